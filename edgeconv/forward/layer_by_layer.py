"""Logits of any checkpoint with one decoder layer in memory at a time, and the choice between that and the whole model.

`LayerByLayerModel(model, device=, dtype=)` runs edgeconv.forward.layer_runner's LayerRunner (the one layer-by-layer
runner: calibration uses it too) and adds the final norm and lm_head per piece, so logits are never held for all
sequences at once (a 151,936 or 201,088-token vocabulary makes them the largest tensor of the run):

- `logits(sequences, on_logits)`: the sequences (lists of token ids, any lengths) go in chunks, each chunk one
  pass over the model (every layer read once); `on_logits(indices, logits)` gets the logits of a few sequences at
  a time ([r, L, V], L the longest of them: shorter ones are right-padded, which causal attention never lets a real
  position see, so their positions are what the unpadded sequence gives, to rounding). The caller reduces: top-k for
  the teacher cache, log-probs of the targets for perplexity, everything for the short parity prompts.
- `full_logits`, `token_logprobs`: the two common reductions.
- `greedy(prompts, max_new, finished)`: batched greedy decoding of all prompts at once, with a KV cache per layer
  kept in memory: one pass (every layer read once) per generated token.

An MoE teacher of a supported family has its MoE blocks computed by the family adapter from the files
(RoutedMoeBlock: per-expert, fused or MXFP4 experts alike); any other causal LM (dense students included) has its
layers loaded straight into the stock transformers modules.

The cost model: a pass reads the whole model once (the next layer is read on a background thread while the current
one computes), so a caller hands over as many sequences per call as it can; chunks are as large as
`max_activation_bytes` of hidden states allows (they stay on the GPU when they fit there).

`use_layer_by_layer(...)` decides, when not told: layer by layer when the weights in the compute dtype (from the
safetensors headers) plus an allowance exceed a safe share of the memory available (psutil, or the GPU's free
memory), and logs which one it chose and why.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeconv.calibration.moe_block import RoutedMoeBlock
from edgeconv.errors import EdgeconvError
from edgeconv.families.base import FAMILIES, MoEFamily, routed_experts
from edgeconv.forward.layer_runner import LayerRunner
from edgeconv.io.checkpoint import Checkpoint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}
LOGITS_BYTES = 256 * 1024**2  # logits made at once by the head (rows of a batch at a time)
SAFETY = 0.7  # the share of the available memory a whole model may fill
ALLOWANCE = 1024**3  # activations, loading transients and the rest of the process, next to the weights
ONE_PASS_ABOVE = 256 * 1024**2  # work done in one pass (parity prompts) runs layer by layer above this many weight
# bytes: loading a whole model costs a transient second copy (stored dtype, then fp32), one layer at a time does not


@dataclass(frozen=True)
class ForwardOptions:
    """How a model that may not fit is run (the CLI's --device, --dtype, --layer-by-layer/--whole-model).

    device: auto (the GPU if there is one), cpu, cuda, cuda:N. dtype: auto (bf16 on a GPU that has it, else
    float32), float32, bfloat16, float16. layer_by_layer: None chooses from the model's size and the memory
    available; True/False forces. chunk_sequences: sequences per layer-by-layer pass (None: as many as
    max_activation_bytes of hidden states hold)."""

    device: str = "auto"
    dtype: str = "auto"
    layer_by_layer: bool | None = None
    chunk_sequences: int | None = None
    max_activation_bytes: int = 2 * 1024**3

    def resolve(self, device_option: str = "--device",
                dtype_option: str = "--dtype") -> tuple[torch.device, torch.dtype]:
        """The device and dtype; an unavailable device or unknown dtype is one clear error (call it early)."""
        device = resolve_device(self.device, device_option)
        return device, resolve_dtype(self.dtype, device, dtype_option)


# --- devices and dtypes ---------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device | None = "auto", option: str = "--device") -> torch.device:
    """auto: the GPU (this process's current CUDA device) if there is one, else the CPU; cpu; cuda; cuda:N.
    Asking for CUDA where there is none is one clear error."""
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not m:
        raise EdgeconvError(f"{option} {device}: not a device", "use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"no CUDA device is visible to this torch (CUDA {torch.version.cuda})")
        raise EdgeconvError(f"{option} {name} was asked, but CUDA is not available here ({why}, "
                            f"torch {torch.__version__}): only the CPU is", f"use {option} cpu, or auto")
    count = torch.cuda.device_count()
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    if index >= count:
        raise EdgeconvError(f"{option} {name} was asked, but {count} CUDA device(s) are visible "
                            f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})",
                            f"use {option} cuda:N with N < {count}, or auto")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: torch.device | str = "cpu",
                  option: str = "--dtype") -> torch.dtype:
    """auto: bfloat16 on a GPU that has it, float32 elsewhere; or float32, bfloat16, float16 (fp32/bf16/fp16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype or "auto").strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    if name == "auto":
        device = torch.device(device)
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    if name not in DTYPES:
        raise EdgeconvError(f"{option} {dtype}: not a compute dtype", f"use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- whole model or layer by layer ----------------------------------------------------------------------------

def weight_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes of the model's weights once loaded in `dtype`, from the safetensors headers (no tensor is read):
    floating-point tensors take `dtype`'s size (fp32 doubles a bf16 file), MXFP4 blocks two values a byte."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name in ckpt.names():
        info = ckpt.info(name)
        if info.dtype.is_floating_point:
            total += info.numel * size
        elif info.dtype == torch.uint8 and name.endswith("_blocks"):
            total += 2 * info.numel * size
        elif not name.endswith("_scales"):
            total += info.nbytes
    return total


def available_bytes(device: torch.device, processes: int = 1) -> int:
    """Free GPU memory on a CUDA device; else the host memory available (psutil), shared by `processes`."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available) // max(1, processes)


def use_layer_by_layer(ckpt: Checkpoint, what: str, dtype: torch.dtype, device: torch.device,
                       layer_by_layer: bool | None = None, *, processes: int = 1, allowance: int = ALLOWANCE,
                       one_pass_above: int | None = None) -> bool:
    """Whether `what` runs layer by layer: as told (`layer_by_layer` True/False), else when the weights in `dtype`
    plus `allowance` exceed SAFETY of the memory available. Logs the choice and why.

    `one_pass_above`: for work that reads every weight once either way (the parity prompts fit one pass), layer
    by layer costs nothing extra and holds one layer instead of the model, so it is chosen for any model whose
    weights exceed this many bytes, whatever memory is free."""
    weights = weight_bytes(ckpt, dtype)
    model = f"model {human(weights)} in {dtype_name(dtype)}"
    if layer_by_layer is not None:
        how = "layer by layer" if layer_by_layer else "whole model"
        log.info(f"{what}: {how} (as asked: {'--layer-by-layer' if layer_by_layer else '--whole-model'}; {model})")
        return bool(layer_by_layer)
    if one_pass_above is not None and weights > one_pass_above:
        log.info(f"{what}: layer by layer ({model} > {human(one_pass_above)}; one pass reads every layer once "
                 "either way, so only one layer is held)")
        return True
    avail = available_bytes(device, processes)
    usable = int(SAFETY * avail)
    where = ("free on " + str(device) if device.type == "cuda"
             else "available" + (f" to each of {processes} processes" if processes > 1 else ""))
    lbl = weights + allowance > usable
    need = f"{model} + {human(allowance)} for activations"
    if lbl:
        log.info(f"{what}: layer by layer ({need} > {human(usable)} usable, {SAFETY:.0%} of {human(avail)} {where})")
    else:
        log.info(f"{what}: whole model ({need} fits in {human(usable)} usable, {SAFETY:.0%} of {human(avail)} {where})")
    return lbl


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def moe_family(config: dict) -> MoEFamily | None:
    """The adapter computing this checkpoint's MoE blocks, or None (a dense model, or an architecture without
    one: its layers are then loaded straight into the stock modules)."""
    arch = (config.get("architectures") or [""])[0]
    if arch not in FAMILIES or routed_experts(config) <= 1:
        return None
    return FAMILIES.get(arch)(config)


# --- the forward ----------------------------------------------------------------------------------------------

class LayerByLayerModel:
    """A checkpoint whose logits are computed one decoder layer at a time (see the module's docstring)."""

    def __init__(self, model: str | Path | Checkpoint, *, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", batch_size: int = 8, chunk_sequences: int | None = None,
                 max_activation_bytes: int = ForwardOptions.max_activation_bytes, spill_dir: Path | None = None,
                 prefetch: bool = True, logits_bytes: int = LOGITS_BYTES, cast_on_use: bool = False,
                 config_overrides: dict | None = None):
        """`cast_on_use`: cast each routed expert when tokens reach it instead of the whole layer before it runs
        (RoutedMoeBlock): for one pass over a few tokens, the layer then costs its stored bytes only.
        `config_overrides`: config.json fields run differently (the YaRN llama.cpp runs, for a teacher's parity)."""
        self.ckpt = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if batch_size < 1 or (chunk_sequences is not None and chunk_sequences < 1):
            raise EdgeconvError(f"batch size {batch_size} / chunk {chunk_sequences} sequences: must be positive",
                                "pass 1 or more")
        self.batch_size, self.chunk_sequences = batch_size, chunk_sequences
        self.max_activation_bytes, self.logits_bytes = max_activation_bytes, logits_bytes
        self.family = moe_family(self.ckpt.config)
        make_block = None
        if self.family is not None:
            self.family.check_checkpoint(self.ckpt)
            family, ckpt, dt = self.family, self.ckpt, self.dtype
            make_block = lambda layer: RoutedMoeBlock(family, ckpt, layer, dt, cast_on_use)  # noqa: E731
        self.runner = LayerRunner(
            self.ckpt, self.family, make_block, dtype=self.dtype, device=self.device,
            max_activation_bytes=max_activation_bytes, spill_dir=spill_dir, prefetch=prefetch,
            config_overrides=config_overrides, what="the activations of the layer-by-layer forward",
            spill_hint="pass fewer sequences per chunk, or free space there")
        self.config = self.runner.config
        self.vocab_size = int(self.config.vocab_size)
        self.passes = 0  # passes over the model so far (each reads every layer once)

    def close(self) -> None:
        self.ckpt.close()

    # --- chunks of sequences ------------------------------------------------------------------------------
    def _sequence_bytes(self, length: int) -> int:
        return length * self.runner.hidden_size * torch.empty((), dtype=self.dtype).element_size()

    def _chunks(self, order: list[int], lengths: list[int], extra_per_token: int = 0) -> list[list[int]]:
        """`order` (longest first) cut into chunks: `chunk_sequences` each, or as many as fit in
        max_activation_bytes (hidden states, plus `extra_per_token` bytes per token, e.g. a KV cache)."""
        chunks, i = [], 0
        while i < len(order):
            longest = lengths[order[i]]
            if self.chunk_sequences:
                n = self.chunk_sequences
            else:
                per = self._sequence_bytes(longest) + extra_per_token * longest
                n = max(1, self.max_activation_bytes // max(1, per))
            chunks.append(order[i:i + n])
            i += n
        return chunks

    def _batches(self, chunk: list[int], seqs: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Batches of `batch_size` sequences of `chunk` (longest first), each right-padded to its longest."""
        batches, parts = [], []
        for j in range(0, len(chunk), self.batch_size):
            part = chunk[j:j + self.batch_size]
            x = torch.zeros(len(part), max(len(seqs[i]) for i in part), dtype=torch.long)
            for r, i in enumerate(part):
                x[r, :len(seqs[i])] = torch.as_tensor(seqs[i], dtype=torch.long)
            batches.append(x)
            parts.append(part)
        return batches, parts

    # --- logits -------------------------------------------------------------------------------------------
    def logits(self, sequences: Sequence, on_logits: Callable[[list[int], torch.Tensor], None],
               progress: Callable[[int], None] | None = None) -> None:
        """Call `on_logits(indices, logits [r, L, V])` for every sequence (by its index in `sequences`), a few at a
        time; a sequence shorter than L is right-padded (its first len(sequence) positions are its logits).
        `progress(n)` after each chunk of n sequences. Empty sequences get no call."""
        seqs = [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in sequences]
        lengths = [len(s) for s in seqs]
        order = sorted((i for i in range(len(seqs)) if lengths[i]), key=lambda i: -lengths[i])
        vocab_row = lambda length: length * self.vocab_size * 4  # noqa: E731  (fp32 logits of one sequence)
        for chunk in self._chunks(order, lengths):
            batches, parts = self._batches(chunk, seqs)

            def on_output(b: int, hidden: torch.Tensor, head: Callable, parts=parts) -> None:
                part = parts[b]
                step = max(1, self.logits_bytes // max(1, vocab_row(hidden.shape[1])))
                for r in range(0, len(part), step):
                    on_logits(part[r:r + step], head(hidden[r:r + step]))

            self.runner.run(batches, on_output=on_output)
            self.passes += 1
            if progress:
                progress(len(chunk))

    def full_logits(self, sequences: Sequence) -> list[np.ndarray]:
        """Float32 logits [len, V] per sequence (for short prompts: they are all held)."""
        out: list = [None] * len(sequences)

        def keep(indices: list[int], logits: torch.Tensor) -> None:
            for r, i in enumerate(indices):
                out[i] = logits[r, :len(sequences[i])].float().cpu().numpy()

        self.logits(sequences, keep)
        return out

    def token_logprobs(self, sequences: Sequence) -> list[np.ndarray]:
        """For each sequence, float64 log p(ids[i] | ids[:i]) for i >= 1 (len(ids) - 1 values)."""
        out: list = [np.zeros(0) for _ in sequences]

        def score(indices: list[int], logits: torch.Tensor) -> None:
            lp = torch.log_softmax(logits.double(), dim=-1)
            for r, i in enumerate(indices):
                n = len(sequences[i])
                if n < 2:
                    continue
                target = torch.as_tensor(list(sequences[i][1:]), dtype=torch.long, device=lp.device)
                out[i] = lp[r, :n - 1].gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu().numpy()

        self.logits(sequences, score)
        return out

    # --- greedy decoding ----------------------------------------------------------------------------------
    def _kv_bytes_per_token(self) -> int:
        c = self.config
        heads = getattr(c, "num_key_value_heads", None) or getattr(c, "num_attention_heads", 1)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if getattr(c, "kv_lora_rank", None):  # MLA caches full keys and values per head
            heads = c.num_attention_heads
            head_dim = (getattr(c, "qk_nope_head_dim", 0) + getattr(c, "qk_rope_head_dim", 0)
                        + getattr(c, "v_head_dim", head_dim)) / 2
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return int(2 * self.runner.num_layers * heads * head_dim * itemsize)

    def greedy(self, prompts: Sequence[Sequence[int]], max_new: int,
               finished: Callable[[int, list[int]], bool] = lambda i, new: False) -> list[list[int]]:
        """Greedy continuations of all `prompts` together: each step is one pass (every layer read once) for every
        prompt still going, with the KV cache of each layer kept in memory. A prompt stops when `finished(i, new)`
        says so after a token was appended, or at `max_new` tokens. Prompts of one length share batches (no
        padding); as many prompts share a pass as their hidden states and KV caches fit in max_activation_bytes."""
        seqs = [list(p) for p in prompts]
        new: list[list[int]] = [[] for _ in seqs]
        if max_new < 1:
            return new
        lengths = [len(s) for s in seqs]
        if not all(lengths):
            raise EdgeconvError("an empty prompt cannot be continued", "give every prompt at least one token")
        order = sorted(range(len(seqs)), key=lambda i: -lengths[i])
        for chunk in self._chunks(order, [n + max_new for n in lengths], self._kv_bytes_per_token()):
            self._greedy_chunk(chunk, seqs, new, max_new, finished)
        return new

    def _greedy_chunk(self, chunk: list[int], seqs: list[list[int]], new: list[list[int]], max_new: int,
                      finished: Callable[[int, list[int]], bool]) -> None:
        by_length: dict[int, list[int]] = {}
        for i in chunk:
            by_length.setdefault(len(seqs[i]), []).append(i)
        parts = [group[j:j + self.batch_size] for group in by_length.values()
                 for j in range(0, len(group), self.batch_size)]
        batches = [torch.tensor([seqs[i] for i in part], dtype=torch.long) for part in parts]
        done = {i: False for i in chunk}
        caches: list | None = None
        while parts:
            picked: list[list[int]] = [[] for _ in parts]

            def pick(b: int, hidden: torch.Tensor, head: Callable, picked=picked, parts=parts) -> None:
                tokens = head(hidden[:, -1:])[:, -1].argmax(-1).tolist()
                picked[b] = tokens
                for i, token in zip(parts[b], tokens):
                    if not done[i]:
                        new[i].append(int(token))
                        done[i] = len(new[i]) >= max_new or bool(finished(i, new[i]))

            self.runner.run(batches, on_output=pick, use_cache=True, caches=caches)
            self.passes += 1
            keep = [b for b, part in enumerate(parts) if not all(done[i] for i in part)]
            caches = [self.runner.caches[b] for b in keep]
            batches = [torch.tensor(picked[b], dtype=torch.long).unsqueeze(1) for b in keep]
            parts = [parts[b] for b in keep]

