"""Every quantization edgeconv exports, in one table: what `--quant` takes per format, and what each type means
for memory planning, llama.cpp, the parity gate and the help texts.

`edgeconv export --quant` and `edgeconv build --quant` take these names; the memory-fit planner reads `bits`;
the GGUF exporter writes the float types and Q8_0 itself (`float_type`, `direct`) and hands the others to
llama.cpp's quantizer (`ftype`); the parity gate (edgeconv.export.parity) checks each artifact against `tolerance`;
target profiles (targets/*.toml) are validated against it. Nothing else lists quantization names.

Lookups are per format and fail with the names that format has: `get_quant("onnx-genai", "int8")` is refused
(onnxruntime-genai's builder has no int8), before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeconv.errors import EdgeconvError
from edgeconv.registry import Registry

FORMATS = ("gguf", "onnx", "onnx-genai")
LABELS = {"gguf": "GGUF", "onnx": "ONNX", "onnx-genai": "onnx-genai"}


@dataclass(frozen=True)
class Tolerance:
    """Parity of an artifact against torch (edgeconv.export.parity). None: not checked for that type.

    rel_diff: max |diff| / max |torch logit|, per position (llama.cpp's and ORT's kernels sum in another order:
    1.5e-3 was seen at logits near 2.7 in F32). top1: agreement on decisive positions, for float types only:
    quantized weights legitimately reorder close candidates (a random benchmark teacher at Q4_K_M kept 49.5 % of
    its top-1s while its perplexity moved 3.6 %), so for them the perplexity ratio is the check. ppl:
    |ppl_artifact / ppl_torch - 1|."""

    rel_diff: float | None
    top1: float | None
    ppl: float


@dataclass(frozen=True)
class QuantType:
    format: str  # gguf | onnx | onnx-genai
    name: str  # what --quant takes
    bits: float  # average bits per weight of 2-D tensors: the memory-fit planner's weights estimate
    tolerance: Tolerance
    help: str  # one line
    # GGUF only. llama.cpp's file type without its LLAMA_FTYPE_ prefix: llama_cpp.LLAMA_FTYPE_<ftype> and
    # gguf.LlamaFileType.<ftype> name the same number (general.file_type).
    ftype: str | None = None
    # GGUF float types edgeconv writes itself (gguf.GGMLQuantizationType name); None: llama.cpp's quantizer makes it.
    float_type: str | None = None
    # The widest GGML type llama.cpp's mix gives an ordinary weight (the free-space bound before an export).
    widest: str | None = None
    # llama.cpp k-quant: blocks of 256, so tensors whose input width is not a multiple of 256 fall back to other
    # types, and the output matrix is kept in Q6_K.
    k_quant: bool = False
    default: bool = False  # the format's default when --quant is not given
    # GGUF: a quantized type edgeconv's writer makes in one pass with gguf-py's quantizer (the bytes llama.cpp's
    # quantizer gives), so no float intermediate file is written.
    direct: bool = False

    @property
    def written_by_edgeconv(self) -> bool:
        """GGUF: the writer makes this type itself (a float type, or a `direct` one), in one file."""
        return self.float_type is not None or self.direct

    @property
    def key(self) -> str:
        """The parity gate's name for the artifact type, e.g. gguf:Q4_K_M."""
        return f"{self.format}:{self.name}"

    @property
    def llama_ftype(self) -> str | None:
        return f"LLAMA_FTYPE_{self.ftype}" if self.ftype else None


def _gguf(name, bits, tol, help, ftype, float_type=None, widest=None, k_quant=False, default=False,
          direct=False) -> QuantType:
    return QuantType("gguf", name, bits, Tolerance(*tol), help, ftype, float_type, widest or float_type, k_quant,
                     default, direct)


def _onnx(fmt, name, bits, tol, help, default=False) -> QuantType:
    return QuantType(fmt, name, bits, Tolerance(*tol), help, default=default)


# GGUF bits: llama.cpp block sizes; the _M mixes keep some attn_v/ffn_down tensors one step up, which llama.cpp's
# own size reports put at these averages. ONNX: int4 is MatMulNBits with block 32 and an fp16 scale; int8
# per-channel. Tolerances: (rel_diff, top1, ppl), see Tolerance.
TABLE: tuple[QuantType, ...] = (
    _gguf("F32", 32.0, (1e-2, 0.99, 0.01), "32-bit float, written by edgeconv", "ALL_F32", "F32"),
    _gguf("F16", 16.0, (3e-2, 0.99, 0.01), "16-bit float, written by edgeconv", "MOSTLY_F16", "F16"),
    _gguf("BF16", 16.0, (5e-2, 0.98, 0.02), "bfloat16, written by edgeconv (lossless for bf16 checkpoints)",
          "MOSTLY_BF16", "BF16"),
    _gguf("Q8_0", 8.5, (None, None, 0.02), "8-bit, blocks of 32 (written by edgeconv, the bytes llama.cpp's "
          "quantizer gives)", "MOSTLY_Q8_0", widest="Q8_0", direct=True),
    _gguf("Q6_K", 6.5625, (None, None, 0.03), "6-bit k-quant", "MOSTLY_Q6_K", widest="Q6_K", k_quant=True),
    _gguf("Q5_K_M", 5.69, (None, None, 0.04), "5-bit k-quant mix, some tensors Q6_K", "MOSTLY_Q5_K_M",
          widest="Q6_K", k_quant=True),
    _gguf("Q4_K_M", 4.85, (None, None, 0.05), "4-bit k-quant mix, some tensors Q6_K", "MOSTLY_Q4_K_M",
          widest="Q6_K", k_quant=True, default=True),
    _gguf("Q4_0", 4.5, (None, None, 0.08), "4-bit, blocks of 32 (repacked for Arm's dotprod/i8mm kernels)",
          "MOSTLY_Q4_0", widest="Q5_1"),
    _onnx("onnx", "fp32", 32.0, (1e-3, 0.99, 0.005), "optimum-onnx's export as is", default=True),
    _onnx("onnx", "fp16", 16.0, (3e-2, 0.99, 0.01), "onnxruntime's float16 converter, inputs and outputs fp32"),
    _onnx("onnx", "int8", 8.0, (None, None, 0.05), "dynamic quantization, MatMul weights QInt8"),
    _onnx("onnx", "int4", 4.5, (None, None, 0.08), "MatMulNBits weight-only, block 32, symmetric"),
    _onnx("onnx-genai", "fp32", 32.0, (1e-3, 0.99, 0.005), "onnxruntime-genai's builder in fp32"),
    _onnx("onnx-genai", "fp16", 16.0, (3e-2, 0.99, 0.01), "the builder in fp16"),
    _onnx("onnx-genai", "int4", 4.5, (None, None, 0.08), "the builder's MatMulNBits int4, block 32", default=True),
)

QUANTS: dict[str, Registry[QuantType]] = {fmt: Registry(f"{LABELS[fmt]} quantization", ordered=True)
                                          for fmt in FORMATS}
for _q in TABLE:
    QUANTS[_q.format].register(_q.name)(_q)


def _registry(fmt: str) -> Registry[QuantType]:
    if fmt not in QUANTS:
        raise EdgeconvError(f"unknown format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    return QUANTS[fmt]


def get_quant(fmt: str, name: str) -> QuantType:
    """The table's entry; an unknown name fails with the names `fmt` has."""
    return _registry(fmt).get(name)


def quants(fmt: str) -> list[QuantType]:
    """`fmt`'s entries in table order (widest first)."""
    reg = _registry(fmt)
    return [reg.get(n) for n in reg.names()]


def quant_names(fmt: str) -> list[str]:
    return _registry(fmt).names()


def default_quant(fmt: str) -> str:
    return next(q.name for q in quants(fmt) if q.default)


def describe(formats: tuple[str, ...] = FORMATS, defaults: bool = True) -> str:
    """One line for a --quant help: each format's names (and its default)."""
    return "; ".join(f"{fmt}: {', '.join(quant_names(fmt))}" + (f" [default {default_quant(fmt)}]" if defaults else "")
                     for fmt in formats)


def listing(formats: tuple[str, ...] = FORMATS) -> str:
    """One line per type (format, name, bits per weight, help), for a command's help text."""
    width = max(len(q.name) for q in TABLE)
    lines = []
    for fmt in formats:
        for q in quants(fmt):
            mark = " (default)" if q.default else ""
            lines.append(f"  {fmt:<10} {q.name:<{width}} {q.bits:>6g} bits/weight  {q.help}{mark}")
    return "\n".join(lines)
