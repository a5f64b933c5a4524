"""The method registries: how experts are scored, grouped and scaled (see DESIGN.md, "The method")."""

from edgeconv.methods import grouping, scaling, scoring
from edgeconv.methods.grouping import GROUPINGS, merge_weights
from edgeconv.methods.scaling import SCALINGS
from edgeconv.methods.scoring import SCORERS, Ranking

__all__ = ["GROUPINGS", "SCALINGS", "SCORERS", "Ranking", "grouping", "merge_weights", "scaling", "scoring"]
