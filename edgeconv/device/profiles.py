"""Target profiles: one TOML file per device class under targets/ (the package `edgeconv.targets`), validated when
loaded.

`--target` takes a profile name, an alias (`jetson`, `phone`) or the path of a TOML file of your own with the
same fields, so a new device needs no code.
"""

from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeconv.errors import EdgeconvError
from edgeconv.quant import LABELS, quant_names
from edgeconv.registry import Registry

PROFILE_DIR = resources.files("edgeconv.targets")  # targets/ at the repository root, shipped as package data
FORMATS = ("gguf", "onnx-genai")


class BenchLaunch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    setup: str = Field(description="how to install the runtime on the device")
    command: str = Field(description="how to run the bundle's bench.py there")


class TargetProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    aliases: list[str] = []
    description: str
    device: str
    memory_gb: float = Field(gt=0, description="memory the device has")
    usable_memory_gb: float = Field(gt=0, description="memory one app can use: the budget the plan must fit")
    bandwidth_gb_s: float = Field(gt=0, description="memory bandwidth; bounds decode speed")
    accelerator: Literal["cpu", "cuda", "metal"]
    formats: list[Literal["gguf", "onnx-genai"]] = Field(min_length=1,
                                                         description="supported; the first is the default")
    # The field names stay `quant` and `onnx_precision` (the CLI spells both --quant): renaming them would break
    # users' own profiles. Both are validated against edgeconv.quant's table.
    quant: str = Field(description="default GGUF quantization")
    onnx_precision: str = Field("int4", description="default onnxruntime-genai quantization")
    runtimes: list[Literal["llama.cpp", "onnxruntime-genai"]] = Field(min_length=1)
    threads: int = Field(gt=0)
    context: int = Field(ge=128, description="context length the plan reserves KV cache for")
    bench: BenchLaunch
    source: str = ""  # the file it was read from

    @field_validator("quant")
    @classmethod
    def _gguf_quant(cls, value: str) -> str:
        return _known("gguf", value)

    @field_validator("onnx_precision")
    @classmethod
    def _genai_quant(cls, value: str) -> str:
        return _known("onnx-genai", value)  # the target formats' ONNX flavour: onnxruntime-genai

    @model_validator(mode="after")
    def _consistent(self) -> TargetProfile:
        if self.usable_memory_gb > self.memory_gb:
            raise ValueError(f"usable_memory_gb {self.usable_memory_gb} exceeds memory_gb {self.memory_gb}")
        runtime_of = {"gguf": "llama.cpp", "onnx-genai": "onnxruntime-genai"}
        for fmt in self.formats:
            if runtime_of[fmt] not in self.runtimes:
                raise ValueError(f"format {fmt} needs runtime {runtime_of[fmt]}, which is not in runtimes")
        return self

    @property
    def usable_bytes(self) -> int:
        return int(self.usable_memory_gb * 1e9)


def _known(fmt: str, value: str) -> str:
    if value not in quant_names(fmt):
        raise ValueError(f"{value!r} is not a {LABELS[fmt]} quantization: use one of {', '.join(quant_names(fmt))}")
    return value


def load_profile(path: Path) -> TargetProfile:
    path = Path(path) if isinstance(path, (str, os.PathLike)) else path  # or a resources Traversable
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EdgeconvError(f"cannot read target profile {path} ({exc.strerror})", "check the path")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgeconvError(f"target profile {path} is not valid TOML ({exc})", "fix the file")
    try:
        return TargetProfile(**data, source=str(path))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise EdgeconvError(f"target profile {path}: {where}: {first['msg']}",
                            f"see {PROFILE_DIR / 'README.md'} for the fields")


def _builtin() -> tuple[Registry[TargetProfile], dict[str, str]]:
    registry: Registry[TargetProfile] = Registry("target")
    aliases: dict[str, str] = {}
    for path in sorted((p for p in PROFILE_DIR.iterdir() if p.name.endswith(".toml")), key=lambda p: p.name):
        profile = load_profile(path)
        if profile.name != path.name.removesuffix(".toml"):
            raise EdgeconvError(f"target profile {path} is named {profile.name!r}", "name the file after the profile")
        registry.register(profile.name)(profile)
        for alias in profile.aliases:
            aliases[alias] = profile.name
    return registry, aliases


TARGETS, ALIASES = _builtin()


def get_target(name: str) -> TargetProfile:
    """A built-in profile by name or alias, or a profile file by path."""
    if name.endswith(".toml") or Path(name).is_file():
        return load_profile(Path(name))
    name = ALIASES.get(name, name)
    if name not in TARGETS:
        aliases = ", ".join(f"{a} = {t}" for a, t in sorted(ALIASES.items()))
        raise EdgeconvError(f"unknown target {name!r}", f"known targets: {', '.join(TARGETS.names())} (aliases: "
                            f"{aliases}); or pass the path of a .toml profile")
    return TARGETS.get(name)


def all_targets() -> list[TargetProfile]:
    return [profile for _, profile in TARGETS.items()]
