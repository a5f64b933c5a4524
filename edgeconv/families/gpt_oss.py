"""GPT-OSS -> GPT-OSS with a single expert and top-1 routing (as the paper ships it).

The dense model keeps GPT-OSS's attention sinks, alternating sliding-window layers and its clamped SwiGLU
with biases: (clamp(up) + 1) * glu(clamp(gate)) acts on each neuron alone, so concatenating experts is
still exact. The one-expert router has a zero weight and bias; softmax over its single top-1 logit is 1.
One deliberate difference: the released configs' YaRN has `truncate: false`, which llama.cpp does not implement
(it always truncates the correction range). The student is ours to define, so it gets `truncate: true` from the
start: distillation trains it with the rope llama.cpp runs, and its GGUF matches torch at the normal tolerance.
On disk, experts are fused 3-D tensors with gate and up interleaved (bf16), or MXFP4 blocks as released.
"""

import torch

from edgeconv.families.base import MoEFamily, register
from edgeconv.families.ffn import Ffn
from edgeconv.families.layouts import GptOssFused, GptOssMxfp4


@register
class GptOss(MoEFamily):
    moe_architecture = "GptOssForCausalLM"
    dense_architecture = "GptOssForCausalLM"
    dense_model_type = "gpt_oss"
    layouts = (GptOssFused(), GptOssMxfp4())
    router_names = ("mlp.router",)
    num_experts_key = "num_local_experts"
    expert_width_key = "intermediate_size"
    has_ffn_bias = True
    # The clamped SwiGLU's constants, fixed in transformers' GptOssExperts.
    alpha = 1.702
    limit = 7.0

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k on the raw logits, then softmax over the k chosen ones."""
        values, ids = torch.topk(logits.float(), self.top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids

    def ffn_forward(self, ffn: Ffn, x: torch.Tensor) -> torch.Tensor:
        gate = (x @ ffn.gate.t() + ffn.gate_bias).clamp(max=self.limit)
        up = (x @ ffn.up.t() + ffn.up_bias).clamp(-self.limit, self.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * self.alpha)) @ ffn.down.t() + ffn.down_bias

    @property
    def dense_layer_width(self) -> int:
        return 0

    def dense_config(self, width: int) -> dict:
        dense = super().dense_config(width)
        dense.update(num_local_experts=1, num_experts_per_tok=1, output_router_logits=False)
        scaling = dense.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "yarn" \
                and scaling.get("truncate") is False:
            dense["rope_scaling"] = {**scaling, "truncate": True}  # llama.cpp's YaRN (see the module docstring)
        if "experts_per_token" in dense:
            dense["experts_per_token"] = 1
        return dense

    def dense_ffn_tensors(self, layer: int, ffn: Ffn) -> dict[str, torch.Tensor]:
        p = f"{self.prefix(layer)}.mlp"
        hidden, dtype, device = ffn.gate.shape[1], ffn.gate.dtype, ffn.gate.device
        # Interleave gate and up again: column 2j is gate neuron j, column 2j+1 is up neuron j.
        gate_up = torch.stack([ffn.gate, ffn.up], dim=1).reshape(2 * ffn.width, hidden).t()
        gate_up_bias = torch.stack([ffn.gate_bias, ffn.up_bias], dim=1).reshape(2 * ffn.width)
        return {
            f"{p}.router.weight": torch.zeros(1, hidden, dtype=dtype, device=device),
            f"{p}.router.bias": torch.zeros(1, dtype=dtype, device=device),
            f"{p}.experts.gate_up_proj": gate_up.unsqueeze(0),
            f"{p}.experts.gate_up_proj_bias": gate_up_bias.unsqueeze(0),
            f"{p}.experts.down_proj": ffn.down.t().unsqueeze(0),
            f"{p}.experts.down_proj_bias": ffn.down_bias.unsqueeze(0),
        }
