"""`edgeconv sweep`: the paper's study on one MoE. One calibration, every scoring x grouping x scaling x K
evaluated before distillation (prescreen), then the best variants and the paper's default distilled with
one token budget and evaluated (finals), next to a dense-to-dense pruned baseline: one stage list, each stage
resumes (edgeconv/stages/study.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgeconv.config import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS, ConfigError
from edgeconv.families import family_for
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded
from edgeconv.planning.calibration_free import model_ref
from edgeconv.planning.methods import GROUPINGS, SCALINGS, SCORERS
from edgeconv.stages.stage import run_stages
from edgeconv.study.variants import grid, parse_ks, pick

logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    out: Path
    prescreen: list[dict]
    final: list[dict] = field(default_factory=list)
    comparison: dict | None = None


def default_ks(groups: int, num_experts: int) -> list[int]:
    """G, 2G, 4G, ... below the expert count (K = E would select every expert, whatever the scoring)."""
    ks, k = [], groups
    while k < num_experts:
        ks.append(k)
        k *= 2
    return ks or [groups]


@guarded("out", "model", "data", "eval_data", "distill_data", "dense")
def sweep(
    model: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    calibration_tokens: int = CALIBRATION_TOKENS,
    seq_len: int = CALIBRATION_SEQ_LEN,
    scorings: str = "all",
    groupings: str = "all",
    scalings: str = "all",
    ks: str = "auto",
    groups: int | None = None,
    seed: int = 0,
    eval_data: str | Path | None = None,
    eval_options: dict | None = None,
    final_eval_options: dict | None = None,
    jobs: int = 1,
    threads: int | None = None,
    distill_tokens: int = 0,
    top: int = 3,
    distill_data: str | Path | None = None,
    distill_options: dict | None = None,
    dense: str | Path | None = None,
    keep: bool = False,
    progress: bool = True,
) -> SweepResult:
    from edgeconv.demo import CALIBRATION_DATA, DISTILL_DATA, EVAL_DATA
    from edgeconv.stages.calibrate import CalibrateStage
    from edgeconv.stages.study import DenseBaselineStage, FinalsStage, PrescreenStage

    out = Path(out).absolute()
    ckpt = Checkpoint.open(model)
    family = family_for(ckpt.config, str(ckpt.path))
    ref = model_ref(family)
    g = groups or ref.top_k
    k_list = default_ks(g, ref.num_experts) if ks == "auto" else parse_ks(ks)
    variants = grid(pick(scorings, SCORERS, "scoring"), pick(groupings, GROUPINGS, "grouping"),
                    pick(scalings, SCALINGS, "scaling"), k_list, g, ref.num_experts)
    if jobs < 1:
        raise ConfigError(f"{{jobs}} {jobs} must be at least 1", "pass {jobs} 1 to run one variant at a time")
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // jobs)
    eval_data = Path(eval_data) if eval_data else EVAL_DATA
    if distill_tokens:
        from edgeconv.config import DistillConfig

        DistillConfig.make(tokens=distill_tokens, **(distill_options or {}))  # fail before the prescreen
    if dense is not None:
        from edgeconv.study.dense_prune import check_dense_source

        check_dense_source(Checkpoint.open(dense))
    out.mkdir(parents=True, exist_ok=True)
    logger.info(f"sweep: {len(variants)} variants of {ckpt.path.name} (K in {k_list}, G={g}) -> {out}")
    calibrate = CalibrateStage(ckpt.path, data or CALIBRATION_DATA, out / "calibrate", tokens=calibration_tokens,
                               seq_len=seq_len, progress=progress)
    screen = PrescreenStage(ckpt.path, out, stats=calibrate.out, variants=variants, eval_data=eval_data,
                            eval_options=eval_options or {}, seed=seed, jobs=jobs, threads=threads, keep=keep,
                            progress=progress)
    stages = [calibrate, screen]
    if distill_tokens:
        finals = FinalsStage(ckpt.path, out, prescreen=screen, top=top, distill_tokens=distill_tokens,
                             distill_data=distill_data or DISTILL_DATA, distill_options=distill_options or {},
                             eval_data=eval_data, eval_options=final_eval_options or {}, progress=progress)
        stages.append(finals)
        if dense is not None:
            stages.append(DenseBaselineStage(out, Path(dense), finals=finals, prescreen_options=eval_options or {}))
    done = {r.name: r.extra for r in run_stages(stages)}
    result = SweepResult(out, done["prescreen"]["rows"])
    if "finals" in done:
        result.final = done["finals"]["rows"]
    if "dense baseline" in done:
        result.final = result.final + done["dense baseline"]["rows"]
        result.comparison = done["dense baseline"]["comparison"]
    return result
