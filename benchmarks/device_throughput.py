#!/usr/bin/env python3
"""Calibration and teacher-cache tokens/s on each device, one run (issue 18: "calibrate and cache-fill tokens/s on the
4-layer shape, CPU vs GPU").

    python benchmarks/device_throughput.py                       # Qwen3-30B-A3B shape, 4 layers; cpu and cuda
    python benchmarks/device_throughput.py --devices cpu --tiny  # the harness on tiny widths (seconds)

Per device: `edgeconv calibrate --device D` (its manifest's token-layers/s) and `edgeconv distill --mode offline
--cache-only --cache-device D` (the cache manifest's tokens/s, teacher loading included), each one measured process
(wall time, peak RSS). The checkpoint is real_shape.py's (written shard by shard, reused when complete); the student
the cache needs is planned and assembled once from the first device's statistics. A device this machine lacks gets a
row that says so: the figures are never estimated. Results: benchmarks/results/device_throughput.{json,md} (--tiny:
benchmarks/_work/device_throughput/tiny-results.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import edgeconv_command, machine, run_measured  # noqa: E402
from real_shape import DISTILL_DATA, edgeconv_commit  # noqa: E402

GB = 1e9
RESULTS = HERE / "results" / "device_throughput.json"
WORK = HERE / "_work" / "device_throughput"


def device_present(device: str) -> str | None:
    """None when `device` can run here, else why not (one line)."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def device_name(device: str) -> str:
    if device == "cpu":
        import os

        return f"CPU, {os.cpu_count()} cores"
    import torch

    return torch.cuda.get_device_name(int(device.split(":", 1)[1]) if ":" in device else 0)


def checkpoint(layers: int, tiny: bool, work: Path) -> Path:
    out = work / ("teacher-tiny" if tiny else f"teacher-L{layers}")
    cmd = [sys.executable, str(HERE / "real_shape.py"), "write", "qwen3", "--layers", str(layers), "--out", str(out),
           "--no-inspect", *(["--tiny"] if tiny else [])]
    subprocess.run(cmd, check=True)
    return out


def run_step(cmd: list, log: Path) -> dict:
    """One measured process (measure.run_measured: exits with its output if it fails)."""
    cmd = [str(c) for c in cmd]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    m = run_measured(cmd, log)
    print(f"  {m['wall_s']:.1f} s, peak RSS {m['peak_rss_bytes'] / GB:.2f} GB", flush=True)
    return {"wall_s": round(m["wall_s"], 2), "peak_rss_bytes": m["peak_rss_bytes"]}


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def measure_device(device: str, ckpt: Path, student: Path | None, args, work: Path) -> tuple[dict, Path]:
    """Calibrate, then fill the cache, on `device`; returns the row and the statistics directory."""
    d = work / device.replace(":", "-")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    edgeconv = edgeconv_command()
    stats = d / "stats"
    cal = run_step([*edgeconv, "calibrate", ckpt, "--device", device, "--dtype", args.dtype, "--tokens",
                    args.calibration_tokens, "--out", stats, "--no-progress"], d / "calibrate.log")
    cal["token_layers_per_second"] = manifest(stats)["summary"]["tokens_per_second"]
    row = {"device": device, "device_name": device_name(device), "dtype": args.dtype, "calibrate": cal}
    if student is not None:
        row["cache"] = cache_fill(device, ckpt, student, args, d)
    return row, stats


def cache_fill(device: str, ckpt: Path, student: Path, args, d: Path) -> dict:
    cache = d / "teacher-cache"
    r = run_step([*edgeconv_command(), "distill", "--teacher", ckpt, "--student", student, "--mode", "offline",
                  "--cache-only", "--cache-device", device, "--cache-dtype", args.dtype, "--tokens", args.cache_tokens,
                  "--data", DISTILL_DATA, "--teacher-cache", cache, "--out", d / "distilled", "--no-progress"],
                 d / "cache.log")
    r["tokens_per_second"] = manifest(cache)["tokens_per_second"]
    return r


def render(results: dict) -> str:
    lines = ["# Calibration and cache-fill throughput per device", "",
             "`benchmarks/device_throughput.py` (Qwen3-30B-A3B shape; calibrate: token-layers/s from its manifest; "
             "cache fill: tokens/s, teacher loading included).", ""]
    for run in results["runs"]:
        lines += [f"## {run['tag']}: {run['checkpoint_gb']:.2f} GB, {run['calibration_tokens']:,} calibration tokens, "
                  f"{run['cache_tokens']:,} cache tokens ({run['date']}, edgeconv {run['edgeconv_commit']})", "",
                  "| device | dtype | calibrate token-layers/s | calibrate wall s | calibrate peak RSS GB "
                  "| cache tokens/s | cache wall s | cache peak RSS GB |", "|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['device']} | - | not measured: {r['skipped']} | | | | | |")
                continue
            c, k = r["calibrate"], r.get("cache", {})
            lines.append(f"| {r['device']} ({r['device_name']}) | {r['dtype']} | {c['token_layers_per_second']:,.0f} "
                         f"| {c['wall_s']:.1f} | {c['peak_rss_bytes'] / GB:.2f} "
                         f"| {k.get('tokens_per_second', 0):,.0f} | {k.get('wall_s', 0):.1f} "
                         f"| {k.get('peak_rss_bytes', 0) / GB:.2f} |")
        measured_rows = [r for r in run["rows"] if "skipped" not in r]
        if len(measured_rows) > 1:
            base = measured_rows[0]
            for r in measured_rows[1:]:
                cal = r["calibrate"]["token_layers_per_second"] / base["calibrate"]["token_layers_per_second"]
                line = f"{r['device']} / {base['device']}: calibrate {cal:.2f}x"
                if "cache" in r and "cache" in base:
                    line += f", cache fill {r['cache']['tokens_per_second'] / base['cache']['tokens_per_second']:.2f}x"
                lines += ["", line]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the Qwen3-30B-A3B shape [4]")
    ap.add_argument("--devices", default="cpu,cuda", help="comma list: cpu, cuda, cuda:N [cpu,cuda]")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype of both steps (auto: bfloat16 on a GPU that has it, else float32)")
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--cache-tokens", type=int, default=8192)
    ap.add_argument("--tiny", action="store_true", help="tiny widths: checks the harness in seconds")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--results", type=Path, help=f"[{RESULTS.relative_to(HERE.parent)}; --tiny: under --work]")
    args = ap.parse_args(argv)
    results_path = args.results or (args.work / "tiny-results.json" if args.tiny else RESULTS)

    ckpt = checkpoint(args.layers, args.tiny, args.work)
    rows, student = [], None
    for device in args.devices.split(","):
        why = device_present(device)
        if why:
            print(f"\n{device}: not measured ({why})", flush=True)
            rows.append({"device": device, "skipped": why})
            continue
        row, stats = measure_device(device, ckpt, student, args, args.work)
        if student is None:  # the cache needs a student (its tokenizer and vocabulary): made once, not timed
            student = args.work / "student"
            shutil.rmtree(student, ignore_errors=True)
            plan = args.work / "plan.json"
            for cmd in ([*edgeconv_command(), "plan", stats, "--out", plan],
                        [*edgeconv_command(), "assemble", ckpt, "--plan", plan, "--out", student, "--no-progress"]):
                subprocess.run([str(c) for c in cmd], check=True)
            row["cache"] = cache_fill(device, ckpt, student, args, args.work / device.replace(":", "-"))
        rows.append(row)

    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
    tag = "tiny" if args.tiny else f"qwen3-30b-a3b-L{args.layers}"
    results["runs"] = [r for r in results["runs"] if r["tag"] != tag] + [{
        "tag": tag, "layers": args.layers, "checkpoint_gb": sum(f.stat().st_size for f in ckpt.glob("*")) / GB,
        "calibration_tokens": args.calibration_tokens, "cache_tokens": args.cache_tokens,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "edgeconv_commit": edgeconv_commit(),
        "machine": machine(), "rows": rows}]
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    results_path.with_suffix(".md").write_text(render(results))
    print("\n" + render(results))
    print(f"results: {results_path} and {results_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
