"""A transformers checkpoint on disk: config.json plus safetensors shards, opened lazily."""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import torch

from edgeconv.errors import EdgeconvError
from edgeconv.io.safetensors_reader import ShardFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_CACHE_PREFIX = "models--"  # the Hugging Face cache keeps repo org/name in .../models--org--name/snapshots/REV
# Files copied next to converted weights: tokenizer, chat template, generation defaults.
SIDECAR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def resolve_model_path(model: str | Path) -> Path:
    """A local directory as is; a shipped demo name (demo-moe, demo-dense); a hub id (org/name) through the
    local HF cache or a download."""
    from edgeconv.demo import DEMO_MODELS, demo_path

    if str(model) in DEMO_MODELS and not Path(model).exists():
        return demo_path(str(model))
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EdgeconvError(f"{path} is a file, not a checkpoint directory",
                                "pass the directory holding config.json")
        return path.absolute()
    if HUB_ID.match(str(model)) and not str(model).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
            try:  # a model already in the local HF cache needs no network
                return Path(snapshot_download(str(model), allow_patterns=patterns, local_files_only=True))
            except Exception:
                return Path(snapshot_download(str(model), allow_patterns=patterns))
        except Exception as exc:  # network, auth, missing repo: all end the same way for the user
            raise EdgeconvError(
                f"model {model!r} is not a local directory and could not be fetched from the hub "
                f"({type(exc).__name__})",
                "pass a local checkpoint directory, or download it first with `huggingface-cli download`",
            )
    raise EdgeconvError(f"model path {path} does not exist", "pass a local checkpoint directory holding config.json")


def hub_id_of(path: str | Path) -> str | None:
    """The hub id (org/name) of a checkpoint that lives in the Hugging Face cache (a snapshot directory, which is
    what `resolve_model_path` returns for a hub id); None for any other directory."""
    path = Path(path)
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith(HUB_CACHE_PREFIX):
        return None
    parts = repo[len(HUB_CACHE_PREFIX):].split("--")  # the cache writes org/name as org--name
    return "/".join(parts) if len(parts) == 2 and all(parts) else None


def model_id(path: str | Path) -> str:
    """How a checkpoint is named to people and in model cards: its hub id when it came from the hub, else the name
    of its directory."""
    return hub_id_of(path) or Path(path).name


class Checkpoint:
    """config.json and the tensor directory of every shard; tensors are read one at a time on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise EdgeconvError(
                f"{self.path} is not a transformers checkpoint (no config.json)",
                "pass the directory written by save_pretrained",
            )
        try:
            self.config: dict = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EdgeconvError(f"{config_path} is not valid JSON ({exc})", "restore the checkpoint's config.json")
        self.shards = [ShardFile(p) for p in self._shard_paths()]
        self._open: tuple[ShardFile, BinaryIO] | None = None  # one shard handle at a time
        self._where: dict[str, ShardFile] = {}
        for shard in self.shards:
            for name in shard.tensors:
                self._where[name] = shard

    @classmethod
    def open(cls, model: str | Path) -> Checkpoint:
        return cls(resolve_model_path(model))

    def _shard_paths(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                raise EdgeconvError(f"{index} is corrupt", "restore the checkpoint's safetensors index")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise EdgeconvError(
                    f"shard {missing[0]} listed in {INDEX_NAME} is missing from {self.path}",
                    "download the missing shard(s) again",
                )
            return [self.path / n for n in names]
        found = sorted(self.path.glob("*.safetensors"))
        if found:
            return found
        other = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
        hint = "re-save it with save_pretrained(..., safe_serialization=True)" if other else "add the weights"
        raise EdgeconvError(f"{self.path} holds no .safetensors weights", hint)

    # --- tensor directory -------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        try:
            return self._where[name].tensors[name]
        except KeyError:
            raise EdgeconvError(f"tensor {name} is missing from {self.path}",
                                "the checkpoint is incomplete or of another layout")

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        self.info(name)
        shard = self._where[name]
        if self._open is None or self._open[0] is not shard:
            self.close()
            self._open = (shard, open(shard.path, "rb"))
        return shard.read(name, index, self._open[1])

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    @property
    def hub_id(self) -> str | None:
        """org/name when this checkpoint was opened from the hub (through the local HF cache), else None."""
        return hub_id_of(self.path)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the checkpoint without reading all of it: config.json, and per shard its name, size,
        header and the first and last MiB of its data (so two same-shape models with different weights
        differ, at the cost of 2 MiB read per shard)."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        sample = 1 << 20
        for shard in self.shards:
            h.update(f"{shard.path.name}:{shard.size}:".encode())
            h.update(shard.header_bytes)
            with open(shard.path, "rb") as fh:
                data_start = 8 + len(shard.header_bytes)
                fh.seek(data_start)
                h.update(fh.read(sample))
                fh.seek(max(data_start, shard.size - sample))
                h.update(fh.read(sample))
        return h.hexdigest()

    def sidecar_files(self) -> list[Path]:
        return [self.path / n for n in SIDECAR_FILES if (self.path / n).is_file()]
