"""A GGUF cut to its first N decoder layers, for the parity check of files too large to run whole.

The cut copies the bytes of the kept tensors (token embedding, blk.0 .. blk.N-1, output norm and head) exactly as
the exported file holds them, quantized or not, and the metadata with block_count = N. llama.cpp then runs the
exact weights that ship, and torch runs the same N layers (`cut_overrides`). The layers past N are written by the
same code, with the same types (the type mix is reported for the whole file), so the cut checks the layout and
the quantization of every kind of tensor while it holds N layers instead of the model: a 61 GB teacher is
checked on a 24 GB machine, and a large student's export costs about what llama.cpp's converter does.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from edgeconv.errors import EdgeconvError
from edgeconv.export.gguf.arch import check_config
from edgeconv.export.gguf.writer import check_free_space

BLOCK = re.compile(r"^blk\.(\d+)\.")


def cut_overrides(config: dict, layers: int) -> dict:
    """The config.json fields of the model cut to its first `layers` decoder layers."""
    out: dict = {"num_hidden_layers": layers}
    if isinstance(config.get("layer_types"), list):  # one entry per layer (GPT-OSS's sliding / full attention)
        out["layer_types"] = config["layer_types"][:layers]
    return out


def default_cut(config: dict) -> int:
    """The fewest layers, at least 2, that hold every kind of layer the model has: a MoE layer after any leading
    dense ones, and each attention type of `layer_types`."""
    from edgeconv.forward.layer_by_layer import moe_family

    layers = int(config["num_hidden_layers"])
    need = 2
    family = moe_family(config)
    if family is not None and family.moe_layers():
        need = max(need, min(family.moe_layers()) + 1)
    kinds = config.get("layer_types")
    if isinstance(kinds, list) and kinds:
        need = max(need, *(kinds.index(k) + 1 for k in set(kinds)))
    return min(need, layers)


def cut_refusal(config: dict, layers: int) -> str | None:
    """Why llama.cpp cannot run `config` cut to `layers` layers (e.g. DeepSeek-V2-Lite, which it recognises by its
    27 layers), or None."""
    total = int(config["num_hidden_layers"])
    if not 1 <= layers <= total:
        return f"the model has {total} layers"
    try:
        check_config({**config, **cut_overrides(config, layers)})
    except EdgeconvError as exc:
        return exc.problem
    return None


def cut_gguf(src: Path, dst: Path, layers: int) -> dict:
    """Write `src` cut to its first `layers` blocks to `dst`; returns {"layers", "of", "tensors", "bytes"}."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    count_key = f"{arch}.block_count"
    total = int(reader.fields[count_key].contents())
    if not 1 <= layers <= total:
        raise EdgeconvError(f"cannot cut {src.name} to {layers} layers: it has {total}", f"pass 1 to {total}")
    writer = gguf.GGUFWriter(dst, arch)  # our files are little-endian
    writer.data_alignment = reader.alignment
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue  # the header's own fields, and the one the writer adds itself
            value, vtype = field.contents(), gguf.GGUFValueType(field.types[0])
            sub_type = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
            if field.name == count_key:
                value = layers
            elif (sub_type is not None and field.name.startswith(f"{arch}.") and len(value) == total
                  and sub_type != gguf.GGUFValueType.STRING):
                value = value[:layers]  # one entry per layer
            writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
        kept = [t for t in reader.tensors if not (m := BLOCK.match(t.name)) or int(m.group(1)) < layers]
        check_free_space(dst.parent, sum(int(t.data.nbytes) for t in kept) + 64 * 1024**2,
                         f"the parity check's {layers}-layer cut of {src.name}")
        for t in kept:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in kept:
            writer.write_tensor_data(t.data)
        writer.flush()
    finally:
        writer.close()
    return {"layers": layers, "of": total, "tensors": len(kept), "bytes": dst.stat().st_size}
