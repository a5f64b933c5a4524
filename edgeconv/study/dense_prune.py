"""Dense-to-dense width pruning, Minitron-style: the baseline the paper compares MoE-to-dense against.

Importance is measured on calibration text by activations, as in Minitron (Muralidharan et al. 2024,
"Compact Language Models via Pruning and Knowledge Distillation"): an FFN channel by the mean absolute value
of its activation (the input of down_proj) over all tokens; an attention head by the mean L2 norm of its
output (its slice of the input of o_proj). Under grouped-query attention a key/value head and the query heads
that share it are kept or dropped together; the group's importance is the sum of its query heads'. Each layer
keeps its own most important channels and groups, in their original order; depth and hidden size are kept.
The output is the source's own stock architecture with a smaller intermediate_size (and head counts).

The whole source model is loaded for the importance pass (dense baselines here are small); the MoE path's
layer-at-a-time calibration is what scales to large checkpoints.
"""

from __future__ import annotations

import torch

from edgeconv.errors import EdgeconvError
from edgeconv.families.base import looks_moe, routed_experts
from edgeconv.io.checkpoint import Checkpoint

# Dense decoders whose layers hold mlp.{gate,up,down}_proj and self_attn.{q,k,v,o}_proj (q/k norms, if any,
# act per head and are shared across heads, so they survive head pruning unchanged).
DENSE_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")


def check_dense_source(ckpt: Checkpoint) -> str:
    arch = (ckpt.config.get("architectures") or ["?"])[0]
    if routed_experts(ckpt.config) > 1 or looks_moe(ckpt.config):
        raise EdgeconvError(f"{ckpt.path} is a Mixture-of-Experts ({arch}), not a dense model",
                            "width pruning is the dense-to-dense baseline; convert an MoE with `edgeconv convert`")
    if arch not in DENSE_ARCHITECTURES:
        raise EdgeconvError(f"{ckpt.path} is a {arch}; dense pruning supports {', '.join(DENSE_ARCHITECTURES)}",
                            "pass a dense checkpoint of one of those architectures")
    return arch


def attention_shape(config: dict) -> tuple[int, int, int]:
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return heads, kv, head_dim


def param_count(config: dict, ffn_width: int | None = None, kv_heads: int | None = None) -> int:
    """Parameters of the source's architecture at this FFN width and key/value head count."""
    heads, kv, d = attention_shape(config)
    kv_new = kv_heads or kv
    q_heads = kv_new * (heads // kv)
    width = config["intermediate_size"] if ffn_width is None else ffn_width
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    bias = (q_heads + 2 * kv_new) * d if config.get("attention_bias") or config.get("model_type") == "qwen2" else 0
    qk_norm = 2 * d if config.get("model_type") == "qwen3" else 0
    attn = h * q_heads * d + 2 * h * kv_new * d + q_heads * d * h + bias + qk_norm
    per_layer = attn + 3 * h * width + 2 * h
    embed = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return layers * per_layer + embed + h


def width_for_params(config: dict, target: int, kv_heads: int | None = None) -> int:
    """The largest FFN width (a multiple of 8) whose model has at most `target` parameters."""
    fixed = param_count(config, 0, kv_heads)
    per_channel = 3 * config["hidden_size"] * config["num_hidden_layers"]
    width = (target - fixed) // per_channel // 8 * 8
    if width < 8:
        raise EdgeconvError(f"{target:,} parameters leave no room for an FFN (attention and embeddings take {fixed:,})",
                            "ask for more parameters, or fewer --kv-heads")
    return min(width, config["intermediate_size"])


def importance(model, ids: torch.Tensor, batch_size: int = 4) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: 'channels' [intermediate] mean |activation|, 'heads' [heads] mean L2 norm of head outputs."""
    heads, _, d = attention_shape(model.config.to_dict())
    acc: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    count = [0]

    def on_down(i):
        def hook(_module, args):
            x = args[0].detach().float()
            acc[i]["channels"] += x.abs().reshape(-1, x.shape[-1]).sum(0)
        return hook

    def on_o(i):
        def hook(_module, args):
            x = args[0].detach().float()
            acc[i]["heads"] += x.reshape(-1, heads, d).norm(dim=-1).sum(0)
        return hook

    for i, layer in enumerate(model.model.layers):
        acc[i] = {"channels": torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64),
                  "heads": torch.zeros(heads, dtype=torch.float64)}
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
    try:
        with torch.no_grad():
            for b in range(0, ids.shape[0], batch_size):
                batch = ids[b:b + batch_size]
                model(input_ids=batch, use_cache=False)
                count[0] += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    return {i: {k: v / count[0] for k, v in a.items()} for i, a in acc.items()}


def keep_top(score: torch.Tensor, n: int) -> list[int]:
    """Indices of the n largest scores (ties to the lower index), in increasing order."""
    values = score.tolist()
    return sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:n])


def pruned_state(model, imp: dict, ffn_width: int, kv_heads: int) -> tuple[dict, dict]:
    """The sliced state dict and, per layer, what was kept."""
    heads, kv, d = attention_shape(model.config.to_dict())
    group = heads // kv
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kept = {}
    for i, _layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        ch = keep_top(imp[i]["channels"], ffn_width)
        group_score = imp[i]["heads"].reshape(kv, group).sum(-1)
        groups = keep_top(group_score, kv_heads)
        q_rows = torch.tensor([h * d + j for g in groups for h in range(g * group, (g + 1) * group) for j in range(d)])
        kv_rows = torch.tensor([g * d + j for g in groups for j in range(d)])
        idx = torch.tensor(ch)
        for name in ("gate_proj", "up_proj"):
            state[f"{p}mlp.{name}.weight"] = state[f"{p}mlp.{name}.weight"][idx]
        state[f"{p}mlp.down_proj.weight"] = state[f"{p}mlp.down_proj.weight"][:, idx]
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for kind in ("weight", "bias"):
                key = f"{p}self_attn.{name}.{kind}"
                if key in state:
                    state[key] = state[key][rows]
        state[f"{p}self_attn.o_proj.weight"] = state[f"{p}self_attn.o_proj.weight"][:, q_rows]
        kept[i] = {"kept_channels": ch, "kv_groups": groups}
    return state, kept


def ckpt_dtype(config: dict, fallback: torch.dtype) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else fallback
