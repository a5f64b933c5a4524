"""Tiny random checkpoints for every family, built from transformers' config classes (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

E = 8  # experts per MoE layer in every tiny model

COMMON = dict(
    vocab_size=384,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def tiny_config(arch: str, top_k: int = 2):
    import transformers as tf

    if arch == "Qwen3MoeForCausalLM":
        return tf.Qwen3MoeConfig(**COMMON, head_dim=8, moe_intermediate_size=16, intermediate_size=40,
                                 num_experts=E, num_experts_per_tok=top_k, norm_topk_prob=True)
    if arch == "Qwen2MoeForCausalLM":
        # Layer 0 is dense in the source (mlp_only_layers) to exercise zero-padding; no qkv bias, so the
        # dense Qwen2's mandatory q/k/v biases must be written as zeros.
        return tf.Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 3}, moe_intermediate_size=16, intermediate_size=40,
                                 shared_expert_intermediate_size=24, num_experts=E, num_experts_per_tok=top_k,
                                 norm_topk_prob=False, mlp_only_layers=[0], qkv_bias=False)
    if arch == "MixtralForCausalLM":
        return tf.MixtralConfig(**COMMON, head_dim=8, intermediate_size=16, num_local_experts=E,
                                num_experts_per_tok=top_k)
    if arch == "OlmoeForCausalLM":
        # No GQA, as in the released OLMoE (llama.cpp's olmoe sizes k-norm by the full width).
        return tf.OlmoeConfig(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=16, num_experts=E,
                              num_experts_per_tok=top_k)
    if arch == "DeepseekV2ForCausalLM":
        return tf.DeepseekV2Config(**{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, intermediate_size=48,
                                   moe_intermediate_size=16,
                                   n_routed_experts=E, n_shared_experts=2, num_experts_per_tok=top_k,
                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                                   qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, head_dim=4,
                                   routed_scaling_factor=2.0, topk_method="greedy", n_group=1, topk_group=1)
    if arch == "GptOssForCausalLM":
        return tf.GptOssConfig(**COMMON, head_dim=8, intermediate_size=32, num_local_experts=E,
                               num_experts_per_tok=top_k, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"])
    raise KeyError(arch)


ARCHS = [
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "MixtralForCausalLM",
    "OlmoeForCausalLM",
    "DeepseekV2ForCausalLM",
    "GptOssForCausalLM",
]


def build_model(arch: str, top_k: int = 2, uniform_router: bool = False, seed: int = 0, weight_std: float = 0.2,
                **overrides):
    """A random model; with `uniform_router` every router (and Qwen2's shared-expert gate) is zeroed.

    Wide models want a smaller `weight_std`: at 0.2 a 256-wide model's logits reach +-15 and its perplexity
    tens of thousands, where any rounding moves the perplexity by percents."""
    config = tiny_config(arch, top_k)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():  # from_config leaves some tensors (e.g. GPT-OSS experts) at zero
            p.copy_(torch.randn_like(p) * weight_std)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            if uniform_router and _is_router(name):
                p.zero_()
    return model


def _is_router(name: str) -> bool:
    return any(name.endswith(s) for s in (
        "mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight", "mlp.router.bias",
        "mlp.shared_expert_gate.weight"))


def save(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def fuse_experts(src: Path, dst: Path) -> Path:
    """Rewrite a per-expert checkpoint in transformers 5.x's fused layout (mlp.experts.gate_up_proj)."""
    import re
    import shutil

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    pat = re.compile(r"^(model\.layers\.\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, t in tensors.items():
        m = pat.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(3)), {})[m.group(4)] = t
            continue
        out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = t
    names = {"gate_proj": ("gate_proj", "up_proj", "down_proj"), "w1": ("w1", "w3", "w2")}
    for layer, by_e in experts.items():
        g, u, d = names["w1" if "w1" in by_e[0] else "gate_proj"]
        ids = sorted(by_e)
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([by_e[e][g], by_e[e][u]]) for e in ids])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([by_e[e][d] for e in ids])
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


CORPUS = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    "12 + 34 = 46. 7 + 8 = 15. sort: c a b -> a b c. reverse: abc -> cba. "
)


def add_tokenizer(path: Path, vocab_size: int = 384) -> Path:
    """A byte-level BPE trained here on CORPUS, saved next to the weights (vocab fits the tiny models):
    all 256 byte symbols (so any text tokenizes the same in llama.cpp), <eos>, and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
    return path


def write_corpus(path: Path, docs: int = 40) -> Path:
    """A JSONL calibration file of `docs` short documents."""
    import random

    rng = random.Random(0)
    words = CORPUS.split()
    with open(path, "w") as fh:
        for _ in range(docs):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n")
    return path
