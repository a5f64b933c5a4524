"""Stages chained: each writes its own directory with a manifest, and is skipped when already done."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeconv.families import family_for
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.stages.assemble import AssembleResult, assemble
from edgeconv.stages.calibrate import calibrate
from edgeconv.stats_planner import check_plan_args, stats_plan
from edgeconv.simple_planner import model_ref


@dataclass
class ConvertResult:
    out: Path  # the final student: the assembled one, or the distilled one with distill_tokens
    assembled: AssembleResult
    distilled: object | None = None  # edgeconv.distill.stage.DistillResult

    @property
    def manifest(self) -> dict:
        return self.assembled.manifest


def work_dir(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f"{out.name}.work"


def convert(
    model: str | Path,
    out: str | Path,
    *,
    data: str | Path | None,
    tokens: int = 65536,
    seq_len: int = 512,
    experts: int | None = None,
    groups: int | None = None,
    scoring: str = "do-acp",
    grouping: str = "none",
    scaling: str = "cp",
    seed: int = 0,
    distill_tokens: int = 0,
    distill_data: str | Path | None = None,
    distill_options: dict | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> ConvertResult:
    """calibrate -> plan -> assemble [-> distill], validating every argument before the first heavy step.
    With `distill_tokens`, the assembled student goes to OUT.work/assembled and the distilled one to OUT."""
    ckpt = Checkpoint.open(model)
    family = family_for(ckpt.config, str(ckpt.path))
    check_plan_args(model_ref(family), experts, groups, scoring, grouping, scaling)
    distill_config = None
    if distill_tokens:
        from edgeconv.distill.config import DistillConfig

        distill_config = DistillConfig.make(tokens=distill_tokens, **(distill_options or {}))
    if data is None:
        from edgeconv.demo import CALIBRATION_DATA

        data = CALIBRATION_DATA
        log(f"calibrating on the shipped demo text ({data.name}: Shakespeare, Python docs, skills); "
            "pass --data with text like your use case")
    work = work_dir(Path(out))
    work.mkdir(parents=True, exist_ok=True)
    n = 4 if distill_config else 3
    log(f"[1/{n}] calibrate -> {work / 'calibrate'}")
    cal = calibrate(ckpt.path, data, work / "calibrate", tokens=tokens, seq_len=seq_len, force=force,
                    progress=progress)
    if cal.skipped:
        log("      up to date")
    log(f"[2/{n}] plan -> {work / 'plan.json'}")
    plan = stats_plan(cal.stats(), experts=experts, groups=groups, scoring=scoring, grouping=grouping,
                      scaling=scaling, seed=seed, model=ckpt.path, stats_path=str(cal.out))
    plan.save(work / "plan.json")
    dense = work / "assembled" if distill_config else Path(out)
    log(f"[3/{n}] assemble -> {dense}")
    result = assemble(ckpt.path, plan, dense, force=force, progress=progress)
    if result.skipped:
        log("      up to date")
    if not distill_config:
        return ConvertResult(Path(out), result)
    from edgeconv.distill.stage import distill

    log(f"[4/4] distill {distill_tokens:,} tokens -> {out}")
    distilled = distill(ckpt.path, dense, distill_data or data, out, distill_config, force=force, progress=progress,
                        log=log)
    if distilled.skipped:
        log("      up to date")
    return ConvertResult(Path(out), result, distilled)
