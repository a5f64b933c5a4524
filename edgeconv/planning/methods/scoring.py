"""Expert scoring: rank one MoE layer's experts and pick the k to keep.

Every scorer is `fn(stats, k, generator) -> Ranking`, registered by name in `SCORERS`. A ranking keeps the
per-expert score vectors it was made from, so a plan report can show why an expert was kept.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgeconv.calibration.stats import LayerStats
from edgeconv.errors import EdgeconvError
from edgeconv.registry import Registry


@dataclass
class Ranking:
    selected: list[int]  # expert ids in selection order, length k
    scores: dict[str, list[float]]  # named per-expert vectors, length E


Scorer = Callable[[LayerStats, int, torch.Generator], Ranking]
SCORERS: Registry[Scorer] = Registry("scoring method")

# Used when every expert has zero ACP, so that log det(K_S + lambda I) stays defined.
TINY_LAMBDA = 1e-12


def scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Register a scorer; the registered function checks k against E before calling it."""

    def wrap(fn: Scorer) -> Scorer:
        @functools.wraps(fn)
        def checked(stats: LayerStats, k: int, generator: torch.Generator) -> Ranking:
            num = stats.num_experts
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num:
                raise EdgeconvError(
                    f"cannot select k={k} experts from a layer with E={num} experts",
                    f"choose K between 1 and {num}",
                )
            return fn(stats, k, generator)

        return SCORERS.register(name)(checked)

    return wrap


def top_k(score: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores; ties go to the lowest index (stable)."""
    values = score.tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def _ranked(name: str, score: torch.Tensor, k: int) -> Ranking:
    score = score.to(torch.float64)
    return Ranking(top_k(score, k), {name: score.tolist()})


def acp(stats: LayerStats) -> torch.Tensor:
    """ACP_e = cp_e * sqrt(E) * mean ||f_e(x)||^2 over routed tokens."""
    return stats.cp * math.sqrt(stats.num_experts) * stats.mean_norm_sq


def cosine(gram: torch.Tensor) -> torch.Tensor:
    """Gram matrix -> cosine similarity. An expert with a zero diagonal (never produced output) is
    similar to nothing but itself: its row and column are 0 except C_ii = 1."""
    gram = gram.to(torch.float64)
    diag = gram.diagonal()
    inv = torch.where(diag > 0, diag.clamp(min=0).rsqrt(), torch.zeros_like(diag))
    c = gram * inv[:, None] * inv[None, :]
    c.fill_diagonal_(1.0)
    return c


def greedy_logdet(kernel: torch.Tensor, k: int, lam: float) -> tuple[list[int], torch.Tensor]:
    """Greedy MAP for a DPP with L = kernel + lam*I (Chen et al. 2018, incremental Cholesky), O(E k^2).

    The marginal gain of adding i to the chosen set S is log d_i^2, where d_i^2 = L_ii - ||c_i||^2 is
    the Schur complement of L_SS in L_{S+i}. Returns the chosen ids and a [E] vector of gains: the gain
    of each chosen expert at the step it was chosen, and for the others their gain at the last step.
    """
    num = kernel.shape[0]
    big_l = kernel.to(torch.float64) + lam * torch.eye(num, dtype=torch.float64)
    d2 = big_l.diagonal().clone()
    rows = torch.zeros(k, num, dtype=torch.float64)  # rows[t, i] = t-th Cholesky coordinate of i
    chosen: list[int] = []
    taken = torch.zeros(num, dtype=torch.bool)
    recorded = torch.empty(num, dtype=torch.float64)
    for step in range(k):
        # Rounding can push a redundant expert's Schur complement to <= 0; it then has ~no gain.
        gain = d2.clamp(min=torch.finfo(torch.float64).tiny).log()
        gain[taken] = -math.inf
        j = int(torch.argmax(gain))  # first maximum: ties go to the lowest index
        if step == k - 1:
            recorded[~taken] = gain[~taken]
        recorded[j] = gain[j]
        chosen.append(j)
        taken[j] = True
        if step == k - 1:
            break
        dj = math.sqrt(max(float(d2[j]), torch.finfo(torch.float64).tiny))
        e = (big_l[j] - rows[:step, j] @ rows[:step]) / dj
        rows[step] = e
        d2 = d2 - e * e
    return chosen, recorded


@scorer("random")
def random_scores(stats: LayerStats, k: int, generator: torch.Generator) -> Ranking:
    """Seeded random scores: the baseline every method must beat."""
    return _ranked("random", torch.rand(stats.num_experts, generator=generator, dtype=torch.float64), k)


@scorer("frequency")
def frequency(stats: LayerStats, k: int, generator: torch.Generator) -> Ranking:
    """SF: how many tokens the router sent to the expert."""
    return _ranked("frequency", stats.count, k)


@scorer("cp")
def cp(stats: LayerStats, k: int, generator: torch.Generator) -> Ranking:
    """CP: mean routing weight over the tokens routed to the expert."""
    return _ranked("cp", stats.cp, k)


@scorer("ean")
def ean(stats: LayerStats, k: int, generator: torch.Generator) -> Ranking:
    """EAN: sum of ||f_e(x)|| over the tokens routed to the expert."""
    # A sum, not a mean: EAN rewards experts that are both used often and produce large outputs.
    return _ranked("ean", stats.norm_sum, k)


@scorer("reap")
def reap(stats: LayerStats, k: int, generator: torch.Generator) -> Ranking:
    """REAP: mean of g_e(x) * ||f_e(x)|| over routed tokens (router weight times output size)."""
    return _ranked("reap", stats.reap, k)


@scorer("acp")
def acp_scores(stats: LayerStats, k: int, generator: torch.Generator) -> Ranking:
    """ACP: cp_e * sqrt(E) * mean ||f_e(x)||^2."""
    return _ranked("acp", acp(stats), k)


@scorer("do-acp")
def do_acp(stats: LayerStats, k: int, generator: torch.Generator) -> Ranking:
    """Diversity-aware ACP: important experts whose outputs are not redundant with each other."""
    score = acp(stats).clamp(min=0)
    root = score.sqrt()
    kernel = root[:, None] * root[None, :] * cosine(stats.gram)  # K_ii = ACP_i
    lam = float(kernel.diagonal().mean()) / k
    chosen, gains = greedy_logdet(kernel, k, lam if lam > 0 else TINY_LAMBDA)
    return Ranking(chosen, {"acp": score.tolist(), "do_acp_gain": gains.tolist()})
