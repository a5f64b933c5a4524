"""Will the student fit the target? Weights + KV cache + runtime buffers, estimated from config.json alone.

Runs before any heavy work: parameter counts come from instantiating the dense config on torch's `meta`
device (no memory, exact shapes for every family), bytes from the bits per weight of the chosen format.
The estimate is deliberately simple and stated: llama.cpp keeps 1-D tensors in F32, the output matrix of a
k-quant mix in Q6_K, the KV cache in F16 for every layer at the full context, and a compute buffer for one
512-token batch (including the attention scores llama.cpp materialises without flash attention).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, replace

from edgeconv.errors import EdgeconvError

# Average bits per weight of 2-D tensors per GGUF type (llama.cpp block sizes; the _M mixes keep some
# attn_v/ffn_down tensors one step up, which llama.cpp's own size reports put at these averages).
GGUF_BITS = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.69,
             "Q4_K_M": 4.85, "Q4_0": 4.5}
# onnxruntime-genai: int4 is MatMulNBits with block 32 and an fp16 scale; int8 per-channel.
ONNX_BITS = {"fp32": 32.0, "fp16": 16.0, "int8": 8.0, "int4": 4.5}
OUTPUT_BITS_K_QUANT = 6.5625  # llama.cpp's _K_M mixes store output.weight in Q6_K
RUNTIME_BASE_BYTES = 150_000_000  # the runtime library, the Python interpreter of bench.py, the tokenizer
BATCH = 512  # llama.cpp's default n_ubatch: the compute buffer scales with it
KV_BYTES = 2  # F16 cache


@dataclass(frozen=True)
class Config:
    """One candidate configuration of the deployed student."""

    groups: int  # dense FFN width = groups x expert width (+ shared)
    width: int
    fmt: str  # gguf | onnx-genai
    quant: str  # GGUF type or ONNX precision
    context: int

    def flags(self) -> str:
        q = "--quant" if self.fmt == "gguf" else "--precision"
        return f"--groups {self.groups} {q} {self.quant} --context {self.context}"


@dataclass(frozen=True)
class Estimate:
    config: Config
    params: int
    weights_bytes: int
    kv_cache_bytes: int
    runtime_bytes: int
    budget_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def breakdown(self) -> str:
        c = self.config
        return (f"weights {gb(self.weights_bytes)} ({self.params / 1e6:,.1f} M params at {c.quant}) + KV cache "
                f"{gb(self.kv_cache_bytes)} at {c.context} tokens + runtime {gb(self.runtime_bytes)} = "
                f"{gb(self.total_bytes)} of {gb(self.budget_bytes)} usable")

    def as_dict(self) -> dict:
        return {**asdict(self.config), "params": self.params, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "runtime_bytes": self.runtime_bytes,
                "total_bytes": self.total_bytes, "budget_bytes": self.budget_bytes, "fits": self.fits}


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def bits_per_weight(fmt: str, quant: str) -> float:
    table = GGUF_BITS if fmt == "gguf" else ONNX_BITS
    if quant not in table:
        raise EdgeconvError(f"unknown {fmt} quantization {quant!r}", f"use one of {', '.join(table)}")
    return table[quant]


PROBE_WIDTH = 7919  # a prime no other dimension equals: marks the FFN-width axes in one instantiation


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape for a transformers config dict, without allocating memory; the FFN width
    (intermediate_size) is substituted into shapes from one cached instantiation."""
    width = int(config["intermediate_size"])
    probe = _shapes_at_probe_width(json.dumps({**config, "intermediate_size": PROBE_WIDTH}, sort_keys=True))
    return {name: tuple(width if d == PROBE_WIDTH else d for d in shape) for name, shape in probe.items()}


@functools.lru_cache(maxsize=8)
def _shapes_at_probe_width(config_json: str) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(config_json)
    skip = ("architectures", "transformers_version", "model_type", "auto_map", "quantization_config")
    cfg = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k not in skip})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    # Tied embeddings appear once: llama.cpp reuses token_embd as the output matrix too.
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def weight_bytes(shapes: dict[str, tuple[int, ...]], fmt: str, quant: str) -> int:
    bits = bits_per_weight(fmt, quant)
    total = 0.0
    for name, shape in shapes.items():
        n = math.prod(shape)
        if len(shape) < 2:
            total += n * 4  # norms and biases stay F32 (GGUF) / fp32 (ONNX)
        elif fmt == "gguf" and "lm_head" in name and "_K" in quant:
            total += n * OUTPUT_BITS_K_QUANT / 8
        else:
            total += n * bits / 8
    return int(total)


def kv_cache_bytes(config: dict, context: int, dense_layers: int | None = None) -> int:
    layers = dense_layers or int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    if "kv_lora_rank" in config and config.get("qk_nope_head_dim"):  # DeepSeek MLA, cached expanded per head
        per_token = heads * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"] + config["v_head_dim"])
    else:
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        per_token = 2 * kv_heads * head_dim
    return layers * per_token * context * KV_BYTES


def runtime_bytes(config: dict, width: int, context: int) -> int:
    """Base + one batch's compute buffer: activations, the FFN's hidden, the logits and the attention scores."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    vocab = int(config["vocab_size"])
    per_row = 4 * (4 * hidden + 2 * width + vocab + heads * context)
    return RUNTIME_BASE_BYTES + BATCH * per_row


def estimate(config: dict, cand: Config, budget_bytes: int) -> Estimate:
    """`config` is the student's (dense) config.json; `cand.width` its FFN width."""
    shapes = tensor_shapes({**config, "intermediate_size": cand.width})
    return Estimate(cand, sum(math.prod(s) for s in shapes.values()), weight_bytes(shapes, cand.fmt, cand.quant),
                    kv_cache_bytes(config, cand.context), runtime_bytes(config, cand.width, cand.context),
                    budget_bytes)


def quants_below(fmt: str, quant: str) -> list[str]:
    """The candidate precisions from `quant` downwards (never up: the user's choice is an upper bound)."""
    table = GGUF_BITS if fmt == "gguf" else ONNX_BITS
    own = table[quant]
    return sorted((q for q, b in table.items() if b <= own and q != "BF16"), key=lambda q: -table[q])


def largest_fit(config: dict, want: Config, expert_width: int, shared_width: int, budget_bytes: int,
                min_context: int = 512) -> Estimate | None:
    """The largest configuration that fits: most FFN groups first, then the highest precision, then the
    longest context (halving down to `min_context`). None if not even one group at the lowest precision
    and `min_context` fits."""
    contexts = []
    c = want.context
    while c >= min_context:
        contexts.append(c)
        c //= 2
    for context in contexts:
        for groups in range(want.groups, 0, -1):
            for quant in quants_below(want.fmt, want.quant):
                cand = replace(want, groups=groups, width=groups * expert_width + shared_width, quant=quant,
                               context=context)
                est = estimate(config, cand, budget_bytes)
                if est.fits:
                    return est
    return None
