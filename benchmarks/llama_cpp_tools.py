"""llama.cpp's own tools, built from the llama.cpp that llama-cpp-python vendors (shared by the benchmarks).

llama-cpp-python ships libllama but none of llama.cpp's programs. `pip download llama-cpp-python==VERSION
--no-deps --no-binary :all:` gives its sdist, whose vendor/llama.cpp is the exact llama.cpp the installed wheel
was built from; the programs are built from it with the flags the wheel was built with, and its
convert_hf_to_gguf.py runs with its own gguf-py (what the script does by itself unless NO_LOCAL_GGUF is set).

    build(["llama-bench", "llama-quantize", "llama-batched-bench"], jobs=2)   # about 25 min on one core
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work"
BUILD = WORK / "llama.cpp-build"
SDIST_DIR = WORK / "llama-cpp-python-sdist"
PYDEPS = WORK / "llama-cpp-pydeps"  # converter requirements this environment lacks, kept out of site-packages
# From vendor/llama.cpp/requirements/requirements-convert_legacy_llama.txt: the llama converter imports it before
# it looks for a tokenizer.model (and falls back to tokenizer.json only on FileNotFoundError).
CONVERTER_DEPS = {"sentencepiece": "sentencepiece>=0.1.98,<0.3.0"}
VERSION = "0.3.36"
# The installed wheel was built with GGML_NATIVE=OFF (README: CMAKE_ARGS="-DGGML_NATIVE=OFF ..."), which on x86-64
# enables SSE4.2, AVX, AVX2, FMA, F16C and BMI2 (lib/cmake/ggml/ggml-config.cmake in the wheel says so); OpenMP on.
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_TOOLS=ON"]


def _sh(cmd: list) -> None:
    print("+ " + " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def source() -> Path:
    """vendor/llama.cpp of the llama-cpp-python VERSION sdist (pip download; the pip cache is used if it has it)."""
    src = SDIST_DIR / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if src.exists():
        return src
    sdist = SDIST_DIR / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        SDIST_DIR.mkdir(parents=True, exist_ok=True)
        _sh([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps", "--no-binary",
             ":all:", "-d", SDIST_DIR])
    with tarfile.open(sdist) as tar:
        tar.extractall(SDIST_DIR)
    return src


def tool(name: str) -> Path:
    return BUILD / "bin" / name


def build(targets: list[str], jobs: int = 1) -> dict[str, Path]:
    """The programs `targets` (cmake target names), built once into benchmarks/_work/llama.cpp-build."""
    missing = [t for t in targets if not tool(t).exists()]
    if missing:
        src = source()
        if not (BUILD / "CMakeCache.txt").exists():
            _sh(["cmake", "-S", src, "-B", BUILD, *CMAKE_FLAGS])
        _sh(["cmake", "--build", BUILD, "--target", *missing, f"-j{jobs}"])
    return {t: tool(t) for t in targets}


def converter_deps() -> Path:
    """Make llama.cpp's converter requirements importable: missing ones are pip-installed into PYDEPS, which the
    caller puts on sys.path (upstream_convert.py does)."""
    import importlib.util

    sys.path.insert(0, str(PYDEPS))
    missing = [spec for mod, spec in CONVERTER_DEPS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        _sh([sys.executable, "-m", "pip", "install", "--no-deps", "--target", PYDEPS, *missing])
        importlib.invalidate_caches()
    return PYDEPS


def convert_script() -> Path:
    """The vendored convert_hf_to_gguf.py (it puts its own gguf-py first on sys.path)."""
    return source() / "convert_hf_to_gguf.py"
