"""Shared by the benchmark scripts: run a command and measure its wall time and exact peak RSS."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# Runs argv[2:] as its only child and writes that child's wall time and rusage to argv[1]. A fresh, small
# process is needed: on Linux a child's ru_maxrss starts at the RSS high-water mark of the process that
# forked it, so measured straight from a benchmark that already imported torch, a small command would
# report the benchmark's peak instead of its own.
WRAPPER = r"""
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as fh:
    json.dump({"wall_s": wall, "maxrss_kib": ru.ru_maxrss, "user_s": ru.ru_utime, "sys_s": ru.ru_stime}, fh)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def edgeconv_command() -> list[str]:
    """The console script next to this interpreter (not a pyenv shim, which would add a bash process)."""
    script = Path(sys.executable).parent / "edgeconv"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edgeconv.cli"]


def measured(cmd: list[str], log: Path) -> dict:
    """Run cmd to completion: wall time and peak RSS of that one process, its output in `log`."""
    usage_file = log.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.run([sys.executable, "-c", WRAPPER, str(usage_file), *cmd], stdout=fh,
                              stderr=subprocess.STDOUT)
    usage = json.loads(usage_file.read_text())
    return {
        "returncode": proc.returncode,
        "wall_s": usage["wall_s"],
        "peak_rss_bytes": usage["maxrss_kib"] * 1024,
        "output": log.read_text(errors="replace").strip()[-2000:],
    }


def machine() -> dict:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpus": os.cpu_count(), "ram_gb": round(mem / 1e9, 1), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def busy_cpu_s() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd: list[str], log: Path) -> dict:
    """Wall time and peak RSS of cmd; also the CPU time other processes used meanwhile (contention)."""
    usage_file = log.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    with open(log, "wb") as fh:
        busy0 = busy_cpu_s()
        rc = subprocess.run([sys.executable, "-c", WRAPPER, str(usage_file), *cmd], stdout=fh,
                            stderr=subprocess.STDOUT).returncode
        busy = busy_cpu_s() - busy0
    output = log.read_text(errors="replace").strip()
    if rc != 0:
        print(output, file=sys.stderr)
        raise SystemExit(f"{' '.join(cmd)} failed ({rc})")
    usage = json.loads(usage_file.read_text())
    other = max(0.0, busy - usage["user_s"] - usage["sys_s"])
    return {"wall_s": usage["wall_s"], "peak_rss_bytes": usage["maxrss_kib"] * 1024, "user_s": usage["user_s"],
            "sys_s": usage["sys_s"], "other_cpu_s": other, "output": output}
