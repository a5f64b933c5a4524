"""Run a causal LM one decoder layer at a time, with only that layer's weights in memory: the one layer-by-layer
forward of edgeconv (calibration, the export parity reference, the offline teacher cache and evaluation all use it;
edgeconv.forward turns it into logits).

The model is built on the meta device (no memory). One pass with every decoder layer replaced by a
recorder captures, per batch, the exact arguments transformers hands each layer (causal or sliding-window
masks, rotary position embeddings, cache positions, the KV cache), and the embeddings. Then, for each layer in
turn: load its weights from the files, push the hidden states of all batches through it, and free it. The next
layer's tensors are read on a background thread while the current one computes (one layer ahead at most, held in
the dtype they are stored in), so peak memory is about one layer in the compute dtype, one as stored, plus the
activations; the activations live on the GPU when they fit there, else in host memory, else in a file-backed
tensor when they would not fit in the allowed memory.

That file (`edgeconv-acts-PID-XXXX/activations.bin` beside the output) is allocated in full before it is
mapped, so a disk too small fails at once in one line instead of a SIGBUS halfway; it is removed on every way
out (return, exception, Ctrl-C, SIGTERM), and one left by a killed run (its PID is dead) is removed by the next.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgeconv.errors import EdgeconvError
from edgeconv.families.base import MoEFamily
from edgeconv.io.checkpoint import Checkpoint


class _Stop(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer `index`: records its keyword arguments and passes hidden states on.

    It returns `(hidden_states,)`: a model whose layers return tuples takes `[0]`, one whose layers return a
    tensor hands the tuple to the next recorder, which only records; the last one stops the pass before anything
    else uses it. (The arguments do not depend on what flows between layers: masks and positions are made
    before the loop.)"""

    def __init__(self, index: int, last: int, store: dict, original: torch.nn.Module):
        super().__init__()
        self.index, self.last, self.store = index, last, store
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type  # GPT-OSS picks the mask by it

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers are expected to get keyword arguments only")
        self.store[self.index] = kwargs
        if self.index == 0:
            self.store["embeddings"] = hidden_states
        if self.index == self.last:
            raise _Stop
        return (hidden_states,)


SPILL_PREFIX = "edgeconv-acts-"
DEVICE_SHARE = 0.5  # activations stay on a GPU when they take at most this share of its free memory
HEAD_SLICE = 16384  # vocabulary rows of the lm_head cast to the compute dtype at a time
SPILL_FILE = "activations.bin"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_spills(directory: Path) -> None:
    """Remove spill directories `edgeconv-acts-PID-*` in `directory` whose process is gone."""
    try:
        candidates = list(Path(directory).glob(f"{SPILL_PREFIX}*-*"))
    except OSError:
        return
    for stale in candidates:
        pid = stale.name[len(SPILL_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue  # not ours to judge, or a live run's
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


@contextmanager
def terminate_unwinds() -> Iterator[None]:
    """During the block, SIGTERM exits through SystemExit (status 128 + 15) instead of killing the process at
    once, so every `finally` and `with` runs first. Only in the main thread, and only where SIGTERM had its
    default action (a handler someone installed, or an ignored SIGTERM, is left alone); restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one unwind: a second SIGTERM must not cut the cleanup
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class ActivationStore:
    """Hidden states of all sequences of a pass [n, seq, hidden]: on the compute device when they fit there (a
    GPU), else in host memory, or, beyond `max_bytes`, in a file-backed tensor.

    The file is allocated in full up front (a disk without room refuses now, in one line) and removed by
    `close()`; use the store as a context manager. `what` and `hint` word the no-room error for the caller.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, max_bytes: int, spill_dir: Path | None = None,
                 *, device: torch.device | str | None = None, what: str = "the calibration activations",
                 hint: str | None = None):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.dir: Path | None = None
        self.spilled = False
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and nbytes <= DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]:
            self.data = torch.empty(shape, dtype=dtype, device=device)
            return
        self.spilled = nbytes > max_bytes
        if not self.spilled:
            self.data = torch.empty(shape, dtype=dtype)
            return
        parent = Path(spill_dir if spill_dir is not None else tempfile.gettempdir()).absolute()
        parent.mkdir(parents=True, exist_ok=True)  # --out's parent may not exist yet
        remove_stale_spills(parent)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=parent))
        path = self.dir / SPILL_FILE
        try:
            _allocate(path, nbytes, parent, max_bytes, what, hint)
            self.data = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the spill file (the mapping, if still referenced, stays valid until it is dropped)."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _allocate(path: Path, nbytes: int, parent: Path, max_bytes: int, what: str, hint: str | None) -> None:
    """Create `path` with all its `nbytes` of disk reserved (a mapped file's missing block is a SIGBUS)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate here: compare with the free space
                free = shutil.disk_usage(parent).free
                if free < nbytes:
                    raise _no_room(parent, nbytes, free, max_bytes, what, hint) from exc
                os.ftruncate(fd, nbytes)
            elif exc.errno in DISK_FULL_ERRNOS:
                os.ftruncate(fd, 0)  # give the partial allocation back before measuring
                raise _no_room(parent, nbytes, shutil.disk_usage(parent).free, max_bytes, what, hint) from exc
            else:
                raise
    finally:
        os.close(fd)


def _no_room(parent: Path, nbytes: int, free: int, max_bytes: int, what: str, hint: str | None) -> EdgeconvError:
    return EdgeconvError(
        f"not enough disk space in {parent} for {what}, which exceed "
        f"{'--max-activation-memory' if hint is None else 'the activation memory allowed'} ({_human(max_bytes)}) "
        f"and go to disk: they need {nbytes:,} bytes "
        f"({_human(nbytes)}), {free:,} bytes ({_human(free)}) are free",
        hint or f"raise --max-activation-memory above {_human(nbytes)} to keep them in memory, lower --tokens, "
        "or free space there (it is the --out directory's parent)",
    )


def build_skeleton(config, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """The model on the meta device (no memory), with a real rotary embedding on `device`."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    base = getattr(model, "model", None)
    missing = [n for n in ("layers", "embed_tokens", "norm") if not hasattr(base, n)] + \
        ([] if hasattr(model, "lm_head") else ["lm_head"])
    if missing:
        raise EdgeconvError(
            f"{type(model).__name__} has no {', '.join(missing)} where the layer-by-layer forward looks "
            "(model.model.layers, .embed_tokens, .norm, lm_head)",
            "run it whole (--whole-model)",
        )
    if hasattr(base, "rotary_emb"):
        base.rotary_emb = type(base.rotary_emb)(config=model.config).to(device)  # buffers computed here, not meta
    return model


def _layer_weights(ckpt: Checkpoint, prefix: str, skip: Callable[[str], bool]) -> dict:
    """The tensors of the layer under `prefix` (names relative to it), as stored; those `skip` names are not read."""
    prefix = f"{prefix}."
    return {name[len(prefix):]: ckpt.read(name) for name in ckpt.names() if name.startswith(prefix) and not skip(name)}


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to do
        return None


_LIBC = _libc()


def release_freed_memory() -> None:
    """Give the memory of a freed layer back to the system. glibc serves allocations of a few MB (one expert's
    tensors) from its heap once its mmap threshold has grown past them, and keeps what is freed there in the
    resident set: measured on a Qwen3-30B-A3B-shaped layer, 6.7 GB peak without this, 4.8 GB with it."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _moe_module(layer_module: torch.nn.Module, family: MoEFamily) -> torch.nn.Module:
    for block in family.blocks:
        if hasattr(layer_module, block):
            return getattr(layer_module, block)
    raise RuntimeError(f"no MoE block among {family.blocks}")


def _cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """To the device, floating-point tensors in the compute dtype (integer ones as they are)."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


class _Pending:
    """One load running on a daemon thread (a daemon: a SIGTERM or Ctrl-C never waits for a read to finish)."""

    def __init__(self, key, load: Callable):
        self.key, self.value, self.error = key, None, None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(load,), name=f"edgeconv-prefetch-{key}", daemon=True).start()

    def _run(self, load: Callable) -> None:
        try:
            self.value = load(self.key)
        except BaseException as exc:  # handed to the consumer, which raises it
            self.error = exc
        finally:
            self.done.set()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        value, self.value = self.value, None
        return value


class Prefetcher:
    """Loads `keys` in order, each on a background thread while the consumer works on the previous one.

    At most one item ahead: item i + 1 starts loading when the consumer takes item i, so memory holds the item
    in use plus the one being read. The consumer must drop item i before taking item i + 1 for that bound to
    hold. Only the loading thread reads the checkpoint while a pass runs (the checkpoint keeps one open handle).
    """

    def __init__(self, load: Callable, keys: list, enabled: bool = True):
        self.load, self.keys, self.enabled = load, list(keys), enabled
        self.next = 0
        self.pending: _Pending | None = None

    def get(self, key):
        if self.next >= len(self.keys) or self.keys[self.next] != key:
            raise RuntimeError(f"prefetch order: asked for {key!r}, expected {self.keys[self.next:][:1]}")
        pending, self.pending = self.pending, None
        value = pending.result() if pending is not None else self.load(key)
        self.next += 1
        if self.enabled and self.next < len(self.keys):
            self.pending = _Pending(self.keys[self.next], self.load)
        return value


class LayerRunner:
    """One checkpoint run a decoder layer at a time, pass after pass, with only that layer's weights in memory.

    `family` (a MoE adapter) and `make_block(layer) -> callable` replace each MoE layer's block by one computed
    from the files (it is built on the loading thread; `materialize(device)` is called on it, if it has one,
    before the layer runs); without them every layer is loaded straight from the files into the stock
    transformers module (any dense model, or a MoE whose on-disk names are the module's).

    A pass (`run`) takes batches of token ids (each [b_i, L_i]; different lengths are fine, each batch keeps its
    own masks) and pushes them through the model: a recorder pass captures the embeddings and the exact keyword
    arguments of every decoder layer per batch, then each layer in turn is loaded (the next one is read on a
    background thread meanwhile), runs every batch, and is freed. With `on_output`, the final norm and lm_head
    are loaded after the last layer and `on_output(b, hidden, head)` is called per batch with its last hidden
    states and `head(h) -> logits`, so the caller reduces the logits a piece at a time.
    """

    def __init__(self, ckpt: Checkpoint, family: MoEFamily | None = None,
                 make_block: Callable[[int], Callable] | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_activation_bytes: int = 4 * 1024**3,
                 spill_dir: Path | None = None, prefetch: bool = True,
                 on_batch: Callable[[int, int], None] | None = None, what: str = "the calibration activations",
                 spill_hint: str | None = None, config_overrides: dict | None = None):
        self.ckpt, self.family, self.make_block = ckpt, family, make_block
        self.dtype, self.device = dtype, torch.device(device)
        self.max_activation_bytes, self.spill_dir, self.prefetch = max_activation_bytes, spill_dir, prefetch
        self.on_batch, self.what, self.spill_hint = on_batch, what, spill_hint
        self.config = AutoConfig.from_pretrained(ckpt.path, **(config_overrides or {}))
        self.model = build_skeleton(self.config, dtype, self.device)
        self.hidden_size = int(self.config.hidden_size)
        self.num_layers = len(self.model.model.layers)
        self.moe_layers = set(family.moe_layers()) if family is not None and make_block is not None else set()
        self.caches: list = []  # per batch, the KV cache of the last pass run with use_cache

    # --- loading (on the prefetch thread) ---------------------------------------------------------------------
    def _load(self, key):
        ckpt = self.ckpt
        if key == "embed":
            return ckpt.read("model.embed_tokens.weight")
        if key == "head":
            norm = _layer_weights(ckpt, "model.norm", lambda name: False)
            name = "lm_head.weight" if ckpt.has("lm_head.weight") else "model.embed_tokens.weight"  # tied
            return norm, ckpt.read(name), ckpt.read("lm_head.bias") if ckpt.has("lm_head.bias") else None
        layer = key
        if layer in self.moe_layers:
            family = self.family
            weights = _layer_weights(ckpt, family.prefix(layer), lambda name: family.owns(name, layer))
            return weights, self.make_block(layer)
        return _layer_weights(ckpt, f"model.layers.{layer}", lambda name: False), None

    # --- one pass ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, batches: list[torch.Tensor], *, on_output: Callable | None = None, use_cache: bool = False,
            caches: list | None = None) -> torch.Tensor | None:
        """Push `batches` through every layer. Returns the last layer's hidden states (before the final norm) of
        all batches, stacked [sum b_i, max L_i, hidden], when `on_output` is None; else None.

        `use_cache`: keep a KV cache per batch (`self.caches` after the pass); `caches`: the caches of the
        previous pass, continued (the batches then hold only the new tokens)."""
        keys = ["embed", *range(self.num_layers)] + (["head"] if on_output is not None else [])
        loader = Prefetcher(self._load, keys, self.prefetch)
        rows = [0]
        for batch in batches:
            rows.append(rows[-1] + len(batch))
        shape = (rows[-1], max(b.shape[1] for b in batches), self.hidden_size)
        with terminate_unwinds(), ActivationStore(shape, self.dtype, self.max_activation_bytes, self.spill_dir,
                                                  device=self.device, what=self.what, hint=self.spill_hint) as acts:
            layer_kwargs = self._record(loader, batches, rows, acts, use_cache, caches)
            self._layers(loader, batches, rows, acts, layer_kwargs)
            if on_output is None:
                return acts.data
            self._head(loader, batches, rows, acts, on_output)
        return None

    def _record(self, loader: Prefetcher, batches, rows, acts: ActivationStore, use_cache: bool, caches) -> list:
        """The recorder pass: embeddings into `acts`, and per batch the keyword arguments of every layer."""
        model, device = self.model, self.device
        base = model.model
        # The table stays in its stored dtype (half of fp32 for a bf16 file: vocabularies are large); the rows
        # looked up are cast, which is exact, so the layers see what an fp32 table would give them.
        weight = loader.get("embed")
        base.embed_tokens.load_state_dict({"weight": weight.to(device)}, assign=True)
        del weight
        cast = base.embed_tokens.register_forward_hook(lambda module, args, out: out.to(self.dtype))
        layers = base.layers
        originals = list(layers)
        store: dict = {}
        by_shape: dict = {}  # without a cache, a layer's arguments depend on the batch's shape only
        layer_kwargs = []
        self.caches = []
        try:
            for i in range(len(originals)):
                layers[i] = _Recorder(i, len(originals) - 1, store, originals[i])
            for b, batch in enumerate(batches):
                store.clear()
                cache = caches[b] if caches is not None else None
                try:
                    base(input_ids=batch.to(device), use_cache=use_cache, past_key_values=cache)
                except _Stop:
                    pass
                acts.data[rows[b]:rows[b + 1], :batch.shape[1]] = store["embeddings"]
                kwargs = {i: store[i] for i in range(len(originals))}
                if use_cache:
                    self.caches.append(kwargs[0].get("past_key_values"))
                    layer_kwargs.append(kwargs)
                else:
                    layer_kwargs.append(by_shape.setdefault(tuple(batch.shape), kwargs))
        finally:
            for i, module in enumerate(originals):
                layers[i] = module
            cast.remove()
            base.embed_tokens.to("meta")  # frees the embedding
            release_freed_memory()
        return layer_kwargs

    def _layers(self, loader: Prefetcher, batches, rows, acts: ActivationStore, layer_kwargs: list) -> None:
        device = self.device
        for i, module in enumerate(self.model.model.layers):
            weights, block = loader.get(i)
            state = {}
            for name in list(weights):
                state[name] = _cast(weights.pop(name), device, self.dtype)  # the stored copy goes as it is cast
            module.load_state_dict(state, strict=False, assign=True)
            del state
            moe = _moe_module(module, self.family) if block is not None else None
            self._check_loaded(module, i, moe)
            if block is not None:
                if hasattr(block, "materialize"):
                    block.materialize(device)
                moe.forward = block
            release_freed_memory()  # the stored copies just cast
            for b, batch in enumerate(batches):
                length = batch.shape[1]
                x = acts.data[rows[b]:rows[b + 1], :length]
                out = module(x.to(device), **layer_kwargs[b][i])
                acts.data[rows[b]:rows[b + 1], :length] = out[0] if isinstance(out, tuple) else out
                if self.on_batch:
                    self.on_batch(i, batch.numel())
            module.to("meta")  # frees this layer's weights
            if moe is not None:
                del moe.forward
            del block
            release_freed_memory()

    def _check_loaded(self, module: torch.nn.Module, layer: int, moe: torch.nn.Module | None) -> None:
        skip = {id(p) for p in moe.parameters()} | {id(b) for b in moe.buffers()} if moe is not None else set()
        for name, t in module.state_dict(keep_vars=True).items():  # parameters and persistent buffers
            if t.is_meta and id(t) not in skip:
                raise EdgeconvError(f"tensor model.layers.{layer}.{name} is missing from {self.ckpt.path}",
                                    "the checkpoint is incomplete or its tensor names are not its architecture's")

    def _head(self, loader: Prefetcher, batches, rows, acts: ActivationStore, on_output: Callable) -> None:
        """The final norm and lm_head; the lm_head weight stays in its stored dtype on the device, and is cast to
        the compute dtype a slice of the vocabulary at a time (HEAD_SLICE rows), not whole."""
        model, device, dtype = self.model, self.device, self.dtype
        norm, weight, bias = loader.get("head")
        model.model.norm.load_state_dict({k: _cast(v, device, dtype) for k, v in norm.items()}, assign=True)
        weight = weight.to(device)
        bias = _cast(bias, device, dtype) if bias is not None else None
        cap = getattr(self.config, "final_logit_softcapping", None)

        def head(h: torch.Tensor) -> torch.Tensor:
            h = model.model.norm(h.to(device))
            if weight.dtype == dtype:
                logits = torch.nn.functional.linear(h, weight, bias)
            else:
                logits = torch.empty(*h.shape[:-1], weight.shape[0], dtype=dtype, device=device)
                for start in range(0, weight.shape[0], HEAD_SLICE):
                    end = start + HEAD_SLICE
                    logits[..., start:end] = torch.nn.functional.linear(
                        h, weight[start:end].to(dtype), bias[start:end] if bias is not None else None)
            return torch.tanh(logits / cap) * cap if cap else logits

        try:
            for b, batch in enumerate(batches):
                on_output(b, acts.data[rows[b]:rows[b + 1], :batch.shape[1]], head)
        finally:
            model.model.norm.to("meta")
            weight = bias = None  # frees the head (the closure above holds these cells)
            release_freed_memory()


def run_layer_by_layer(
    ckpt: Checkpoint,
    family: MoEFamily,
    input_ids: torch.Tensor,
    make_block: Callable[[int], Callable],
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_activation_bytes: int = 4 * 1024**3,
    spill_dir: Path | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    prefetch: bool = True,
) -> torch.Tensor:
    """Push `input_ids` [n, seq] through every decoder layer; MoE blocks are computed by `make_block(layer)`.

    Returns the last layer's output hidden states (before the final norm). `on_batch(layer, tokens)` is
    called after each batch, for progress.
    """
    runner = LayerRunner(ckpt, family, make_block, dtype=dtype, device=device,
                         max_activation_bytes=max_activation_bytes, spill_dir=spill_dir, prefetch=prefetch,
                         on_batch=on_batch)
    batches = [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]
    return runner.run(batches)
