"""Which GGML type llama.cpp's quantizer gives every tensor of a GGUF, and how many bytes the file then takes.

Learned from llama.cpp's src/llama-quant.cpp as vendored by llama-cpp-python 0.3.36 (the quantizer edgeconv calls;
`benchmarks/llama_cpp_tools.py source()` unpacks it), rewritten here, not called:

- `tensor_allows_quantization`: only tensors of >= 2 dimensions (ggml counts dimensions without trailing 1s, so a
  torch [1, n] router is 1-D) whose name ends in "weight", not a norm, not `ffn_gate_inp` (the router) and not a
  few model-specific names; every other tensor keeps the type it has in the input file.
- `llama_ftype_get_default_type`: the file type's base type (Q4_K_M -> Q4_K, Q4_0 -> Q4_0, ...).
- `tensor_get_category` / `init_quantize_state_counters`: categories by substring of the name; `n_attention_wv`
  counts attn_v-like tensors, the ffn counters run to the block count; the embeddings count as tied unless an
  `output.weight` exists.
- `llama_tensor_get_type_impl`: the per-tensor mix. The output matrix (and tied token embeddings) becomes Q6_K
  (Q8_0 when its width is not a multiple of the base type's block, or when the base is Q8_0 already); attn_v and
  ffn_down get Q6_K in the layers `use_more_bits` picks for Q4_K_M and Q5_K_M; models with exactly 8 experts
  bump attn_v / attn_k to Q8_0 and, for Q4_K_S/Q4_K_M, attn_output to Q5_K; llama/qwen2 models of 80 layers
  ("70B") bump Q4_K attn_v to Q5_K.
- `tensor_type_fallback`: a width (ne[0], the input dimension) that is not a multiple of the chosen type's block
  falls back, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0; if even that block does not divide
  it, F16.
- `llama_model_quantize_impl`: tensors are visited in the loader's order (`weight_name_comparer`: non-layer
  tensors first, then by layer number, then by name), which is the order the counters above run in; each tensor's
  data is padded to the file's alignment (32).

Only the file types of edgeconv.quant (and their Q4_K_S/Q5_K_S/Q4_1/Q5_0/Q5_1 siblings) are implemented; the
IQ and Q2/Q3 mixes are refused rather than guessed. The float types (F32, F16, BF16) are written by edgeconv
itself (edgeconv.export.gguf.writer): every tensor in the type except those it keeps F32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
from dataclasses import dataclass, field

import gguf
import numpy as np

ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: the quantizer pads every tensor's data to it

# llama_ftype_get_default_type, for the file types this module implements (gguf.LlamaFileType names).
DEFAULT_TYPE = {
    "ALL_F32": "F32", "MOSTLY_F16": "F16", "MOSTLY_BF16": "BF16",
    "MOSTLY_Q8_0": "Q8_0", "MOSTLY_Q4_0": "Q4_0", "MOSTLY_Q4_1": "Q4_1", "MOSTLY_Q5_0": "Q5_0", "MOSTLY_Q5_1": "Q5_1",
    "MOSTLY_Q6_K": "Q6_K", "MOSTLY_Q5_K_S": "Q5_K", "MOSTLY_Q5_K_M": "Q5_K", "MOSTLY_Q4_K_S": "Q4_K",
    "MOSTLY_Q4_K_M": "Q4_K",
}
FLOAT_TYPES = ("F32", "F16", "BF16")

# tensor_type_fallback: a type whose block does not divide the width, and what llama.cpp uses instead.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# tensor_allows_quantization: substrings that keep a tensor as it is (those that can occur in a GGUF of any arch).
NOT_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
    "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
NOT_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")  # LLM_TENSOR_POS_EMBD / TOKEN_TYPES

# The archs whose loaders call an 80-layer model "70B" (src/models/llama.cpp, qwen2.cpp, olmo.cpp, deci.cpp).
SEVENTY_B = {"llama": 80, "qwen2": 80, "olmo": 80, "deci": 80, "jais2": 68}

BLK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Hparams:
    """What of the model's header the type choice reads (llama_hparams / llama_model::type)."""

    arch: str  # GGUF general.architecture, e.g. "qwen3", "gpt-oss"
    n_layer: int  # {arch}.block_count
    n_expert: int = 0  # {arch}.expert_count; llama.cpp reads 0 or 1 as 0
    n_head: int = 0
    n_head_kv: int = 0

    @property
    def experts(self) -> int:
        return self.n_expert if self.n_expert > 1 else 0

    @property
    def is_70b(self) -> bool:
        layers = SEVENTY_B.get(self.arch)
        if layers is None or self.n_layer != layers:
            return False
        if self.arch == "llama":  # llama's loader: 80 layers and grouped-query attention, not an 8-expert model
            return self.experts != 8 and self.n_head != self.n_head_kv
        return True


def ne(shape: tuple[int, ...]) -> list[int]:
    """ggml's dimensions of a torch (row-major) shape: reversed, so ne[0] is the row width."""
    return list(reversed([int(d) for d in shape])) or [1]


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count (a torch [1, n] tensor is 1-D)."""
    dims = ne(shape)
    for i in range(len(dims) - 1, 0, -1):
        if dims[i] != 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization with llama-cpp-python's default parameters (output tensor quantized)."""
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    return not any(s in name for s in NOT_QUANTIZED) and name not in NOT_QUANTIZED_NAMES


def category(name: str) -> str:
    """tensor_get_category: by name; order matters (attn_qkv before attn_v before attn_k ...)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")  # category_is_attn_v


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama_tensor_get_type_impl's use_more_bits: the first and last eighth, and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def block(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGML type (ggml.c's type traits, as gguf-py lists them)."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def is_quantized(type_name: str) -> bool:
    return type_name not in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def tensor_bytes(shape: tuple[int, ...], type_name: str) -> int:
    """The tensor's data in the file: rows x row size (ggml_row_size), without the alignment padding."""
    dims = ne(shape)
    size, nbytes = block(type_name)
    return math.prod(dims[1:]) * (dims[0] // size) * nbytes


def padded(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def loader_order(name: str) -> tuple[int, str]:
    """llama_model_loader's weight_name_comparer: tensors outside blocks first (layer -1), then by layer, then name."""
    m = BLK.match(name)
    return (int(m.group(1)) if m else -1, name)


def fallback(type_name: str, width: int) -> str:
    """tensor_type_fallback: the type a width that `type_name`'s block does not divide gets instead."""
    size = block(type_name)[0]
    if width % size == 0:
        return type_name
    if type_name in FALLBACK:
        out = FALLBACK[type_name]
    elif size <= 32:
        out = type_name
    else:
        raise ValueError(f"llama.cpp defines no fallback for {type_name}")
    return out if width % block(out)[0] == 0 else "F16"


@dataclass
class _State:
    """quantize_state_impl's counters."""

    n_attention_wv: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    tied: bool = True


def _mix(st: _State, hp: Hparams, ftype: str, new: str, name: str, shape: tuple[int, ...], cat: str,
         has_imatrix: bool) -> str:
    """llama_tensor_get_type_impl for the implemented file types (no user overrides, not --pure)."""
    experts = hp.experts

    def layer_of(counter: int) -> tuple[int, int]:
        if experts > 1:  # Mixtral's experts are not consecutive: the layer comes from the name
            m = BLK.match(name)
            if not m:
                raise ValueError(f"cannot tell the layer of {name}")
            return int(m.group(1)), hp.n_layer
        return counter, hp.n_layer

    if cat == "output" or (st.tied and cat == "token_embd"):
        if ne(shape)[0] % block(new)[0] != 0 or hp.arch == "falcon":
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        return new
    if cat in ATTN_V_LIKE:
        if ftype in ("MOSTLY_Q4_K_M", "MOSTLY_Q5_K_M") and use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = "Q6_K"
        elif ftype == "MOSTLY_Q4_K_S" and st.i_attention_wv < 4:
            new = "Q5_K"
        if hp.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if experts == 8:
            new = "Q8_0"
        st.i_attention_wv += 1
        return new
    if cat == "attn_k":
        return "Q8_0" if experts == 8 else new
    if cat == "ffn_down":
        i_layer, n_layer = layer_of(st.i_ffn_down)
        st.i_ffn_down += 1
        falcon = hp.arch == "falcon"
        if ftype == "MOSTLY_Q4_K_M":
            if falcon:
                return "Q6_K" if i_layer < n_layer // 16 else "Q5_K" if use_more_bits(i_layer, n_layer) else "Q4_K"
            return "Q6_K" if use_more_bits(i_layer, n_layer) else new
        if ftype == "MOSTLY_Q5_K_M" and use_more_bits(i_layer, n_layer):
            return "Q6_K"
        if ftype == "MOSTLY_Q4_K_S" and not falcon and i_layer < n_layer // 8:
            return "Q5_K"
        if ftype in ("MOSTLY_Q4_0", "MOSTLY_Q5_0") and has_imatrix and i_layer < n_layer // 8:
            return "Q4_1" if ftype == "MOSTLY_Q4_0" else "Q5_1"
        return new
    if cat == "attn_output":
        if hp.arch != "falcon" and experts == 8 and ftype in ("MOSTLY_Q4_K_S", "MOSTLY_Q4_K_M"):
            return "Q5_K"
        return new
    if cat == "ffn_gate":  # only IQ3_XS changes these; the counters run regardless
        st.i_ffn_gate += 1
    elif cat == "ffn_up":
        st.i_ffn_up += 1
    return new


@dataclass(frozen=True)
class Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch (row-major) shape
    kept_f32: bool = False  # F32 in every file edgeconv writes (norms, biases, routers, sinks)


@dataclass
class TypePlan:
    """Every tensor's GGML type and bytes in the file `ftype` makes."""

    ftype: str
    types: dict[str, str]
    nbytes: dict[str, int]  # each tensor's data, padded to the alignment
    quantized: list[str] = field(default_factory=list)  # the tensors llama.cpp's quantizer chose a type for
    fallbacks: list[str] = field(default_factory=list)  # those whose width refused the mix's type

    @property
    def tensor_bytes(self) -> int:
        return sum(self.nbytes.values())

    def mix(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def hparams_from_config(arch: str, config: dict) -> Hparams:
    """The hyperparameters llama.cpp's type choice reads, from config.json (what the GGUF header would say)."""
    from edgeconv.families.base import routed_experts

    heads = int(config.get("num_attention_heads") or 0)
    return Hparams(arch, int(config["num_hidden_layers"]), routed_experts(config), heads,
                   int(config.get("num_key_value_heads") or heads))


def choose_types(tensors: list[Tensor], ftype: str, hparams: Hparams, *, source: str = "F32",
                 has_imatrix: bool = False) -> TypePlan:
    """llama.cpp's type for every tensor when a float file of `tensors` (its tensors in `source`, F32 or BF16, except
    those kept in F32) is quantized to `ftype` (a gguf.LlamaFileType name such as "MOSTLY_Q4_K_M":
    edgeconv.quant's QuantType.ftype). For the float file types, the types edgeconv's own writer gives them: the
    file's type, except the tensors kept in F32."""
    if ftype not in DEFAULT_TYPE:
        raise ValueError(f"llama.cpp's type choice for {ftype} is not implemented (known: {', '.join(DEFAULT_TYPE)})")
    default = DEFAULT_TYPE[ftype]
    ordered = sorted(tensors, key=lambda t: loader_order(t.name))
    st = _State(n_attention_wv=sum(category(t.name) in ATTN_V_LIKE for t in ordered),
                tied=not any(category(t.name) == "output" for t in ordered))
    types: dict[str, str] = {}
    quantized: list[str] = []
    fallbacks: list[str] = []
    for t in ordered:
        if default in FLOAT_TYPES:  # edgeconv's writer: F32 where it keeps F32, the file's type elsewhere
            types[t.name] = "F32" if t.kept_f32 else default
            continue
        if not allows_quantization(t.name, t.shape):
            types[t.name] = "F32" if t.kept_f32 else source
            continue
        quantized.append(t.name)
        chosen = _mix(st, hparams, ftype, default, t.name, t.shape, category(t.name), has_imatrix)
        final = fallback(chosen, ne(t.shape)[0])
        if final != chosen:
            fallbacks.append(t.name)
        types[t.name] = final
    nbytes = {t.name: padded(tensor_bytes(t.shape, types[t.name])) for t in ordered}
    return TypePlan(ftype, types, nbytes, quantized, fallbacks)


# --- a GGUF planned from config.json alone (the memory planner, before the student exists) ---------------------

# Tokenizer metadata per vocabulary entry when no tokenizer.json is at hand: the token string (8-byte length + about
# 7 bytes), its type (4) and about one merge (8 + about 13). A tokenizer.json, when given, is written exactly.
VOCAB_BYTES_PER_TOKEN = 40


class _ShapesOnly:
    """The part of a Checkpoint that edgeconv.export.gguf.writer's tensor listing reads: names, shapes, config."""

    def __init__(self, config: dict, shapes: dict[str, tuple[int, ...]]):
        self.config, self._shapes = config, shapes

    def names(self) -> list[str]:
        return list(self._shapes)

    def has(self, name: str) -> bool:
        return name in self._shapes

    def info(self, name: str):
        from types import SimpleNamespace

        return SimpleNamespace(shape=tuple(self._shapes[name]))

    def read(self, name: str, index=None):
        raise RuntimeError(f"{name}: a planned checkpoint has no data")


@dataclass
class FilePlan:
    """The GGUF a quantization of a planned checkpoint makes: every tensor's type and the file's bytes."""

    quant: str
    types: TypePlan
    metadata_bytes: int  # header, key-values (tokenizer included), tensor infos; padded to the alignment
    vocab: str  # "tokenizer" (written as the export writes it) or "estimated" (VOCAB_BYTES_PER_TOKEN)

    @property
    def tensor_bytes(self) -> int:
        return self.types.tensor_bytes

    @property
    def file_bytes(self) -> int:
        return self.metadata_bytes + self.types.tensor_bytes


@dataclass
class GgufLayout:
    """The tensors and header of the GGUF edgeconv would write for a checkpoint, from its config and shapes."""

    tensors: list[Tensor]
    hparams: Hparams
    source: str  # the float type the quantizer reads: BF16 for bf16 checkpoints, else F32 (as export_gguf picks)
    float_metadata: int  # unpadded bytes of the float file's header, key-values and tensor infos
    vocab: str

    def plan(self, quant: str, has_imatrix: bool = False) -> FilePlan:
        """The file `edgeconv export --quant quant` writes (a name of edgeconv.quant's GGUF table)."""
        from edgeconv.quant import get_quant

        entry = get_quant("gguf", quant)
        types = choose_types(self.tensors, entry.ftype, self.hparams, source=self.source, has_imatrix=has_imatrix)
        if entry.written_by_edgeconv and not has_imatrix:  # edgeconv's writer: every dimension written
            return FilePlan(quant, types, padded(self.float_metadata), self.vocab)
        # llama.cpp copies the key-values and writes each tensor's info with ggml_n_dims dimensions (trailing 1s
        # dropped: a one-expert stack [1, rows, cols] is 2-D), 8 bytes less per dropped dimension.
        dropped = sum(len(t.shape) - n_dims(t.shape) for t in self.tensors)
        return FilePlan(quant, types, padded(self.float_metadata - 8 * dropped), self.vocab)


@contextlib.contextmanager
def quiet_gguf():
    """gguf-py's warnings (logger "gguf") silenced for the block: planning writes no file and has nothing to warn."""
    log = logging.getLogger("gguf")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@functools.lru_cache(maxsize=8)
def vocab_metadata_bytes(tokenizer: str, vocab_size: int) -> int | None:
    """The bytes of the tokenizer's key-values in the GGUF (tokens, types, merges, special ids, chat template), as
    the export writes them from `tokenizer`/tokenizer.json; None when there is no tokenizer the export could write."""
    from pathlib import Path

    from edgeconv.errors import EdgeconvError
    from edgeconv.export.gguf.vocab import add_vocab
    from edgeconv.export.gguf.writer import _file_bytes

    if not (Path(tokenizer) / "tokenizer.json").is_file():
        return None
    for pre in (None, "gpt-2"):  # a pre-tokenizer edgeconv cannot name is named on the command line: any will do
        writer = gguf.GGUFWriter(None, "planned")
        writer.data_alignment = 1
        before = _file_bytes(writer)[0]
        try:
            with quiet_gguf():  # gguf-py's notes on special tokens are the export's to show, not the plan's
                add_vocab(writer, Path(tokenizer), vocab_size, pre)
        except EdgeconvError:
            continue
        except Exception:  # an unreadable tokenizer: estimated like an absent one
            return None
        return _file_bytes(writer)[0] - before
    return None


def gguf_layout(config: dict, shapes: dict[str, tuple[int, ...]], tokenizer=None, name: str = "model") -> GgufLayout:
    """The GGUF of a checkpoint with this config.json and these HF tensor shapes (e.g. from a meta-device
    instantiation), named and stacked by the exporter's own code; `tokenizer` a directory with tokenizer.json
    (the tokenizer's metadata is then exact, else estimated); `name` the general.name the export writes (the
    checkpoint directory's name). Raises EdgeconvError where the exporter would."""
    from edgeconv.errors import EdgeconvError
    from edgeconv.export.gguf.arch import gguf_arch_for
    from edgeconv.export.gguf.writer import _file_bytes, _items, _kept_f32

    spec = gguf_arch_for(config)
    items = _items(_ShapesOnly(config, shapes), spec)
    # The exporter's key-values (edgeconv.export.gguf.writer.plan_gguf) but general.*'s description of the model
    # beyond its name (a few hundred bytes from its card and lineage, unknown before the student exists).
    writer = gguf.GGUFWriter(None, spec.name)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    try:
        with quiet_gguf():  # e.g. DeepSeek's key lengths, written twice on purpose
            spec.metadata(writer, config)
        header = True
    except EdgeconvError:  # the export would refuse this config (e.g. YaRN without truncation): plan anyway
        header = False
    vocab_size = int(config.get("vocab_size") or 0)
    exact = vocab_metadata_bytes(str(tokenizer), vocab_size) if tokenizer is not None else None
    vocab = "tokenizer" if exact is not None else "estimated"
    vocab_bytes = exact if exact is not None else vocab_size * VOCAB_BYTES_PER_TOKEN
    for it in items:
        writer.add_tensor_info(it.name, it.shape, np.dtype(np.float32), 4 * math.prod(it.shape))
    writer.data_alignment = 1  # the unpadded size: each file type pads its own (the quantizer adds a key)
    metadata = _file_bytes(writer)[0] + vocab_bytes
    kv = writer.kv_data[0]

    def value(key: str, default: int = 0) -> int:
        v = kv.get(f"{spec.name}.{key}")
        return int(v.value) if v is not None else default

    if header:
        hp = Hparams(spec.name, value("block_count"), value("expert_count"), value("attention.head_count"),
                     value("attention.head_count_kv"))
    else:
        hp = hparams_from_config(spec.name, config)
    dtype = config.get("torch_dtype") or config.get("dtype")
    writer.close()
    return GgufLayout([Tensor(it.name, tuple(it.shape), _kept_f32(it)) for it in items], hp,
                      "BF16" if dtype == "bfloat16" else "F32", metadata, vocab)
