"""Offline teacher: a first pass writes the teacher's top-k log-probs of every training token to disk, so the
teacher need not be in memory (or even on the machine) while the student trains.

A cache directory holds, for the run's `sequences x seq_len` tokens (rows in the packed-stream order of
edgeconv.training.packing, not in training order, so one cache serves any seed, learning rate or batch size):

    values.npy    float16 [sequences, seq_len, k]   log p_i of the k most likely tokens at temperature T, sorted
    indices.npy   uint16 (vocab <= 65536) or int32 [sequences, seq_len, k]   their token ids
    tail.npy      float32 [sequences, seq_len]      log(1 - sum of the k probabilities), from the full softmax
    done.npy      uint8 [sequences]                 1 once a row is on disk (an interrupted pass resumes)
    manifest.json what the cache is for, written last: a cache without it is incomplete

so k * (2 + 2) + 4 bytes per token (260 B at k = 64 with a vocabulary of up to 65536 tokens), against 2 * V for
full fp16 logits. How the loss uses the tail is in edgeconv.training.losses.

The teacher runs whole (`fill`) when it fits in memory, else one decoder layer at a time (`fill_layer_by_layer`,
edgeconv.forward: the rows in chunks, each chunk one pass over the teacher; the same top-k ids and, before fp16
rounding, log-probs within 1e-5 in float32).

The cache is keyed by the teacher's fingerprint, the sha256 of the token ids, the number of rows, seq_len, k,
T and the vocabulary size; a cache made for anything else is refused (rebuilding it needs --force). Under
several processes each fills the rows r, r + P, r + 2P, ... of the same files. Rows are read and written with
positional I/O, not memory maps, so the cache never counts in the resident set of the training process.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edgeconv.errors import EdgeconvError
from edgeconv.io.output_dir import stage_key
from edgeconv.training.losses import TopK, teacher_topk

FORMAT = "edgeconv-teacher-topk"
VERSION = 1
BUILDING = "building.json"  # the spec of a cache being written
MANIFEST = "manifest.json"
FP16_MIN = float(np.finfo(np.float16).min)


@dataclass(frozen=True)
class CacheSpec:
    teacher_fingerprint: str
    tokens_sha256: str
    sequences: int
    seq_len: int
    top_k: int
    temperature: float
    vocab_size: int

    @property
    def key(self) -> str:
        return stage_key("teacher-cache", {"format": FORMAT, "version": VERSION}, asdict(self))

    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 65536 else np.int32)

    @property
    def bytes_per_token(self) -> int:
        return self.top_k * (2 + self.index_dtype.itemsize) + 4

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        m, n, k = self.sequences, self.seq_len, self.top_k
        return {"values": ((m, n, k), np.dtype(np.float16)), "indices": ((m, n, k), self.index_dtype),
                "tail": ((m, n), np.dtype(np.float32)), "done": ((m,), np.dtype(np.uint8))}


class _RowFile:
    """One .npy array read and written a row (its first axis) at a time with positional I/O.

    Not memory-mapped, for the reason edgeconv.io.safetensors_reader gives: every mapped page touched stays in
    the resident set, so a long run would look like it held the whole cache in memory."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, writable: bool):
        self.fh = open(path, "r+b" if writable else "rb")
        version = np.lib.format.read_magic(self.fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        found_shape, fortran, found_dtype = read_header(self.fh)
        if tuple(found_shape) != tuple(shape) or found_dtype != dtype or fortran:
            raise EdgeconvError(f"teacher cache file {path} holds {found_dtype} {tuple(found_shape)}, "
                                f"expected {dtype} {tuple(shape)}", "pass --force to rebuild the cache")
        self.offset, self.shape, self.dtype = self.fh.tell(), tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def read(self, rows: np.ndarray) -> np.ndarray:
        fd = self.fh.fileno()
        data = b"".join(os.pread(fd, self.row_bytes, self.offset + int(r) * self.row_bytes) for r in rows)
        return np.frombuffer(data, dtype=self.dtype).reshape(len(rows), *self.shape[1:])

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        fd = self.fh.fileno()
        values = np.ascontiguousarray(values, dtype=self.dtype)
        for r, row in zip(rows, values):
            os.pwrite(fd, row.tobytes(), self.offset + int(r) * self.row_bytes)

    def sync(self) -> None:
        os.fsync(self.fh.fileno())


class TeacherCache:
    """The arrays of a cache directory, read (and, in the caching pass, written) row by row."""

    def __init__(self, path: Path, spec: CacheSpec, writable: bool = False):
        self.path, self.spec = Path(path), spec
        self.files = {name: _RowFile(self.path / f"{name}.npy", shape, dtype, writable)
                      for name, (shape, dtype) in spec.shapes().items()}

    def targets(self, rows: torch.Tensor) -> TopK:
        """The cached teacher targets of these rows, as tensors (log-probs in fp32, ids as int64)."""
        r = rows.numpy()
        f = self.files
        return TopK(torch.from_numpy(f["values"].read(r).astype(np.float32)),
                    torch.from_numpy(f["indices"].read(r).astype(np.int64)),
                    torch.from_numpy(f["tail"].read(r).copy()))

    def missing_rows(self) -> np.ndarray:
        return np.flatnonzero(self.files["done"].read(np.arange(self.spec.sequences)) == 0)

    def write(self, rows: np.ndarray, target: TopK) -> None:
        f = self.files
        f["values"].write(rows, target.logp.clamp(min=FP16_MIN).to(torch.float16).numpy())
        f["indices"].write(rows, target.ids.numpy())
        f["tail"].write(rows, target.tail_logp.float().numpy())
        for name in ("values", "indices", "tail"):
            f[name].sync()
        f["done"].write(rows, np.ones(len(rows), dtype=np.uint8))  # only once the data is on disk
        f["done"].sync()

    def close(self) -> None:
        for f in self.files.values():
            f.fh.close()

    def nbytes(self) -> int:
        return sum((self.path / f"{name}.npy").stat().st_size for name in self.spec.shapes())


def cache_status(path: Path, spec: CacheSpec) -> tuple[str, str]:
    """(state, why): state is 'complete', 'partial' (this spec, being written), 'absent', 'other' (a cache made
    for something else: rebuilt only when forced) or 'foreign' (not a cache at all: never overwritten)."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "absent", ""
    for name, state in ((MANIFEST, "complete"), (BUILDING, "partial")):
        try:
            found = json.loads((path / name).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if found.get("key") == spec.key:
            return state, ""
        return "other", _difference(path, found.get("spec", {}), asdict(spec))
    return "foreign", f"{path} exists and is not a teacher cache"


def _difference(path: Path, found: dict, wanted: dict) -> str:
    diffs = [f"{k} {found.get(k)!r:.20} (this run: {v!r:.20})" for k, v in wanted.items() if found.get(k) != v]
    return f"teacher cache {path} was made for another run: {', '.join(diffs) or 'another format'}"


def open_for_writing(path: Path, spec: CacheSpec, status: str) -> None:
    """Create the arrays (or keep a partial cache of this spec), to be filled by `fill`. Main process only."""
    path = Path(path)
    if status == "partial":
        return
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True)
    for name, (shape, dtype) in spec.shapes().items():
        arr = np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        del arr  # header written, data zero-filled (a sparse file: no page is touched)
    (path / BUILDING).write_text(json.dumps({"key": spec.key, "spec": asdict(spec)}, indent=1) + "\n")


@torch.no_grad()
def fill(cache: TeacherCache, teacher: torch.nn.Module, ids: torch.Tensor, rows: np.ndarray, micro_batch: int,
         device: torch.device, autocast: Callable, on_rows: Callable[[int], None] = lambda n: None) -> None:
    """Run the teacher over `rows` of `ids` and write their top-k targets, `micro_batch` rows at a time."""
    spec = cache.spec
    for start in range(0, len(rows), micro_batch):
        chunk = rows[start:start + micro_batch]
        x = ids[torch.from_numpy(chunk)].long().to(device)
        with autocast():
            logits = teacher(input_ids=x, use_cache=False).logits
        target = teacher_topk(logits, spec.top_k, spec.temperature)
        cache.write(chunk, TopK(*(t.cpu() for t in (target.logp, target.ids, target.tail_logp))))
        on_rows(len(chunk))


@torch.no_grad()
def fill_layer_by_layer(cache: TeacherCache, teacher, ids: torch.Tensor, rows: np.ndarray, flush_rows: int = 64,
                        on_rows: Callable[[int], None] = lambda n: None) -> None:
    """`fill` for a teacher that does not fit: `teacher` is an edgeconv.forward LayerByLayerModel. The rows go in
    chunks (each chunk one pass over the teacher, a layer at a time); the logits of a few rows at a time are
    reduced to their top-k at once, and the targets are written `flush_rows` rows at a time (and at the end of
    every chunk), so an interrupted pass resumes from the last rows written."""
    spec = cache.spec
    buffered: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # row, logp, ids, tail

    def flush() -> None:
        if not buffered:
            return
        at = np.array([b[0] for b in buffered])
        cache.write(at, TopK(*(torch.stack([b[j] for b in buffered]) for j in (1, 2, 3))))
        on_rows(len(buffered))
        buffered.clear()

    def reduce(indices: list[int], logits: torch.Tensor) -> None:
        target = teacher_topk(logits, spec.top_k, spec.temperature)
        logp, top, tail = (t.cpu() for t in (target.logp, target.ids, target.tail_logp))
        buffered.extend((int(rows[i]), logp[j], top[j], tail[j]) for j, i in enumerate(indices))
        if len(buffered) >= flush_rows:
            flush()

    teacher.logits(ids[torch.from_numpy(rows)].long(), reduce, progress=lambda n: flush())
    flush()


def finish(path: Path, spec: CacheSpec, seconds: float | None = None) -> dict:
    """Check every row is written, then write the manifest (last: it marks the cache complete). `seconds`: how
    long this process's caching pass took (None when it only completed an interrupted one)."""
    cache = TeacherCache(path, spec)
    missing = cache.missing_rows()
    cache.close()
    if len(missing):
        raise EdgeconvError(f"teacher cache {path} misses {len(missing)} rows after the caching pass",
                            "run the same command again to fill them")
    manifest = {"format": FORMAT, "version": VERSION, "key": spec.key, "spec": asdict(spec),
                "bytes": cache.nbytes(), "bytes_per_token": spec.bytes_per_token,
                "seconds": None if seconds is None else round(seconds, 2),
                "tokens_per_second": round(spec.sequences * spec.seq_len / seconds, 1) if seconds else None,
                "layout": {name: {"shape": list(shape), "dtype": dtype.name}
                           for name, (shape, dtype) in spec.shapes().items()}}
    tmp = Path(path) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, Path(path) / MANIFEST)
    (Path(path) / BUILDING).unlink(missing_ok=True)
    return manifest
