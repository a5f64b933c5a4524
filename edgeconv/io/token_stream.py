"""The packed token stream: the data's documents tokenized in order, each followed by EOS, in a file on disk.

Calibration, distillation and the importance matrix all read their token ids from here. The ids are written
as they are tokenized (one batch of documents at a time: never all of them in memory) and read back through
a memory map, so a run over billions of tokens costs disk, not RAM (4 bytes a token).

    CACHE/<key>/tokens.u32   the token ids, uint32 little-endian, back to back (documents joined by EOS)
    CACHE/<key>/docs.u64     where each document ends in tokens.u32 (uint64, cumulative token counts)
    CACHE/<key>/stream.json  the sidecar: format, key, tokens, documents, complete, eos_token_id, sha256 of
                             tokens.u32 (computed while writing), the tokenizer's and the source's fingerprints
                             (files: paths, sizes, mtimes), the byte sizes of both files, how it was built

<key> is a hash of the format, the tokenizer's fingerprint and the source's: a rerun on the same data with
the same tokenizer maps the existing stream instead of tokenizing again. A stream is built in a temporary
directory beside it and renamed into place (atomic); an exclusive lock on CACHE/.<key>.lock makes concurrent
processes (the ranks of a distributed run) build it once. It holds at least the tokens asked for: tokenizing
stops at the first multiple of GRANULE documents past them (or at the end of the data: `complete`); a later
request for more tokens than an incomplete stream holds builds it again.

Without a cache directory the stream is built in a temporary directory ($TMPDIR) that is removed at once (the
open memory maps keep the files readable until they are closed): nothing is reused or left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from edgeconv.errors import EdgeconvError

FORMAT = "edgeconv-token-stream/1"
TOKENS_FILE = "tokens.u32"
DOCS_FILE = "docs.u64"
META_FILE = "stream.json"
BATCH_DOCS = 64  # documents per batched tokenizer call: what the writer holds in memory at a time
# Tokenizing stops only at a multiple of GRANULE documents. Distillation's `documents` count (how many documents
# were tokenized to fill its budget, 64 at a time) is derived from that, as it was before the stream.
GRANULE = 64
HASH_TOKENS = 1 << 22  # tokens hashed per read when the sha256 of a prefix is asked for
PROBE = "Hello, world! Ünïcödé ½ 日本語 \t  spaces\n\nnew lines 12345 <eos> </s> <|endoftext|>"
_TEMP = ".tmp-"


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides the ids a tokenizer gives: its class, its definition (a fast tokenizer's JSON, else its
    vocabulary and special tokens), the ids of a probe text, and its EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps([sorted(tokenizer.get_vocab().items()), sorted(map(str, tokenizer.all_special_tokens))],
                          ensure_ascii=False)
    probe = tokenizer([PROBE], add_special_tokens=False, verbose=False)["input_ids"][0]
    digest = hashlib.sha256(body.encode()).hexdigest()
    return {"class": type(tokenizer).__name__, "sha256": digest, "probe": hashlib.sha256(
        json.dumps(probe).encode()).hexdigest(), "eos_token_id": tokenizer.eos_token_id}


def source_fingerprint(path: Path, files: list[Path]) -> dict:
    """The data as the files it is read from: their paths, sizes and modification times, in reading order."""
    entries = []
    total = 0
    for f in files:
        st = f.stat()
        entries.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        total += st.st_size
    return {"path": str(Path(path).resolve()), "files": len(entries), "bytes": total,
            "sha256": hashlib.sha256(json.dumps(entries).encode()).hexdigest()}


class TokenStream:
    """A built stream, memory-mapped: `ids(n)` are the first n token ids as an int32 array backed by the file."""

    def __init__(self, directory: Path, meta: dict):
        self.directory = Path(directory)
        self.meta = meta
        self.count = int(meta["tokens"])
        self.documents = int(meta["documents"])
        self.complete = bool(meta["complete"])
        # Copy-on-write maps: writable arrays (torch.from_numpy takes them without a warning) whose writes never
        # reach the files. Ids are below 2**31, so int32 reads the uint32 file unchanged.
        self._ids = _map(self.directory / TOKENS_FILE, "<i4", self.count)
        self._ends = _map(self.directory / DOCS_FILE, "<u8", self.documents)
        # Hashing reads the file, not the map: the pages it reads stay in the page cache, not in this process.
        self._file = open(self.directory / TOKENS_FILE, "rb", buffering=0)

    def ids(self, n: int) -> np.ndarray:
        """The first `n` token ids (int32, memory-mapped: reading them pages in only what is read)."""
        if n > self.count:
            raise ValueError(f"the stream holds {self.count} tokens, not {n}")
        return self._ids[:n]

    def documents_before(self, n: int) -> int:
        """How many documents start before token n (the documents the first n tokens draw from)."""
        return min(int(np.searchsorted(self._ends, n, side="left")) + 1, self.documents) if n else 0

    def sha256(self, n: int | None = None) -> str:
        """sha256 of the first `n` ids as int32 (= uint32) little-endian bytes, read in pieces."""
        n = self.count if n is None else n
        if n == self.count:
            return self.meta["sha256"]
        h = hashlib.sha256()
        buf = memoryview(bytearray(4 * min(n, HASH_TOKENS)))
        for start in range(0, n, HASH_TOKENS):
            want = 4 * (min(n, start + HASH_TOKENS) - start)
            got = os.preadv(self._file.fileno(), [buf[:want]], 4 * start)
            if got != want:
                raise EdgeconvError(f"the token stream {self.directory} is shorter than its sidecar says",
                                    "delete it: the next run builds it again")
            h.update(buf[:want])
        return h.hexdigest()

    def close(self) -> None:
        self._file.close()

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()


def _map(file: Path, dtype: str, n: int) -> np.ndarray:
    if n == 0:  # mmap refuses an empty file
        return np.zeros(0, dtype)
    return np.memmap(file, dtype=dtype, mode="c", shape=(n,))


def open_stream(tokenizer, path: Path, min_tokens: int, cache_dir: Path | None = None, *,
                batch_docs: int | None = None, what: str = "data") -> TokenStream:
    """The token stream of `path` holding at least `min_tokens` ids (fewer only when the data has no more:
    `complete`), reused from `cache_dir` when it is there, built (and left there) when not."""
    from edgeconv.io.text_data import data_files, iter_documents

    path = Path(path)
    batch_docs = batch_docs or BATCH_DOCS
    files = data_files(path)
    meta = {"format": FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "source": source_fingerprint(path, files)}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    meta = {"format": FORMAT, "key": key, **meta}
    build = lambda dest: _build(tokenizer, iter_documents(path), min_tokens, dest, meta, batch_docs)  # noqa: E731
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="edgeconv-tokens-") as tmp:
            return _write_errors(lambda: build(Path(tmp) / key), Path(tmp), what)
    cache_dir = Path(cache_dir).absolute()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeconvError(f"cannot create the token cache {cache_dir} ({exc.strerror or exc})",
                            "choose a writable output directory")
    with _locked(cache_dir / f".{key}.lock"):
        final = cache_dir / key
        found = _reusable(final, key, min_tokens)
        if found is not None:
            return found
        for stale in cache_dir.glob(f".{key}{_TEMP}*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f".{key}{_TEMP}{os.getpid()}"
        try:
            stream = _write_errors(lambda: build(tmp), cache_dir, what)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # a stream too short for this request: replace it (open maps of it stay valid)
            old = cache_dir / f".{key}{_TEMP}old-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        stream.directory = final
        return stream


def _write_errors(fn: Callable[[], TokenStream], where: Path, what: str) -> TokenStream:
    try:
        return fn()
    except OSError as exc:
        if exc.filename and not Path(exc.filename).absolute().is_relative_to(where.absolute()):
            raise EdgeconvError(f"cannot read data file {exc.filename}: {exc.strerror}",
                                "check the file and its permissions")
        raise EdgeconvError(f"cannot write the token stream of the {what} in {where} ({exc.strerror or exc})",
                            "free disk space there (4 bytes a token) or write the output elsewhere")


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiter)


def _reusable(directory: Path, key: str, min_tokens: int) -> TokenStream | None:
    """The stream in `directory` if it is complete on disk, this key's, and long enough."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        sizes = {name: (directory / name).stat().st_size for name in (TOKENS_FILE, DOCS_FILE)}
    except (OSError, ValueError):
        return None
    if sizes != meta.get("files") or not (meta["complete"] or meta["tokens"] >= min_tokens):
        return None
    return TokenStream(directory, meta)


def _build(tokenizer, documents: Iterable[tuple[str, str]], min_tokens: int, dest: Path, meta: dict,
           batch_docs: int) -> TokenStream:
    """Tokenize `documents` into `dest`, `batch_docs` at a time, until `min_tokens` (at a GRANULE boundary)."""
    started = time.perf_counter()
    dest.mkdir(parents=True)
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    digest = hashlib.sha256()
    count = docs = peak = 0
    complete = True
    chunk: list[str] = []
    with open(dest / TOKENS_FILE, "wb") as tokens_fh, open(dest / DOCS_FILE, "wb") as docs_fh:

        def flush() -> None:
            nonlocal count, docs, peak
            # verbose=False: documents longer than the model's context are meant here (they are cut into
            # sequences); transformers would warn about each one.
            rows = tokenizer(chunk, add_special_tokens=False, verbose=False, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
            lengths = np.fromiter((len(r) + len(eos) for r in rows), np.int64, len(rows))
            n = int(lengths.sum())
            flat = np.fromiter(itertools.chain.from_iterable(r + eos for r in rows), np.int64, n)
            if n and (flat.min() < 0 or flat.max() >= 2**31):
                bad = int(flat.max() if flat.max() >= 2**31 else flat.min())
                raise EdgeconvError(f"the tokenizer gave the id {bad}, outside 0 .. 2**31-1",
                                    "use the model's own tokenizer")
            ids = flat.astype("<u4")
            tokens_fh.write(ids.tobytes())
            digest.update(ids)
            docs_fh.write((count + np.cumsum(lengths)).astype("<u8").tobytes())
            peak = max(peak, n)
            count += n
            docs += len(rows)
            chunk.clear()

        for _, text in documents:
            if not text or text.isspace():
                continue
            chunk.append(text)
            if len(chunk) >= batch_docs or (docs + len(chunk)) % GRANULE == 0:
                flush()
                if count >= min_tokens and docs % GRANULE == 0:
                    complete = False
                    break
        if chunk:
            flush()
        for fh in (tokens_fh, docs_fh):
            fh.flush()
            os.fsync(fh.fileno())
    meta = {**meta, "dtype": "uint32", "byteorder": "little", "tokens": count, "documents": docs,
            "complete": complete, "eos_token_id": eos[0] if eos else None, "sha256": digest.hexdigest(),
            "files": {TOKENS_FILE: count * 4, DOCS_FILE: docs * 8},
            "build": {"batch_docs": batch_docs, "peak_buffer_tokens": peak,
                      "seconds": round(time.perf_counter() - started, 3)}}
    tmp = dest / (META_FILE + _TEMP)
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.rename(dest / META_FILE)
    return TokenStream(dest, meta)
