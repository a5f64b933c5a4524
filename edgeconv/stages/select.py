"""Plan: calibration statistics -> plan.json (which experts, in which groups, at which scale), for assemble.

The one stage without a manifest: a plan takes milliseconds, so it is made again on every run and written as the
plain file OUT.work/plan.json; what it decides is keyed downstream (assemble's key holds the plan's sha256).
"""

from __future__ import annotations

from pathlib import Path

from edgeconv.stages.stage import Identity, StageBase


class PlanStage(StageBase):
    name = "plan"
    keyed = False

    def __init__(self, stats: Path, out: Path, *, model: str | Path | None, experts: int | None = None,
                 groups: int | None = None, scoring: str = "do-acp", grouping: str = "none", scaling: str = "cp",
                 seed: int = 0):
        self.stats, self.out, self.model = Path(stats), Path(out), model
        self.experts, self.groups, self.scoring, self.grouping, self.scaling, self.seed = (
            experts, groups, scoring, grouping, scaling, seed)

    def describe(self) -> str:
        k = f"{self.experts} experts in " if self.experts else ""
        g = f"{self.groups} groups" if self.groups else "top-k groups"
        return f"scoring {self.scoring}, grouping {self.grouping}, scaling {self.scaling}: {k}{g} per layer"

    def identity(self) -> Identity:
        return Identity({"stats": str(self.stats)}, {"experts": self.experts, "groups": self.groups,
                                                     "scoring": self.scoring, "grouping": self.grouping,
                                                     "scaling": self.scaling, "seed": self.seed})

    def run(self, tmp: Path) -> dict:
        from edgeconv.calibration.stats import CalibrationStats
        from edgeconv.planning.from_stats import stats_plan

        plan = stats_plan(CalibrationStats.load(self.stats), experts=self.experts, groups=self.groups,
                          scoring=self.scoring, grouping=self.grouping, scaling=self.scaling, seed=self.seed,
                          model=self.model, stats_path=str(self.stats))
        plan.save(self.out)
        return {}
