"""llama.cpp through llama-cpp-python: quantize with its own quantizer, read logits and tokens back."""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgeconv.errors import EdgeconvError
from edgeconv.quant import get_quant

# `edgeconv export --quant` names, their llama.cpp file types (llama_ftype), k-quant flags and widest types:
# edgeconv.quant's table.


def _llama_cpp():
    try:
        import llama_cpp
        from llama_cpp._logger import set_verbose
    except ImportError:
        raise EdgeconvError("llama-cpp-python is not installed", "pip install llama-cpp-python==0.3.36")
    set_verbose(bool(os.environ.get("EDGECONV_LLAMA_VERBOSE")))  # llama.cpp's per-tensor log only on request
    return llama_cpp


# How many of llama.cpp's last log lines a quantize failure shows, and how long that part may be.
LOG_LINES_SHOWN = 3
LOG_CHARS_SHOWN = 400


@contextmanager
def captured_log(llama_cpp, keep: int = 50) -> Iterator[deque]:
    """llama.cpp's log lines during the block, the last `keep` of them (also echoed under EDGECONV_LLAMA_VERBOSE).

    llama-cpp-python's own callback is put back afterwards.
    """
    from llama_cpp import _logger

    lines: deque[str] = deque(maxlen=keep)
    partial: list[str] = []
    echo = bool(os.environ.get("EDGECONV_LLAMA_VERBOSE"))

    def on_log(level, text, user_data):
        try:
            piece = text.decode("utf-8", "replace") if text else ""
            if echo:
                print(piece, end="", file=sys.stderr, flush=True)
            partial.append(piece)
            if "\n" in piece:
                *done, rest = "".join(partial).split("\n")
                lines.extend(line for line in done if line.strip())
                partial[:] = [rest] if rest else []
        except Exception:  # never let an exception cross into C
            pass

    callback = llama_cpp.llama_log_callback(on_log)  # referenced until restored below
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        if "".join(partial).strip():
            lines.append("".join(partial))


def log_tail(lines, n: int = LOG_LINES_SHOWN, limit: int = LOG_CHARS_SHOWN) -> str:
    """The last `n` log lines as one printable line, shortened from the front to `limit` characters."""
    text = " | ".join(" ".join(line.split()) for line in list(lines)[-n:])
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


# The keys llama-quantize (tools/quantize/quantize.cpp) writes when it quantizes with an importance matrix.
IMATRIX_FILE = "quantize.imatrix.file"
IMATRIX_DATASET = "quantize.imatrix.dataset"
IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"
KV_VALUE_CHARS = 127  # llama_model_kv_override's key and val_str are char[128]


def imatrix_metadata(file: str, dataset: str | None, entries: int, chunks: int | None) -> dict[str, int | str]:
    """The quantize.imatrix.* key-values as llama-quantize sets them: the file and dataset names (strings cut to
    127 bytes), the number of entries and of chunks (llama.cpp stores both as uint32; no chunk count when unknown)."""
    meta: dict[str, int | str] = {IMATRIX_FILE: file}
    if dataset:
        meta[IMATRIX_DATASET] = dataset
    meta[IMATRIX_ENTRIES] = int(entries)
    if chunks:
        meta[IMATRIX_CHUNKS] = int(chunks)
    return meta


def _kv_overrides(llama_cpp, metadata: dict[str, int | str]):
    """A null-terminated C array of llama_model_kv_override: ints as INT (llama.cpp writes them as uint32), strings
    as STR, what llama-quantize builds from its --imatrix file."""
    entries = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()  # zeroed: the last one ends the list
    for entry, (key, value) in zip(entries, metadata.items()):
        entry.key = key.encode()[:KV_VALUE_CHARS]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"{key}: only int and str metadata can be handed to llama.cpp's quantizer")
        if isinstance(value, int):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            entry.value.val_i64 = value
        else:
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            entry.value.val_str = value.encode()[:KV_VALUE_CHARS]
    return entries


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None, imatrix: dict | None = None,
             metadata: dict[str, int | str] | None = None) -> None:
    """llama.cpp's quantizer; `imatrix` maps GGUF tensor names to float32 importance vectors; `metadata`: key-values
    set in the output (llama.cpp's kv_overrides; `imatrix_metadata` gives the ones llama-quantize sets).

    A failure is an EdgeconvError that quotes llama.cpp's last log lines (its log is otherwise hidden).
    """
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, get_quant("gguf", quant).llama_ftype)
    params.nthread = threads or os.cpu_count() or 1
    keep = []  # the C array points into these buffers: keep them alive during the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # null-terminated
        for i, (name, vec) in enumerate(sorted(imatrix.items())):
            buf = np.ascontiguousarray(vec.numpy() if hasattr(vec, "numpy") else vec, dtype=np.float32)
            keep.append(buf)
            entries[i].name = name.encode()
            entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = buf.size
        keep.append(entries)
        params.imatrix = entries
    if metadata:
        overrides = _kv_overrides(llama_cpp, metadata)
        keep.append(overrides)
        params.kv_overrides = overrides
    with captured_log(llama_cpp) as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        said = log_tail(log)
        raise EdgeconvError(
            f"llama.cpp could not quantize {Path(src).name} to {quant} (code {rc})"
            + (f": {said}" if said else ": it logged nothing"),
            "check that the input GGUF is complete and the disk has room; "
            "EDGECONV_LLAMA_VERBOSE=1 shows llama.cpp's whole log",
        )


# An upper bound on a quantized file's size, for the free-space check before an export starts. Per --quant,
# the widest type llama.cpp's mix gives an ordinary weight (edgeconv.quant: QuantType.widest); the output, the
# embeddings and attention k/v may be bumped up to Q8_0 in any mix; a row width that is not a multiple of 256
# makes k-quants fall back (at most to Q8_0), one that is not a multiple of 32 leaves the tensor F16. 1-D tensors
# and router weights stay F32.
BUMPED = re.compile(r"^(output|token_embd)\.|\.attn_(k|v|qkv|kv_b|k_b|v_b)\.weight$")


def quantized_bytes_bound(tensors, quant: str, metadata_bytes: int) -> int:
    """At most how many bytes llama.cpp's `quant` file of these (name, torch shape, kept F32) tensors takes."""
    import gguf

    sizes, types = gguf.GGML_QUANT_SIZES, gguf.GGMLQuantizationType
    widest, q8 = types[get_quant("gguf", quant).widest], types.Q8_0
    total = metadata_bytes
    for name, shape, kept_f32 in tensors:
        n = int(np.prod(shape))
        width = int(shape[-1])
        if kept_f32:
            t = types.F32
        elif width % 32:
            t = types.F16
        elif BUMPED.search(name) or width % 256:
            t = q8 if sizes[q8][1] / sizes[q8][0] >= sizes[widest][1] / sizes[widest][0] else widest
        else:
            t = widest
        block, size = sizes[t]
        total += -(-n // block) * size + 32  # + the data alignment
    return int(total * 1.02) + 1024**2


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> the type actually stored (what a file's nominal type hides)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def type_mix(types: dict[str, str]) -> dict[str, int]:
    return dict(Counter(types.values()).most_common())


def k_quant_fallbacks(types: dict[str, str], quant: str) -> list[str]:
    """2-D weights a k-quant export left in a non-k type (input width not a multiple of 256)."""
    if not get_quant("gguf", quant).k_quant:
        return []
    ok = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "F32"}
    return sorted(n for n, t in types.items() if t not in ok and not n.endswith(("norm.weight", ".bias")))


class LlamaRunner:
    """A GGUF loaded in llama.cpp with logits for every position."""

    def __init__(self, path: Path, n_ctx: int = 256, threads: int | None = None):
        llama_cpp = _llama_cpp()
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=threads or os.cpu_count(),
            seed=0,
        )

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def close(self) -> None:
        self.llm.close()
