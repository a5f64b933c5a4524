"""Qwen2-MoE -> Qwen2 dense.

The shared expert is always kept and concatenated. In the MoE its output is multiplied per token by
sigmoid(shared_expert_gate . x); a dense FFN cannot compute that, so the dense model uses one constant
per layer instead: the plan's ``shared_scale`` (calibration records the mean gate value over the
calibration tokens), or, without calibration, 0.5 = sigmoid(0), the gate's value for a zero gate vector.
Qwen2 dense always has q/k/v biases; if the MoE was trained without them they are written as zeros.
"""

from edgeconv.families.base import register
from edgeconv.families.layouts import PlainMlp
from edgeconv.families.qwen3_moe import Qwen3Moe
from edgeconv.io.checkpoint import Checkpoint


@register
class Qwen2Moe(Qwen3Moe):  # same MoE-layer rule and router; adds the gated shared expert
    moe_architecture = "Qwen2MoeForCausalLM"
    dense_architecture = "Qwen2ForCausalLM"
    dense_model_type = "qwen2"
    shared = PlainMlp("mlp.shared_expert")
    moe_config_keys = Qwen3Moe.moe_config_keys + ("shared_expert_intermediate_size", "qkv_bias")
    layer_returns_tuple = True

    @property
    def shared_width(self) -> int:
        return int(self.config.get("shared_expert_intermediate_size") or 0)

    def default_shared_scale(self) -> float:
        return 0.5

    def read_shared_gate(self, ckpt: Checkpoint, layer: int):
        return ckpt.read(f"{self.prefix(layer)}.mlp.shared_expert_gate.weight")

    def zero_tensors(self, ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
        zeros = {}
        for layer in range(self.num_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                name = f"{self.prefix(layer)}.self_attn.{proj}"
                if not ckpt.has(f"{name}.bias"):
                    zeros[f"{name}.bias"] = (ckpt.info(f"{name}.weight").shape[0],)
        return zeros
