"""`edgeconv convert`: calibrate -> plan -> assemble [-> distill], one stage list run by edgeconv.stages.stage.

Statistics, the plan (and, with distillation, the assembled student) go to OUT.work/; each stage writes its own
directory with a manifest and is skipped when already done. Every argument is checked before the first stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from edgeconv.config import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS, ConfigError, literal
from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded, work_dir
from edgeconv.io.output_dir import check_out_early
from edgeconv.io.text_data import check_data, check_seq_len
from edgeconv.planning.calibration_free import model_ref
from edgeconv.planning.from_stats import check_plan_args
from edgeconv.stages.assemble import AssembleStage
from edgeconv.stages.calibrate import CalibrateStage
from edgeconv.stages.select import PlanStage
from edgeconv.stages.stage import Stage, StageResult, run_pipeline

logger = logging.getLogger(__name__)


@dataclass
class ConvertResult:
    out: Path  # the final student: the assembled one, or the distilled one with distill_tokens
    assembled: StageResult
    distilled: StageResult | None = None
    stages: list[StageResult] = field(default_factory=list)  # every stage's result, in order

    @property
    def manifest(self) -> dict:
        return self.assembled.manifest

    @classmethod
    def of(cls, out: Path, results: list[StageResult]) -> ConvertResult:
        by_name = {r.name: r for r in results}
        return cls(Path(out), by_name["assemble"], by_name.get("distill"), results)


def convert_stages(model: str | Path, out: Path, *, data: str | Path | None, tokens: int = CALIBRATION_TOKENS,
                   seq_len: int = CALIBRATION_SEQ_LEN, experts: int | None = None, groups: int | None = None,
                   scoring: str = "do-acp", grouping: str = "none", scaling: str = "cp", seed: int = 0,
                   distill_config=None, distill_data: str | Path | None = None,
                   progress: bool = True) -> list[Stage]:
    """The stages, in order (nothing is read or checked here: --dry-run prints them). With `distill_config` the
    assembled student goes to OUT.work/assembled and the distilled one to OUT."""
    work = work_dir(Path(out))
    dense = work / "assembled" if distill_config else Path(out)
    stages: list[Stage] = [
        CalibrateStage(model, data, work / "calibrate", tokens=tokens, seq_len=seq_len, progress=progress),
        PlanStage(work / "calibrate", work / "plan.json", model=model, experts=experts, groups=groups,
                  scoring=scoring, grouping=grouping, scaling=scaling, seed=seed),
        AssembleStage(model, work / "plan.json", dense, progress=progress),
    ]
    if distill_config:
        from edgeconv.stages.distill import DistillStage

        stages.append(DistillStage(model, dense, distill_data or data, out, distill_config, progress=progress))
    return stages


@dataclass
class CheckedConvert:
    """A convert whose arguments passed every check: the resolved model and data, and its run record."""

    model: Path
    data: str | Path
    distill_config: object | None  # edgeconv.config.DistillConfig
    record: dict


def check_convert(model: str | Path, out: str | Path, *, data: str | Path | None, tokens: int = CALIBRATION_TOKENS,
                  seq_len: int = CALIBRATION_SEQ_LEN, experts: int | None = None, groups: int | None = None,
                  scoring: str = "do-acp", grouping: str = "none", scaling: str = "cp", seed: int = 0,
                  distill_tokens: int = 0, distill_data: str | Path | None = None, distill_options: dict | None = None,
                  force: bool = False) -> CheckedConvert:
    """Every argument checked before the first heavy step; without `data`, the shipped demo text (said so)."""
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
        logger.info(f"calibrating on the shipped demo text ({data.name}: Shakespeare, Python docs, skills); "
                    "pass --data with text like your use case")
    # Everything the last stage's write would refuse is refused now, before an hour of calibration.
    check_out_early(Path(out), force, ("distill",) if distill_config else ("assemble",))
    check_seq_len(ckpt.config, seq_len)
    check_data(data)
    if distill_config and distill_data is not None:
        if not Path(distill_data).exists():
            raise ConfigError(f"{{distill_data}} {literal(distill_data)} does not exist",
                              "pass text or JSONL files, parquet files (a 'text' column), a datasets directory, "
                              "or a directory of them")
        check_data(distill_data)
    limit = ckpt.config.get("max_position_embeddings")
    if distill_config and limit and distill_config.seq_len > int(limit):
        raise EdgeconvError(f"distillation sequences of {distill_config.seq_len} tokens are longer than the model's "
                            f"context ({limit} positions)",
                            f"run convert without --distill-tokens, then `edgeconv distill --seq-len {limit}`")
    record = {
        "model": ckpt.path, "data": Path(data).absolute(), "tokens": tokens, "seq_len": seq_len, "experts": experts,
        "groups": groups, "scoring": scoring, "grouping": grouping, "scaling": scaling, "seed": seed,
        "distill_tokens": distill_tokens, "distill_data": Path(distill_data).absolute() if distill_data else None,
        "distill_options": distill_options if distill_tokens else None}
    return CheckedConvert(ckpt.path, data, distill_config, record)


@guarded("out", "model", "data", "distill_data", work=True)
def convert(
    model: str | Path,
    out: str | Path,
    *,
    data: str | Path | None,
    tokens: int = CALIBRATION_TOKENS,
    seq_len: int = CALIBRATION_SEQ_LEN,
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
) -> ConvertResult:
    """calibrate -> plan -> assemble [-> distill], validating every argument before the first heavy step.
    With `distill_tokens`, the assembled student goes to OUT.work/assembled and the distilled one to OUT."""
    method = {"experts": experts, "groups": groups, "scoring": scoring, "grouping": grouping, "scaling": scaling,
              "seed": seed}
    checked = check_convert(model, out, data=data, tokens=tokens, seq_len=seq_len, **method,
                            distill_tokens=distill_tokens, distill_data=distill_data, distill_options=distill_options,
                            force=force)
    stages = convert_stages(checked.model, Path(out), data=checked.data, tokens=tokens, seq_len=seq_len, **method,
                            distill_config=checked.distill_config, distill_data=distill_data, progress=progress)
    results = run_pipeline(stages, work=work_dir(Path(out)), command="convert", record=checked.record, force=force)
    return ConvertResult.of(Path(out), results)
