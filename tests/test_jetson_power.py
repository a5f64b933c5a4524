"""Issue 20, point 5: Jetson figures with their power mode. bench.py and bench.sh record `nvpmodel -q` and whether
jetson_clocks pinned the clocks when those tools exist (stand-ins here: scripts printing what the real tools print on
an Orin), `edgeconv report` shows them, and the Jetson profiles build llama-cpp-python with CUDA as JetPack 6
needs and offer GGUF only."""

import json
import os
import shlex
import subprocess
import sys
from importlib import resources

import pytest
from device_bundle import (
    CLOCKS_PINNED,
    CLOCKS_SCALING,
    NVPMODEL_Q,
    fake_sysfs,
    make_bundle,
    stand_in_jetson_tools,
    stand_in_llama_cpp,
    tiny_gguf,
)

from edgeconv.device import runner
from edgeconv.device.profiles import get_target
from edgeconv.reporting import load_results, report

JETSONS = ("jetson-orin-nano", "jetson-agx-orin")
RESULT = {"schema": "edgeconv-bench/1", "label": "s", "role": "student", "target": "jetson-orin-nano",
          "model": {"path": "s.gguf", "format": "gguf", "bytes": 1_000_000, "quant": "Q4_K_M"},
          "runtime": {"name": "llama.cpp", "threads": 6, "gpu_layers": -1}, "peak_rss_mb": 300.0,
          "speed": [{"prompt_tokens": 64, "ttft_ms": 9.0, "prefill_tok_s": 900.0, "decode_tok_s": 60.0}],
          "decode_tok_s": 60.0, "notes": []}


def test_nvpmodel_and_jetson_clocks_outputs_are_read():
    assert runner.parse_nvpmodel(NVPMODEL_Q) == {"mode": "MAXN", "id": 0}
    assert runner.parse_nvpmodel("NV Power Mode: 15W\n1\n") == {"mode": "15W", "id": 1}
    assert runner.parse_nvpmodel("") == {"mode": None, "id": None}
    assert runner.parse_jetson_clocks(CLOCKS_PINNED) is True  # cpu5 is offline: not counted
    assert runner.parse_jetson_clocks(CLOCKS_SCALING) is False
    assert runner.parse_jetson_clocks(CLOCKS_PINNED.replace("GPU MinFreq=624750000", "GPU MinFreq=306000000")) is False
    assert runner.parse_jetson_clocks("Error: Run this script as a root user") is None


def test_jetson_power_is_none_where_the_tools_are_not_installed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert runner.jetson_power() == {"nvpmodel": None, "jetson_clocks": None}
    device = runner.device_info()
    assert device["nvpmodel"] is None and device["jetson_clocks"] is None


def test_jetson_power_from_the_tools(monkeypatch, tmp_path):
    tools = stand_in_jetson_tools(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    assert runner.jetson_power() == {"nvpmodel": {"mode": "MAXN", "id": 0, "source": "nvpmodel -q"},
                                     "jetson_clocks": {"on": True, "source": "jetson_clocks --show"}}
    (tools / "clocks.txt").write_text(CLOCKS_SCALING)
    assert runner.jetson_power()["jetson_clocks"]["on"] is False


@pytest.mark.parametrize("cpus,gpu,on", [([(1510400, 1510400)] * 2, (624750000, 624750000), True),
                                         ([(729600, 1510400)] * 2, (624750000, 624750000), False),
                                         ([(1510400, 1510400)] * 2, (306000000, 624750000), False)])
def test_without_root_jetson_clocks_is_read_from_sysfs(monkeypatch, tmp_path, cpus, gpu, on):
    tools = stand_in_jetson_tools(tmp_path / "bin", clocks=None)  # --show fails, as it does without root
    sysfs = fake_sysfs(tmp_path / "sys", cpus, gpu)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("EDGECONV_SYSFS", str(sysfs))
    got = runner.jetson_power()["jetson_clocks"]
    assert got == {"on": on, "source": f"min = max frequency in {sysfs}"}


@pytest.fixture(scope="module")
def jetson_bundle(small_eval, tmp_path_factory):
    root = tmp_path_factory.mktemp("jetson")
    dense, gguf = tiny_gguf(root)
    return make_bundle(root / "bundle", dense, gguf, small_eval, "jetson-orin-nano")


def test_bench_py_records_the_power_mode_and_report_shows_it(jetson_bundle, tmp_path):
    tools = stand_in_jetson_tools(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "bench.py", "--threads", "1", "--prompt-lengths", "8", "--decode-tokens",
                          "4", "--repeats", "1", "--no-accuracy", "--out", str(out)], cwd=jetson_bundle, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "power      nvpmodel MAXN (0), jetson_clocks on" in run.stdout
    device = json.loads(out.read_text())["device"]
    assert device["nvpmodel"] == {"mode": "MAXN", "id": 0, "source": "nvpmodel -q"}
    assert device["jetson_clocks"] == {"on": True, "source": "jetson_clocks --show"}
    (r,) = load_results([out])
    assert r.power == "nvpmodel MAXN (0), jetson_clocks on"
    md = report([out], tmp_path / "report").markdown.read_text()
    header, _, row = md.split("## Results")[1].strip().splitlines()[:3]
    assert header.split(" | ")[4] == "power" and row.split(" | ")[4] == "nvpmodel MAXN (0), jetson_clocks on"


def test_bench_sh_reads_sysfs_when_jetson_clocks_needs_root(jetson_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(jetson_bundle, bundle)
    tools = stand_in_jetson_tools(stand_in_llama_cpp(tmp_path / "bin", tmp_path / "calls.jsonl"), clocks=None)
    sysfs = fake_sysfs(tmp_path / "sys", [(729600, 1510400)] * 6, (306000000, 624750000))
    run = subprocess.run(["sh", "bench.sh", "--no-perplexity"], cwd=bundle, capture_output=True, text=True,
                         env={"PATH": f"{tools}:/usr/bin:/bin", "EDGECONV_SYSFS": str(sysfs)}, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert "jetson_clocks: off" in run.stderr
    device = json.loads((bundle / "llama-bench.edgeconv.json").read_text())["device"]
    assert device["jetson_clocks"] == {"on": False, "source": f"min = max frequency in {sysfs}"}
    assert device["nvpmodel"]["mode"] == "MAXN"
    assert load_results([bundle / "llama-bench.json"])[0].power == "nvpmodel MAXN (0), jetson_clocks off"


def test_report_shows_the_power_column_only_when_one_was_recorded(tmp_path):
    plain, jetson = tmp_path / "plain.json", tmp_path / "jetson.json"
    plain.write_text(json.dumps({**RESULT, "label": "laptop", "target": "laptop", "device": {"processor": "x86"}}))
    orin = {"jetson_model": "Orin Nano", "nvpmodel": {"mode": "15W", "id": 1}, "jetson_clocks": {"on": False}}
    jetson.write_text(json.dumps({**RESULT, "device": orin}))
    assert "| power |" not in report([plain], tmp_path / "a").markdown.read_text()
    md = report([plain, jetson], tmp_path / "b").markdown.read_text()
    assert "| power |" in md and "nvpmodel 15W (1), jetson_clocks off" in md
    rows = [line for line in md.splitlines() if line.startswith("| laptop |")]
    assert rows and rows[0].split(" | ")[4] == "-"


@pytest.mark.parametrize("name", JETSONS)
def test_jetson_profiles_build_llama_cpp_python_with_cuda_for_orin(name):
    target = get_target(name)
    assert target.bench.setup == ('python3 -m venv venv && CUDACXX=/usr/local/cuda/bin/nvcc CMAKE_ARGS="-DGGML_CUDA=on '
                                  '-DCMAKE_CUDA_ARCHITECTURES=87" venv/bin/pip install llama-cpp-python')
    words = shlex.split(target.bench.setup.split("&&", 1)[1])
    assert words[:2] == ["CUDACXX=/usr/local/cuda/bin/nvcc",
                         "CMAKE_ARGS=-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87"]
    assert target.bench.command.endswith("--gpu-layers -1")
    # No aarch64 CUDA wheel of onnxruntime-genai on PyPI: GGUF only, and the profile says why.
    assert target.formats == ["gguf"] and target.runtimes == ["llama.cpp"]
    text = (resources.files("edgeconv.targets") / f"{name}.toml").read_text()
    assert "PyPI has no aarch64 wheel of onnxruntime-genai-cuda" in text
