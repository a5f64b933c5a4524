#!/usr/bin/env python3
"""Run one command and sample its memory from /proc every --every seconds: where a peak RSS comes from.

    python benchmarks/rss_timeline.py --out timeline.tsv -- edgeconv calibrate CKPT --tokens 4096 --out stats/

Prints the peak of VmRSS, RssAnon (heap, tensors) and RssFile (mapped files, e.g. safetensors) and when each was
reached; the TSV has one row per sample (seconds, then the three in kB). Linux only. A console script that execs
python (not a pyenv shim that forks) keeps the PID sampled here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def sample(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines() if line.startswith(FIELDS)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the timeline, TSV")
    ap.add_argument("--every", type=float, default=0.5, help="seconds between samples [0.5]")
    ap.add_argument("--log", type=Path, help="the command's output [--out with .log]")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command after --")
    with open(args.log or args.out.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        t0, rows = time.perf_counter(), []
        while proc.poll() is None:
            values = sample(proc.pid)
            if values:
                rows.append((time.perf_counter() - t0, values))
            time.sleep(args.every)
    args.out.write_text("seconds\t" + "\t".join(f"{f}_kB" for f in FIELDS) + "\n" + "".join(
        f"{t:.1f}\t" + "\t".join(str(v.get(f, 0)) for f in FIELDS) + "\n" for t, v in rows))
    print(f"rc {proc.returncode}, {time.perf_counter() - t0:.1f} s, {len(rows)} samples -> {args.out}")
    for f in FIELDS:
        t, v = max(rows, key=lambda r: r[1].get(f, 0), default=(0.0, {}))
        print(f"  peak {f}: {v.get(f, 0) / 1e6:.2f} GB at {t:.0f} s")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
