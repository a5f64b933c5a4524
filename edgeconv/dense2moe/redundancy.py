"""Which layers of a dense model are redundant: similarities measured on calibration text, and runs chosen.

Two figures per layer, both mean cosine similarities over every calibration token:
- `layer_similarity[i]`: between decoder layer i's input and output hidden states (1 - ShortGPT's Block
  Influence): near 1, the layer barely changes the residual stream.
- `mlp_input_similarity[i]`: between the MLP inputs (post-attention norm outputs) of layers i - 1 and i (0 for
  layer 0): near 1, layer i's MLP reads what layer i - 1's MLP reads, so both can read the same input.
Layer i (i >= 1) is absorbable when both are >= the threshold. A run is a kept layer followed by the
absorbable layers right after it: the first keeps its attention, the others give their MLPs as experts.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from edgeconv.errors import EdgeconvError


class Run(BaseModel):
    first: int  # keeps attention; its MLP becomes the shared expert
    last: int  # inclusive; layers first+1..last lose attention, their MLPs become routed experts

    @property
    def absorbed(self) -> list[int]:
        return list(range(self.first + 1, self.last + 1))

    def label(self) -> str:
        return f"{self.first}-{self.last}"


def measure(model, ids: torch.Tensor, batch_size: int = 4) -> dict[str, list[float]]:
    """layer_similarity and mlp_input_similarity per layer (see the module docstring)."""
    layers = model.model.layers
    n = len(layers)
    sums = {"layer": torch.zeros(n, dtype=torch.float64), "mlp": torch.zeros(n, dtype=torch.float64)}
    seen: dict[str, torch.Tensor] = {}
    tokens = [0]
    hooks = []

    def on_layer(i):
        def hook(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            sums["layer"][i] += torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).sum().double()
        return hook

    def on_mlp(i):
        def hook(_module, args):
            x = args[0].float()
            if i > 0:
                sums["mlp"][i] += torch.nn.functional.cosine_similarity(seen["mlp"], x, dim=-1).sum().double()
            seen["mlp"] = x
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        hooks.append(layer.mlp.register_forward_pre_hook(on_mlp(i)))
    try:
        with torch.no_grad():
            for b in range(0, ids.shape[0], batch_size):
                batch = ids[b:b + batch_size]
                seen.clear()
                model(input_ids=batch, use_cache=False)
                tokens[0] += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    return {"layer_similarity": (sums["layer"] / tokens[0]).tolist(),
            "mlp_input_similarity": (sums["mlp"] / tokens[0]).tolist()}


def absorbable(figures: dict[str, list[float]], threshold: float) -> list[bool]:
    ls, ms = figures["layer_similarity"], figures["mlp_input_similarity"]
    return [i > 0 and ls[i] >= threshold and ms[i] >= threshold for i in range(len(ls))]


def select_runs(figures: dict[str, list[float]], threshold: float) -> list[Run]:
    """Maximal runs: each absorbable layer joins the run of the layer before it."""
    runs: list[Run] = []
    for i, ok in enumerate(absorbable(figures, threshold)):
        if not ok:
            continue
        if runs and runs[-1].last == i - 1:
            runs[-1] = Run(first=runs[-1].first, last=i)
        else:
            runs.append(Run(first=i - 1, last=i))
    return runs


def parse_runs(text: str, num_layers: int) -> list[Run]:
    """'none', or 'L1-L2,...' (inclusive layer indices, L2 > L1)."""
    if text.strip() == "none":
        return []
    runs = []
    for part in text.split(","):
        try:
            a, b = (int(x) for x in part.strip().split("-"))
        except ValueError:
            raise EdgeconvError(f"--runs {text!r}: {part.strip()!r} is not FIRST-LAST", "pass e.g. --runs 3-4,6-8")
        if not 0 <= a < b < num_layers:
            raise EdgeconvError(f"--runs {part.strip()}: need 0 <= FIRST < LAST < {num_layers} (the model's layers)",
                                "a run is a kept layer and at least one layer after it")
        runs.append(Run(first=a, last=b))
    runs.sort(key=lambda r: r.first)
    for prev, nxt in zip(runs, runs[1:]):
        if nxt.first <= prev.last:
            raise EdgeconvError(f"--runs {prev.label()} and {nxt.label()} overlap", "give disjoint runs")
    return runs


def check_runs(runs: list[Run], num_layers: int) -> None:
    if any(r.first == 0 and r.last == num_layers - 1 for r in runs):
        raise EdgeconvError(f"run 0-{num_layers - 1} covers every layer: the model would keep one attention layer",
                            "keep at least one layer outside the runs (a lower --threshold, or explicit --runs)")
