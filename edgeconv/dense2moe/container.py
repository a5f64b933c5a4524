"""The upcycled model as a stock transformers class: Glm4MoeForCausalLM.

Why GLM-4-MoE: it is the one class in transformers 4.57 that holds a Qwen3 decoder exactly (per-head RMSNorm
on q and k with `use_qk_norm`, full rotate-half RoPE with `partial_rotary_factor` 1.0, no attention bias, GQA)
next to an always-on shared expert, and that llama.cpp loads with GQA (its `glm4moe` arch). dots1 has the
same modules but llama.cpp's dots1 rejects GQA; Qwen2-MoE has no q/k norm; Qwen3-MoE has no shared expert.

How a Qwen3 source maps:
- layers before the first fused layer stay plain MLP layers (`first_k_dense_replace`);
- a fused layer keeps its attention; its own MLP is the shared expert (`n_shared_experts` x
  `moe_intermediate_size` = the source width); each absorbed layer's MLP becomes `split` routed experts
  (its channels cut in `split` equal parts), whose gate/up columns absorb the ratio of the absorbed layer's
  post-attention norm weight to the fused layer's (the MoE block reads the fused layer's norm output);
- GLM-4-MoE puts plain MLP layers only first, so a kept layer after a fused one is an MoE layer whose shared
  expert is its MLP and whose routed experts are zero, the router pinned to expert 0 by its bias: exact,
  at the cost of zero expert weights in the file (never read when memory-mapped: the pinned expert is zero
  too, but only that one is touched);
- routing: sigmoid scores, top-k (1 by default), no renormalisation, `routed_scaling_factor` 2, so a router
  logit of 0 gives an expert weight of exactly 2 * sigmoid(0) = 1; renormalised top-1 would pin every weight
  at 1 and leave the router without a gradient. Unused expert slots get bias -1e4 (never chosen).
Absorbed MLPs read the fused layer's input instead of their own layer's: the MoE block is parallel, so an
upcycled run differs from the source by the removed attention and by this reordering.
"""

from __future__ import annotations

import math

import torch

from edgeconv.dense2moe.redundancy import Run

NEVER = -1e4  # router bias of a slot that must never be chosen (sigmoid scores are in (0, 1))
ROUTED_SCALE = 2.0  # 2 * sigmoid(0) = 1: a zero router logit passes an expert through unchanged


def layer_map(num_layers: int, runs: list[Run]) -> list[tuple[int, Run | None]]:
    """(source layer, its run if it heads one) for every kept layer, in order."""
    absorbed = {a for r in runs for a in r.absorbed}
    head = {r.first: r for r in runs}
    return [(i, head.get(i)) for i in range(num_layers) if i not in absorbed]


def container_config(source: dict, runs: list[Run], split: int, top_k: int):
    from transformers import Glm4MoeConfig

    kept = layer_map(source["num_hidden_layers"], runs)
    first_fused = next((k for k, (_, run) in enumerate(kept) if run), len(kept))
    width = source["intermediate_size"]
    most = max((len(r.absorbed) for r in runs), default=1)
    heads = source["num_attention_heads"]
    config = Glm4MoeConfig(
        vocab_size=source["vocab_size"], hidden_size=source["hidden_size"], intermediate_size=width,
        num_hidden_layers=len(kept), num_attention_heads=heads,
        num_key_value_heads=source.get("num_key_value_heads") or heads,
        head_dim=source.get("head_dim") or source["hidden_size"] // heads, partial_rotary_factor=1.0,
        use_qk_norm=True, attention_bias=False, hidden_act=source.get("hidden_act", "silu"),
        max_position_embeddings=source["max_position_embeddings"], rms_norm_eps=source["rms_norm_eps"],
        rope_theta=source.get("rope_theta", 10000.0), rope_scaling=source.get("rope_scaling"),
        tie_word_embeddings=source.get("tie_word_embeddings", False),
        moe_intermediate_size=width // split, n_shared_experts=split, n_routed_experts=max(2, most * split),
        num_experts_per_tok=top_k, n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=ROUTED_SCALE, first_k_dense_replace=first_fused,
    )
    config.architectures = ["Glm4MoeForCausalLM"]
    config.num_nextn_predict_layers = 0
    return config


def container_state(src_state: dict[str, torch.Tensor], config, num_layers: int, runs: list[Run], split: int,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """The GLM-4-MoE state dict (fp32) from the source's. Router weights of fused layers: N(0, (0.1/sqrt(H))^2)
    so that initial weights are 1 +- a few percent and tokens spread over the experts."""
    out = {k: v for k, v in src_state.items() if not k.startswith("model.layers.")}
    gen = torch.Generator().manual_seed(seed)
    hidden, n_exp = config.hidden_size, config.n_routed_experts
    piece = config.moe_intermediate_size
    for k, (s, run) in enumerate(layer_map(num_layers, runs)):
        src, dst = f"model.layers.{s}.", f"model.layers.{k}."
        for name, t in src_state.items():
            if name.startswith(src) and ".mlp." not in name:
                out[dst + name[len(src):]] = t
        mlp = {p: src_state[f"{src}mlp.{p}_proj.weight"] for p in ("gate", "up", "down")}
        if k < config.first_k_dense_replace:
            out.update({f"{dst}mlp.{p}_proj.weight": w for p, w in mlp.items()})
            continue
        out.update({f"{dst}mlp.shared_experts.{p}_proj.weight": w for p, w in mlp.items()})
        experts = [{p: torch.zeros(piece, hidden) for p in ("gate", "up")} | {"down": torch.zeros(hidden, piece)}
                   for _ in range(n_exp)]
        bias = torch.full((n_exp,), NEVER)
        router = torch.zeros(n_exp, hidden)
        if run is None:  # a kept layer after a fused one: zero experts, pinned to expert 0
            bias[0] = 0.0
        else:
            gamma = src_state[f"{src}post_attention_layernorm.weight"].float()
            slot = 0
            for a in run.absorbed:
                pre = f"model.layers.{a}."
                ratio = src_state[f"{pre}post_attention_layernorm.weight"].float() / gamma
                for c in range(split):
                    rows = slice(c * piece, (c + 1) * piece)
                    experts[slot] = {
                        "gate": src_state[f"{pre}mlp.gate_proj.weight"][rows].float() * ratio,
                        "up": src_state[f"{pre}mlp.up_proj.weight"][rows].float() * ratio,
                        "down": src_state[f"{pre}mlp.down_proj.weight"][:, rows].float(),
                    }
                    bias[slot] = 0.0
                    router[slot] = torch.randn(hidden, generator=gen) * (0.1 / math.sqrt(hidden))
                    slot += 1
        for e, ex in enumerate(experts):
            out.update({f"{dst}mlp.experts.{e}.{p}_proj.weight": w for p, w in ex.items()})
        out[f"{dst}mlp.gate.weight"] = router
        out[f"{dst}mlp.gate.e_score_correction_bias"] = bias
    return {k: v.float().contiguous() for k, v in out.items()}
