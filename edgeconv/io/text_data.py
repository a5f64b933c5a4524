"""Calibration text: plain text files, JSONL with a `text` field, parquet files with a `text` column, a
`datasets` `save_to_disk` directory, or a directory of files of those kinds.

Documents are read in file order (a directory is walked in sorted order; a `datasets` directory in its rows'
order), tokenized, joined with the EOS token and cut into sequences of `seq_len` tokens until `tokens` are
collected. The tokens go through a memory-mapped token stream (`edgeconv.io.token_stream`): written to disk as
they are tokenized, read back as sequences.

The data must be UTF-8 text. A binary file (an archive, a model shard, a UTF-16 file) decoded with
replacement characters still tokenizes, and a model calibrated or distilled on that noise gives no sign of
it, so files are checked as they are read (`TextGuard`), and `check_data` checks the start of every file
before any model is loaded. Tables (parquet, arrow) must hold their documents in a string column `text`,
valid UTF-8 (`edgeconv.io.text_sources`).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edgeconv.errors import EdgeconvError
from edgeconv.io import text_sources

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}

# Undecodable bytes tolerated per window of text: above 1 character in 100 (once there are more than
# MIN_BAD of them) the data is refused. Valid UTF-8 has none; a stray corrupt byte in a scraped corpus is
# far below 1 %; random or compressed bytes decode to ~45 % replacement characters; text in a legacy
# 8-bit encoding (Latin-1, cp1252) lands at 1-10 % and is refused too, rightly: the model would see a
# replacement character for every accented letter. MIN_BAD spares a tiny file with one odd byte.
MAX_BAD_FRACTION = 0.01
MIN_BAD = 4
WINDOW_CHARS = 1 << 16  # judged per window, so binary data after a long text start is caught as it streams
# check_data reads the first PREFIX_BYTES of each file, UPFRONT_BYTES in all (the first file always): cheap
# on a huge file or a directory of thousands. What it does not read is checked as it is read for work, by
# the same rule: a file that turns binary later fails then, before the tokens are used.
PREFIX_BYTES = 1 << 20
UPFRONT_BYTES = 16 << 20
_HINT = ("pass UTF-8 text: .txt files or JSONL with a 'text' field "
         "(convert other encodings, e.g. UTF-16 or Latin-1, with `iconv -t utf-8`)")


class TextGuard:
    """Decodes one file's bytes as UTF-8, piece by piece, and refuses it once it looks binary: any NUL
    byte, or more than MAX_BAD_FRACTION undecodable characters in a window of WINDOW_CHARS."""

    def __init__(self, file: Path):
        self.file = file
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = 0  # bytes fed so far
        self._chars = self._bad = 0  # the current window
        self._windows = 0  # windows judged so far

    def feed(self, raw: bytes) -> str:
        nul = raw.find(b"\0")
        if nul >= 0:
            raise EdgeconvError(
                f"data file {self.file} is not text: it holds NUL bytes (the first at byte {self.offset + nul}), "
                "as binary files and UTF-16 text do",
                _HINT,
            )
        text = self._decoder.decode(raw)
        self._count(text, len(raw))
        return text

    def finish(self, complete: bool = True) -> str:
        """The end of the file (`complete`), or of a prefix of it: judge what is left of the window."""
        tail = self._decoder.decode(b"", final=True) if complete else ""
        self._count(tail, 0)
        if self._chars:
            whole = complete and not self._windows
            self._judge("its characters" if whole else f"the {self._chars:,} characters before byte {self.offset:,}")
        return tail

    def _count(self, text: str, nbytes: int) -> None:
        pos = 0
        while pos < len(text):
            take = min(WINDOW_CHARS - self._chars, len(text) - pos)
            self._bad += text.count("\ufffd", pos, pos + take)
            self._chars += take
            pos += take
            if self._chars >= WINDOW_CHARS:
                near = self.offset + nbytes * pos // len(text)  # the byte where this window ends, about
                self._judge(f"the {self._chars:,} characters before about byte {near:,}")
                self._chars = self._bad = 0
                self._windows += 1
        self.offset += nbytes

    def _judge(self, what: str) -> None:
        """Refuse the current window, described by `what`, if it has too many undecodable characters."""
        if self._bad > max(MIN_BAD, MAX_BAD_FRACTION * self._chars):
            raise EdgeconvError(
                f"data file {self.file} is not UTF-8 text: {self._bad / self._chars:.0%} of {what} are "
                f"undecodable ({self._bad:,} of {self._chars:,}; binary data?)",
                _HINT,
            )


def data_files(path: Path) -> list[Path]:
    """The files `iter_documents` reads, in order: `path` itself, the arrow files of a `datasets` directory,
    or the text, JSONL and parquet files under a directory (and the files of `datasets` directories in it)."""
    path = Path(path)
    if not path.exists():
        raise EdgeconvError(f"calibration data {path} does not exist",
                            "pass a text, JSONL or parquet file, a datasets directory, or a directory of files")
    if not path.is_dir():
        return [path]
    files = _walk(path)
    if not files:
        raise EdgeconvError(f"{path} holds no .txt/.md/.rst/.jsonl/.parquet files",
                            "pass text, JSONL or parquet data, or a directory datasets' save_to_disk wrote")
    return files


def _walk(directory: Path) -> list[Path]:
    """Depth first, in sorted order (the order of `sorted(directory.rglob("*"))`)."""
    if text_sources.is_datasets_dir(directory):
        return text_sources.datasets_files(directory)
    files: list[Path] = []
    for p in sorted(directory.iterdir()):
        if p.is_dir():
            files += _walk(p)
        elif p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES | text_sources.PARQUET_SUFFIXES:
            files.append(p)
    return files


def check_data(path: str | Path) -> None:
    """Fail at once when the data does not exist or is not text (see PREFIX_BYTES for how much is read).

    Cheap: call it before loading any model. `iter_documents` applies the same rule to all it reads. A table
    (parquet, arrow) is checked for a string `text` column (its schema: a small read), the first table's first
    rows for valid UTF-8."""
    budget = UPFRONT_BYTES
    tables = 0
    for n, file in enumerate(data_files(Path(path))):
        if text_sources.is_table(file):
            if tables:
                text_sources.check_schema(file)
            else:
                text_sources.check_table(file)
            tables += 1
            continue
        if n and budget <= 0:
            continue  # later tables are still checked (their schema), text files are not
        guard = TextGuard(file)
        try:
            with open(file, "rb") as fh:
                raw = fh.read(PREFIX_BYTES)
                whole = not fh.read(1)
        except OSError as exc:
            raise EdgeconvError(f"cannot read data file {file}: {exc.strerror}", "check the file and its permissions")
        budget -= len(raw)
        guard.feed(raw)
        guard.finish(complete=whole)


def check_seq_len(config: dict, seq_len: int, flag: str = "--seq-len") -> None:
    """Fail at once when sequences are longer than the model's context (`max_position_embeddings`): the
    positions past it were never trained, and calibrating on them measures the experts on inputs they never
    see in use."""
    limit = config.get("max_position_embeddings")
    if limit and seq_len > int(limit):
        raise EdgeconvError(
            f"{flag} {seq_len} is longer than the model's context ({limit} positions, max_position_embeddings)",
            f"use {flag} {limit} or less",
        )


def iter_documents(path: Path) -> Iterator[tuple[str, str]]:
    """(source, text) for every document under `path`; a file that turns out not to be text is refused."""
    for file in data_files(Path(path)):
        if text_sources.is_table(file):
            yield from text_sources.iter_table_documents(file)
            continue
        guard = TextGuard(file)
        if file.suffix.lower() in JSONL_SUFFIXES:
            with open(file, "rb") as fh:
                for n, raw in enumerate(fh, 1):
                    line = guard.feed(raw)
                    if n == 1:
                        line = line.removeprefix("\ufeff")  # a byte-order mark
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise EdgeconvError(f"{file}:{n} is not a JSON object with a 'text' field", "fix that line")
                    yield f"{file.name}:{n}", str(text)
            guard.finish()
        else:
            with open(file, "rb") as fh:
                parts = [guard.feed(chunk) for chunk in iter(lambda: fh.read(PREFIX_BYTES), b"")]
            parts.append(guard.finish())
            yield file.name, "".join(parts)


def token_sequences(tokenizer, path: Path, tokens: int, seq_len: int,
                    cache_dir: Path | None = None) -> tuple[torch.Tensor, dict]:
    """[n, seq_len] token ids (int64), n = ceil(tokens / seq_len), and a description of what was used.

    Read from the data's token stream (`edgeconv.io.token_stream`), kept in `cache_dir` for a rerun to reuse
    (None: a temporary stream, removed at once). The tensor itself is in memory: calibration budgets are small.
    """
    from edgeconv.io.token_stream import open_stream

    if seq_len < 2:
        raise EdgeconvError(f"--seq-len {seq_len} is too short", "use at least 2 (typically 512-2048)")
    if tokens < 1:
        raise EdgeconvError(f"--tokens {tokens} must be positive", "pass the number of calibration tokens")
    n = -(-tokens // seq_len)
    need = n * seq_len
    stream = open_stream(tokenizer, Path(path), need, cache_dir, what="calibration data")
    if stream.count < need:
        raise EdgeconvError(
            f"calibration data {path} gives only {stream.count} tokens, {need} are needed "
            f"({n} sequences of {seq_len})",
            "add text, or lower --tokens / --seq-len",
        )
    data = torch.from_numpy(stream.ids(need).astype(np.int64)).view(n, seq_len)
    return data, {"path": str(path), "tokens": need, "seq_len": seq_len, "sequences": n,
                  "documents": stream.documents_before(need)}
