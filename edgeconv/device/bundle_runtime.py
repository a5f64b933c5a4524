"""How a bundle runs on its device: the runtime its model's format needs, the package that installs it there, the
execution provider an onnxruntime-genai model is built for, and the setup line and bench.py command the bundle's
README and `edgeconv build` print.

A target profile's `[bench] setup` and `command` are the llama.cpp (GGUF) lines: they name llama-cpp-python and
its build flags (CUDA, Metal) and llama.cpp's --gpu-layers. An ONNX model needs other lines, made here from the
format, the runtime and the execution provider:

    gguf        llama.cpp           llama-cpp-python (the profile's own lines)
    onnx        onnxruntime         onnxruntime (bench.py does not run it: the README shows onnxruntime's own use)
    onnx-genai  onnxruntime-genai   onnxruntime-genai, or onnxruntime-genai-cuda for a model built for CUDA

An onnxruntime-genai model is built for CUDA only where the target has CUDA and PyPI has onnxruntime-genai-cuda
for it: x86-64 Linux and Windows. PyPI has none for Arm64 (Jetson), so there the model is built for the CPU, and
its Arm64 wheel of onnxruntime-genai needs Python 3.11 or later (JetPack 6 ships 3.10).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edgeconv.device.profiles import TargetProfile

RUNTIME_OF = {"gguf": "llama.cpp", "onnx": "onnxruntime", "onnx-genai": "onnxruntime-genai"}
PACKAGE_OF = {"llama.cpp": "llama-cpp-python", "onnxruntime": "onnxruntime", "onnxruntime-genai": "onnxruntime-genai"}
CUDA_PACKAGE_OF = {"onnxruntime-genai": "onnxruntime-genai-cuda"}  # on PyPI for x86-64 Linux and Windows only
ARM_PYTHON = "python3.11"  # PyPI's Arm64 Linux wheels of onnxruntime-genai start at CPython 3.11


def is_arm(target: TargetProfile) -> bool:
    """Whether the target's CPU is Arm (Jetson, phones, Apple silicon), from its `device` description."""
    return re.search(r"\b(arm|arm64|aarch64|cortex-a\w*|apple)\b", f"{target.device} {target.description}",
                     re.IGNORECASE) is not None


def genai_provider(target: TargetProfile) -> str:
    """The execution provider `edgeconv build` builds an onnxruntime-genai model for on `target`: cuda where the
    target has CUDA and PyPI has onnxruntime-genai-cuda for it (not Arm64), else cpu."""
    return "cuda" if target.accelerator == "cuda" and not is_arm(target) else "cpu"


@dataclass
class Launch:
    """What the device needs to run a bundle of `fmt`, and how."""

    fmt: str
    runtime: str  # llama.cpp, onnxruntime, onnxruntime-genai
    package: str  # what pip installs
    provider: str | None  # the execution provider the model was built for (onnx-genai)
    setup: str
    command: str | None  # bench.py's command line; None: bench.py does not run this format
    notes: list[str] = field(default_factory=list)


def launch(target: TargetProfile, fmt: str, provider: str | None = None) -> Launch:
    """The setup line and bench.py command for a bundle of `fmt` on `target` (`provider`: the execution provider
    the onnxruntime-genai model was built for; default: what the build chooses, `genai_provider`)."""
    runtime = RUNTIME_OF[fmt]
    if fmt == "gguf":
        return Launch(fmt, runtime, PACKAGE_OF[runtime], None, target.bench.setup, target.bench.command)
    notes = []
    provider = (provider or genai_provider(target)) if fmt == "onnx-genai" else None
    package = CUDA_PACKAGE_OF[runtime] if provider == "cuda" else PACKAGE_OF[runtime]
    python = "python3"
    if fmt == "onnx-genai" and is_arm(target) and target.accelerator != "metal":
        python = ARM_PYTHON
        notes.append(f"PyPI's Arm64 Linux wheels of {package} need Python 3.11 or later; JetPack 6 and Ubuntu "
                     f"22.04 ship 3.10: `sudo apt install {ARM_PYTHON}-venv` first.")
    if fmt == "onnx-genai" and target.accelerator == "cuda" and provider == "cpu":
        notes.append("The model is built for the CPU execution provider and runs on the CPU cores: PyPI has no "
                     "onnxruntime-genai-cuda for this device. For its GPU, build onnxruntime-genai with CUDA from "
                     "source and export with `edgeconv export --format onnx-genai --execution-provider cuda`.")
    if provider == "cuda":
        notes.append(f"The model is built for the CUDA execution provider: {package} needs the CUDA and cuDNN "
                     "libraries its release notes name.")
    setup = f"{python} -m venv venv && venv/bin/pip install {package}"
    command = f"venv/bin/python bench.py --threads {target.threads}" if fmt == "onnx-genai" else None
    if command is None:
        notes.append("bench.py runs GGUF and onnxruntime-genai models only; this model.onnx (its KV cache as "
                     "inputs and outputs, as optimum exports it) runs in onnxruntime directly, or through "
                     "optimum's ORTModelForCausalLM.")
    return Launch(fmt, runtime, package, provider, setup, command, notes)
