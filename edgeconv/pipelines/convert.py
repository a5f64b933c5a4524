"""Stages chained: each writes its own directory with a manifest, and is skipped when already done."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded, work_dir
from edgeconv.io.output_dir import check_out_early, claim_work, drop_claim_if_idle
from edgeconv.io.text_data import check_data, check_seq_len
from edgeconv.planning.calibration_free import model_ref
from edgeconv.planning.from_stats import check_plan_args, stats_plan
from edgeconv.stages.assemble import AssembleResult, assemble
from edgeconv.stages.calibrate import calibrate


@dataclass
class ConvertResult:
    out: Path  # the final student: the assembled one, or the distilled one with distill_tokens
    assembled: AssembleResult
    distilled: object | None = None  # edgeconv.stages.distill.DistillResult

    @property
    def manifest(self) -> dict:
        return self.assembled.manifest


@guarded("out", "model", "data", "distill_data", work=True)
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
        from edgeconv.config import DistillConfig

        distill_config = DistillConfig.make(tokens=distill_tokens, **(distill_options or {}))
    if data is None:
        from edgeconv.demo import CALIBRATION_DATA

        data = CALIBRATION_DATA
        log(f"calibrating on the shipped demo text ({data.name}: Shakespeare, Python docs, skills); "
            "pass --data with text like your use case")
    # Everything the last stage's write would refuse is refused now, before an hour of calibration.
    check_out_early(Path(out), force, ("distill",) if distill_config else ("assemble",))
    check_seq_len(ckpt.config, seq_len)
    check_data(data)
    if distill_config and distill_data is not None:
        if not Path(distill_data).exists():
            raise EdgeconvError(f"--distill-data {distill_data} does not exist",
                                "pass text or JSONL files, parquet files (a 'text' column), a datasets directory, "
                                "or a directory of them")
        check_data(distill_data)
    limit = ckpt.config.get("max_position_embeddings")
    if distill_config and limit and distill_config.seq_len > int(limit):
        raise EdgeconvError(f"distillation sequences of {distill_config.seq_len} tokens are longer than the model's "
                            f"context ({limit} positions)",
                            f"run convert without --distill-tokens, then `edgeconv distill --seq-len {limit}`")
    work = work_dir(Path(out))
    claim_work(work, "convert", {
        "model": ckpt.path, "data": Path(data).absolute(), "tokens": tokens, "seq_len": seq_len, "experts": experts,
        "groups": groups, "scoring": scoring, "grouping": grouping, "scaling": scaling, "seed": seed,
        "distill_tokens": distill_tokens, "distill_data": Path(distill_data).absolute() if distill_data else None,
        "distill_options": distill_options if distill_tokens else None}, force)
    try:
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
        from edgeconv.stages.distill import distill

        log(f"[4/4] distill {distill_tokens:,} tokens -> {out}")
        distilled = distill(ckpt.path, dense, distill_data or data, out, distill_config, force=force, progress=progress,
                            log=log)
        if distilled.skipped:
            log("      up to date")
        return ConvertResult(Path(out), result, distilled)
    except BaseException:
        drop_claim_if_idle(work, "convert")  # a run that failed before its first stage leaves nothing
        raise
