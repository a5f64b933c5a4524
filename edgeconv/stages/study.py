"""The study's stages (`edgeconv sweep` after its calibration): prescreen, finals, dense-to-dense baseline.

They keep no manifest (`keyed = False`): each resumes from its own JSONL rows (one per variant or model, appended
as soon as it is known) and the assemble / prune / distill runs inside them are keyed stages of their own. The
methods are edgeconv/study/ (prescreen.py, finals.py); these classes put them in the sweep's stage list.
"""

from __future__ import annotations

from pathlib import Path

from edgeconv.stages.stage import Identity, StageBase


class PrescreenStage(StageBase):
    name = "prescreen"
    keyed = False

    def __init__(self, model: Path, root: Path, *, stats: Path, variants: list, eval_data: Path, eval_options: dict,
                 seed: int = 0, jobs: int = 1, threads: int = 1, keep: bool = False, progress: bool = True):
        from edgeconv.study.prescreen import ROWS

        self.model, self.root, self.stats, self.variants = model, Path(root), Path(stats), variants
        self.out = self.root / ROWS
        self.eval_data, self.eval_options, self.seed = eval_data, eval_options, seed
        self.jobs, self.threads, self.keep, self.progress = jobs, threads, keep, progress
        self.rows: list[dict] = []

    def describe(self) -> str:
        return (f"{len(self.variants)} variants planned, assembled and evaluated before distillation, "
                f"{self.jobs} at a time")

    def identity(self) -> Identity:
        return Identity({"stats": str(self.stats)}, {"variants": [v.name for v in self.variants], "seed": self.seed,
                                                     "eval": self.eval_options})

    def run(self, tmp: Path) -> dict:
        from edgeconv.calibration.stats import CalibrationStats
        from edgeconv.study.prescreen import prescreen

        self.rows = prescreen(self.model, CalibrationStats.load(self.stats), self.variants, self.root,
                              eval_data=self.eval_data, eval_options=self.eval_options, seed=self.seed, jobs=self.jobs,
                              threads=self.threads, keep=self.keep, progress=self.progress)
        return {"rows": self.rows}


class FinalsStage(StageBase):
    """The paper's default and the `top` best prescreen variants (from `prescreen`'s rows) distilled and evaluated,
    with the teacher as the reference."""

    name = "finals"
    keyed = False

    def __init__(self, model: Path, root: Path, *, prescreen: PrescreenStage, top: int, distill_tokens: int,
                 distill_data: Path, distill_options: dict, eval_data: Path, eval_options: dict,
                 progress: bool = True):
        from edgeconv.study.finals import ROWS

        self.model, self.root, self.prescreen, self.top = model, Path(root), prescreen, top
        self.out = self.root / ROWS
        self.distill = {"distill_tokens": distill_tokens, "distill_data": distill_data,
                        "distill_options": distill_options}
        self.eval_data, self.eval_options, self.progress = eval_data, eval_options, progress
        self.rows: list[dict] = []

    def describe(self) -> str:
        return (f"the paper's default and the {self.top} best variants distilled "
                f"({self.distill['distill_tokens']:,} tokens each) and evaluated, next to the teacher")

    def identity(self) -> Identity:
        return Identity({"prescreen": str(self.prescreen.out)}, {"top": self.top, **self.distill,
                                                                 "eval": self.eval_options})

    def run(self, tmp: Path) -> dict:
        from edgeconv.study.finals import run_finals

        self.rows = run_finals(self.model, self.root, self.prescreen.rows, top=self.top, **self.distill,
                               eval_data=self.eval_data, eval_options=self.eval_options, progress=self.progress)
        return {"rows": self.rows}


class DenseBaselineStage(StageBase):
    """A dense model width-pruned to the finalists' size, distilled from itself with the same budget, evaluated."""

    name = "dense baseline"
    keyed = False

    def __init__(self, root: Path, dense: Path, *, finals: FinalsStage, prescreen_options: dict):
        self.root, self.dense, self.finals, self.prescreen_options = Path(root), Path(dense), finals, prescreen_options
        self.out = self.root / "final" / "dense-to-dense"
        self.rows: list[dict] = []
        self.comparison: dict | None = None

    def describe(self) -> str:
        return f"{self.dense.name} pruned to the students' size, distilled with the same budget, evaluated"

    def identity(self) -> Identity:
        return Identity({"dense": str(self.dense)}, {"prescreen": self.prescreen_options})

    def run(self, tmp: Path) -> dict:
        from edgeconv.study.finals import run_dense_baseline

        f = self.finals
        self.rows, self.comparison = run_dense_baseline(
            self.root, f.prescreen.rows, self.dense, top=f.top, **f.distill, eval_data=f.eval_data,
            eval_options=f.eval_options, prescreen_options=self.prescreen_options, progress=f.progress)
        return {"rows": self.rows, "comparison": self.comparison}
