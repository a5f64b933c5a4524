"""Does bench.py's decode tokens/s agree with llama.cpp's own llama-bench (goal: within 5 %)?

llama-cpp-python bundles libllama but not the llama-bench program, so this script builds llama-bench from the
llama.cpp that llama-cpp-python 0.3.36 vendors (its sdist's vendor/llama.cpp), with the CPU flags the installed
wheel was built with, and measures the same GGUF files at the same thread counts:

  reference  llama-bench -m FILE -t T -p 0 -n 128 -r 5 -o json      (tg128: 128 single-token decodes from an
             empty cache in a 128-cell context; -fa 0 and -fa auto; -d D adds D tokens of depth first)
  runner     python edgeconv/device/runner.py --model FILE --threads T --context 128 --prompt-lengths 1
             --decode-tokens 127 --repeats 5 --no-accuracy      (same positions, same KV cache size; the timed
             region is llama_decode + llama_synchronize; --flash-attn for the auto comparison), and the same
             with bench.py's default context (2048) and 128 decodes, as a bundle runs it

The context matters for small models: llama.cpp's attention spans max(256, used cells rounded up to 256) KV cells,
capped by the cache size, so a 128-cell context (what llama-bench creates for -p 0 -n 128) attends over 128
cells where any context >= 256 attends over 256. The "matched" ratio compares equal work; the default-context one
shows what that costs on the file at hand.

A round runs llama-bench then bench.py, or the reverse in odd rounds, back to back. The headline ratio is paired:
per round bench.py's median / llama-bench's median (repetitions after --skip-reps, the warm-up), then the median
over rounds with a bootstrap 95 % interval; on a VM whose speed drifts over seconds the two invocations of a round
see the same state. Pooled medians over all repetitions are reported too. A second llama-bench variant runs the same
binary with LD_LIBRARY_PATH on the Python package's own libllama/libggml (the exact library bench.py calls),
which separates "same library" from "same source, separate build".

    python benchmarks/llama_bench_agreement.py                 # build if needed, threads 1, both demo GGUFs
    python benchmarks/llama_bench_agreement.py --threads 2 --rounds 100 --reps 15 --skip-reps 5 --variants matched
    python benchmarks/llama_bench_agreement.py --threads 1,2 --depths 0,64 --realtime
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_tools  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work"
BUILD = llama_cpp_tools.BUILD
AGREE = WORK / "agree"
RUNNER = ROOT / "edgeconv" / "device" / "runner.py"
RESULTS = ROOT / "benchmarks" / "results" / "llama_bench_agreement.json"
VERSION = llama_cpp_tools.VERSION
CMAKE_FLAGS = llama_cpp_tools.CMAKE_FLAGS  # the wheel's flags (see llama_cpp_tools.py)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def build_llama_bench(jobs: int) -> Path:
    """llama-bench from the sdist of llama-cpp-python VERSION (benchmarks/llama_cpp_tools.py)."""
    return llama_cpp_tools.build(["llama-bench"], jobs)["llama-bench"]


def ensure_models() -> list[Path]:
    """The shipped demo teacher and its default student, both Q4_K_M, made with the edgeconv CLI."""
    AGREE.mkdir(parents=True, exist_ok=True)
    teacher, student = AGREE / "teacher-q4km.gguf", AGREE / "student-q4km.gguf"
    if not teacher.exists():
        sh(["edgeconv", "export", "demo-moe", "--format", "gguf", "--quant", "Q4_K_M", "--out", teacher])
    if not student.exists():
        if not (AGREE / "student" / "config.json").exists():
            sh(["edgeconv", "convert", "--out", AGREE / "student"])
        sh(["edgeconv", "export", AGREE / "student", "--quant", "Q4_K_M", "--out", student])
    return [teacher, student]


def python_lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def llama_bench(exe: Path, model: Path, threads: int, n_gen: int, reps: int, fa: str, depth: int,
                same_library: bool, prefix: list) -> dict:
    env = dict(os.environ)
    if same_library:  # the binary's RUNPATH yields to LD_LIBRARY_PATH: load the Python package's libraries
        env["LD_LIBRARY_PATH"] = str(python_lib_dir())
    cmd = [exe, "-m", model, "-t", threads, "-p", 0, "-n", n_gen, "-r", reps, "-o", "json"]
    if fa != "auto":
        cmd += ["-fa", fa]
    if depth:
        cmd += ["-d", depth]
    test = json.loads(sh(prefix + cmd, capture_output=True, text=True, env=env).stdout)[0]
    return {"command": " ".join(str(c) for c in cmd).replace(str(ROOT) + "/", ""), "avg_ts": test["avg_ts"],
            "stddev_ts": test["stddev_ts"], "samples_ts": test["samples_ts"], "flash_attn": test.get("flash_attn"),
            "n_threads": test.get("n_threads"), "build_commit": test.get("build_commit"),
            "cpu_info": test.get("cpu_info")}


def runner(model: Path, threads: int, n_gen: int, reps: int, fa: str, depth: int, matched: bool, tmp: Path,
           prefix: list) -> dict:
    """bench.py on the same file. `matched`: the context llama-bench creates (depth + n_gen cells, so attention
    spans as many KV cells) and the same positions; else bench.py's default context (2048)."""
    out = tmp / "bench.json"
    if matched and depth == 0:  # a 1-token prompt takes position 0, so n_gen - 1 decodes fill the n_gen cells
        prompt, decode, context = 1, n_gen - 1, n_gen
    else:
        prompt, decode, context = max(1, depth), n_gen, (depth + n_gen if matched else None)
    cmd = [sys.executable, RUNNER, "--model", model, "--threads", threads, "--prompt-lengths", prompt,
           "--decode-tokens", decode, "--repeats", reps, "--no-accuracy", "--no-verify", "--out", out]
    if context:
        cmd += ["--context", context]
    if fa in ("on", "auto"):  # auto resolves to on for llama.cpp's CPU backend
        cmd.append("--flash-attn")
    sh(prefix + cmd, capture_output=True, text=True)
    r = json.loads(out.read_text())
    row = r["speed"][0]
    return {"command": " ".join(str(c) for c in cmd).replace(str(ROOT) + "/", "").replace(str(tmp) + "/", ""),
            "decode_tok_s": row["decode_tok_s"], "samples_ts": [round(decode / x, 2) for x in row["runs"]["decode_s"]],
            "runtime_clock_tok_s": row.get("decode_tok_s_runtime_clock"),
            "context": r["runtime"]["context"]}


def training_running() -> bool:
    """Whether another job shares the machine (the demo training, its model card, a test run)."""
    return subprocess.run(["pgrep", "-f", "demo/train.py|demo/card.py|pytest"], capture_output=True,
                          check=False).returncode == 0


def steady(run: dict, skip: int) -> list:
    """One invocation's repetitions after the first `skip` (the first ones at 2 threads run slow while the
    process warms up; dropping as many from both programs compares steady states)."""
    return run["samples_ts"][skip:]


def pooled(runs: list, skip: int = 0) -> list:
    return [x for run in runs for x in steady(run, skip)]


def paired_ratios(runs: dict, skip: int) -> list:
    """bench.py / llama-bench per round: the two invocations of a round ran back to back, so on a machine whose
    speed drifts over seconds (a VM whose vCPUs the host moves) each ratio compares like with like."""
    return [statistics.median(steady(b, skip)) / statistics.median(steady(a, skip))
            for a, b in zip(runs["llama_bench"], runs["bench_py_matched"])]


def bootstrap_ci(values: list, level: float = 0.95, n: int = 2000, seed: int = 0) -> tuple:
    """Percentile bootstrap interval of the median (a fixed seed: rerunning on the same data gives the same)."""
    import random

    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int((1 - level) / 2 * n)], meds[int((1 + level) / 2 * n) - 1]


def rounded(x, digits: int):
    return None if x is None else round(x, digits)


def quantile(values: list, q: float) -> float:
    values = sorted(values)
    return values[round(q * (len(values) - 1))]


def fmt(x, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def paired_cell(row: dict) -> str:
    if "ratio_paired" not in row:
        return "-"
    low, high = row["ratio_paired_ci95"]
    return f"{row['ratio_paired']:.3f} [{low:.3f}, {high:.3f}]"


def save(args, rows: list) -> str:
    """Write the results file (rows of earlier runs with other settings are kept) and return the table."""
    import llama_cpp

    first = rows[0]["runs"]["llama_bench"][0] if rows else {}
    result = {
        "goal": "bench.py decode tokens/s within 5 % of llama-bench on the same GGUF and thread count",
        "estimator": "ratio: median over all repetitions of all rounds; ratio_paired: median over rounds of "
                     "bench.py / llama-bench within the round (each invocation's median after skip_reps), with a "
                     "bootstrap 95 % interval; rounds alternate which program runs first",
        "llama_cpp_python": llama_cpp.__version__,
        "llama_bench": {"source": f"llama-cpp-python {VERSION} sdist, vendor/llama.cpp", "cmake": CMAKE_FLAGS,
                        "build_commit": first.get("build_commit")},
        "machine": {"cpu": first.get("cpu_info"), "nproc": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "n_gen": args.n_gen, "reps": args.reps, "rounds": args.rounds, "realtime": args.realtime,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():  # keep rows measured earlier under other settings (e.g. 2 threads after 1)
        old = json.loads(args.out.read_text())

        def key(r):
            return (r["model"], r["threads"], r["flash_attn"], r["depth"])

        new_keys = {key(r) for r in rows}
        result["rows"] = [r for r in old.get("rows", []) if key(r) not in new_keys and "ratio_matched" in r] + rows
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [(f"{'model':<20} {'thr':>3} {'fa':>4} {'depth':>5} {'llama-bench':>11} {'bench.py':>9} {'ratio':>6} "
             f"{'bench.py@2048':>13} {'ratio':>6} {'llama-bench, py lib':>19} {'busy':>5} {'load':>5} {'p90 ratio':>9} "
             f"{'paired [95 % CI]':>22}")]
    for r in result["rows"]:
        lines.append(f"{r['model']:<20} {r['threads']:>3} {r['flash_attn']:>4} {r['depth']:>5} "
                     f"{r['llama_bench_tok_s']:>11.0f} {r['bench_py_matched_tok_s']:>9.0f} {r['ratio_matched']:>6.3f} "
                     f"{fmt(r['bench_py_default_tok_s'], 13, 0)} {fmt(r['ratio_default_context'], 6, 3)} "
                     f"{fmt(r['llama_bench_python_lib_tok_s'], 19, 0)} {r['other_job_running']!s:>5} "
                     f"{r.get('load_average', 0):>5.2f} {r.get('ratio_matched_p90', float('nan')):>9.3f} "
                     f"{paired_cell(r):>22}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", type=Path, help="GGUF files (default: the demo teacher and student, Q4_K_M)")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts")
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of one llama-bench and one bench.py invocation, the order alternating")
    ap.add_argument("--skip-reps", type=int, default=0,
                    help="repetitions dropped from the start of every invocation of both programs (warm-up)")
    ap.add_argument("--fa", default="off,auto", help="flash attention settings to compare: off, on, auto")
    ap.add_argument("--depths", default="0", help="comma-separated KV depths (llama-bench -d; bench.py prompt length)")
    ap.add_argument("--realtime", action="store_true",
                    help="run both under `chrt -f 10` (a machine shared with another job: fewer preemptions)")
    ap.add_argument("--variants", default="matched,default,python-lib",
                    help="what runs besides llama-bench: matched (bench.py, same context), default (bench.py, "
                         "context 2048), python-lib (llama-bench on the Python package's libraries)")
    ap.add_argument("--jobs", type=int, default=1, help="cmake build jobs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    variants = set(args.variants.split(","))
    exe = build_llama_bench(args.jobs)
    models = args.models or ensure_models()
    tmp = WORK / "agree" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    prefix = ["chrt", "-f", "10"] if args.realtime else []
    rows = []
    for model in models:
        for threads in (int(t) for t in args.threads.split(",")):
            for fa in args.fa.split(","):
                for depth in (int(d) for d in args.depths.split(",")):
                    runs = {"llama_bench": [], "bench_py_matched": [], "bench_py_default": [],
                            "llama_bench_python_lib": []}
                    busy = training_running()
                    for rnd in range(args.rounds):
                        log(f"{model.name} t={threads} fa={fa} d={depth} round {rnd + 1}/{args.rounds}")
                        common = (model, threads, args.n_gen, args.reps, fa, depth)
                        if rnd % 2 == 0:  # ABBA: neither program always runs first
                            runs["llama_bench"].append(llama_bench(exe, *common, False, prefix))
                            runs["bench_py_matched"].append(runner(*common, True, tmp, prefix))
                        else:
                            runs["bench_py_matched"].append(runner(*common, True, tmp, prefix))
                            runs["llama_bench"].append(llama_bench(exe, *common, False, prefix))
                        if "default" in variants:
                            runs["bench_py_default"].append(runner(*common, False, tmp, prefix))
                        if "python-lib" in variants:
                            runs["llama_bench_python_lib"].append(llama_bench(exe, *common, True, prefix))
                        busy = busy or training_running()
                    runs = {k: v for k, v in runs.items() if v}
                    # median, and the 90th percentile: interference on a shared VM only ever slows a run down
                    skip = args.skip_reps
                    med = {k: statistics.median(pooled(v, skip)) for k, v in runs.items()}
                    p90 = {k: quantile(pooled(v, skip), 0.9) for k, v in runs.items()}
                    pairs = paired_ratios(runs, skip)
                    paired = statistics.median(pairs)
                    low, high = bootstrap_ci(pairs)
                    med.setdefault("bench_py_default", None)
                    med.setdefault("llama_bench_python_lib", None)
                    ref = med["llama_bench"]
                    rows.append({
                        "model": model.name, "bytes": model.stat().st_size, "threads": threads, "flash_attn": fa,
                        "depth": depth, **{f"{k}_tok_s": rounded(v, 1) for k, v in med.items()},
                        "ratio_matched": round(med["bench_py_matched"] / ref, 4),
                        # median over rounds of (bench.py / llama-bench) within a round, and its 95 % interval
                        "ratio_paired": round(paired, 4), "ratio_paired_ci95": [round(low, 4), round(high, 4)],
                        "skip_reps": skip, "reps": args.reps, "rounds": args.rounds,
                        "p90_tok_s": {k: round(v, 1) for k, v in p90.items()},
                        "ratio_matched_p90": round(p90["bench_py_matched"] / p90["llama_bench"], 4),
                        # llama.cpp's perf counters inside the same bench.py runs (what the ctypes calls add)
                        "bench_py_matched_runtime_clock_tok_s": round(statistics.median(
                            x["runtime_clock_tok_s"] or 0 for x in runs["bench_py_matched"]), 1),
                        "ratio_default_context": rounded(med["bench_py_default"] and med["bench_py_default"] / ref, 4),
                        "ratio_python_lib": rounded(med["llama_bench_python_lib"]
                                                    and med["llama_bench_python_lib"] / ref, 4),
                        "within_5_percent": abs(med["bench_py_matched"] / ref - 1) <= 0.05,
                        "paired_within_5_percent": 0.95 <= low and high <= 1.05,
                        "other_job_running": busy,  # another job shared the 2-core machine during this row
                        "runs": runs,
                    })
                    rows[-1]["load_average"] = round(os.getloadavg()[0], 2)  # 1-minute, at the end of the row
                    save(args, rows)
                    log(f"  llama-bench {ref:.0f} tok/s; bench.py {med['bench_py_matched']:.0f} (same context, "
                        f"ratio {med['bench_py_matched'] / ref:.3f}; paired {paired:.3f} [{low:.3f}, {high:.3f}])")
    table = save(args, rows)
    print(table)
    log(f"wrote {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
