"""Helpers of the device tests (bench.sh, adb, Jetson power): a real bundle written by BundleStage around a tiny
F32 GGUF, and stand-in programs (llama-bench, llama-perplexity, nvpmodel, jetson_clocks) as small scripts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import tiny

from edgeconv.device.memory_fit import Config, Estimate
from edgeconv.device.profiles import get_target
from edgeconv.stages.bundle import BundleStage
from edgeconv.stages.stage import run_stage

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_BIN = ROOT / "benchmarks" / "_work" / "llama.cpp-build" / "bin"  # benchmarks/llama_cpp_tools.py builds it


def tiny_gguf(root: Path) -> tuple[Path, Path]:
    """(dense student directory, its F32 GGUF): a 2-expert dense Qwen3 of a tiny random MoE, a 512-token context."""
    from edgeconv.families import family_for
    from edgeconv.planning.calibration_free import simple_plan
    from edgeconv.stages.assemble import assemble
    from edgeconv.stages.export_gguf import export_gguf

    src = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=5, hidden_size=64, head_dim=16,
                                                       max_position_embeddings=512), root / "moe"))
    dense = root / "dense"
    assemble(src, simple_plan(family_for(tiny.config_of(src)), "ids:1,4"), dense, progress=False)
    return dense, export_gguf(dense, root / "student-F32.gguf", "F32").path


def make_bundle(out: Path, dense: Path, gguf: Path, eval_dir: Path, target: str) -> Path:
    """A bundle for `target`, as `edgeconv build` writes it (BundleStage: manifest, bench.py, bench.sh, eval/)."""
    est = Estimate(Config(2, 64, "gguf", "F32", 512), 100_000, gguf.stat().st_size, 10_000, 10_000,
                   get_target(target).usable_bytes)
    run_stage(BundleStage(out, name="tiny-dense", export=gguf.parent, artifact=gguf, fmt="gguf", quant="F32",
                          target=get_target(target), estimate=est, eval_data=eval_dir, teacher="tiny-moe",
                          student=dense))
    return out


def llama_cpp_bin() -> Path | None:
    """llama.cpp's programs built from the vendored llama.cpp: EDGECONV_LLAMA_CPP_BIN, else the benchmarks' build."""
    where = Path(os.environ.get("EDGECONV_LLAMA_CPP_BIN") or LLAMA_CPP_BIN)
    return where if (where / "llama-bench").is_file() and (where / "llama-perplexity").is_file() else None


def script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def record(n_prompt: int, n_gen: int, avg_ts: float, *, threads: int = 4, ngl: int = 99, model: str = "m.gguf",
           gpu: str = "") -> dict:
    """One test of llama-bench's -o json output (the fields edgeconv reads, and a few others)."""
    return {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "ARMv8 Processor rev 1 (v8l)",
            "gpu_info": gpu, "backends": "CUDA" if gpu else "CPU", "model_filename": model,
            "model_type": "qwen3 ?B all F32", "model_size": 345600, "model_n_params": 86400, "n_batch": 2048,
            "n_ubatch": 512, "n_threads": threads, "type_k": "f16", "type_v": "f16", "n_gpu_layers": ngl,
            "flash_attn": -1, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": 0,
            "test_time": "2026-12-05T01:09:12Z", "avg_ns": int(1e9 * (n_prompt or n_gen) / avg_ts),
            "stddev_ns": 1000, "avg_ts": avg_ts, "stddev_ts": avg_ts / 100, "samples_ns": [1, 2],
            "samples_ts": [avg_ts, avg_ts]}


CANNED = [record(512, 0, 1500.0), record(0, 128, 42.5)]
CANNED_PPL = 12.5


def stand_in_llama_cpp(bin_dir: Path, log: Path, canned: list[dict] = CANNED, ppl: float = CANNED_PPL) -> Path:
    """llama-bench and llama-perplexity stand-ins in BIN_DIR: each appends its name, argv and LD_LIBRARY_PATH to
    LOG (one JSON line) and prints canned output (llama-bench: CANNED; llama-perplexity: a log ending in PPL). Each
    is one self-contained file, so that a copy runs anywhere (pushed to the stand-in phone)."""
    body = f'''#!/bin/sh
printf '%s\\n' "$(basename "$0")" "$@" | python3 -c 'import json, os, sys; \\
lines = sys.stdin.read().splitlines(); print(json.dumps({{"prog": lines[0], "argv": lines[1:], \\
"ld": os.environ.get("LD_LIBRARY_PATH")}}))' >> {log}
'''
    script(bin_dir / "llama-bench", body + f"cat <<'EOF'\n{json.dumps(canned, indent=2)}\nEOF\n")
    script(bin_dir / "llama-perplexity", body + f'''echo "perplexity: calculating perplexity over 4 chunks"
echo "[1]13.1,[2]12.9,[3]12.7,[4]{ppl},"
echo "Final estimate: PPL = {ppl} +/- 0.31"
''')
    return bin_dir


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


NVPMODEL_Q = "NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN\n0\n"
CLOCKS_PINNED = """SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano Developer Kit
Online CPUs: 0-5
cpu0:  Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400 IdleStates: WFI=0 c7=0
cpu1:  Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400 IdleStates: WFI=0 c7=0
cpu5:  Online=0 Governor=schedutil MinFreq=729600 MaxFreq=1510400 CurrentFreq=729600 IdleStates: WFI=1 c7=1
GPU MinFreq=624750000 MaxFreq=624750000 CurrentFreq=624750000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
NV Power Mode: MAXN
"""
CLOCKS_SCALING = CLOCKS_PINNED.replace("cpu1:  Online=1 Governor=schedutil MinFreq=1510400",
                                       "cpu1:  Online=1 Governor=schedutil MinFreq=729600")


def stand_in_jetson_tools(bin_dir: Path, *, clocks: str | None = CLOCKS_PINNED) -> Path:
    """nvpmodel and jetson_clocks stand-ins: `nvpmodel -q` prints NVPMODEL_Q; `jetson_clocks --show` prints CLOCKS,
    or fails as it does without root when CLOCKS is None."""
    script(bin_dir / "nvpmodel", f"#!/bin/sh\n[ \"$1\" = -q ] && printf '%s' '{NVPMODEL_Q}'\n")
    if clocks is None:
        script(bin_dir / "jetson_clocks", "#!/bin/sh\necho 'Error: Run this script as a root user' >&2\nexit 1\n")
    else:
        (bin_dir / "clocks.txt").write_text(clocks)
        script(bin_dir / "jetson_clocks", '#!/bin/sh\n[ "$1" = --show ] && cat "$(dirname "$0")/clocks.txt"\n')
    return bin_dir


def fake_sysfs(root: Path, cpus: list[tuple[int, int]], gpu: tuple[int, int]) -> Path:
    """A /sys with each CPU's cpufreq scaling_min/max_freq and a GPU devfreq min/max_freq."""
    for i, (lo, hi) in enumerate(cpus):
        d = root / "devices" / "system" / "cpu" / f"cpu{i}" / "cpufreq"
        d.mkdir(parents=True)
        (d / "scaling_min_freq").write_text(f"{lo}\n")
        (d / "scaling_max_freq").write_text(f"{hi}\n")
    d = root / "class" / "devfreq" / "17000000.gpu"
    d.mkdir(parents=True)
    (d / "min_freq").write_text(f"{gpu[0]}\n")
    (d / "max_freq").write_text(f"{gpu[1]}\n")
    return root
