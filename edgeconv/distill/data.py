"""Training data for distillation: one packed token stream, cut into sequences, visited in a seeded order.

Documents (text, JSONL with a `text` field, or a directory of them: `edgeconv.calibration.data.iter_documents`)
are tokenized in file order, each followed by the EOS token, and the stream is cut into `sequences` rows of
`seq_len` tokens (documents run across row boundaries; no padding, no cross-document attention mask, as in
most pre-training). Each row is used once: the run's token budget must fit in the data.

The order is one seeded permutation of the rows, and step s trains on rows order[s*B:(s+1)*B]. So the batch of
a step depends only on (seed, step): the data position of a checkpoint is its step number, and a resumed run,
or one on another number of processes, sees exactly the same batches. With P processes, rank r takes the r-th
slice of B/P rows of the step's batch, and cuts it into micro-batches for gradient accumulation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from edgeconv.calibration.data import iter_documents
from edgeconv.errors import EdgeconvError

TOKENIZE_CHUNK = 64  # documents per batched tokenizer call


def pack_tokens(tokenizer, path: Path, sequences: int, seq_len: int, batch_size: int = 1,
                budget: str = "") -> tuple[torch.Tensor, dict]:
    """[sequences, seq_len] int32 token ids from the start of the data, and a description with their sha256.

    Too little data is refused with the number of tokens found and the largest budget (a whole number of
    steps of `batch_size` sequences) that fits. `budget` says in the error where the number of sequences came
    from (e.g. "--tokens 65536 = 16 steps x --batch-size 16 x --seq-len 256").
    """
    need = sequences * seq_len
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    parts: list[np.ndarray] = []  # int32 per document: 4 bytes a token, not a Python int each
    count = documents = 0
    chunk: list[str] = []

    def flush() -> None:
        nonlocal count, documents
        # verbose=False: documents longer than the model's context are fine here, they are cut into rows.
        for row in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            parts.append(np.asarray(row + eos, dtype=np.int32))
            count += len(parts[-1])
            documents += 1
        chunk.clear()

    for _, text in iter_documents(Path(path)):
        if text.strip():
            chunk.append(text)
        if len(chunk) >= TOKENIZE_CHUNK:
            flush()
            if count >= need:
                break
    if chunk:
        flush()
    if count < need:
        per_step = batch_size * seq_len
        fits = count // per_step * per_step
        raise EdgeconvError(
            f"--data {path} has {count:,} tokens ({documents} documents), the token budget needs {need:,}"
            + (f" ({budget})" if budget else ""),
            f"add text, or lower --tokens to at most {fits:,}" if fits else
            "add text, or lower --batch-size or --seq-len",
        )
    data = torch.from_numpy(np.concatenate(parts)[:need].copy()).view(sequences, seq_len)
    info = {"path": str(path), "tokens": need, "seq_len": seq_len, "sequences": sequences, "documents": documents,
            "sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest()}
    return data, info


def sequence_order(sequences: int, seed: int) -> torch.Tensor:
    """The seeded permutation of the rows; independent of everything else in the process."""
    return torch.randperm(sequences, generator=torch.Generator().manual_seed(seed))


def step_rows(order: torch.Tensor, step: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The rows this process trains on at `step`: its share of the step's global batch."""
    local = batch_size // world
    start = step * batch_size + rank * local
    return order[start:start + local]


def check_split(batch_size: int, grad_accum: int, world: int) -> int:
    """Sequences per micro-batch; the global batch must split evenly over processes and micro-batches."""
    if batch_size % (world * grad_accum):
        raise EdgeconvError(
            f"--batch-size {batch_size} does not split into {world} process(es) x --grad-accum {grad_accum} "
            "micro-batches",
            f"use a --batch-size that is a multiple of {world * grad_accum}",
        )
    return batch_size // (world * grad_accum)
