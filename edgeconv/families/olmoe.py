"""OLMoE -> OLMoE with a single expert and top-1 routing.

No stock dense class matches OLMoE: it normalises q and k over the full projection width *and* is
pre-norm. Olmo has no qk-norm; Olmo2/Olmo3 normalise after each sub-layer. So the dense model is OLMoE
itself with one expert: its router has one output, softmax over one logit is 1, and the layer computes
exactly that expert's FFN. Stock transformers and llama.cpp load it.
"""

import torch

from edgeconv.families.base import MoEFamily, register
from edgeconv.families.ffn import Ffn


@register
class Olmoe(MoEFamily):
    moe_architecture = "OlmoeForCausalLM"
    dense_architecture = "OlmoeForCausalLM"
    dense_model_type = "olmoe"
    expert_width_key = "intermediate_size"
    layer_returns_tuple = True

    @property
    def dense_layer_width(self) -> int:
        return 0

    def dense_config(self, width: int) -> dict:
        dense = super().dense_config(width)
        dense.update(num_experts=1, num_experts_per_tok=1, output_router_logits=False)
        return dense

    def dense_ffn_tensors(self, layer: int, ffn: Ffn) -> dict[str, torch.Tensor]:
        p = f"{self.prefix(layer)}.mlp"
        return {
            f"{p}.gate.weight": torch.zeros(1, ffn.gate.shape[1], dtype=ffn.gate.dtype, device=ffn.gate.device),
            f"{p}.experts.0.gate_proj.weight": ffn.gate,
            f"{p}.experts.0.up_proj.weight": ffn.up,
            f"{p}.experts.0.down_proj.weight": ffn.down,
        }
