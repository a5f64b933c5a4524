"""Write a HF checkpoint (dense student or MoE teacher) as an unquantized GGUF, one tensor at a time.

Tensor infos are declared first (their shapes follow from the headers), then the data is streamed, so
memory holds one tensor, or one layer's stacked experts. Quantized types are made from this file by
llama.cpp's own quantizer (see `quantize.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from edgeconv.errors import EdgeconvError
from edgeconv.export.gguf_arch import GgufArch, family_adapter, gguf_arch_for, permute_for_llama_rope
from edgeconv.export.gguf_vocab import add_vocab
from edgeconv.io.checkpoint import Checkpoint

FLOAT_TYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
# Small tensors llama.cpp keeps in F32 whatever the file type (its converter does the same).
KEEP_F32 = re.compile(r"(ffn_gate_inp(_shexp)?\.weight|attn_sinks\.weight|\.bias)$")


@dataclass
class Item:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch (row-major) shape
    produce: Callable[[], torch.Tensor]


def _items(ckpt: Checkpoint, spec: GgufArch) -> list[Item]:
    config = ckpt.config
    tmap = gguf.get_tensor_name_map(spec.arch, int(config["num_hidden_layers"]))
    family = family_adapter(config) if spec.moe else None
    if family is not None and not spec.split_kv_b and len(family.moe_layers()) != family.num_layers:
        dense = sorted(set(range(family.num_layers)) - set(family.moe_layers()))
        raise EdgeconvError(
            f"llama.cpp's {spec.name} needs every layer to be MoE, but layers {dense} of this checkpoint are dense",
            "export it to ONNX instead, or convert it to a dense model first",
        )
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    items: list[Item] = []
    for name in ckpt.names():
        m = LAYER.match(name)
        if family is not None and m and family.owns(name, int(m.group(1))) and ".experts." in name:
            continue  # stacked below
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if spec.stack_by_name and EXPERT.match(name):
            continue  # stacked below
        if name.endswith("mlp.gate.e_score_correction_bias"):  # the router's selection bias
            items.append(Item(f"blk.{m.group(1)}.exp_probs_b.bias", ckpt.info(name).shape,
                              lambda n=name: ckpt.read(n)))
            continue
        if spec.split_kv_b and name.endswith("kv_b_proj.weight"):
            items.extend(_split_kv_b(ckpt, name, tmap))
            continue
        lookup = name + ".weight" if name.endswith("self_attn.sinks") else name  # GPT-OSS sinks have no suffix
        gname = tmap.get_name(lookup, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise EdgeconvError(f"tensor {name} has no {spec.name} GGUF name", "this checkpoint layout is not supported for GGUF")
        produce = lambda n=name: ckpt.read(n)  # noqa: E731
        if spec.permute_qk and re.search(r"self_attn\.(q|k)_proj\.weight$", name):
            n_head = heads if ".q_proj." in name else kv_heads
            produce = lambda n=name, h=n_head: permute_for_llama_rope(ckpt.read(n), h)  # noqa: E731
        items.append(Item(gname, ckpt.info(name).shape, produce))
    if family is not None:
        items.extend(_expert_items(ckpt, family, tmap))
    if spec.stack_by_name:
        items.extend(_experts_by_name(ckpt, tmap))
    return items


def _experts_by_name(ckpt: Checkpoint, tmap) -> list[Item]:
    """ffn_{gate,up,down}_exps per layer, stacked from per-expert tensors mlp.experts.<e>.<proj>.weight."""
    found: dict[tuple[int, str], dict[int, str]] = {}
    for name in ckpt.names():
        m = EXPERT.match(name)
        if m:
            found.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = name
    items = []
    for (layer, proj), by_expert in sorted(found.items()):
        names = [by_expert[e] for e in sorted(by_expert)]
        shape = (len(names), *ckpt.info(names[0]).shape)
        gname = tmap.get_name(f"model.layers.{layer}.mlp.experts.{proj}_proj.weight", try_suffixes=(".weight",))
        items.append(Item(gname, shape, lambda ns=names: torch.stack([ckpt.read(n) for n in ns])))
    return items


def _split_kv_b(ckpt: Checkpoint, name: str, tmap) -> list[Item]:
    """MLA's kv_b_proj [heads * (nope + v), rank] as llama.cpp wants it: k_b [heads, rank, nope], v_b [heads, v, rank]."""
    c = ckpt.config
    heads, nope, v = int(c["num_attention_heads"]), int(c["qk_nope_head_dim"]), int(c["v_head_dim"])
    rank = int(c["kv_lora_rank"])

    def part(which: str) -> torch.Tensor:
        kv_b = ckpt.read(name).view(heads, nope + v, rank)
        k_b, v_b = torch.split(kv_b, [nope, v], dim=1)
        return k_b.transpose(1, 2).contiguous() if which == "k" else v_b.contiguous()

    return [
        Item(tmap.get_name(name.replace("kv_b_proj", "k_b_proj"), try_suffixes=(".weight",)), (heads, rank, nope),
             lambda: part("k")),
        Item(tmap.get_name(name.replace("kv_b_proj", "v_b_proj"), try_suffixes=(".weight",)), (heads, v, rank),
             lambda: part("v")),
    ]


def _expert_items(ckpt: Checkpoint, family, tmap) -> list[Item]:
    """ffn_{gate,up,down}_exps per MoE layer: [E, I, H], [E, I, H], [E, H, I] (+ biases [E, I], [E, H] where
    the family has them), each layer's experts read once and every part freed once written."""
    items = []
    hidden, width, n = family.hidden_size, family.expert_width, family.num_experts
    parts = [("gate", "gate_proj", "weight", (n, width, hidden)), ("up", "up_proj", "weight", (n, width, hidden)),
             ("down", "down_proj", "weight", (n, hidden, width))]
    if family.has_ffn_bias:
        parts += [("gate_bias", "gate_proj", "bias", (n, width)), ("up_bias", "up_proj", "bias", (n, width)),
                  ("down_bias", "down_proj", "bias", (n, hidden))]
    for layer in family.moe_layers():
        cache: dict[str, torch.Tensor] = {}

        def stacked(part: str, layer=layer, cache=cache) -> torch.Tensor:
            if not cache:
                experts = [family.read_expert(ckpt, layer, e) for e in range(n)]
                cache.update({p: torch.stack([getattr(x, p) for x in experts]) for p, *_ in parts})
            return cache.pop(part)  # each part is written once; popping frees it

        for part, proj, kind, shape in parts:
            gname = tmap.get_name(f"model.layers.{layer}.mlp.experts.{proj}.{kind}", try_suffixes=(f".{kind}",))
            items.append(Item(gname, shape, lambda p=part, f=stacked: f(p)))
    return items


def _encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if qtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.float32).contiguous().numpy()


def write_gguf(model_dir: Path, out_path: Path, ftype: str = "F16", pre: str | None = None) -> dict:
    """Write `model_dir` as a GGUF of float type `ftype` to `out_path`; returns what was written."""
    if ftype not in FLOAT_TYPES:
        raise EdgeconvError(f"{ftype} is not a float GGUF type", f"use one of {', '.join(FLOAT_TYPES)}")
    ckpt = Checkpoint.open(model_dir)
    spec = gguf_arch_for(ckpt.config)
    qtype, file_type = FLOAT_TYPES[ftype]
    items = _items(ckpt, spec)
    writer = gguf.GGUFWriter(out_path, spec.name)
    try:
        writer.add_name(Path(model_dir).name)
        writer.add_file_type(file_type)
        spec.metadata(writer, ckpt.config)
        pre_used = add_vocab(writer, ckpt.path, int(ckpt.config["vocab_size"]), pre)
        types = {}
        for it in items:
            t = gguf.GGMLQuantizationType.F32 if len(it.shape) == 1 or KEEP_F32.search(it.name) else qtype
            types[it.name] = t
            itemsize = 4 if t == gguf.GGMLQuantizationType.F32 else 2
            np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                        gguf.GGMLQuantizationType.BF16: np.uint16}[t]
            writer.add_tensor_info(it.name, it.shape, np.dtype(np_dtype), int(np.prod(it.shape)) * itemsize,
                                   raw_dtype=t if t == gguf.GGMLQuantizationType.BF16 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for it in items:
            data = it.produce()
            if tuple(data.shape) != tuple(it.shape):
                raise RuntimeError(f"{it.name}: produced {tuple(data.shape)}, declared {it.shape}")
            writer.write_tensor_data(_encode(data, types[it.name]))
    finally:
        writer.close()
        ckpt.close()
    return {"architecture": spec.name, "tensors": len(items), "tokenizer_pre": pre_used, "ftype": ftype}
