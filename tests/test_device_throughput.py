"""benchmarks/device_throughput.py on tiny widths: the CPU row is measured from the manifests, and a device this
machine lacks gets a row that says so instead of a figure."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the row of a device this machine lacks")
def test_cpu_measured_and_a_missing_gpu_says_so(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import device_throughput

    results = tmp_path / "r.json"
    assert device_throughput.main(["--tiny", "--devices", "cpu,cuda", "--calibration-tokens", "1024",
                                   "--cache-tokens", "1024", "--work", str(tmp_path), "--results", str(results)]) == 0
    (run,) = json.loads(results.read_text())["runs"]
    cpu, cuda = run["rows"]
    stats = json.loads((tmp_path / "cpu" / "stats" / "manifest.json").read_text())
    cache = json.loads((tmp_path / "cpu" / "teacher-cache" / "manifest.json").read_text())
    assert cpu["calibrate"]["token_layers_per_second"] == stats["summary"]["tokens_per_second"] > 0
    assert cpu["cache"]["tokens_per_second"] == cache["tokens_per_second"] > 0
    assert cpu["calibrate"]["peak_rss_bytes"] > 0 and cpu["cache"]["wall_s"] > 0
    assert cuda == {"device": "cuda", "skipped": "no CUDA device on this machine"}
    md = results.with_suffix(".md").read_text()
    assert "| cuda | - | not measured: no CUDA device on this machine |" in md
    assert sys.modules["device_throughput"].device_present("cpu") is None
