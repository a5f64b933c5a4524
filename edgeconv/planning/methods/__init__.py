"""The method registries: how experts are scored, grouped and scaled (see docs/method.md, "Plans")."""

from edgeconv.planning.methods import grouping, scaling, scoring
from edgeconv.planning.methods.grouping import GROUPINGS, merge_weights
from edgeconv.planning.methods.scaling import SCALINGS
from edgeconv.planning.methods.scoring import SCORERS, Ranking

__all__ = ["GROUPINGS", "SCALINGS", "SCORERS", "Ranking", "grouping", "merge_weights", "scaling", "scoring"]
