"""llama.cpp through llama-cpp-python: quantize with its own quantizer, read logits and tokens back."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from edgeconv.errors import EdgeconvError

# `edgeconv export --quant` names -> llama.cpp file types (llama_ftype).
QUANT_FTYPES = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
K_QUANTS = {"Q6_K", "Q5_K_M", "Q4_K_M"}


def _llama_cpp():
    try:
        import llama_cpp
        from llama_cpp._logger import set_verbose
    except ImportError:
        raise EdgeconvError("llama-cpp-python is not installed", "pip install llama-cpp-python==0.3.36")
    set_verbose(bool(os.environ.get("EDGECONV_LLAMA_VERBOSE")))  # llama.cpp's per-tensor log only on request
    return llama_cpp


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None, imatrix: dict | None = None) -> None:
    """llama.cpp's quantizer; `imatrix` maps GGUF tensor names to float32 importance vectors."""
    import ctypes

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
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
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise EdgeconvError(f"llama.cpp could not quantize {src.name} to {quant} (code {rc})", "see llama.cpp's log above")


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> the type actually stored (what a file's nominal type hides)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def type_mix(types: dict[str, str]) -> dict[str, int]:
    return dict(Counter(types.values()).most_common())


def k_quant_fallbacks(types: dict[str, str], quant: str) -> list[str]:
    """2-D weights a k-quant export left in a non-k type (input width not a multiple of 256)."""
    if quant not in K_QUANTS:
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
