"""Training data for distillation: one packed token stream, cut into sequences, visited in a seeded order.

Documents (text, JSONL with a `text` field, parquet with a `text` column, a `datasets` directory, or a directory
of such files: `edgeconv.io.text_data.iter_documents`) are tokenized in file order, each followed by the EOS
token, into a memory-mapped token stream on disk (`edgeconv.io.token_stream`), and the stream is cut into
`sequences` rows of `seq_len` tokens (documents run across row boundaries; no padding, no cross-document attention
mask, as in most pre-training). Each row is used once: the run's token budget must fit in the data.

The order is one seeded permutation of the rows, and step s trains on rows order[s*B:(s+1)*B]. So the batch of
a step depends only on (seed, step): the data position of a checkpoint is its step number, and a resumed run,
or one on another number of processes, sees exactly the same batches. With P processes, rank r takes the r-th
slice of B/P rows of the step's batch, and cuts it into micro-batches for gradient accumulation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgeconv.errors import EdgeconvError
from edgeconv.io.token_stream import GRANULE, open_stream


def pack_tokens(tokenizer, path: Path, sequences: int, seq_len: int, batch_size: int = 1,
                budget: str = "", cache_dir: Path | None = None) -> tuple[torch.Tensor, dict]:
    """[sequences, seq_len] int32 token ids from the start of the data, and a description with their sha256.

    The tensor is a memory map of the data's token stream (`edgeconv.io.token_stream`, kept in `cache_dir` for
    a rerun to reuse; None: a temporary one): indexing rows (`ids[rows]`) reads those rows from disk, so the
    token budget is not held in memory. Writes to it stay in this process (a copy-on-write map).

    Too little data is refused with the number of tokens found and the largest budget (a whole number of
    steps of `batch_size` sequences) that fits. `budget` says in the error where the number of sequences came
    from (e.g. "--tokens 65536 = 16 steps x --batch-size 16 x --seq-len 256").
    """
    need = sequences * seq_len
    stream = open_stream(tokenizer, Path(path), need, cache_dir, what="distillation data")
    if stream.count < need:
        count, per_step = stream.count, batch_size * seq_len
        fits = count // per_step * per_step
        raise EdgeconvError(
            f"--data {path} has {count:,} tokens ({stream.documents} documents), the token budget needs {need:,}"
            + (f" ({budget})" if budget else ""),
            f"add text, or lower --tokens to at most {fits:,}" if fits else
            "add text, or lower --batch-size or --seq-len",
        )
    data = torch.from_numpy(stream.ids(need).reshape(sequences, seq_len))
    # The documents tokenized to fill the budget, GRANULE (64) at a time, as before the stream.
    documents = min(stream.documents, -(-stream.documents_before(need) // GRANULE) * GRANULE)
    info = {"path": str(path), "tokens": need, "seq_len": seq_len, "sequences": sequences, "documents": documents,
            "sha256": stream.sha256(need)}
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
