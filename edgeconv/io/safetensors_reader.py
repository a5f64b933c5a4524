"""Lazy safetensors reading: parse the header, then read one tensor (or one row of it) at a time.

We parse the format ourselves instead of using ``safetensors.safe_open`` because safe_open maps the whole
file: every page we touch stays in our resident set until the file is closed, so streaming a 60 GB
checkpoint would look like it used 60 GB. Plain positional reads keep the resident set at the size of the
tensor being read, let us read a single expert out of a fused [E, ...] tensor, and let us name the shard
that is truncated or corrupt before any work starts.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from edgeconv.errors import EdgeconvError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Every floating-point tensor read is checked for NaN/Inf (a damaged checkpoint otherwise calibrates into NaN
# statistics, or assembles into a model that outputs NaN): a full scan upfront would read the whole model
# once more, checking each tensor as it is read for work costs one pass over memory already loaded.
# Checked in pieces of this many elements, so the temporary is small next to the tensor.
FINITE_CHUNK = 1 << 24


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(path: Path, what: str) -> EdgeconvError:
    return EdgeconvError(
        f"shard {path.name} is corrupt or truncated ({what})",
        f"re-download or re-save {path}",
    )


class ShardFile:
    """One .safetensors file: its header, parsed and checked against the file size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                raw_len = fh.read(8)
                if len(raw_len) < 8:
                    raise _corrupt(self.path, f"{size} bytes, too short for a header")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > min(MAX_HEADER_BYTES, size - 8):
                    raise _corrupt(self.path, f"header length {header_len} does not fit in {size} bytes")
                self.header_bytes = fh.read(header_len)
        except OSError as exc:
            raise EdgeconvError(f"cannot read shard {self.path}: {exc.strerror}", "check the file and its permissions")
        try:
            header = json.loads(self.header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(self.path, "header is not valid JSON")
        if not isinstance(header, dict):
            raise _corrupt(self.path, "header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + header_len
        self.size = size
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise _corrupt(self.path, f"bad header entry for {name!r}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if end - begin != math.prod(shape) * itemsize or begin < 0:
                raise _corrupt(self.path, f"{name!r} has offsets that do not match its shape")
            if base + end > size:
                raise _corrupt(
                    self.path,
                    f"header says {base + end} bytes, file has {size}: the file was cut short",
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, base + begin, base + end)

    def read(self, name: str, index: int | None = None, fh: BinaryIO | None = None,
             check_finite: bool = True) -> torch.Tensor:
        """Read a tensor, or with `index` only its row `index` along dim 0 (one expert of a fused tensor).

        `fh` is an already open handle on this file (the checkpoint keeps one open); without it the file
        is opened for this read. A floating-point tensor holding NaN or Inf is refused (`check_finite`).
        """
        info = self.tensors[name]
        start, shape = info.start, info.shape
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise IndexError(f"{name}: row {index} out of range for shape {shape}")
            row_bytes = info.nbytes // shape[0]
            start += index * row_bytes
            shape = shape[1:]
        nbytes = math.prod(shape) * torch.empty((), dtype=info.dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8)  # not zero-filled: readinto overwrites every byte
        if fh is None:
            with open(self.path, "rb") as own:
                got = _read_at(own, start, buf)
        else:
            got = _read_at(fh, start, buf)
        if got != nbytes:
            raise _corrupt(self.path, f"short read of {name!r}")
        tensor = buf.view(info.dtype).reshape(shape)
        if check_finite and not all_finite(tensor):
            row = f" (row {index})" if index is not None else ""
            raise EdgeconvError(
                f"tensor {name}{row} in {self.path.name} holds NaN/Inf values",
                f"the checkpoint is damaged: re-download or re-save {self.path}",
            )
        return tensor


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf (always for integer and bool tensors).

    Fast path: the sum. NaN and Inf propagate through any order of additions, so a finite sum proves every
    element finite, at the speed of a reduction (no temporary). A non-finite sum is either a NaN/Inf or an
    overflow of finite values (a float16 sum past 65504), told apart by the exact element-wise check.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    flat = tensor.reshape(-1)
    if flat.element_size() == 1:  # float8: no sum or isfinite kernels, upcast a piece at a time
        return all(bool(torch.isfinite(flat[i:i + FINITE_CHUNK].float()).all())
                   for i in range(0, flat.numel(), FINITE_CHUNK))
    if bool(torch.isfinite(flat.sum())):
        return True
    return all(bool(torch.isfinite(flat[i:i + FINITE_CHUNK]).all()) for i in range(0, flat.numel(), FINITE_CHUNK))


def _read_at(fh: BinaryIO, offset: int, buf: torch.Tensor) -> int:
    fh.seek(offset)
    return fh.readinto(memoryview(buf.numpy()))
