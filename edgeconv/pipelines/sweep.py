"""`edgeconv sweep`: the paper's study on one MoE. One calibration, every scoring x grouping x scaling x K
evaluated before distillation (prescreen), then the best variants and the paper's default distilled with
one token budget and evaluated, next to a dense-to-dense pruned baseline. Every step resumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded
from edgeconv.planning.calibration_free import model_ref
from edgeconv.planning.methods import GROUPINGS, SCALINGS, SCORERS
from edgeconv.study.prescreen import prescreen
from edgeconv.study.variants import grid, parse_ks, pick


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
    calibration_tokens: int = 65536,
    seq_len: int = 512,
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
    log: Callable[[str], None] = lambda msg: None,
) -> SweepResult:
    from edgeconv.demo import CALIBRATION_DATA, DISTILL_DATA, EVAL_DATA
    from edgeconv.stages.calibrate import calibrate

    out = Path(out).absolute()
    ckpt = Checkpoint.open(model)
    family = family_for(ckpt.config, str(ckpt.path))
    ref = model_ref(family)
    g = groups or ref.top_k
    k_list = default_ks(g, ref.num_experts) if ks == "auto" else parse_ks(ks)
    variants = grid(pick(scorings, SCORERS, "scoring"), pick(groupings, GROUPINGS, "grouping"),
                    pick(scalings, SCALINGS, "scaling"), k_list, g, ref.num_experts)
    if jobs < 1:
        raise EdgeconvError(f"--jobs {jobs} must be at least 1", "pass --jobs 1 to run one variant at a time")
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
    log(f"sweep: {len(variants)} variants of {ckpt.path.name} (K in {k_list}, G={g}) -> {out}")
    cal = calibrate(ckpt.path, data or CALIBRATION_DATA, out / "calibrate", tokens=calibration_tokens,
                    seq_len=seq_len, progress=progress)
    rows = prescreen(ckpt.path, cal.stats(), variants, out, eval_data=eval_data,
                     eval_options=eval_options or {}, seed=seed, jobs=jobs, threads=threads, keep=keep,
                     progress=progress, log=log)
    result = SweepResult(out, rows)
    if distill_tokens:
        from edgeconv.study.finals import run_finals

        result.final, result.comparison = run_finals(
            ckpt.path, out, rows, top=top, distill_tokens=distill_tokens,
            distill_data=distill_data or DISTILL_DATA, distill_options=distill_options or {},
            eval_data=eval_data, eval_options=final_eval_options or {}, prescreen_options=eval_options or {},
            dense=Path(dense) if dense else None, progress=progress, log=log)
    return result
