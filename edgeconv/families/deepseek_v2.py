"""DeepSeek-V2 -> DeepSeek-V2 with every layer dense (MLA attention kept as is).

The shared experts (n_shared_experts x moe_intermediate_size, no gate) are concatenated. The router
multiplies every routed weight by routed_scaling_factor, so that factor is folded into each group's scale.
The first `first_k_dense_replace` layers are dense in the source with their own (usually larger) width;
the dense config has one intermediate_size, so narrower layers are zero-padded to the widest (exact:
a zero neuron outputs zero), and the report says how much that costs.
"""

import torch

from edgeconv.families.base import MoEFamily, register
from edgeconv.families.layouts import PlainMlp


@register
class DeepseekV2(MoEFamily):
    moe_architecture = "DeepseekV2ForCausalLM"
    dense_architecture = "DeepseekV2ForCausalLM"
    dense_model_type = "deepseek_v2"
    shared = PlainMlp("mlp.shared_experts")
    num_experts_key = "n_routed_experts"
    block_returns_tuple = False

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax, then greedy top-k or DeepSeek's group-limited top-k; no renormalisation (as in 4.57)."""
        probs = torch.softmax(logits.float(), dim=-1)
        if self.config.get("topk_method", "greedy") == "group_limited_greedy":
            groups = int(self.config["n_group"])
            best = probs.view(probs.shape[0], groups, -1).max(dim=-1).values
            keep = torch.topk(best, int(self.config["topk_group"]), dim=-1).indices
            mask = torch.zeros_like(best).scatter_(1, keep, 1.0).repeat_interleave(self.num_experts // groups, dim=1)
            probs = probs.masked_fill(mask == 0, 0.0)
        return torch.topk(probs, self.top_k, dim=-1)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= int(self.config.get("first_k_dense_replace") or 0)

    @property
    def shared_width(self) -> int:
        return int(self.config.get("n_shared_experts") or 0) * self.expert_width

    def routed_scale(self) -> float:
        return float(self.config.get("routed_scaling_factor") or 1.0)

    def dense_config(self, width: int) -> dict:
        dense = super().dense_config(width)
        dense["first_k_dense_replace"] = self.num_layers  # no layer is MoE any more
        return dense
