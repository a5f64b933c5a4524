"""Run a causal LM one decoder layer at a time, with only that layer's weights in memory.

The model is built on the meta device (no memory). One pass with every decoder layer replaced by a
recorder captures, per batch, the exact arguments transformers hands each layer (causal or sliding-window
masks, rotary position embeddings, cache positions), and the embeddings. Then, for each layer in turn:
load its weights from the files, push the hidden states of all batches through it, and free it. Peak
memory is one layer plus the activations; the activations live in a file-backed tensor when they would
not fit in the allowed memory.

That file (`edgeconv-acts-PID-XXXX/activations.bin` beside the output) is allocated in full before it is
mapped, so a disk too small fails at once in one line instead of a SIGBUS halfway; it is removed on every way
out (return, exception, Ctrl-C, SIGTERM), and one left by a killed run (its PID is dead) is removed by the next.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgeconv.errors import EdgeconvError
from edgeconv.families.base import MoEFamily
from edgeconv.io.checkpoint import Checkpoint


class _Stop(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer `index`: records its keyword arguments and passes hidden states on."""

    def __init__(self, index: int, last: int, store: dict, original: torch.nn.Module, as_tuple: bool):
        super().__init__()
        self.index, self.last, self.store, self.as_tuple = index, last, store, as_tuple
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
        return (hidden_states,) if self.as_tuple else hidden_states


SPILL_PREFIX = "edgeconv-acts-"
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
    """Hidden states of all calibration sequences [n, seq, hidden]: in memory, or in a file-backed tensor.

    The file is allocated in full up front (a disk without room refuses now, in one line) and removed by
    `close()`; use the store as a context manager.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, max_bytes: int, spill_dir: Path | None = None):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.spilled = nbytes > max_bytes
        self.dir: Path | None = None
        if not self.spilled:
            self.data = torch.empty(shape, dtype=dtype)
            return
        parent = Path(spill_dir if spill_dir is not None else tempfile.gettempdir()).absolute()
        parent.mkdir(parents=True, exist_ok=True)  # --out's parent may not exist yet
        remove_stale_spills(parent)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=parent))
        path = self.dir / SPILL_FILE
        try:
            _allocate(path, nbytes, parent, max_bytes)
            self.data = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the spill file (the mapping, if still referenced, stays valid until it is dropped)."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _allocate(path: Path, nbytes: int, parent: Path, max_bytes: int) -> None:
    """Create `path` with all its `nbytes` of disk reserved (a mapped file's missing block is a SIGBUS)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate here: compare with the free space
                free = shutil.disk_usage(parent).free
                if free < nbytes:
                    raise _no_room(parent, nbytes, free, max_bytes) from exc
                os.ftruncate(fd, nbytes)
            elif exc.errno in DISK_FULL_ERRNOS:
                os.ftruncate(fd, 0)  # give the partial allocation back before measuring
                raise _no_room(parent, nbytes, shutil.disk_usage(parent).free, max_bytes) from exc
            else:
                raise
    finally:
        os.close(fd)


def _no_room(parent: Path, nbytes: int, free: int, max_bytes: int) -> EdgeconvError:
    return EdgeconvError(
        f"not enough disk space in {parent} for the calibration activations, which exceed "
        f"--max-activation-memory ({_human(max_bytes)}) and go to disk: they need {nbytes:,} bytes "
        f"({_human(nbytes)}), {free:,} bytes ({_human(free)}) are free",
        f"raise --max-activation-memory above {_human(nbytes)} to keep them in memory, lower --tokens, "
        "or free space there (it is the --out directory's parent)",
    )


def build_skeleton(ckpt: Checkpoint, dtype: torch.dtype):
    """The model on the meta device, with real embeddings and rotary embedding."""
    config = AutoConfig.from_pretrained(ckpt.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    base = model.model
    base.embed_tokens.load_state_dict({"weight": ckpt.read("model.embed_tokens.weight").to(dtype)}, assign=True)
    base.rotary_emb = type(base.rotary_emb)(config=model.config)  # buffers computed on the CPU, not meta
    return model


def _layer_weights(ckpt: Checkpoint, family: MoEFamily, layer: int, moe: bool, dtype: torch.dtype) -> dict:
    prefix = f"{family.prefix(layer)}."
    return {
        name[len(prefix):]: ckpt.read(name).to(dtype)
        for name in ckpt.names()
        if name.startswith(prefix) and not (moe and family.owns(name, layer))
    }


def _moe_module(layer_module: torch.nn.Module, family: MoEFamily) -> torch.nn.Module:
    for block in family.blocks:
        if hasattr(layer_module, block):
            return getattr(layer_module, block)
    raise RuntimeError(f"no MoE block among {family.blocks}")


def run_layer_by_layer(
    ckpt: Checkpoint,
    family: MoEFamily,
    input_ids: torch.Tensor,
    make_block: Callable[[int], Callable],
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    max_activation_bytes: int = 4 * 1024**3,
    spill_dir: Path | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Push `input_ids` [n, seq] through every decoder layer; MoE blocks are computed by `make_block(layer)`.

    Returns the last layer's output hidden states (before the final norm). `on_batch(layer, tokens)` is
    called after each batch, for progress.
    """
    model = build_skeleton(ckpt, dtype)
    batches = [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]
    with terminate_unwinds(), ActivationStore((*input_ids.shape, family.hidden_size), dtype, max_activation_bytes,
                                              spill_dir) as acts:
        return _run(model, family, ckpt, batches, acts, make_block, dtype, on_batch)


def _run(model, family: MoEFamily, ckpt: Checkpoint, batches: list[torch.Tensor], acts: ActivationStore,
         make_block: Callable[[int], Callable], dtype: torch.dtype,
         on_batch: Callable[[int, int], None] | None) -> torch.Tensor:
    layers = model.model.layers
    originals = list(layers)
    last = len(originals) - 1
    layer_kwargs: list[dict] = []
    with torch.no_grad():
        store: dict = {}
        for i in range(len(originals)):
            layers[i] = _Recorder(i, last, store, originals[i], family.layer_returns_tuple)
        row = 0
        for batch in batches:
            store.clear()
            try:
                model.model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            acts.data[row : row + len(batch)] = store["embeddings"]
            layer_kwargs.append({i: store[i] for i in range(len(originals))})
            row += len(batch)
        for i, module in enumerate(originals):
            layers[i] = module
        moe_layers = set(family.moe_layers())
        for i, module in enumerate(originals):
            moe = i in moe_layers
            module.load_state_dict(_layer_weights(ckpt, family, i, moe, dtype), strict=False, assign=True)
            if moe:
                _moe_module(module, family).forward = make_block(i)
            row = 0
            for b, batch in enumerate(batches):
                out = module(acts.data[row : row + len(batch)], **layer_kwargs[b][i])
                acts.data[row : row + len(batch)] = out[0] if isinstance(out, tuple) else out
                row += len(batch)
                if on_batch:
                    on_batch(i, batch.numel())
            module.to("meta")  # frees this layer's weights
            if moe:
                del _moe_module(module, family).forward
    return acts.data
