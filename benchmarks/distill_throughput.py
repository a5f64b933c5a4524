#!/usr/bin/env python
"""Student training throughput of `edgeconv distill` with the online teacher vs the cached top-k teacher
log-probs, and peak RSS of each, measured in one run on the same models, data and token budget.

1. The student: --student, or by default the teacher converted with `edgeconv convert TEACHER --out
   WORKDIR/distill-throughput/student` (the paper's defaults on the shipped calibration text; a no-op when it
   is already there).
2. Three commands, each in its own process, --repeat times in turn (online, cache, offline):
     online   edgeconv distill --mode online  --out .../online                       teacher runs every step
     cache    edgeconv distill --mode offline --cache-only --teacher-cache .../cache   the caching pass alone
     offline  edgeconv distill --mode offline --teacher-cache .../cache --out .../offline
              training from the complete cache: the teacher's weights are never loaded in this process
   with the same --tokens --seq-len --batch-size (and --top-k for the cache). Output and cache directories
   are deleted before each run, so nothing is skipped as "up to date".
3. Measured per run: `train_tokens_per_second` from OUT/manifest.json (the optimizer steps alone: no loading,
   tokenizing or checkpointing), the cache pass's tokens/s from the cache manifest (teacher loading
   included), the whole process's wall time, and its peak RSS (ru_maxrss from os.wait4 of that one process,
   in the fork/exec wrapper of measure.py), plus the CPU time other processes used meanwhile (contention).
   Medians over the repeats (peak RSS: the largest).
4. Prints the throughput ratio offline / online (the goal figure: how much a cached teacher speeds up student
   training), the peak RSS of each mode, and the cache size per token, and writes everything as JSON to
   --json (default benchmarks/results/distill_throughput.json).

Usage:  python benchmarks/distill_throughput.py [--teacher demo-moe] [--student DIR] [--data TEXT]
                                                [--tokens 32768] [--seq-len 256] [--batch-size 16]
                                                [--top-k 64] [--repeat 2] [--workdir benchmarks/_work]
MB here means 10^6 bytes. Only commit a result JSON from the demo models (or say in it what the models were).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import measure  # noqa: E402  (shared with the other benchmarks)
from measure import edgeconv_command, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MB = 1e6


def run_measured(cmd: list[str], log: Path) -> dict:
    """measure.run_measured, rounded, with the output's tail only (it goes into the results JSON)."""
    r = measure.run_measured(cmd, log)
    return {"wall_s": round(r["wall_s"], 2), "peak_rss_bytes": r["peak_rss_bytes"],
            "other_cpu_s": round(r["other_cpu_s"], 1), "output": r["output"][-600:]}


def model_info(path: str) -> dict:
    """Architecture, parameter count and size on disk, from the safetensors headers (no weights loaded)."""
    from edgeconv.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(path)
    params = sum(info.numel for shard in ckpt.shards for info in shard.tensors.values())
    return {"path": str(ckpt.path), "architecture": (ckpt.config.get("architectures") or ["?"])[0],
            "params": params, "checkpoint_mb": round(ckpt.total_bytes / MB, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="demo-moe", help="teacher checkpoint (a directory or a demo name)")
    ap.add_argument("--student", default=None, help="dense student [default: the teacher converted, in --workdir]")
    ap.add_argument("--data", type=Path, default=None, help="training text [default: the shipped demo text]")
    ap.add_argument("--tokens", type=int, default=32768, help="token budget of every run")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    ap.add_argument("--top-k", type=int, default=64, help="teacher log-probs cached per token (offline)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each mode, in turn; medians are reported")
    ap.add_argument("--workdir", type=Path, default=HERE / "_work")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "distill_throughput.json")
    args = ap.parse_args()

    from edgeconv.demo import CALIBRATION_DATA

    work = (args.workdir / "distill-throughput").resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = (args.data or CALIBRATION_DATA).resolve()
    cmd = edgeconv_command()
    student = args.student
    if student is None:
        student = str(work / "student")
        print(f"converting {args.teacher} -> {student} (skipped when already there) ...", flush=True)
        subprocess.run(cmd + ["convert", args.teacher, "--out", student, "--no-progress"], check=True)

    common = ["--teacher", args.teacher, "--student", student, "--data", str(data), "--tokens", str(args.tokens),
              "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--checkpoint-every", "1000000",
              "--no-progress"]
    cache = work / "cache"
    outs = {"online": work / "online", "offline": work / "offline"}
    runs = {
        "online": common + ["--mode", "online", "--out", str(outs["online"])],
        "cache": common + ["--mode", "offline", "--top-k", str(args.top_k), "--teacher-cache", str(cache),
                           "--cache-only", "--out", str(outs["offline"])],
        "offline": common + ["--mode", "offline", "--top-k", str(args.top_k), "--teacher-cache", str(cache),
                             "--out", str(outs["offline"])],
    }
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for i in range(args.repeat):
        for name, argv in runs.items():
            for path in ([cache] if name == "cache" else []) + list(outs.values()):
                shutil.rmtree(path, ignore_errors=True)
                shutil.rmtree(path.parent / f"{path.name}.work", ignore_errors=True)
            r = run_measured(cmd + ["distill", *argv], work / f"{name}-{i + 1}.log")
            if name == "cache":
                r["cache"] = json.loads((cache / "manifest.json").read_text())
                r["tokens_per_second"] = r["cache"]["tokens_per_second"]
            else:
                r["summary"] = json.loads((outs[name] / "manifest.json").read_text())["summary"]
                r["tokens_per_second"] = r["summary"]["train_tokens_per_second"]
            results[name].append(r)
            print(f"{name:8} {i + 1}/{args.repeat}: {r['tokens_per_second']:,.0f} tokens/s, "
                  f"process {r['wall_s']:.1f} s, "
                  f"peak RSS {r['peak_rss_bytes'] / MB:,.0f} MB; other processes used {r['other_cpu_s']:.1f} CPU s "
                  "meanwhile", flush=True)

    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in results[name])

    def peak(name: str) -> int:
        return max(r["peak_rss_bytes"] for r in results[name])

    tps = {name: med(name, "tokens_per_second") for name in runs}
    cache_manifest = results["cache"][-1]["cache"]
    summary = {
        "online_train_tokens_per_second": tps["online"],
        "offline_train_tokens_per_second": tps["offline"],
        "offline_over_online_throughput": round(tps["offline"] / tps["online"], 3),
        "cache_pass_tokens_per_second": tps["cache"],
        "online_peak_rss_mb": round(peak("online") / MB, 1),
        "offline_train_peak_rss_mb": round(peak("offline") / MB, 1),
        "cache_pass_peak_rss_mb": round(peak("cache") / MB, 1),
        "cache_bytes_per_token": cache_manifest["bytes_per_token"],
        "cache_mb": round(cache_manifest["bytes"] / MB, 2),
        "final_loss": {name: results[name][-1]["summary"]["final_loss"] for name in ("online", "offline")},
    }
    result = {
        "command": "python benchmarks/distill_throughput.py " + " ".join(sys.argv[1:]),
        "distill_commands": {name: "edgeconv distill " + " ".join(argv).replace(str(work), "<workdir>")
                             for name, argv in runs.items()},
        "machine": machine(),
        "teacher": model_info(args.teacher),
        "student": model_info(student),
        "data": {"path": str(data), "tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
                 "top_k": args.top_k},
        "repeat": args.repeat,
        "summary": summary,
        "runs": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nstudent training: online {tps['online']:,.0f} tokens/s, offline (cached top-{args.top_k}) "
          f"{tps['offline']:,.0f} tokens/s -> x{summary['offline_over_online_throughput']:.2f}")
    print(f"peak RSS: online {summary['online_peak_rss_mb']:,.0f} MB, offline training "
          f"{summary['offline_train_peak_rss_mb']:,.0f} MB, caching pass {summary['cache_pass_peak_rss_mb']:,.0f} MB")
    print(f"cache: {summary['cache_bytes_per_token']} bytes per token, {summary['cache_mb']:,.1f} MB for "
          f"{cache_manifest['spec']['sequences'] * cache_manifest['spec']['seq_len']:,} tokens; pass at "
          f"{tps['cache']:,.0f} tokens/s")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
