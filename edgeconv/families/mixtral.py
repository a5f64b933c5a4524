"""Mixtral -> Mistral dense. transformers 4.x saves ``block_sparse_moe.experts.<e>.w1/w3/w2`` (gate/up/down),
5.x ``mlp.experts`` fused; both are read."""

from edgeconv.families.base import MoEFamily, register
from edgeconv.families.layouts import FusedGateUp, PerExpert


@register
class Mixtral(MoEFamily):
    moe_architecture = "MixtralForCausalLM"
    dense_architecture = "MistralForCausalLM"
    dense_model_type = "mistral"
    layouts = (
        PerExpert("block_sparse_moe", gate="w1", up="w3", down="w2"),
        PerExpert("mlp", gate="w1", up="w3", down="w2"),
        PerExpert("mlp"),
        FusedGateUp("mlp"),
    )
    blocks = ("block_sparse_moe", "mlp")
    router_names = ("block_sparse_moe.gate", "mlp.gate")
    num_experts_key = "num_local_experts"
    expert_width_key = "intermediate_size"
    moe_config_keys = (
        "num_local_experts",
        "num_experts_per_tok",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
    )

    def normalizes_top_k(self) -> bool:
        return True  # Mixtral always renormalises its top-k weights

    @property
    def dense_layer_width(self) -> int:
        return 0  # every Mixtral layer is MoE; intermediate_size is the expert width
