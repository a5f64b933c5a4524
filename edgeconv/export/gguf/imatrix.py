"""Importance matrix for llama.cpp's quantizer, computed in torch from calibration text.

For every matrix y = W x that llama.cpp will quantize, the importance of input column j is the mean of
x_j^2 over the calibration tokens (what llama.cpp's imatrix tool collects); the quantizer then spends its
precision where inputs are large. Routed experts get one vector per expert, averaged over the tokens routed
to it, stacked in expert order. Collected with forward hooks on the model's nn.Linear modules and handed to
`llama_model_quantize` through its C array of (name, data, size), no intermediate file needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import torch

from edgeconv.export.gguf.arch import gguf_arch_for
from edgeconv.io.text_data import token_sequences

EXPERT = re.compile(r"^(model\.layers\.\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)$")
EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class Imatrix(dict):
    """GGUF tensor name -> float32 importance vector, and what it was computed on: `chunks` sequences of
    `chunk_size` tokens (llama-imatrix's chunks: one forward pass each) of the data `dataset`."""

    def __init__(self, vectors: dict[str, torch.Tensor], *, dataset: str, chunks: int, chunk_size: int):
        super().__init__(vectors)
        self.dataset, self.chunks, self.chunk_size = dataset, chunks, chunk_size


def compute_imatrix(model_dir: Path, data: Path, tokens: int = 8192, seq_len: int = 256,
                    cache_dir: Path | None = None) -> Imatrix:
    """GGUF tensor name -> float32 importance vector (length = input width, x experts for stacked experts).

    `data` is any calibration data (`edgeconv.io.text_data`: text, JSONL, parquet, a datasets directory),
    read through its token stream (kept in `cache_dir` for a rerun; None: a temporary one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = __import__("json").loads((Path(model_dir) / "config.json").read_text())
    spec = gguf_arch_for(config)
    tmap = gguf.get_tensor_name_map(spec.arch, int(config["num_hidden_layers"]))
    ids, _ = token_sequences(AutoTokenizer.from_pretrained(model_dir), Path(data), tokens, seq_len, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i in range(0, len(ids), 4):
            model(ids[i : i + 4])
    for h in handles:
        h.remove()
    means = {n: (sums[n] / max(counts[n], 1)).float() for n in sums}
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, vec in means.items():
        m = EXPERT.match(name)
        if m:
            experts.setdefault((m.group(1), EXPERT_PROJ.get(m.group(4), m.group(4))), {})[int(m.group(3))] = vec
            continue
        gname = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
        if gname is not None:
            out[gname] = vec
    for (layer, proj), by_expert in experts.items():
        n = max(by_expert) + 1
        width = next(iter(by_expert.values())).numel()
        # An expert no calibration token reached gets uniform importance (1), i.e. plain quantization.
        stacked = torch.cat([by_expert.get(e, torch.ones(width)) for e in range(n)])
        gname = tmap.get_name(f"{layer}.mlp.experts.{proj}.weight", try_suffixes=(".weight",))
        if gname is not None:
            out[gname] = stacked
    return Imatrix(out, dataset=Path(data).name, chunks=int(ids.shape[0]), chunk_size=int(ids.shape[1]))
