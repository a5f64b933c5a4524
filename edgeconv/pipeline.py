"""Stages chained: each writes its own directory with a manifest, and is skipped when already done."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.stages.assemble import AssembleResult, assemble
from edgeconv.stages.calibrate import calibrate
from edgeconv.stats_planner import check_plan_args, stats_plan
from edgeconv.simple_planner import model_ref


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
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> AssembleResult:
    """calibrate -> plan -> assemble, validating every argument before the first heavy step."""
    ckpt = Checkpoint.open(model)
    family = family_for(ckpt.config, str(ckpt.path))
    check_plan_args(model_ref(family), experts, groups, scoring, grouping, scaling)
    if data is None:
        from edgeconv.demo import CALIBRATION_DATA

        data = CALIBRATION_DATA
        log(f"calibrating on the shipped demo text ({data.name}: Shakespeare, Python docs, skills); "
            "pass --data with text like your use case")
    work = work_dir(Path(out))
    work.mkdir(parents=True, exist_ok=True)
    log(f"[1/3] calibrate -> {work / 'calibrate'}")
    cal = calibrate(ckpt.path, data, work / "calibrate", tokens=tokens, seq_len=seq_len, force=force,
                    progress=progress)
    if cal.skipped:
        log("      up to date")
    log(f"[2/3] plan -> {work / 'plan.json'}")
    plan = stats_plan(cal.stats(), experts=experts, groups=groups, scoring=scoring, grouping=grouping,
                      scaling=scaling, seed=seed, model=ckpt.path, stats_path=str(cal.out))
    plan.save(work / "plan.json")
    log(f"[3/3] assemble -> {out}")
    result = assemble(ckpt.path, plan, out, force=force, progress=progress)
    if result.skipped:
        log("      up to date")
    return result
