"""A SwiGLU feed-forward block in one canonical layout, whatever the checkpoint stored.

gate/up are [width, hidden] and down is [hidden, width], as in torch.nn.Linear. Biases are optional (only
GPT-OSS has them). Concatenating blocks along `width` adds their outputs, which is what makes a pruned MoE
layer a dense one: every activation here acts on one neuron at a time, so neurons of different experts never
mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Ffn:
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    @property
    def has_bias(self) -> bool:
        return self.gate_bias is not None

    def float(self) -> Ffn:
        return self.to(torch.float32)

    def to(self, dtype: torch.dtype) -> Ffn:
        return Ffn(*(t.to(dtype) if t is not None else None for t in self._parts()))

    def _parts(self):
        return (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)

    def scaled(self, scale: float) -> Ffn:
        """Multiply the block's output by `scale` (down projection and its bias)."""
        bias = self.down_bias * scale if self.down_bias is not None else None
        return Ffn(self.gate, self.up, self.down * scale, self.gate_bias, self.up_bias, bias)


# Above this width the assignment problem (O(width^3), a width x width cost matrix) costs more than it is
# worth at conversion time; such experts are averaged in stored order, and the manifest says so.
MAX_ALIGN_WIDTH = 4096


def permuted(ffn: Ffn, perm: torch.Tensor) -> Ffn:
    """The same function with its neurons reordered: row i of the result is neuron perm[i] of `ffn`."""
    pick = lambda t: t[perm] if t is not None else None  # noqa: E731
    return Ffn(ffn.gate[perm], ffn.up[perm], ffn.down[:, perm], pick(ffn.gate_bias), pick(ffn.up_bias), ffn.down_bias)


def align_to(reference: Ffn, other: Ffn) -> Ffn:
    """Reorder `other`'s neurons to best match `reference`'s (weight matching, as M-SMoE does).

    A SwiGLU expert is unchanged by permuting its neurons, but two experts' neuron i need not compute
    anything alike, so averaging them unaligned blurs both. The permutation maximises the summed inner
    product of matched gate and up rows (a linear assignment problem).
    """
    from scipy.optimize import linear_sum_assignment

    ref = torch.cat([reference.gate, reference.up], dim=1).double()
    oth = torch.cat([other.gate, other.up], dim=1).double()
    _, cols = linear_sum_assignment((ref @ oth.t()).numpy(), maximize=True)
    return permuted(other, torch.from_numpy(cols))


def weighted_average(blocks: list[Ffn], weights: list[float], align: bool = False) -> Ffn:
    """Parameter average; with `align`, every block's neurons are first matched to the first block's."""
    if len(blocks) == 1:
        return blocks[0]
    if align:
        blocks = [blocks[0]] + [align_to(blocks[0], b) for b in blocks[1:]]

    def avg(parts):
        if parts[0] is None:
            return None
        return sum(w * p for w, p in zip(weights, parts))

    return Ffn(*(avg([b._parts()[i] for b in blocks]) for i in range(6)))


def concat(blocks: list[Ffn], width: int | None = None) -> Ffn:
    """Stack blocks along the neuron axis; zero-pad to `width` (zero neurons output exactly zero).

    Down biases add up: each block's output carries its own bias.
    """
    with_bias = any(b.has_bias for b in blocks)
    hidden = blocks[0].gate.shape[1]
    dtype = blocks[0].gate.dtype
    gates, ups, downs, gbs, ubs = [], [], [], [], []
    down_bias = torch.zeros(hidden, dtype=torch.float32) if with_bias else None  # summed in fp32, rounded once
    for b in blocks:
        gates.append(b.gate)
        ups.append(b.up)
        downs.append(b.down)
        if with_bias:
            gbs.append(b.gate_bias if b.gate_bias is not None else torch.zeros(b.width, dtype=dtype))
            ubs.append(b.up_bias if b.up_bias is not None else torch.zeros(b.width, dtype=dtype))
            if b.down_bias is not None:
                down_bias += b.down_bias.float()
    total = sum(b.width for b in blocks)
    if width is not None and width > total:
        pad = width - total
        gates.append(torch.zeros(pad, hidden, dtype=dtype))
        ups.append(torch.zeros(pad, hidden, dtype=dtype))
        downs.append(torch.zeros(hidden, pad, dtype=dtype))
        if with_bias:
            gbs.append(torch.zeros(pad, dtype=dtype))
            ubs.append(torch.zeros(pad, dtype=dtype))
    return Ffn(
        torch.cat(gates, 0),
        torch.cat(ups, 0),
        torch.cat(downs, 1),
        torch.cat(gbs) if with_bias else None,
        torch.cat(ubs) if with_bias else None,
        down_bias.to(dtype) if with_bias else None,
    )
