"""Calibration text: plain text files, JSONL with a `text` field, or a directory of either.

Documents are tokenized in file order (a directory is walked in sorted order), joined with the EOS token
and cut into sequences of `seq_len` tokens until `tokens` are collected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from edgeconv.errors import EdgeconvError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}


def iter_documents(path: Path) -> Iterator[tuple[str, str]]:
    """(source, text) for every document under `path`."""
    path = Path(path)
    if not path.exists():
        raise EdgeconvError(f"calibration data {path} does not exist", "pass a text file, a JSONL file or a directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES or not path.is_dir()]
    if not files:
        raise EdgeconvError(f"{path} holds no .txt/.md/.rst/.jsonl files", "pass text or JSONL calibration data")
    for file in files:
        if file.suffix.lower() in JSONL_SUFFIXES:
            for n, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EdgeconvError(f"{file}:{n} is not a JSON object with a 'text' field", "fix that line")
                yield f"{file.name}:{n}", str(text)
        else:
            yield file.name, file.read_text(encoding="utf-8", errors="replace")


def token_sequences(tokenizer, path: Path, tokens: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    """[n, seq_len] token ids, n = ceil(tokens / seq_len), and a description of what was used."""
    if seq_len < 2:
        raise EdgeconvError(f"--seq-len {seq_len} is too short", "use at least 2 (typically 512-2048)")
    if tokens < 1:
        raise EdgeconvError(f"--tokens {tokens} must be positive", "pass the number of calibration tokens")
    n = -(-tokens // seq_len)
    need = n * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    sources: list[str] = []
    for source, text in iter_documents(path):
        if not text.strip():
            continue
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        sources.append(source)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise EdgeconvError(
            f"calibration data {path} gives only {len(ids)} tokens, {need} are needed "
            f"({n} sequences of {seq_len})",
            "add text, or lower --tokens / --seq-len",
        )
    data = torch.tensor(ids[:need], dtype=torch.long).view(n, seq_len)
    return data, {"path": str(path), "tokens": need, "seq_len": seq_len, "sequences": n, "documents": len(sources)}
