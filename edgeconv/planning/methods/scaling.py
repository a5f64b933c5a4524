"""Group output scaling: one factor per group, multiplied into the group's down projection.

Every scaling is `fn(stats, groups) -> list[float]`, registered by name in `SCALINGS`.
"""

from __future__ import annotations

from collections.abc import Callable

from edgeconv.calibration.stats import LayerStats
from edgeconv.registry import Registry

Scaling = Callable[[LayerStats, list[list[int]]], list[float]]
SCALINGS: Registry[Scaling] = Registry("scaling method")


@SCALINGS.register("uniform")
def uniform(stats: LayerStats, groups: list[list[int]]) -> list[float]:
    """Every group's output x 1/groups."""
    # Uniform routing over g groups gives each group weight 1/g (the exactness check's case).
    return [1.0 / len(groups)] * len(groups)


@SCALINGS.register("cp")
def cp(stats: LayerStats, groups: list[list[int]]) -> list[float]:
    """The group's mean routing weight over the tokens routed to any of its experts."""
    scales = []
    for group in groups:
        count = float(stats.count[group].sum())
        scales.append(float(stats.weight_sum[group].sum()) / count if count > 0 else 0.0)
    return scales
