"""Write a HF checkpoint (dense student or MoE teacher) as a float or Q8_0 GGUF, one tensor at a time.

Tensor infos are declared first (their shapes follow from the headers), then the data is streamed, so
memory holds one tensor, or one layer's stacked experts. Q8_0 is quantized here by gguf-py, with the per-tensor
types llama.cpp's quantizer would choose (type_choice) and the bytes it would write (a test compares them), so it
needs no float intermediate; the other quantized types are made from a float file by llama.cpp's own quantizer
(see `llamacpp.py`). `plan_gguf` declares everything first, so the file's exact size
is known before a byte is written: writers check the free space against it and refuse in one line.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from edgeconv.errors import EdgeconvError
from edgeconv.export.gguf.arch import GgufArch, check_all_moe, family_adapter, gguf_arch_for, permute_for_llama_rope
from edgeconv.export.gguf.metadata import add_general
from edgeconv.export.gguf.vocab import add_vocab
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.quant import get_quant, quants

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
# Small tensors llama.cpp keeps in F32 whatever the file type (its converter does the same).
KEEP_F32 = re.compile(r"(ffn_gate_inp(_shexp)?\.weight|attn_sinks\.weight|\.bias)$")


Q8_0_CHUNK = 8 * 1024**2  # values quantized at a time (_encode)


@dataclass
class Item:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch (row-major) shape
    produce: Callable[[], torch.Tensor]


def _items(ckpt: Checkpoint, spec: GgufArch) -> list[Item]:
    config = ckpt.config
    tmap = gguf.get_tensor_name_map(spec.arch, int(config["num_hidden_layers"]))
    check_all_moe(config, spec)
    family = family_adapter(config) if spec.moe else None
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
            raise EdgeconvError(f"tensor {name} has no {spec.name} GGUF name",
                                "this checkpoint layout is not supported for GGUF")
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
    """MLA's kv_b_proj [heads * (nope + v), rank] as llama.cpp wants it: k_b [heads, rank, nope],
    v_b [heads, v, rank]."""
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
            if not cache:  # each expert read once, straight into the stacks (no list of experts beside them)
                for e in range(n):
                    x = family.read_expert(ckpt, layer, e)
                    for p, *_ in parts:
                        t = getattr(x, p)
                        if p not in cache:
                            cache[p] = torch.empty((n, *t.shape), dtype=t.dtype)
                        cache[p][e] = t
                    del x
            return cache.pop(part)  # each part is written once; popping frees it

        for part, proj, kind, shape in parts:
            gname = tmap.get_name(f"model.layers.{layer}.mlp.experts.{proj}.{kind}", try_suffixes=(f".{kind}",))
            items.append(Item(gname, shape, lambda p=part, f=stacked: f(p)))
    return items


def _kept_f32(it: Item) -> bool:
    return len(it.shape) == 1 or bool(KEEP_F32.search(it.name))


def _encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.Q8_0:  # gguf-py rounds as llama.cpp's quantize_row_q8_0 does
        # A few million values at a time: a layer's stacked experts in float32, and gguf-py's temporaries of them,
        # would be several times the layer as stored.
        rows = t.reshape(-1, t.shape[-1])
        step = max(1, Q8_0_CHUNK // max(1, t.shape[-1]))
        parts = [gguf.quants.quantize(rows[i:i + step].to(torch.float32).numpy(), qtype)
                 for i in range(0, rows.shape[0], step)]
        return np.concatenate(parts).reshape(*t.shape[:-1], -1)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if qtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.float32).contiguous().numpy()


@dataclass
class GgufPlan:
    """A float GGUF ready to write: metadata and tensor infos declared, its exact size known, no file opened."""

    ckpt: Checkpoint
    spec: GgufArch
    writer: gguf.GGUFWriter
    items: list[Item]
    types: dict[str, gguf.GGMLQuantizationType]
    ftype: str
    pre_used: str | None
    metadata_bytes: int  # header, key-values and tensor infos, padded to the data alignment
    nbytes: int  # the whole file

    def tensors(self) -> list[tuple[str, tuple[int, ...], bool]]:
        """(GGUF name, torch shape, kept in F32 whatever the file type) of every tensor, in file order."""
        return [(it.name, tuple(it.shape), _kept_f32(it)) for it in self.items]

    def write(self, out_path: Path) -> dict:
        """Stream the tensors to `out_path`. On failure the partial file stays (the caller removes it, after
        judging whether the disk filled up)."""
        writer = self.writer
        try:
            writer.write_header_to_file(path=Path(out_path))
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for it in self.items:
                data = it.produce()
                if tuple(data.shape) != tuple(it.shape):
                    raise RuntimeError(f"{it.name}: produced {tuple(data.shape)}, declared {it.shape}")
                writer.write_tensor_data(_encode(data, self.types[it.name]))
            writer.flush()
        finally:
            writer.close()
        return {"architecture": self.spec.name, "tensors": len(self.items), "tokenizer_pre": self.pre_used,
                "ftype": self.ftype}

    def close(self) -> None:
        self.writer.close()
        self.ckpt.close()


def _file_bytes(writer: gguf.GGUFWriter) -> tuple[int, int]:
    """(metadata bytes, whole file bytes) of what `writer` declares, as its write_* methods will lay it out."""
    align = writer.data_alignment
    tensors = writer.tensors[0]
    string = gguf.GGUFValueType.STRING
    try:
        kv = sum(len(writer._pack_val(k, string, add_vtype=False))
                 + len(writer._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type))
                 for k, v in writer.kv_data[0].items())
        ti = sum(len(writer._pack_val(name, string, add_vtype=False)) + 4 + 8 * len(info.shape) + 4 + 8
                 for name, info in tensors.items())
    except Exception:  # gguf's private packing changed: a generous allowance instead of the exact count
        kv, ti = 64 * 1024**2, 1024 * len(tensors)
    metadata = gguf.GGUFWriter.ggml_pad(4 + 4 + 8 + 8 + kv + ti, align)
    return metadata, metadata + sum(gguf.GGUFWriter.ggml_pad(info.nbytes, align) for info in tensors.values())


def _direct_types(ckpt: Checkpoint, spec: GgufArch, items: list[Item], entry) -> dict[str, str]:
    """llama.cpp's type for every tensor of a `direct` file type (edgeconv.quant): the rules llama_model_quantize
    applies (type_choice), with the float source it would have read (BF16 for bf16 checkpoints, else F32)."""
    from edgeconv.export.gguf.type_choice import Tensor, choose_types, hparams_from_config

    c = ckpt.config
    source = "BF16" if (c.get("torch_dtype") or c.get("dtype")) == "bfloat16" else "F32"
    tensors = [Tensor(it.name, tuple(it.shape), _kept_f32(it)) for it in items]
    return choose_types(tensors, entry.ftype, hparams_from_config(spec.name, c), source=source).types


def plan_gguf(model_dir: Path, ftype: str = "F16", pre: str | None = None, name: str | None = None,
              config_overrides: dict | None = None) -> GgufPlan:
    """Declare `model_dir` as a GGUF of type `ftype`, a float type or a `direct` one (Q8_0): everything but the
    tensor data, which `write` streams. `name`: general.name [default: the hub id, else the directory name]; the
    rest of general.* is edgeconv.export.gguf.metadata's."""
    own = [q.name for q in quants("gguf") if q.written_by_edgeconv]  # the types edgeconv writes itself
    if ftype not in own:
        raise EdgeconvError(f"edgeconv's GGUF writer does not make {ftype} itself", f"use one of {', '.join(own)}")
    entry = get_quant("gguf", ftype)
    ckpt = Checkpoint.open(model_dir)
    ckpt.config = {**ckpt.config, **(config_overrides or {})}  # e.g. the YaRN llama.cpp runs (export_gguf)
    writer = None
    try:
        spec = gguf_arch_for(ckpt.config)
        file_type = gguf.LlamaFileType[entry.ftype]
        items = _items(ckpt, spec)
        if entry.float_type:
            chosen = {it.name: "F32" if _kept_f32(it) else entry.float_type for it in items}
        else:
            chosen = _direct_types(ckpt, spec, items, entry)
        writer = gguf.GGUFWriter(None, spec.name)
        types = {}
        for it in items:  # declared first: general.size_label counts them
            t = gguf.GGMLQuantizationType[chosen[it.name]]
            types[it.name] = t
            block, block_bytes = gguf.GGML_QUANT_SIZES[t]
            nbytes = int(np.prod(it.shape)) // block * block_bytes
            np_dtype = {gguf.GGMLQuantizationType.F32: np.float32,
                        gguf.GGMLQuantizationType.F16: np.float16}.get(t, np.float32)
            writer.add_tensor_info(it.name, it.shape, np.dtype(np_dtype), nbytes,
                                   raw_dtype=None if t in (gguf.GGMLQuantizationType.F32,
                                                           gguf.GGMLQuantizationType.F16) else t)
        # The key-values in the order llama.cpp's converter writes them: general.*, the architecture's, the
        # quantization version, the file type, the tokenizer's.
        add_general(writer, ckpt.path, name)
        spec.metadata(writer, ckpt.config)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(file_type)
        pre_used = add_vocab(writer, ckpt.path, int(ckpt.config["vocab_size"]), pre)
        metadata, nbytes = _file_bytes(writer)
    except BaseException:
        if writer is not None:
            writer.close()
        ckpt.close()
        raise
    return GgufPlan(ckpt, spec, writer, items, types, ftype, pre_used, metadata, nbytes)


def write_gguf(model_dir: Path, out_path: Path, ftype: str = "F16", pre: str | None = None,
               name: str | None = None) -> dict:
    """Write `model_dir` as a GGUF of float type `ftype` to `out_path`; returns what was written.

    Refuses before writing when the disk lacks the file's (exactly known) size; a disk that fills up anyway
    leaves no partial file and the same one-line error.
    """
    out_path = Path(out_path)
    plan = plan_gguf(model_dir, ftype, pre, name)
    try:
        what = f"the {ftype} GGUF {out_path.name}"
        check_free_space(out_path.parent, plan.nbytes, what)
        try:
            return plan.write(out_path)
        except OSError as exc:
            full = is_disk_full(exc, out_path.parent)
            out_path.unlink(missing_ok=True)
            if full:
                raise not_enough_space(out_path.parent, plan.nbytes, what) from exc
            raise
    finally:
        plan.close()


# Disk space: every writer of a large file checks before it starts, and names the numbers when it cannot.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NEAR_FULL_BYTES = 64 * 1024**2  # after a failed write, less than this free means the write ran out of space


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def not_enough_space(directory: Path, needed: int, what: str, free: int | None = None) -> EdgeconvError:
    free = free_bytes(directory) if free is None else free
    return EdgeconvError(
        f"not enough disk space in {directory} for {what}: it needs {needed:,} bytes ({_human(needed)}), "
        f"{free:,} bytes ({_human(free)}) are free",
        "free some space or choose an --out on a larger disk, then run the same command again",
    )


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse, before writing anything, when `directory`'s disk has less than `needed` bytes free."""
    free = free_bytes(directory)
    if free < needed:
        raise not_enough_space(directory, needed, what, free)


def is_disk_full(exc: OSError, directory: Path) -> bool:
    """Whether a write into `directory` failed for want of space: by its errno, or (numpy's short writes raise
    OSError without one) by the disk being practically full right after the failure."""
    if exc.errno in DISK_FULL_ERRNOS:
        return True
    return exc.errno in (None, errno.EIO) and disk_nearly_full(directory)


def disk_nearly_full(directory: Path) -> bool:
    try:
        return free_bytes(directory) < NEAR_FULL_BYTES
    except OSError:
        return False
