"""DeepSeek-V2 -> DeepSeek-V2 with every layer dense (MLA attention kept as is).

The shared experts (n_shared_experts x moe_intermediate_size, no gate) are concatenated. The router
multiplies every routed weight by routed_scaling_factor, so that factor is folded into each group's scale.
The first `first_k_dense_replace` layers are dense in the source with their own (usually larger) width;
the dense config has one intermediate_size, so narrower layers are zero-padded to the widest (exact:
a zero neuron outputs zero), and the report says how much that costs.
"""

from edgeconv.families.base import MoEFamily, register
from edgeconv.families.layouts import PlainMlp


@register
class DeepseekV2(MoEFamily):
    moe_architecture = "DeepseekV2ForCausalLM"
    dense_architecture = "DeepseekV2ForCausalLM"
    dense_model_type = "deepseek_v2"
    shared = PlainMlp("mlp.shared_experts")
    num_experts_key = "n_routed_experts"

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
