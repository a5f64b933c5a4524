"""The six released MoEs whose exact shapes `real_shape.py` writes, and the random checkpoints themselves.

Every config below was typed from the model's published config.json on the Hugging Face hub (no hub access
here: the values are what those files say, checked for internal consistency and against the published
parameter counts by tests/test_real_shape.py). What changes when a checkpoint is written:

- the vocabulary is the shipped 4,096-token demo tokenizer's (edgeconv/assets/demo-moe), so vocab_size is 4096
  and bos/eos/pad come from it (eos = pad = 0 `<eos>`, no bos); every model gets that tokenizer;
- num_hidden_layers is --layers (per-layer lists such as GPT-OSS's layer_types are cut to it);
- --experts E replaces the routed expert count (top-k becomes min(top-k, E));
- DeepSeek-V2-Lite's `auto_map` (remote code) is dropped: transformers 4.57 has the architecture natively.

Weights: bf16 with transformers 4.57's on-disk names for the architecture (per-expert Linears for Qwen3-MoE,
Qwen2-MoE, OLMoE and DeepSeek-V2, Mixtral's `block_sparse_moe.experts.{e}.w1/w2/w3`, GPT-OSS's fused experts),
N(0, 0.02) for matrices and biases, 1 for norm weights, the output head N(0, 0.02 x --logit-scale).
GPT-OSS experts are written as OpenAI released them (MXFP4 `*_blocks` uint8 [E, rows, cols/32, 16] + `*_scales`
uint8 [E, rows, cols/32], random codes with the exponent 2^-7, so the values have std ~0.023; biases bf16) or,
with gpt_oss_format="bf16", as transformers' bf16 `gate_up_proj` [E, H, 2I] (gate/up interleaved) + `down_proj`.

Each tensor is generated in chunks from a generator seeded by (seed, tensor name, chunk), and streamed into
safetensors shards (a header per shard up front, then the bytes): memory holds one chunk (16 M values).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "edgeconv" / "assets" / "demo-moe"
DISTILL_DATA = ROOT / "edgeconv" / "assets" / "distill.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
STD = 0.02
MXFP4_SCALE = 127 - 7  # biased exponent: values x 2^-7 (e2m1 codes have rms 2.93, so std ~0.023)
CHUNK = 1 << 24  # values generated at once
META = "real_shape.json"  # written last: the checkpoint is complete

# ---------------------------------------------------------------------------------------------------------------
# The registry. `config` is the published config.json (typed from the hub file named in `hub`); `published`
# holds what the model card says, to check the shapes against; `tiny` shrinks the widths (tests, --tiny).
# ---------------------------------------------------------------------------------------------------------------

SHAPES: dict[str, dict] = {
    # Qwen/Qwen3-30B-A3B, config.json (typed from the published file)
    "qwen3-30b-a3b": {
        "hub": "Qwen/Qwen3-30B-A3B",
        "config": {
            "architectures": ["Qwen3MoeForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "decoder_sparse_step": 1,
            "eos_token_id": 151645,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "initializer_range": 0.02,
            "intermediate_size": 6144,
            "max_position_embeddings": 40960,
            "max_window_layers": 48,
            "mlp_only_layers": [],
            "model_type": "qwen3_moe",
            "moe_intermediate_size": 768,
            "norm_topk_prob": True,
            "num_attention_heads": 32,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "num_hidden_layers": 48,
            "num_key_value_heads": 4,
            "output_router_logits": False,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.001,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": 151936,
        },
        "published": {"params": 30.5e9, "active": 3.3e9},
        "tiny": {"hidden_size": 64, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 64},
    },
    # allenai/OLMoE-1B-7B-0924, config.json (typed from the published file)
    "olmoe-1b-7b": {
        "hub": "allenai/OLMoE-1B-7B-0924",
        "config": {
            "architectures": ["OlmoeForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "clip_qkv": None,
            "eos_token_id": 50279,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "initializer_range": 0.02,
            "intermediate_size": 1024,
            "max_position_embeddings": 4096,
            "model_type": "olmoe",
            "norm_topk_prob": False,
            "num_attention_heads": 16,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "num_hidden_layers": 16,
            "num_key_value_heads": 16,
            "output_router_logits": False,
            "pad_token_id": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "router_aux_loss_coef": 0.01,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.43.0.dev0",
            "use_cache": True,
            "vocab_size": 50304,
        },
        "published": {"params": 6.9e9, "active": 1.3e9},
        "tiny": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 8,
                 "num_experts_per_tok": 2, "intermediate_size": 32},
    },
    # mistralai/Mixtral-8x7B-v0.1, config.json (typed from the published file)
    "mixtral-8x7b": {
        "hub": "mistralai/Mixtral-8x7B-v0.1",
        "config": {
            "architectures": ["MixtralForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "initializer_range": 0.02,
            "intermediate_size": 14336,
            "max_position_embeddings": 32768,
            "model_type": "mixtral",
            "num_attention_heads": 32,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "output_router_logits": False,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.02,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.36.0.dev0",
            "use_cache": True,
            "vocab_size": 32000,
        },
        "published": {"params": 46.7e9, "active": 12.9e9},
        "tiny": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64},
    },
    # Qwen/Qwen1.5-MoE-A2.7B, config.json (typed from the published file)
    "qwen1.5-moe-a2.7b": {
        "hub": "Qwen/Qwen1.5-MoE-A2.7B",
        "config": {
            "architectures": ["Qwen2MoeForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "decoder_sparse_step": 1,
            "eos_token_id": 151643,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "initializer_range": 0.02,
            "intermediate_size": 5632,
            "max_position_embeddings": 8192,
            "max_window_layers": 21,
            "model_type": "qwen2_moe",
            "moe_intermediate_size": 1408,
            "norm_topk_prob": False,
            "num_attention_heads": 16,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "num_hidden_layers": 24,
            "num_key_value_heads": 16,
            "output_router_logits": False,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.001,
            "shared_expert_intermediate_size": 5632,
            "sliding_window": 32768,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.39.0.dev0",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": 151936,
        },
        "published": {"params": 14.3e9, "active": 2.7e9},
        "tiny": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 6,
                 "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                 "intermediate_size": 64},
    },
    # deepseek-ai/DeepSeek-V2-Lite, config.json (typed from the published file; its auto_map is dropped)
    "deepseek-v2-lite": {
        "hub": "deepseek-ai/DeepSeek-V2-Lite",
        "config": {
            "architectures": ["DeepseekV2ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "aux_loss_alpha": 0.001,
            "bos_token_id": 100000,
            "eos_token_id": 100001,
            "first_k_dense_replace": 1,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "initializer_range": 0.02,
            "intermediate_size": 10944,
            "kv_lora_rank": 512,
            "max_position_embeddings": 163840,
            "model_type": "deepseek_v2",
            "moe_intermediate_size": 1408,
            "moe_layer_freq": 1,
            "n_group": 1,
            "n_routed_experts": 64,
            "n_shared_experts": 2,
            "norm_topk_prob": False,
            "num_attention_heads": 16,
            "num_experts_per_tok": 6,
            "num_hidden_layers": 27,
            "num_key_value_heads": 16,
            "pretraining_tp": 1,
            "q_lora_rank": None,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": 40,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "original_max_position_embeddings": 4096,
                "type": "yarn",
            },
            "rope_theta": 10000,
            "routed_scaling_factor": 1.0,
            "scoring_func": "softmax",
            "seq_aux": True,
            "tie_word_embeddings": False,
            "topk_group": 1,
            "topk_method": "greedy",
            "torch_dtype": "bfloat16",
            "transformers_version": "4.33.1",
            "use_cache": True,
            "v_head_dim": 128,
            "vocab_size": 102400,
        },
        "published": {"params": 15.7e9, "active": 2.4e9},
        "tiny": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32,
                 "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
                 "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 96},
    },
    # openai/gpt-oss-20b, config.json (typed from the published file). It has no torch_dtype: its bf16 tensors
    # are the attention, router, biases, embeddings and head; the experts are MXFP4 (quantization_config).
    "gpt-oss-20b": {
        "hub": "openai/gpt-oss-20b",
        "config": {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": 200002,
            "experts_per_token": 4,
            "head_dim": 64,
            "hidden_act": "silu",
            "hidden_size": 2880,
            "initial_context_length": 4096,
            "initializer_range": 0.02,
            "intermediate_size": 2880,
            "layer_types": ["sliding_attention", "full_attention"] * 12,
            "max_position_embeddings": 131072,
            "model_type": "gpt_oss",
            "num_attention_heads": 64,
            "num_experts_per_tok": 4,
            "num_hidden_layers": 24,
            "num_key_value_heads": 8,
            "num_local_experts": 32,
            "output_router_logits": False,
            "pad_token_id": 199999,
            "quantization_config": {
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": 150000,
            "router_aux_loss_coef": 0.9,
            "sliding_window": 128,
            "swiglu_limit": 7.0,
            "tie_word_embeddings": False,
            "transformers_version": "4.55.0.dev0",
            "use_cache": True,
            "vocab_size": 201088,
        },
        "published": {"params": 20.9e9, "active": 3.6e9},
        "tiny": {"hidden_size": 64, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "num_local_experts": 8, "num_experts_per_tok": 2, "experts_per_token": 2, "intermediate_size": 64},
    },
}

ALIASES = {"qwen3": "qwen3-30b-a3b", "qwen3-moe": "qwen3-30b-a3b", "olmoe": "olmoe-1b-7b", "mixtral": "mixtral-8x7b",
           "qwen2-moe": "qwen1.5-moe-a2.7b", "qwen1.5-moe": "qwen1.5-moe-a2.7b", "qwen2moe": "qwen1.5-moe-a2.7b",
           "deepseek": "deepseek-v2-lite", "deepseek-v2": "deepseek-v2-lite", "gpt-oss": "gpt-oss-20b",
           "gptoss": "gpt-oss-20b"}
EXPERTS_KEY = {"Qwen3MoeForCausalLM": "num_experts", "OlmoeForCausalLM": "num_experts",
               "MixtralForCausalLM": "num_local_experts", "Qwen2MoeForCausalLM": "num_experts",
               "DeepseekV2ForCausalLM": "n_routed_experts", "GptOssForCausalLM": "num_local_experts"}


def resolve(name: str) -> str:
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}: one of {', '.join(SHAPES)} (or {', '.join(ALIASES)})")
    return key


def arch(config: dict) -> str:
    return config["architectures"][0]


def min_layers(shape: str) -> int:
    """DeepSeek-V2-Lite's first layer is dense: a MoE needs at least one more."""
    return int(SHAPES[shape]["config"].get("first_k_dense_replace") or 0) + 1


def _set_path(config: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = config
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def demo_tokenizer_ids() -> dict:
    tok = json.loads((DEMO / "tokenizer.json").read_text())
    special = json.loads((DEMO / "special_tokens_map.json").read_text())
    vocab = tok["model"]["vocab"]
    ids = {a["content"]: a["id"] for a in tok.get("added_tokens", [])} | vocab
    size = max(ids.values()) + 1

    def token_id(what: str):
        entry = special.get(what)
        content = entry["content"] if isinstance(entry, dict) else entry
        return ids.get(content) if content else None

    return {"vocab_size": size, "bos_token_id": token_id("bos_token"), "eos_token_id": token_id("eos_token"),
            "pad_token_id": token_id("pad_token")}


def make_config(shape: str, layers: int | None = None, experts: int | None = None, *, tiny: bool = False,
                gpt_oss_format: str = "mxfp4", overrides: dict | None = None, vocab: str = "demo") -> dict:
    """The config.json a checkpoint of `shape` is written with (see the module docstring for what changes).
    vocab="published" keeps the published vocabulary (for parameter counts; no such tokenizer here)."""
    spec = SHAPES[shape]
    c = copy.deepcopy(spec["config"])
    c.pop("auto_map", None)
    if tiny:
        c.update(spec["tiny"])
    if vocab == "demo":
        c.update(demo_tokenizer_ids())
    n = int(layers or c["num_hidden_layers"])
    if n < min_layers(shape):
        raise SystemExit(f"{shape} needs --layers >= {min_layers(shape)} (its first "
                         f"{min_layers(shape) - 1} layer(s) are dense)")
    if "layer_types" in c:  # GPT-OSS: alternating, starting with a sliding-window layer
        full = c["layer_types"]
        c["layer_types"] = [full[i % len(full)] for i in range(n)]
    c["num_hidden_layers"] = n
    if experts:
        key = EXPERTS_KEY[arch(c)]
        c[key] = int(experts)
        for k in ("num_experts_per_tok", "experts_per_token"):
            if k in c:
                c[k] = min(int(c[k]), int(experts))
    if arch(c) == "GptOssForCausalLM" and gpt_oss_format == "bf16":
        c.pop("quantization_config", None)  # as the community's bf16 re-releases: plain bf16 experts
        c["torch_dtype"] = "bfloat16"
    for k, v in (overrides or {}).items():
        _set_path(c, k, v)
    return c


# ---------------------------------------------------------------------------------------------------------------
# Tensor names and shapes (transformers 4.57's on-disk names for each architecture)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    init: str = "normal"  # normal | ones | embed | head | mxfp4_blocks | mxfp4_scales
    dtype: str = "BF16"  # safetensors dtype: BF16 or U8
    hin: int | None = None  # the axis along which it reads the residual stream (hidden as input)
    hout: int | None = None  # the axis along which it writes the residual stream (hidden as output)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * (2 if self.dtype == "BF16" else 1)

    @property
    def params(self) -> int:
        """Model parameters it holds (an MXFP4 byte holds two; scales hold none)."""
        if self.init == "mxfp4_blocks":
            return self.numel * 2
        if self.init == "mxfp4_scales":
            return 0
        return self.numel


def _mlp(p: str, width: int, hidden: int, names=("gate_proj", "up_proj", "down_proj")) -> list[Tensor]:
    g, u, d = names
    return [Tensor(f"{p}.{g}.weight", (width, hidden), hin=1), Tensor(f"{p}.{u}.weight", (width, hidden), hin=1),
            Tensor(f"{p}.{d}.weight", (hidden, width), hout=0)]


def _attention(p: str, c: dict, *, bias: bool = False, o_bias: bool = False,
               qk_norm: str | None = None) -> list[Tensor]:
    h, nh = int(c["hidden_size"]), int(c["num_attention_heads"])
    nkv = int(c.get("num_key_value_heads") or nh)
    hd = int(c.get("head_dim") or h // nh)
    out = []
    for proj, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
        out.append(Tensor(f"{p}.{proj}.weight", (rows, h), hin=1))
        if bias:
            out.append(Tensor(f"{p}.{proj}.bias", (rows,)))
    out.append(Tensor(f"{p}.o_proj.weight", (h, nh * hd), hout=0))
    if o_bias:
        out.append(Tensor(f"{p}.o_proj.bias", (h,), hout=0))
    if qk_norm == "head":  # Qwen3: per head
        out += [Tensor(f"{p}.q_norm.weight", (hd,), "ones"), Tensor(f"{p}.k_norm.weight", (hd,), "ones")]
    elif qk_norm == "full":  # OLMoE: over the whole projection
        out += [Tensor(f"{p}.q_norm.weight", (nh * hd,), "ones"), Tensor(f"{p}.k_norm.weight", (nkv * hd,), "ones")]
    return out


def _mla(p: str, c: dict) -> list[Tensor]:
    h, nh = int(c["hidden_size"]), int(c["num_attention_heads"])
    nope, rope, v = int(c["qk_nope_head_dim"]), int(c["qk_rope_head_dim"]), int(c["v_head_dim"])
    kv_rank, q_rank = int(c["kv_lora_rank"]), c.get("q_lora_rank")
    bias = bool(c.get("attention_bias"))
    out = []
    if q_rank:
        out += [Tensor(f"{p}.q_a_proj.weight", (int(q_rank), h), hin=1)]
        out += [Tensor(f"{p}.q_a_proj.bias", (int(q_rank),))] if bias else []
        out += [Tensor(f"{p}.q_a_layernorm.weight", (int(q_rank),), "ones"),
                Tensor(f"{p}.q_b_proj.weight", (nh * (nope + rope), int(q_rank)))]
    else:
        out.append(Tensor(f"{p}.q_proj.weight", (nh * (nope + rope), h), hin=1))
    out.append(Tensor(f"{p}.kv_a_proj_with_mqa.weight", (kv_rank + rope, h), hin=1))
    out += [Tensor(f"{p}.kv_a_proj_with_mqa.bias", (kv_rank + rope,))] if bias else []
    out += [Tensor(f"{p}.kv_a_layernorm.weight", (kv_rank,), "ones"),
            Tensor(f"{p}.kv_b_proj.weight", (nh * (nope + v), kv_rank)),
            Tensor(f"{p}.o_proj.weight", (h, nh * v), hout=0)]
    out += [Tensor(f"{p}.o_proj.bias", (h,), hout=0)] if bias else []
    return out


def _qwen_moe_layer(c: dict, i: int) -> bool:
    step = int(c.get("decoder_sparse_step") or 1)
    return int(c.get("num_experts") or 0) > 0 and i not in (c.get("mlp_only_layers") or []) and (i + 1) % step == 0


def layer_tensors(c: dict, i: int, gpt_oss_format: str = "mxfp4") -> list[Tensor]:
    a, h = arch(c), int(c["hidden_size"])
    p = f"model.layers.{i}"
    out = [Tensor(f"{p}.input_layernorm.weight", (h,), "ones")]
    if a == "Qwen3MoeForCausalLM":
        out += _attention(f"{p}.self_attn", c, bias=bool(c.get("attention_bias")), qk_norm="head")
    elif a == "Qwen2MoeForCausalLM":
        out += _attention(f"{p}.self_attn", c, bias=bool(c.get("qkv_bias", True)))
    elif a == "OlmoeForCausalLM":
        out += _attention(f"{p}.self_attn", c, bias=bool(c.get("attention_bias")), qk_norm="full")
    elif a == "MixtralForCausalLM":
        out += _attention(f"{p}.self_attn", c)
    elif a == "DeepseekV2ForCausalLM":
        out += _mla(f"{p}.self_attn", c)
    elif a == "GptOssForCausalLM":
        out += _attention(f"{p}.self_attn", c, bias=True, o_bias=True)
        out.append(Tensor(f"{p}.self_attn.sinks", (int(c["num_attention_heads"]),)))
    else:
        raise ValueError(a)
    out.append(Tensor(f"{p}.post_attention_layernorm.weight", (h,), "ones"))
    m = f"{p}.mlp"
    if a in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
        if _qwen_moe_layer(c, i):
            e, w = int(c["num_experts"]), int(c["moe_intermediate_size"])
            out.append(Tensor(f"{m}.gate.weight", (e, h), hin=1))
            for j in range(e):
                out += _mlp(f"{m}.experts.{j}", w, h)
            if a == "Qwen2MoeForCausalLM":
                out += _mlp(f"{m}.shared_expert", int(c["shared_expert_intermediate_size"]), h)
                out.append(Tensor(f"{m}.shared_expert_gate.weight", (1, h), hin=1))
        else:
            out += _mlp(m, int(c["intermediate_size"]), h)
    elif a == "OlmoeForCausalLM":
        e, w = int(c["num_experts"]), int(c["intermediate_size"])
        out.append(Tensor(f"{m}.gate.weight", (e, h), hin=1))
        for j in range(e):
            out += _mlp(f"{m}.experts.{j}", w, h)
    elif a == "MixtralForCausalLM":
        b = f"{p}.block_sparse_moe"
        e, w = int(c["num_local_experts"]), int(c["intermediate_size"])
        out.append(Tensor(f"{b}.gate.weight", (e, h), hin=1))
        for j in range(e):
            out += _mlp(f"{b}.experts.{j}", w, h, ("w1", "w3", "w2"))
    elif a == "DeepseekV2ForCausalLM":
        if i >= int(c.get("first_k_dense_replace") or 0):
            e, w = int(c["n_routed_experts"]), int(c["moe_intermediate_size"])
            out.append(Tensor(f"{m}.gate.weight", (e, h), hin=1))
            for j in range(e):
                out += _mlp(f"{m}.experts.{j}", w, h)
            out += _mlp(f"{m}.shared_experts", w * int(c["n_shared_experts"]), h)
        else:
            out += _mlp(m, int(c["intermediate_size"]), h)
    elif a == "GptOssForCausalLM":
        e, w = int(c["num_local_experts"]), int(c["intermediate_size"])
        x = f"{m}.experts"
        out += [Tensor(f"{m}.router.weight", (e, h), hin=1), Tensor(f"{m}.router.bias", (e,))]
        if gpt_oss_format == "mxfp4":  # output-major, blocks of 32 inputs: 16 bytes of codes + 1 exponent
            out += [Tensor(f"{x}.gate_up_proj_blocks", (e, 2 * w, h // 32, 16), "mxfp4_blocks", "U8", hin=2),
                    Tensor(f"{x}.gate_up_proj_scales", (e, 2 * w, h // 32), "mxfp4_scales", "U8"),
                    Tensor(f"{x}.gate_up_proj_bias", (e, 2 * w)),
                    Tensor(f"{x}.down_proj_blocks", (e, h, w // 32, 16), "mxfp4_blocks", "U8", hout=1),
                    Tensor(f"{x}.down_proj_scales", (e, h, w // 32), "mxfp4_scales", "U8"),
                    Tensor(f"{x}.down_proj_bias", (e, h), hout=1)]
        else:  # transformers' bf16 layout: input-major, gate/up interleaved along the last axis
            out += [Tensor(f"{x}.gate_up_proj", (e, h, 2 * w), hin=1), Tensor(f"{x}.gate_up_proj_bias", (e, 2 * w)),
                    Tensor(f"{x}.down_proj", (e, w, h), hout=2), Tensor(f"{x}.down_proj_bias", (e, h), hout=1)]
    return out


def tensor_plan(c: dict, gpt_oss_format: str = "mxfp4") -> list[Tensor]:
    h, v = int(c["hidden_size"]), int(c["vocab_size"])
    out = [Tensor("model.embed_tokens.weight", (v, h), "embed")]
    for i in range(int(c["num_hidden_layers"])):
        out += layer_tensors(c, i, gpt_oss_format)
    out.append(Tensor("model.norm.weight", (h,), "ones"))
    if not c.get("tie_word_embeddings"):
        out.append(Tensor("lm_head.weight", (v, h), "head"))
    return out


def gpt_oss_format_of(c: dict) -> str:
    return "mxfp4" if (c.get("quantization_config") or {}).get("quant_method") == "mxfp4" else "bf16"


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def split_shards(plan: list[Tensor], shard_bytes: int) -> list[list[Tensor]]:
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def unigram_log_probs(vocab_size: int) -> torch.Tensor:
    """log p(token) of the demo tokenizer over the shipped distillation text (+0.5 smoothing), centred."""
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    counts = torch.full((vocab_size,), 0.5, dtype=torch.float64)
    lines = DISTILL_DATA.read_text().splitlines()
    for enc in tok.encode_batch([json.loads(line)["text"] for line in lines if line.strip()]):
        counts += torch.bincount(torch.tensor(enc.ids, dtype=torch.long), minlength=vocab_size)[:vocab_size]
    logp = (counts / counts.sum()).log()
    return (logp - logp.mean()).float()


def _with_prior(x, t: Tensor, start: int, prior):
    """The unigram prior (see write_checkpoint): channel 0 of the residual stream is 1 for every token, no layer
    reads or writes it, and the head turns it into prior * log p_unigram."""
    if t.init == "embed":
        x[:, 0] = PRIOR_CHANNEL
    elif t.init == "head":
        x[:, 0] = (prior * UNIGRAM[0][start:start + x.shape[0]]).to(x.dtype)
    elif t.init == "mxfp4_blocks" and t.hin is not None:
        x[:, :, 0, 0] &= 0xF0  # input 0 is the low nibble of each row's first byte
    elif t.init == "mxfp4_blocks" and t.hout is not None:
        x[:, 0] = 0
    elif t.hin is not None:
        x.select(t.hin, 0).zero_()
    elif t.hout == 0:
        if start == 0:
            x[0] = 0
    elif t.hout is not None:
        x.select(t.hout, 0).zero_()
    return x


UNIGRAM: list = []  # [centred log-probs], filled when a prior is written
PRIOR_CHANNEL = 1.0  # the value of residual channel 0 in every embedding row


def _chunks(t: Tensor, seed: int, logit_scale: float, prior: float = 0.0):
    """The tensor's bytes, generated CHUNK values at a time along its first axis."""
    import torch

    if t.init == "ones":
        yield torch.ones(t.shape, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
        return
    row = max(1, math.prod(t.shape[1:]))
    rows_per_chunk = max(1, CHUNK // row)
    base = zlib.crc32(t.name.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)
    for k, start in enumerate(range(0, t.shape[0], rows_per_chunk)):
        n = min(rows_per_chunk, t.shape[0] - start)
        g = torch.Generator().manual_seed((base << 20) + k)
        shape = (n, *t.shape[1:])
        if t.init == "mxfp4_blocks":
            x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        elif t.init == "mxfp4_scales":
            x = torch.full(shape, MXFP4_SCALE, dtype=torch.uint8)
        else:
            std = STD * (logit_scale if t.init == "head" else 1.0)
            x = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=g)
        if prior:
            x = _with_prior(x, t, start, prior)
        x = x.view(torch.uint8)
        yield x.numpy().tobytes() if x.numel() < (1 << 16) else memoryview(x.numpy()).cast("B")


def write_shards(out: Path, plan: list[Tensor], shard_bytes: int, seed: int, logit_scale: float,
                 progress=None, prior: float = 0.0) -> list[str]:
    shards = split_shards(plan, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in shard:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
            weight_map[t.name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for t in shard:
                written = 0
                for data in _chunks(t, seed, logit_scale, prior):
                    fh.write(data)
                    written += len(data) if isinstance(data, bytes) else data.nbytes
                assert written == t.nbytes, (t.name, written, t.nbytes)
                if progress:
                    progress(t)
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def spec_of(shape: str, layers: int, experts: int | None, tiny: bool, gpt_oss_format: str, seed: int,
            logit_scale: float, overrides: dict | None, unigram_prior: float = 0.0) -> dict:
    return {"shape": shape, "hub": SHAPES[shape]["hub"], "layers": layers, "experts": experts, "tiny": tiny,
            "gpt_oss_format": gpt_oss_format if arch(SHAPES[shape]["config"]) == "GptOssForCausalLM" else None,
            "seed": seed, "logit_scale": logit_scale, "unigram_prior": unigram_prior, "overrides": overrides or {},
            "std": STD, "version": 1}


def existing_spec(out: Path) -> dict | None:
    try:
        return json.loads((out / META).read_text())["spec"]
    except (OSError, ValueError, KeyError):
        return None


def write_checkpoint(out: Path, shape: str, layers: int, experts: int | None = None, *, tiny: bool = False,
                     gpt_oss_format: str = "mxfp4", seed: int = 0, logit_scale: float = 1.0,
                     overrides: dict | None = None, shard_bytes: int = 4 * 10**9, force: bool = False,
                     unigram_prior: float = 0.0, log=print) -> dict:
    """Write (or reuse) the checkpoint; returns its real_shape.json content.

    logit_scale multiplies the output head's std. unigram_prior B > 0 gives the random teacher a context-free
    prior, so its perplexity on the demo text can fall far below the vocabulary size (a random head alone
    only sharpens wrong guesses): residual channel 0 is set to 1 in every embedding row, every tensor that reads
    the residual stream ignores it (its input column 0 is zero) and every tensor that writes it leaves it alone
    (output row 0 is zero), so it reaches the final norm unchanged, and the head's column 0 is
    B x log p_unigram(token) (centred; counts of the demo tokenizer over the shipped distill.jsonl). The logits
    get B x h_0 x log p, with h_0 = 1 / rms of the last hidden state: tune B with `real_shape.py check --forward`
    (on OLMoE's shape at 1 layer, B = 0.12 gave perplexity 1,326 against 5,178 without, of 4,096 tokens;
    the text's unigram perplexity, the floor of such a prior, is 695)."""
    out = Path(out)
    spec = spec_of(shape, layers, experts, tiny, gpt_oss_format, seed, logit_scale, overrides, unigram_prior)
    found = existing_spec(out)
    if found == spec:
        log(f"checkpoint {out} is complete (real_shape.json matches): reused")
        return json.loads((out / META).read_text())
    if out.exists() and any(out.iterdir()):
        if not ((out / META).exists() or (out / ".real_shape-writing").exists()):
            raise SystemExit(f"{out} is not a real-shape checkpoint: choose another --out (it is not deleted)")
        if found is not None and not force:  # complete, another spec (an interrupted write is simply redone)
            raise SystemExit(f"{out} holds a real-shape checkpoint of another spec: pass --force to replace it")
        shutil.rmtree(out)
    config = make_config(shape, layers, experts, tiny=tiny, gpt_oss_format=gpt_oss_format, overrides=overrides)
    plan = tensor_plan(config, gpt_oss_format_of(config))
    total = sum(t.nbytes for t in plan)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < total + (1 << 30):
        raise SystemExit(f"{out}: the checkpoint needs {total / 1e9:.2f} GB and {free / 1e9:.2f} GB are free")
    (out / ".real_shape-writing").write_text(json.dumps(spec) + "\n")
    log(f"writing {shape} ({SHAPES[shape]['hub']}) with {layers} layers to {out}: {len(plan)} tensors, "
        f"{total / 1e9:.2f} GB, {sum(t.params for t in plan) / 1e9:.3f} B params")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    ids = demo_tokenizer_ids()
    gen = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if ids[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        shutil.copyfile(DEMO / f, out / f)
    import time

    t0 = time.perf_counter()
    done = [0]

    def progress(t: Tensor) -> None:
        before = done[0]
        done[0] += t.nbytes
        if done[0] * 10 // total != before * 10 // total:
            log(f"  {done[0] / 1e9:6.2f} / {total / 1e9:.2f} GB  {time.perf_counter() - t0:6.1f} s")

    if unigram_prior:
        UNIGRAM[:] = [unigram_log_probs(int(config["vocab_size"]))]
    shards = write_shards(out, plan, shard_bytes, seed, logit_scale, progress, unigram_prior)
    seconds = time.perf_counter() - t0
    meta = {"spec": spec, "bytes": total, "params": sum(t.params for t in plan), "tensors": len(plan),
            "shards": shards, "write_seconds": round(seconds, 1)}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    (out / ".real_shape-writing").unlink()
    log(f"wrote {total / 1e9:.2f} GB in {len(shards)} shard(s) in {seconds:.1f} s ({total / 1e9 / seconds:.2f} GB/s)")
    return meta


def params_summary(c: dict, gpt_oss_format: str = "mxfp4") -> dict:
    """Total and active (per token) parameters of a config, from its tensor plan."""
    plan = tensor_plan(c, gpt_oss_format)
    total = sum(t.params for t in plan)
    a = arch(c)
    experts = int(c[EXPERTS_KEY[a]])
    top_k = int(c["num_experts_per_tok"])
    routed = 0
    for t in plan:
        if ".experts." in t.name:
            routed += t.params
    active = total - routed + routed * top_k // experts
    embed = int(c["vocab_size"]) * int(c["hidden_size"])
    return {"params": total, "active": active - embed, "active_with_embedding": active,
            "bytes": sum(t.nbytes for t in plan)}


def remove(path: Path) -> None:
    """Delete a file or a directory (the harness's own outputs)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        os.unlink(path)
