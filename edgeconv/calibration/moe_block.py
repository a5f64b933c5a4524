"""A MoE block computed from the weights in the files, as transformers computes it, whatever the on-disk layout.

`RoutedMoeBlock` replaces the forward of the transformers MoE module of one layer when a model runs one layer at
a time (edgeconv.forward.layer_runner): it routes, runs each routed expert on its tokens, adds the shared expert
(gated, for Qwen2-MoE), and returns what the module would. The family adapter reads the experts, so per-expert,
fused (transformers 5.x) and MXFP4 (GPT-OSS) checkpoints all work.

It is built in two steps, so that a layer can be read on a background thread while the previous one computes:
the constructor reads the tensors in the dtype they are stored in (held on the CPU); `materialize(device)` casts
them to the compute dtype and moves them to the device, one expert at a time, just before the layer runs (or at
the first call). A prefetched layer therefore holds its stored (usually bf16) bytes, not fp32 copies.
With `cast_on_use`, the experts stay as stored and each is cast when tokens are routed to it, then dropped: for a
single pass over a few tokens (the parity reference) the layer then costs its stored bytes, not fp32 copies of
every expert (2.4 GB for a Qwen3-30B-A3B layer), at the price of one cast per expert per call.

`CalibratedMoeBlock` is the same computation collecting expert statistics as it goes (calibration): it
accumulates what the scorers need from the very expert outputs of the forward, so the statistics cost little
beyond the forward itself. Every expert also runs on a strided sample of tokens (the shared sample) for the Gram
matrix.
"""

from __future__ import annotations

import torch

from edgeconv.calibration.stats import LayerStats
from edgeconv.families.base import MoEFamily
from edgeconv.families.ffn import Ffn
from edgeconv.io.checkpoint import Checkpoint


def _moved(ffn: Ffn, device: torch.device, dtype: torch.dtype) -> Ffn:
    return Ffn(*(t.to(device=device, dtype=dtype) if t is not None else None for t in ffn._parts()))


class RoutedMoeBlock:
    """The MoE block of `layer`: router, routed experts and shared expert, read from `ckpt` by the adapter."""

    def __init__(self, family: MoEFamily, ckpt: Checkpoint, layer: int, dtype: torch.dtype = torch.float32,
                 cast_on_use: bool = False):
        self.family, self.layer, self.dtype, self.cast_on_use = family, layer, dtype, cast_on_use
        self.router_weight, self.router_bias = family.read_router(ckpt, layer)
        self.experts = [family.read_expert(ckpt, layer, e) for e in range(family.num_experts)]
        self.shared = family.read_shared(ckpt, layer)
        self.shared_gate = family.read_shared_gate(ckpt, layer)
        self.routed_scale = family.routed_scale()
        self.device: torch.device | None = None  # set by materialize

    def materialize(self, device: torch.device | str = "cpu") -> RoutedMoeBlock:
        """Cast every tensor to the compute dtype on `device` (one expert at a time: the stored copy of each is
        released as its cast copy is made, so the transient is one expert, not a layer)."""
        device = torch.device(device)
        cast = lambda t: t.to(device=device, dtype=self.dtype) if t is not None else None  # noqa: E731
        self.router_weight, self.router_bias = cast(self.router_weight), cast(self.router_bias)
        if not self.cast_on_use:
            for e in range(len(self.experts)):
                self.experts[e] = _moved(self.experts[e], device, self.dtype)
        self.shared = _moved(self.shared, device, self.dtype) if self.shared is not None else None
        self.shared_gate = cast(self.shared_gate)
        self.device = device
        return self

    @torch.no_grad()
    def __call__(self, hidden_states: torch.Tensor):
        if self.device is None:
            self.materialize(hidden_states.device)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        family = self.family
        logits = torch.nn.functional.linear(x, self.router_weight, self.router_bias)
        weights, ids = family.route(logits)
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            token_idx, slot = torch.where(ids == e)
            expert = _moved(self.experts[e], self.device, self.dtype) if self.cast_on_use else self.experts[e]
            y = family.ffn_forward(expert, x[token_idx])
            del expert
            g = weights[token_idx, slot]
            out.index_add_(0, token_idx, (y * (g * self.routed_scale).unsqueeze(1).to(y.dtype)))
            self._routed(e, g, y)
        self._sample(x)
        if self.shared is not None:
            shared_out = family.ffn_forward(self.shared, x)
            if self.shared_gate is not None:
                gate = torch.sigmoid(torch.nn.functional.linear(x, self.shared_gate))
                self._shared_gate(gate)
                shared_out = gate * shared_out
            out = out + shared_out
        self._seen(x, logits)
        out = out.reshape(shape)
        return (out, logits) if family.block_returns_tuple else out

    # What calibration collects; nothing here.
    def _routed(self, expert: int, weights: torch.Tensor, outputs: torch.Tensor) -> None:
        pass

    def _sample(self, x: torch.Tensor) -> None:
        pass

    def _shared_gate(self, gate: torch.Tensor) -> None:
        pass

    def _seen(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        pass


class CalibratedMoeBlock(RoutedMoeBlock):
    """RoutedMoeBlock that accumulates the layer's expert statistics into `stats` (on the CPU, in float64)."""

    def __init__(self, family: MoEFamily, ckpt: Checkpoint, layer: int, stats: LayerStats,
                 gram_stride: int, gram_tokens: int, dtype: torch.dtype = torch.float32):
        super().__init__(family, ckpt, layer, dtype)
        self.stats = stats
        self.gram_stride, self.gram_left = gram_stride, gram_tokens
        self.position = 0  # tokens seen so far, to pick the shared sample by global position

    def _routed(self, e: int, g: torch.Tensor, y: torch.Tensor) -> None:
        # Per-batch sums in the compute dtype, accumulated across batches in float64: the precision that
        # matters over 10^5+ tokens, without float64 copies of every expert output.
        st = self.stats
        norms = y.norm(dim=-1)
        st.count[e] += len(g)
        st.weight_sum[e] += float(g.sum())
        st.norm_sum[e] += float(norms.sum())
        st.norm_sq_sum[e] += float((norms * norms).sum())
        st.reap_sum[e] += float((g * norms).sum())
        st.out_sum[e] += y.sum(0).double().cpu()

    def _shared_gate(self, gate: torch.Tensor) -> None:
        self.stats.shared_gate_sum += float(gate.double().sum())

    def _seen(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        st = self.stats
        st.logit_sum += logits.sum(0).double().cpu()
        st.logit_sq_sum += (logits * logits).sum(0).double().cpu()
        st.tokens += x.shape[0]
        self.position += x.shape[0]

    def _sample(self, x: torch.Tensor) -> None:
        if self.gram_left <= 0:
            return
        start = (-self.position) % self.gram_stride  # first token in this batch whose global index is on the stride
        pick = torch.arange(start, x.shape[0], self.gram_stride, device=x.device)[: self.gram_left]
        if not len(pick):
            return
        sample = x[pick]
        flat = torch.stack([self.family.ffn_forward(ex, sample) for ex in self.experts]).flatten(1)  # [E, S*H]
        self.stats.gram_sum += (flat @ flat.t()).double().cpu()  # one matmul: ~8x faster than the float64 einsum
        self.stats.gram_tokens += len(pick)
        self.gram_left -= len(pick)
