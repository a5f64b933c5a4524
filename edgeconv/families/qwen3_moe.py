"""Qwen3-MoE -> Qwen3 dense (the main case). Experts per expert on disk (4.x) or fused (5.x)."""

from edgeconv.families.base import MoEFamily, register


@register
class Qwen3Moe(MoEFamily):
    moe_architecture = "Qwen3MoeForCausalLM"
    dense_architecture = "Qwen3ForCausalLM"
    dense_model_type = "qwen3"
    moe_config_keys = (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "decoder_sparse_step",
        "mlp_only_layers",
        "norm_topk_prob",
        "output_router_logits",
        "router_aux_loss_coef",
    )

    def is_moe_layer(self, layer: int) -> bool:
        # Same rule as transformers' Qwen3MoeDecoderLayer.
        step = int(self.config.get("decoder_sparse_step") or 1)
        return layer not in (self.config.get("mlp_only_layers") or []) and (layer + 1) % step == 0
