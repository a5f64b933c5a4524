"""Expert grouping: partition the selected experts of one layer into g groups, each merged into one block.

Every grouping is `fn(stats, selected, groups, generator, weights=None) -> list[list[int]]`, registered by
name in `GROUPINGS`. The registered function validates its input and returns groups in a canonical order:
within a group by descending count (ties: lower id), so a group's first expert is its most frequent
("centre"); groups by the position of their first expert in `selected`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from edgeconv.calibration.stats import LayerStats
from edgeconv.errors import EdgeconvError
from edgeconv.planning.methods.scoring import cosine
from edgeconv.registry import Registry

Grouping = Callable[..., list[list[int]]]
GROUPINGS: Registry[Grouping] = Registry("grouping method")

KMEANS_MAX_ITERS = 100


def grouping(name: str) -> Callable[[Grouping], Grouping]:
    """Register a grouping; the registered function validates input and orders its output."""

    def wrap(fn: Grouping) -> Grouping:
        @functools.wraps(fn)
        def checked(stats, selected, groups, generator, weights=None):
            selected = [int(e) for e in selected]
            if len(set(selected)) != len(selected) or any(not 0 <= e < stats.num_experts for e in selected):
                raise EdgeconvError(
                    f"selected experts {selected} must be distinct ids below E={stats.num_experts}",
                    "select each expert at most once",
                )
            if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= len(selected):
                raise EdgeconvError(f"K={len(selected)} experts cannot form {groups} groups", "choose K >= groups")
            return canonical(stats, selected, fn(stats, selected, groups, generator, weights))

        return GROUPINGS.register(name)(checked)

    return wrap


def canonical(stats: LayerStats, selected: list[int], parts: list[list[int]]) -> list[list[int]]:
    count = stats.count.tolist()
    parts = [sorted(p, key=lambda e: (-count[e], e)) for p in parts if p]
    position = {e: i for i, e in enumerate(selected)}
    return sorted(parts, key=lambda p: position[p[0]])


def merge_weights(stats: LayerStats, group: list[int]) -> list[float]:
    """Frequency-weighted parameter averaging weights (sum to 1; uniform if the group was never routed)."""
    counts = stats.count[group].to(torch.float64)
    total = float(counts.sum())
    if total <= 0:
        return [1.0 / len(group)] * len(group)
    return (counts / total).tolist()


@grouping("none")
def none(stats, selected, groups, generator, weights=None):
    """Pure pruning: every kept expert is its own group (K = groups)."""
    if len(selected) != groups:
        raise EdgeconvError(
            f"grouping 'none' keeps each of the K={len(selected)} experts as its own group, "
            f"but {groups} groups were asked for",
            "use a clustering grouping (weight-cluster, output-cluster, dominant, random) or set K = groups",
        )
    return [[e] for e in selected]


@grouping("random")
def random_groups(stats, selected, groups, generator, weights=None):
    """Seeded random partition into near-equal groups: the grouping baseline."""
    order = torch.randperm(len(selected), generator=generator).tolist()
    # Near-equal parts: the first len % groups parts get one extra expert.
    size, extra = divmod(len(selected), groups)
    parts, start = [], 0
    for g in range(groups):
        end = start + size + (g < extra)
        parts.append([selected[i] for i in order[start:end]])
        start = end
    return parts


@grouping("dominant")
def dominant(stats, selected, groups, generator, weights=None):
    """M-SMoE: the most frequent experts are centres; the rest join their most similar centre."""
    count = stats.count.tolist()
    by_freq = sorted(selected, key=lambda e: (-count[e], e))
    centres, rest = by_freq[:groups], by_freq[groups:]
    sim = cosine(stats.gram)
    parts = [[c] for c in centres]
    for e in rest:
        # argmax takes the first maximum, i.e. the more frequent centre on a tie.
        parts[int(torch.argmax(sim[e, centres]))].append(e)
    return parts


@grouping("output-cluster")
def output_cluster(stats, selected, groups, generator, weights=None):
    """HC-SMoE: average-linkage agglomerative clustering on cosine distance of mean routed outputs."""
    out = stats.out_mean[selected].to(torch.float64)
    norm = out.norm(dim=1)
    unit = out / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]
    # A zero output (never routed) has cosine 0 with every other expert: distance 1.
    labels = average_linkage(1.0 - unit @ unit.T, groups)
    return [[e for e, lab in zip(selected, labels) if lab == c] for c in range(groups)]


def average_linkage(dist: torch.Tensor, clusters: int) -> list[int]:
    """UPGMA on a [n, n] distance matrix, merged until `clusters` remain; returns a label per point.
    Ties merge the pair with the lowest (row, column) indices. O(n^3), fine for n <= a few hundred."""
    n = dist.shape[0]
    d = dist.clone().to(torch.float64)
    d.fill_diagonal_(float("inf"))
    size = [1] * n
    members = [[i] for i in range(n)]
    alive = n
    while alive > clusters:
        flat = int(torch.argmin(d))
        a, b = divmod(flat, n)  # a < b: the first minimum of a symmetric matrix is above the diagonal
        # Size-weighted mean of the average distances: exact average linkage of the merged cluster.
        merged = (size[a] * d[a] + size[b] * d[b]) / (size[a] + size[b])
        d[a], d[:, a] = merged, merged
        d[a, a] = float("inf")
        d[b], d[:, b] = float("inf"), float("inf")
        size[a] += size[b]
        members[a] += members[b]
        members[b] = []
        alive -= 1
    labels = [0] * n
    for label, group in enumerate(m for m in members if m):
        for i in group:
            labels[i] = label
    return labels


@grouping("weight-cluster")
def weight_cluster(stats, selected, groups, generator, weights=None):
    """k-means (k-means++ init from the generator) on the selected experts' flattened weights."""
    if weights is None:
        raise EdgeconvError(
            "grouping 'weight-cluster' needs the selected experts' weights",
            "pass weights=[K, D] flattened expert weights, or use output-cluster / dominant",
        )
    if weights.dim() != 2 or weights.shape[0] != len(selected):
        raise EdgeconvError(
            f"weights for weight-cluster have shape {tuple(weights.shape)}, expected [{len(selected)}, D]",
            "pass one flattened row per selected expert, in selection order",
        )
    x = weights if weights.dtype in (torch.float32, torch.float64) else weights.float()
    labels = kmeans(x, groups, generator)
    return [[e for e, lab in zip(selected, labels) if lab == c] for c in range(groups)]


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """Lloyd's k-means from a k-means++ start, until assignments are stable or KMEANS_MAX_ITERS."""
    centres = kmeans_pp(x, k, generator)
    assign = None
    for _ in range(KMEANS_MAX_ITERS):
        dist = torch.cdist(x, centres)
        new = fill_empty(dist, torch.argmin(dist, dim=1), k)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centres = torch.stack([x[assign == c].mean(dim=0) for c in range(k)])
    return assign.tolist()


def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    d2 = torch.cdist(x, x[chosen]).squeeze(1).double() ** 2
    for _ in range(1, k):
        if float(d2.sum()) > 0:
            nxt = int(torch.multinomial(d2, 1, generator=generator))
        else:  # every point coincides with a centre: take the first unused one
            nxt = next(i for i in range(n) if i not in chosen)
        chosen.append(nxt)
        d2 = torch.minimum(d2, torch.cdist(x, x[nxt : nxt + 1]).squeeze(1).double() ** 2)
    return x[chosen].clone()


def fill_empty(dist: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Re-seed each empty cluster with the point farthest from its centre, taken from a cluster with more
    than one member (one always exists while n >= k), so no group comes out empty."""
    assign = assign.clone()
    for c in range(k):
        if (assign == c).any():
            continue
        sizes = torch.bincount(assign, minlength=k)
        own = dist.gather(1, assign[:, None]).squeeze(1)
        own[sizes[assign] <= 1] = -1.0
        assign[int(torch.argmax(own))] = c
    return assign
