"""Per-architecture GGUF knowledge: which llama.cpp architecture a HF class becomes, its metadata keys,
and the few tensor transforms llama.cpp expects. Tensor names come from gguf-py's own map
(`gguf.get_tensor_name_map`); experts stored per expert (or fused) are stacked into `ffn_*_exps` here, once,
for every family, through the family adapters that already read every on-disk layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch

from edgeconv.errors import EdgeconvError
from edgeconv.families.base import FAMILIES


def permute_for_llama_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF Llama/Mistral q/k rows are laid out for rotate-half RoPE; llama.cpp's llama arch rotates adjacent
    pairs, so each head's rows are interleaved (the same permutation llama.cpp's converter applies)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _common(w: gguf.GGUFWriter, c: dict) -> None:
    w.add_context_length(int(c["max_position_embeddings"]))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_head_count(int(c["num_attention_heads"]))
    w.add_head_count_kv(int(c.get("num_key_value_heads") or c["num_attention_heads"]))
    head_dim = int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    w.add_key_length(head_dim)  # written explicitly: llama.cpp would otherwise derive hidden / heads
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    scaling = c.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "yarn":
        if scaling.get("truncate") is False:
            # Measured here: a tiny GPT-OSS with truncate=false drifted from torch by up to 2 % of the largest
            # logit by position 40; the same model with truncate=true matched within 1e-3.
            raise EdgeconvError(
                "the model's YaRN rope scaling has truncate=false, which llama.cpp does not implement (it always "
                "truncates the correction range), so the GGUF would not match torch",
                "a teacher GGUF: pass --allow-yarn-drift to export it with llama.cpp's YaRN and the drift measured per "
                "position (edgeconv's students get truncate=true from the start); or export to ONNX",
            )
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        # The YaRN parameters a config may set, written when it does (as llama.cpp's converter writes them; llama.cpp
        # otherwise assumes its defaults: beta_fast 32, beta_slow 1, the extrapolation and attention factors derived).
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("attn_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if scaling.get(key) is not None and not (key == "attn_factor" and "attention_factor" in scaling):
                add(float(scaling[key]))
    elif kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in (None, "default"):
        raise EdgeconvError(f"rope scaling {kind!r} is not supported by the GGUF exporter",
                            "export without it or to ONNX")


def _moe(w: gguf.GGUFWriter, c: dict, experts_key: str, width_key: str) -> None:
    w.add_expert_count(int(c[experts_key]))
    w.add_expert_used_count(int(c["num_experts_per_tok"]))
    w.add_expert_feed_forward_length(int(c[width_key]))


@dataclass(frozen=True)
class GgufArch:
    arch: gguf.MODEL_ARCH
    metadata: Callable[[gguf.GGUFWriter, dict], None]
    moe: bool = False  # experts are stacked through the family adapter
    permute_qk: bool = False
    split_kv_b: bool = False  # DeepSeek MLA: kv_b_proj -> k_b (transposed) and v_b
    stack_by_name: bool = False  # experts stored per expert under mlp.experts.<e>.*: stacked by their names

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _dense(w, c):
    _common(w, c)
    w.add_feed_forward_length(int(c["intermediate_size"]))


def _moe_dense_width(w, c):
    # The width of the dense MLP a Qwen-MoE config also declares (mlp_only_layers use it): llama.cpp's converter
    # writes it as feed_forward_length even when every layer is MoE, so it is written here too.
    if c.get("intermediate_size"):
        w.add_feed_forward_length(int(c["intermediate_size"]))


def _qwen3moe(w, c):
    _common(w, c)
    _moe_dense_width(w, c)
    _moe(w, c, "num_experts", "moe_intermediate_size")
    w.add_expert_weights_norm(bool(c.get("norm_topk_prob", False)))


def _qwen2moe(w, c):
    _common(w, c)
    _moe_dense_width(w, c)
    _moe(w, c, "num_experts", "moe_intermediate_size")
    w.add_expert_shared_feed_forward_length(int(c["shared_expert_intermediate_size"]))


def _mixtral(w, c):
    _common(w, c)
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_expert_count(int(c["num_local_experts"]))
    w.add_expert_used_count(int(c["num_experts_per_tok"]))
    _llama(w, c)


def _olmoe(w, c):
    _common(w, c)
    w.add_feed_forward_length(int(c["intermediate_size"]))
    _moe(w, c, "num_experts", "intermediate_size")


def _gpt_oss(w, c):
    _common(w, c)
    w.add_feed_forward_length(int(c["intermediate_size"]))
    _moe(w, c, "num_local_experts", "intermediate_size")
    w.add_sliding_window(int(c["sliding_window"]))


def _deepseek2(w, c):
    # llama.cpp runs MLA as multi-query attention over the compressed KV (one KV head of width
    # kv_lora_rank + rope dims), decompressing per head with the k_b / v_b halves of kv_b_proj.
    _common(w, {**c, "num_key_value_heads": 1, "head_dim": 1})
    w.add_key_length(int(c["kv_lora_rank"]) + int(c["qk_rope_head_dim"]))  # replaces _common's placeholder
    w.add_value_length(int(c["kv_lora_rank"]))
    w.add_key_length_mla(int(c["qk_nope_head_dim"]) + int(c["qk_rope_head_dim"]))
    w.add_value_length_mla(int(c["v_head_dim"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_leading_dense_block_count(int(c.get("first_k_dense_replace") or 0))
    w.add_vocab_size(int(c["vocab_size"]))
    if c.get("q_lora_rank"):
        w.add_q_lora_rank(int(c["q_lora_rank"]))
    elif int(c["num_hidden_layers"]) != 27:
        raise EdgeconvError(
            "this DeepSeek-V2 has no q LoRA (q_lora_rank is null); llama.cpp accepts that only for DeepSeek-V2-Lite, "
            f"which it recognises by its 27 layers (this model has {c['num_hidden_layers']})",
            "export it to ONNX instead",
        )
    w.add_kv_lora_rank(int(c["kv_lora_rank"]))
    w.add_expert_feed_forward_length(int(c["moe_intermediate_size"]))
    w.add_expert_count(int(c["n_routed_experts"]))
    w.add_expert_used_count(int(c["num_experts_per_tok"]))
    w.add_expert_shared_count(int(c.get("n_shared_experts") or 0))
    w.add_expert_weights_scale(float(c.get("routed_scaling_factor") or 1.0))
    w.add_expert_weights_norm(False)  # transformers 4.57's DeepSeek-V2 router never renormalises
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    # Group-limited routing: transformers applies n_group / topk_group only for topk_method group_limited_greedy
    # (DeepSeek-V2, V2-Chat); for greedy (V2-Lite) one group, which is no grouping in llama.cpp too (it asserts
    # topk_group < n_group whenever n_group > 1).
    grouped = c.get("topk_method") == "group_limited_greedy" and int(c.get("n_group") or 1) > 1
    w.add_expert_group_count(int(c["n_group"]) if grouped else 1)
    w.add_expert_group_used_count(int(c["topk_group"]) if grouped else 1)
    w.add_rope_dimension_count(int(c["qk_rope_head_dim"]))
    scaling = c.get("rope_scaling") or {}
    if scaling.get("mscale_all_dim") is not None:
        # YaRN's attention scale: llama.cpp's deepseek2 derives its rope and softmax scaling from 0.1 * mscale_all_dim
        # (what llama.cpp's converter writes). Without it the DeepSeek-V2-Lite shape (benchmarks/gguf_keys.py) missed
        # the F32 parity tolerance at 25 of 140 positions; with it, none.
        w.add_rope_scaling_yarn_log_mul(0.1 * float(scaling["mscale_all_dim"]))


def _glm4moe(w, c):
    # The container of `edgeconv upcycle` (leading dense layers, then MoE layers with one shared expert):
    # llama.cpp's glm4moe, sigmoid router with a selection bias (exp_probs_b), GQA kept.
    _common(w, c)
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_leading_dense_block_count(int(c.get("first_k_dense_replace") or 0))
    _moe(w, c, "n_routed_experts", "moe_intermediate_size")
    w.add_expert_shared_count(int(c.get("n_shared_experts") or 0))
    w.add_expert_weights_scale(float(c.get("routed_scaling_factor") or 1.0))
    w.add_expert_weights_norm(bool(c.get("norm_topk_prob", True)))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    head_dim = int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    w.add_rope_dimension_count(int(head_dim * float(c.get("partial_rotary_factor", 0.5))))
    w.add_nextn_predict_layers(0)


def _llama(w, c):
    # What llama.cpp's converter adds for its llama architecture (Mistral): the vocabulary size and the rotary
    # dimensions (the whole head, which llama.cpp also assumes when the key is absent).
    w.add_vocab_size(int(c["vocab_size"]))
    w.add_rope_dimension_count(int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]))


def _mistral(w, c):
    _dense(w, c)
    _llama(w, c)


ARCHS: dict[str, GgufArch] = {
    "Qwen3ForCausalLM": GgufArch(gguf.MODEL_ARCH.QWEN3, _dense),
    "Qwen3MoeForCausalLM": GgufArch(gguf.MODEL_ARCH.QWEN3MOE, _qwen3moe, moe=True),
    "Qwen2ForCausalLM": GgufArch(gguf.MODEL_ARCH.QWEN2, _dense),
    "Qwen2MoeForCausalLM": GgufArch(gguf.MODEL_ARCH.QWEN2MOE, _qwen2moe, moe=True),
    "MistralForCausalLM": GgufArch(gguf.MODEL_ARCH.LLAMA, _mistral, permute_qk=True),
    "MixtralForCausalLM": GgufArch(gguf.MODEL_ARCH.LLAMA, _mixtral, moe=True, permute_qk=True),
    "OlmoeForCausalLM": GgufArch(gguf.MODEL_ARCH.OLMOE, _olmoe, moe=True),
    "GptOssForCausalLM": GgufArch(gguf.MODEL_ARCH.GPT_OSS, _gpt_oss, moe=True),
    "DeepseekV2ForCausalLM": GgufArch(gguf.MODEL_ARCH.DEEPSEEK2, _deepseek2, moe=True, split_kv_b=True),
    "Glm4MoeForCausalLM": GgufArch(gguf.MODEL_ARCH.GLM4_MOE, _glm4moe, stack_by_name=True),
}


def gguf_arch_for(config: dict) -> GgufArch:
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in ARCHS:
        raise EdgeconvError(
            f"GGUF export does not support {arch}",
            f"supported: {', '.join(sorted(ARCHS))}; export it to ONNX instead",
        )
    return ARCHS[arch]


def family_adapter(config: dict):
    """The family adapter used to read experts, also for single-expert outputs (OLMoE, GPT-OSS)."""
    return FAMILIES.get(config["architectures"][0])(config)


def untruncated_yarn(config: dict) -> dict | None:
    """The rope scaling llama.cpp runs instead of `config`'s, when they differ: YaRN with truncate=false (every
    released GPT-OSS) becomes truncate=true. None when llama.cpp runs the config as it is."""
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "yarn" and scaling.get("truncate") is False:
        return {**scaling, "truncate": True}
    return None


class _NoWriter:
    """Takes every GGUFWriter call and keeps nothing: running an architecture's metadata function against it
    raises exactly the refusals that depend on config.json alone (check_config)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def check_config(config: dict) -> GgufArch:
    """Everything the GGUF writer would refuse about `config` (architecture, rope scaling, DeepSeek-V2's q LoRA,
    dense layers in a MoE that llama.cpp wants all-MoE), raised now: planning and --dry-run call this before any
    work, on the student's config (and the teacher's when it is exported too)."""
    arch = gguf_arch_for(config)
    arch.metadata(_NoWriter(), config)
    check_all_moe(config, arch)
    return arch


def check_all_moe(config: dict, arch: GgufArch) -> None:
    """llama.cpp's MoE architectures other than deepseek2 have no leading dense layers."""
    if arch.moe and not arch.split_kv_b:
        family = family_adapter(config)
        dense = sorted(set(range(family.num_layers)) - set(family.moe_layers()))
        if dense:
            raise EdgeconvError(
                f"llama.cpp's {arch.name} needs every layer to be MoE, but layers {dense} of this model are dense",
                "export it to ONNX instead, or convert it to a dense model first")
