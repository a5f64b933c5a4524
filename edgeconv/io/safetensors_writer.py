"""Streaming, size-capped safetensors shards.

All output shapes are known before the first byte is written (they follow from the plan), so each shard's
header is written up front and tensors are then streamed into it one by one: memory holds one tensor, not
one shard. The safetensors package can only save a complete dict of tensors, hence this small writer.
Every file's sha256 is computed while it is written.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from edgeconv.io.safetensors_reader import DTYPE_NAMES

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _write_bytes(fh: BinaryIO, data) -> None:
    """The only place bytes reach the disk (tests replace it to simulate a full disk)."""
    fh.write(data)


def split_into_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving: a new shard starts when the next tensor would overflow the cap."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardedWriter:
    """Write tensors, in the order of `specs`, into shards of at most `max_shard_bytes` plus an index."""

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards = split_into_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.file_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._pos = 0
        self._open_index = -1
        self._fh: BinaryIO | None = None
        self._hash = None
        self.sha256: dict[str, str] = {}
        self.total_bytes = sum(s.nbytes for s in specs)

    def _open(self, i: int) -> None:
        self._close_current()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[i]:
            header[spec.name] = {
                "dtype": DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
        self._fh = open(self.out_dir / self.file_names[i], "wb")
        self._hash = hashlib.sha256()
        self._open_index = i
        self._emit(len(raw).to_bytes(8, "little"))
        self._emit(raw)

    def _emit(self, data) -> None:
        _write_bytes(self._fh, data)
        self._hash.update(data)

    def _close_current(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.sha256[self.file_names[self._open_index]] = self._hash.hexdigest()
            self._fh = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, spec = self._queue[self._pos]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"writer expected {spec.name} {spec.shape} {spec.dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard_index != self._open_index:
            self._open(shard_index)
        if spec.nbytes:
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._emit(memoryview(data))
        self._pos += 1

    def close(self) -> dict[str, str]:
        """Finish the last shard, write the index, return {file name: sha256} of every file written."""
        if self._pos != len(self._queue):
            missing = self._queue[self._pos][1].name
            raise RuntimeError(f"writer closed before {missing} was written")
        self._close_current()
        weight_map = {spec.name: self.file_names[i] for i, spec in self._queue}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        data = (json.dumps(index, indent=2) + "\n").encode()
        with open(self.out_dir / INDEX_NAME, "wb") as fh:
            _write_bytes(fh, data)
        self.sha256[INDEX_NAME] = hashlib.sha256(data).hexdigest()
        return dict(self.sha256)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
