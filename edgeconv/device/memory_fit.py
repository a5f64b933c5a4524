"""Will the student fit the target? Weights + KV cache + runtime buffers, estimated from config.json alone.

Runs before any heavy work: parameter counts come from instantiating the dense config on torch's `meta`
device (no memory, exact shapes for every family). For GGUF the weights are the file llama.cpp's quantizer
writes: the exporter's own tensor list, each tensor's type chosen by llama.cpp's rules (its per-tensor mix and
its fallbacks for widths that are not a multiple of 256: edgeconv.export.gguf.type_choice), plus the header and
the tokenizer's metadata (exact from a tokenizer.json, else estimated from the vocabulary size). For ONNX, the
bits per weight of the type. Then the KV cache in F16 for every layer at the full context, and a compute buffer
for one 512-token batch (including the attention scores llama.cpp materialises without flash attention).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, replace

from edgeconv.quant import get_quant, quants

# Bits per weight of each type: edgeconv.quant's table (QuantType.bits); for GGUF only when the exporter cannot
# lay the model out (an architecture it does not export).
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
    quant: str  # a name of edgeconv.quant's table for fmt
    context: int

    def flags(self) -> str:
        """The `edgeconv build` options that choose this configuration (every format spells it --quant)."""
        return f"--groups {self.groups} --quant {self.quant} --context {self.context}"


@dataclass(frozen=True)
class Estimate:
    config: Config
    params: int
    weights_bytes: int
    kv_cache_bytes: int
    runtime_bytes: int
    budget_bytes: int
    # GGUF: 2-D weights llama.cpp's k-quant mix cannot give its type (input width not a multiple of 256), of how many.
    fallbacks: int = 0
    quantized: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def breakdown(self) -> str:
        c = self.config
        note = (f", {self.fallbacks} of {self.quantized} matrices outside the k-quants: width not a multiple of 256"
                if self.fallbacks else "")
        return (f"weights {gb(self.weights_bytes)} ({self.params / 1e6:,.1f} M params at {c.quant}{note}) + KV cache "
                f"{gb(self.kv_cache_bytes)} at {c.context} tokens + runtime {gb(self.runtime_bytes)} = "
                f"{gb(self.total_bytes)} of {gb(self.budget_bytes)} usable")

    def as_dict(self) -> dict:
        return {**asdict(self.config), "params": self.params, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "runtime_bytes": self.runtime_bytes,
                "total_bytes": self.total_bytes, "budget_bytes": self.budget_bytes, "fits": self.fits,
                "k_quant_fallbacks": self.fallbacks}


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def bits_per_weight(fmt: str, quant: str) -> float:
    return get_quant(fmt, quant).bits


PROBE_WIDTH = 7919  # a prime no other dimension is a multiple of: marks the FFN-width axes in one instantiation


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape for a transformers config dict, without allocating memory; the FFN width
    (intermediate_size) is substituted into shapes from one cached instantiation. An axis of k x the width
    (GPT-OSS's fused gate_up_proj [E, hidden, 2 x width] and its bias) becomes k x the width."""
    width = int(config["intermediate_size"])
    probe = _shapes_at_probe_width(json.dumps({**config, "intermediate_size": PROBE_WIDTH}, sort_keys=True))
    return {name: tuple(d // PROBE_WIDTH * width if d % PROBE_WIDTH == 0 else d for d in shape)
            for name, shape in probe.items()}


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


def gguf_file(config: dict, quant: str, tokenizer=None, shapes: dict | None = None):
    """The GGUF `edgeconv export --quant quant` writes for a checkpoint with this config.json
    (edgeconv.export.gguf.type_choice.FilePlan: every tensor's type, the file's bytes), `tokenizer` a directory
    with its tokenizer.json; None when the exporter cannot lay this architecture out."""
    from edgeconv.errors import EdgeconvError

    try:
        layout = _gguf_layout(json.dumps(config, sort_keys=True), None if tokenizer is None else str(tokenizer),
                              json.dumps(sorted(shapes.items())) if shapes is not None else None)
    except EdgeconvError:
        return None
    return layout.plan(quant)


@functools.lru_cache(maxsize=16)
def _gguf_layout(config_json: str, tokenizer: str | None, shapes_json: str | None):
    from edgeconv.export.gguf.type_choice import gguf_layout

    config = json.loads(config_json)
    shapes = ({name: tuple(shape) for name, shape in json.loads(shapes_json)} if shapes_json is not None
              else tensor_shapes(config))
    return gguf_layout(config, shapes, tokenizer)


def weight_bytes(shapes: dict[str, tuple[int, ...]], fmt: str, quant: str, config: dict | None = None,
                 tokenizer=None) -> int:
    """The weights' bytes on the device. GGUF with the model's `config`: the whole file llama.cpp writes
    (gguf_file). Otherwise (ONNX, or no config): the type's bits per weight, 1-D tensors in fp32 and, for a GGUF
    k-quant mix, the output matrix in Q6_K."""
    if fmt == "gguf" and config is not None:
        planned = gguf_file(config, quant, tokenizer, shapes)
        if planned is not None:
            return planned.file_bytes
    bits = bits_per_weight(fmt, quant)
    total = 0.0
    for name, shape in shapes.items():
        n = math.prod(shape)
        if len(shape) < 2:
            total += n * 4  # norms and biases stay F32 (GGUF) / fp32 (ONNX)
        elif fmt == "gguf" and "lm_head" in name and get_quant(fmt, quant).k_quant:
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


def estimate(config: dict, cand: Config, budget_bytes: int, tokenizer=None) -> Estimate:
    """`config` is the student's (dense) config.json; `cand.width` its FFN width; `tokenizer` a directory with the
    tokenizer.json the student will have (the teacher's), for the GGUF's exact tokenizer metadata."""
    student = {**config, "intermediate_size": cand.width}
    shapes = tensor_shapes(student)
    params = sum(math.prod(s) for s in shapes.values())
    planned = gguf_file(student, cand.quant, tokenizer) if cand.fmt == "gguf" else None
    if planned is not None:
        weights, quantized = planned.file_bytes, len(planned.types.quantized)
        fallbacks = len(planned.types.fallbacks) if get_quant("gguf", cand.quant).k_quant else 0
    else:
        weights, quantized, fallbacks = weight_bytes(shapes, cand.fmt, cand.quant), 0, 0
    return Estimate(cand, params, weights, kv_cache_bytes(config, cand.context),
                    runtime_bytes(config, cand.width, cand.context), budget_bytes, fallbacks, quantized)


def quants_below(fmt: str, quant: str) -> list[str]:
    """The candidate types of `fmt` from `quant` downwards (never up: the user's choice is an upper bound), one
    per size (the first in table order: F16, not BF16)."""
    own = get_quant(fmt, quant).bits
    seen: dict[float, str] = {}
    for q in quants(fmt):
        if q.bits <= own:
            seen.setdefault(q.bits, q.name)
    return [seen[b] for b in sorted(seen, reverse=True)]


def largest_fit(config: dict, want: Config, expert_width: int, shared_width: int, budget_bytes: int,
                min_context: int = 512, tokenizer=None) -> Estimate | None:
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
                est = estimate(config, cand, budget_bytes, tokenizer)
                if est.fits:
                    return est
    return None
