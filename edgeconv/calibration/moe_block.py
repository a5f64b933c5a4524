"""A MoE block computed from the weights in the files, collecting expert statistics as it goes.

During calibration this replaces the forward of the transformers MoE module of one layer: it routes,
runs the routed experts once, and accumulates what the scorers need from those very outputs, so the
statistics cost little beyond the forward itself. Every expert also runs on a strided sample of tokens
(the shared sample) for the Gram matrix.
"""

from __future__ import annotations

import torch

from edgeconv.calibration.stats import LayerStats
from edgeconv.families.base import MoEFamily
from edgeconv.io.checkpoint import Checkpoint


class CalibratedMoeBlock:
    def __init__(self, family: MoEFamily, ckpt: Checkpoint, layer: int, stats: LayerStats,
                 gram_stride: int, gram_tokens: int, dtype: torch.dtype = torch.float32):
        self.family, self.stats = family, stats
        weight, bias = family.read_router(ckpt, layer)
        self.router_weight = weight.to(dtype)
        self.router_bias = bias.to(dtype) if bias is not None else None
        self.experts = [family.read_expert(ckpt, layer, e).to(dtype) for e in range(family.num_experts)]
        shared = family.read_shared(ckpt, layer)
        self.shared = shared.to(dtype) if shared is not None else None
        gate = family.read_shared_gate(ckpt, layer)
        self.shared_gate = gate.to(dtype) if gate is not None else None
        self.routed_scale = family.routed_scale()
        self.gram_stride, self.gram_left = gram_stride, gram_tokens
        self.position = 0  # tokens seen so far, to pick the shared sample by global position

    @torch.no_grad()
    def __call__(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        st, family = self.stats, self.family
        logits = torch.nn.functional.linear(x, self.router_weight, self.router_bias)
        weights, ids = family.route(logits)
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            token_idx, slot = torch.where(ids == e)
            y = family.ffn_forward(self.experts[e], x[token_idx])
            g = weights[token_idx, slot]
            out.index_add_(0, token_idx, (y * (g * self.routed_scale).unsqueeze(1).to(y.dtype)))
            # Per-batch sums in the compute dtype, accumulated across batches in float64: the precision that
            # matters over 10^5+ tokens, without float64 copies of every expert output.
            norms = y.norm(dim=-1)
            st.count[e] += len(token_idx)
            st.weight_sum[e] += float(g.sum())
            st.norm_sum[e] += float(norms.sum())
            st.norm_sq_sum[e] += float((norms * norms).sum())
            st.reap_sum[e] += float((g * norms).sum())
            st.out_sum[e] += y.sum(0).double()
        self._gram(x)
        if self.shared is not None:
            shared_out = family.ffn_forward(self.shared, x)
            if self.shared_gate is not None:
                gate = torch.sigmoid(torch.nn.functional.linear(x, self.shared_gate))
                st.shared_gate_sum += float(gate.double().sum())
                shared_out = gate * shared_out
            out = out + shared_out
        st.logit_sum += logits.sum(0).double()
        st.logit_sq_sum += (logits * logits).sum(0).double()
        st.tokens += x.shape[0]
        self.position += x.shape[0]
        out = out.reshape(shape)
        return (out, logits) if family.block_returns_tuple else out

    def _gram(self, x: torch.Tensor) -> None:
        if self.gram_left <= 0:
            return
        start = (-self.position) % self.gram_stride  # first token in this batch whose global index is on the stride
        pick = torch.arange(start, x.shape[0], self.gram_stride)[: self.gram_left]
        if not len(pick):
            return
        sample = x[pick]
        flat = torch.stack([self.family.ffn_forward(ex, sample) for ex in self.experts]).flatten(1)  # [E, S*H]
        self.stats.gram_sum += (flat @ flat.t()).double()  # one matmul: ~8x faster than the float64 einsum
        self.stats.gram_tokens += len(pick)
        self.gram_left -= len(pick)
