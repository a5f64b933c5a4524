#!/usr/bin/env python
"""Memory and time of `edgeconv assemble` on a synthetic multi-GB Qwen3-MoE checkpoint.

1. Writes (or reuses) a random bf16 Qwen3MoeForCausalLM checkpoint of at least --size-gb GB, sharded
   (~500 MB shards + model.safetensors.index.json), streamed tensor by tensor with edgeconv's
   ShardedWriter so the generator holds one tensor at a time.
2. Warm-up: reads every shard once (so the page cache is in the same, warm state for both measurements).
3. Times reading every byte of every shard once (16 MB readinto into one reused buffer): the "read time".
   safetensors.torch.load_file is timed too, for reference only: it maps the file and reads nothing until
   a tensor is touched.
4. `edgeconv plan CKPT --experts first:TOP_K`, then `edgeconv assemble ... --no-progress` in a subprocess:
   wall time, and peak RSS from os.wait4's rusage of that one process (exact ru_maxrss, taken in a small
   wrapper process, see WRAPPER), cross-checked by psutil polling every 20 ms. The same is measured for a
   bare `import edgeconv.stages.assemble` (python + torch import: the floor of any edgeconv command).
5. Secondary, unless --no-cold: the shards are evicted from the page cache (os.sync + posix_fadvise
   DONTNEED) and the read and the assemble are timed again, cold.
6. Checks the output (config, index, shards, tensor count, sizes) and prints

     peak RSS / checkpoint size          goal <= 0.10
     assemble wall time / read time      goal <= 1.5

   The result block is also written as JSON to benchmarks/results/assemble_memory.json.

Usage:  python benchmarks/assemble_memory.py [--size-gb 5] [--workdir benchmarks/_work] [--keep]
MB here means 10^6 bytes, GB 10^9 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import WRAPPER, edgeconv_command  # noqa: E402  (shared with the other benchmarks)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MB = 1e6
GB = 1e9
RSS_GOAL = 0.10
TIME_GOAL = 1.5
GENERATOR_VERSION = 2  # bump when the generated checkpoint changes, so old ones are not reused


# --- synthetic checkpoint ----------------------------------------------------------------------------

BASE_SHAPE = dict(
    hidden_size=1024,
    moe_intermediate_size=512,
    intermediate_size=4096,
    num_experts=64,
    num_experts_per_tok=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=32768,
)
BYTES_PER_PARAM = 2  # bf16


def layer_params(s: dict) -> int:
    h, i, e, hd = s["hidden_size"], s["moe_intermediate_size"], s["num_experts"], s["head_dim"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    attn = h * q + 2 * h * kv + q * h + 2 * hd
    return attn + e * 3 * i * h + e * h + 2 * h


def fixed_params(s: dict) -> int:
    return 2 * s["vocab_size"] * s["hidden_size"] + s["hidden_size"]


def make_config(size_gb: float) -> dict:
    s = dict(BASE_SHAPE)
    target = size_gb * GB / BYTES_PER_PARAM
    layers = max(1, math.ceil((target - fixed_params(s)) / layer_params(s)))
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "decoder_sparse_step": 1,
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "hidden_size": s["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate_size"],
        "max_position_embeddings": 4096,
        "max_window_layers": layers,
        "mlp_only_layers": [],
        "moe_intermediate_size": s["moe_intermediate_size"],
        "norm_topk_prob": True,
        "num_attention_heads": s["num_attention_heads"],
        "num_experts": s["num_experts"],
        "num_experts_per_tok": s["num_experts_per_tok"],
        "num_hidden_layers": layers,
        "num_key_value_heads": s["num_key_value_heads"],
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": s["vocab_size"],
    }


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor, in module order, named as transformers 4.x saves Qwen3MoeForCausalLM."""
    h, i, e, hd = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (q, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, q)),
            (f"{p}.self_attn.q_norm.weight", (hd,)),
            (f"{p}.self_attn.k_norm.weight", (hd,)),
            (f"{p}.mlp.gate.weight", (e, h)),
        ]
        for x in range(e):
            out += [
                (f"{p}.mlp.experts.{x}.gate_proj.weight", (i, h)),
                (f"{p}.mlp.experts.{x}.up_proj.weight", (i, h)),
                (f"{p}.mlp.experts.{x}.down_proj.weight", (h, i)),
            ]
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    return out


def checkpoint_complete(ckpt: Path, meta: dict) -> bool:
    """A checkpoint from an earlier run is reused only if it was finished with the same config."""
    try:
        if json.loads((ckpt / "edgeconv_bench_meta.json").read_text()) != meta:
            return False
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    for name in set(index["weight_map"].values()):
        path = ckpt / name
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        if path.stat().st_size != 8 + n + max(v["data_offsets"][1] for v in header.values()):
            return False
    return True


def generate(ckpt: Path, config: dict, shard_bytes: int, seed: int) -> dict:
    import resource

    import torch

    from edgeconv.io.safetensors_writer import ShardedWriter, TensorSpec

    meta = {"generator_version": GENERATOR_VERSION, "config": config, "shard_bytes": shard_bytes, "seed": seed}
    if checkpoint_complete(ckpt, meta):
        return {"reused": True, "seconds": 0.0}
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir(parents=True)
    shapes = tensor_shapes(config)
    specs = [TensorSpec(n, s, torch.bfloat16) for n, s in shapes]
    print(f"generating {sum(s.nbytes for s in specs) / GB:.2f} GB checkpoint in {ckpt} ...", flush=True)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    writer = ShardedWriter(ckpt, specs, shard_bytes)
    try:
        for spec in specs:
            if spec.name.endswith("norm.weight"):
                t = torch.ones(spec.shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(spec.shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
            writer.write(spec.name, t)
            del t
        writer.close()
    finally:
        writer.abort()
    (ckpt / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (ckpt / "edgeconv_bench_meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks it complete
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"generated in {seconds:.1f} s, generator peak RSS {peak / MB:.0f} MB", flush=True)
    return {"reused": False, "seconds": round(seconds, 2), "generator_peak_rss_mb": round(peak / MB, 1)}


# --- measurements ------------------------------------------------------------------------------------

def shard_paths(ckpt: Path) -> list[Path]:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return [ckpt / n for n in sorted(set(index["weight_map"].values()))]


def read_raw(paths: list[Path], chunk: int = 16 << 20) -> float:
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


def evict(paths: list[Path]) -> None:
    """Flush dirty pages, then ask the kernel to drop these files from the page cache (no root needed)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_load_file(paths: list[Path]) -> float:
    """safetensors.torch.load_file per shard. NB: it maps the file; pages are only read when touched."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    for path in paths:
        tensors = load_file(path)
        del tensors
    return time.perf_counter() - t0


def fmt_runs(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "] s"





def run_measured(cmd: list[str], log: Path, poll_s: float = 0.02) -> dict:
    """Run cmd: wall time, exact peak RSS (wait4 rusage of that one process) and a psutil-polled RSS timeline."""
    import psutil

    usage_file = log.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(usage_file), *cmd], stdout=fh,
                                stderr=subprocess.STDOUT)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def poll():
            try:
                wrapper = psutil.Process(proc.pid)
                while not stop.is_set() and not (children := wrapper.children()):
                    time.sleep(0.002)
                if stop.is_set():
                    return
                child = children[0]
                while not stop.is_set():
                    rss = child.memory_info().rss
                    if rss:
                        samples.append((time.perf_counter() - t0, rss))
                    time.sleep(poll_s)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                pass

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        proc.wait()
        stop.set()
        poller.join()
    usage = json.loads(usage_file.read_text())
    polled_peak = max((r for _, r in samples), default=0)
    peak_at = next((t for t, r in samples if r == polled_peak), None)
    return {
        "returncode": proc.returncode,
        "wall_s": usage["wall_s"],  # fork to exit, as timed by the wrapper
        "peak_rss_bytes": usage["maxrss_kib"] * 1024,  # Linux: KiB
        "user_s": usage["user_s"],
        "sys_s": usage["sys_s"],
        "polled_peak_rss_bytes": polled_peak,
        "polled_peak_at_s": peak_at,
        "samples": samples,
        "output": log.read_text(errors="replace").strip(),
    }


def check_output(out: Path, config: dict, top_k: int) -> dict:
    """Config, index, every shard present with the size its header implies, the expected tensor count."""
    dense = json.loads((out / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    problems = []
    if dense.get("architectures") != ["Qwen3ForCausalLM"] or dense.get("model_type") != "qwen3":
        problems.append(f"dense config is {dense.get('architectures')} / {dense.get('model_type')}")
    width = top_k * config["moe_intermediate_size"]
    if dense.get("intermediate_size") != width:
        problems.append(f"intermediate_size {dense.get('intermediate_size')} != {width}")
    # Per layer: q,k,v,o, q_norm, k_norm, 2 layer norms, gate/up/down; plus embed, norm, lm_head.
    expected = 11 * config["num_hidden_layers"] + 3
    if len(weight_map) != expected:
        problems.append(f"{len(weight_map)} tensors in the index, expected {expected}")
    header_total, file_total, seen = 0, 0, 0
    for name in sorted(set(weight_map.values())):
        path = out / name
        if not path.is_file():
            problems.append(f"missing shard {name}")
            continue
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        seen += len(header)
        data = max(v["data_offsets"][1] for v in header.values())
        header_total += data
        file_total += path.stat().st_size
        if path.stat().st_size != 8 + n + data:
            problems.append(f"{name}: {path.stat().st_size} bytes, header implies {8 + n + data}")
        if any(weight_map.get(t) != name for t in header):
            problems.append(f"{name}: holds tensors the index places elsewhere")
    if seen != len(weight_map):
        problems.append(f"shards hold {seen} tensors, index lists {len(weight_map)}")
    if index.get("metadata", {}).get("total_size") != header_total:
        problems.append(f"index total_size {index.get('metadata', {}).get('total_size')} != {header_total}")
    return {
        "ok": not problems,
        "problems": problems,
        "tensors": len(weight_map),
        "expected_tensors": expected,
        "shards": len(set(weight_map.values())),
        "dense_width": dense.get("intermediate_size"),
        "weights_bytes": file_total,
        "dir_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
    }


def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {
        "cpus": os.cpu_count(),
        "mem_total_gb": round(mem / GB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "edgeconv_commit": commit.strip(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=5.0, help="smallest checkpoint size in GB (>= 4)")
    ap.add_argument("--workdir", type=Path, default=HERE / "_work")
    ap.add_argument("--shard-mb", type=int, default=500, help="input shard size in MB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the assemble output (the input is always kept)")
    ap.add_argument("--repeat", type=int, default=3, help="warm reads and warm assembles to take the median of")
    ap.add_argument("--no-cold", action="store_true", help="skip the secondary cold-cache read and assemble")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "assemble_memory.json")
    args = ap.parse_args()
    if args.size_gb < 4:
        ap.error("--size-gb must be at least 4")

    config = make_config(args.size_gb)
    top_k = config["num_experts_per_tok"]
    work = args.workdir.resolve()
    ckpt = work / f"qwen3moe-synthetic-{args.size_gb:g}gb"
    out = work / "assemble-out"
    plan = work / "plan.json"
    work.mkdir(parents=True, exist_ok=True)

    gen = generate(ckpt, config, int(args.shard_mb * MB), args.seed)
    paths = shard_paths(ckpt)
    ckpt_bytes = sum(p.stat().st_size for p in paths)
    print(f"checkpoint: {len(paths)} shards, {ckpt_bytes / MB:,.0f} MB, {config['num_hidden_layers']} layers "
          f"x {config['num_experts']} experts", flush=True)

    os.sync()  # the generator's dirty pages must not be written back during the timings
    warmup_s = read_raw(paths)  # puts every shard in the page cache: the timings below all run warm
    raws = [read_raw(paths) for _ in range(args.repeat)]
    raw_s = statistics.median(raws)
    load_s = read_load_file(paths)
    print(f"read (warm): {fmt_runs(raws)} every byte; load_file {load_s:.2f} s (mmap, lazy); "
          f"warm-up pass {warmup_s:.2f} s", flush=True)

    cmd = edgeconv_command()
    imports = run_measured([sys.executable, "-c", "import edgeconv.cli, edgeconv.stages.assemble"],
                           work / "import.log")
    planned = run_measured(cmd + ["plan", str(ckpt), "--experts", f"first:{top_k}", "--out", str(plan)],
                           work / "plan.log")
    if planned["returncode"] != 0:
        print(planned["output"], file=sys.stderr)
        return 1
    assemble_cmd = cmd + ["assemble", str(ckpt), "--plan", str(plan), "--out", str(out), "--no-progress"]

    def assemble_once(log_name: str) -> dict:
        shutil.rmtree(out, ignore_errors=True)  # an existing output would make assemble a no-op
        os.sync()
        run = run_measured(assemble_cmd, work / log_name)
        if run["returncode"] != 0:
            print(run["output"], file=sys.stderr)
            raise SystemExit(1)
        return run

    runs = []
    for i in range(args.repeat):
        runs.append(assemble_once(f"assemble-{i + 1}.log"))
        print(f"assemble (warm) {i + 1}/{args.repeat}: {runs[-1]['wall_s']:.2f} s, "
              f"peak RSS {runs[-1]['peak_rss_bytes'] / MB:.0f} MB", flush=True)
    walls = [r["wall_s"] for r in runs]
    run = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]  # the median run (by wall time)
    peak_rss = max(r["peak_rss_bytes"] for r in runs)  # the worst run, for memory
    check = check_output(out, config, top_k)
    cold = None
    if not args.no_cold:
        # Secondary figures: the shards evicted from the page cache (posix_fadvise DONTNEED) before each.
        evict(paths)
        cold_read_s = read_raw(paths)
        evict(paths)
        cold_run = assemble_once("assemble-cold.log")
        cold = {
            "read_s": round(cold_read_s, 3),
            "assemble_wall_s": round(cold_run["wall_s"], 3),
            "assemble_peak_rss_mb": round(cold_run["peak_rss_bytes"] / MB, 1),
            "assemble_over_read": round(cold_run["wall_s"] / cold_read_s, 3),
        }
        print(f"cold: read {cold_read_s:.2f} s, assemble {cold_run['wall_s']:.2f} s", flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)

    rss_ratio = peak_rss / ckpt_bytes
    time_ratio = run["wall_s"] / raw_s
    # RSS timeline, thinned to ~40 points, for finding where the peak is.
    step = max(1, len(run["samples"]) // 40)
    timeline = [(round(t, 2), round(r / MB)) for t, r in run["samples"][::step]]
    result = {
        "command": "python benchmarks/assemble_memory.py " + " ".join(sys.argv[1:]),
        "assemble_command": "edgeconv " + " ".join(assemble_cmd[len(cmd):]).replace(str(work), "<workdir>"),
        "machine": machine(),
        "checkpoint": {
            "architecture": "Qwen3MoeForCausalLM",
            "layers": config["num_hidden_layers"],
            "experts": config["num_experts"],
            "top_k": top_k,
            "hidden_size": config["hidden_size"],
            "moe_intermediate_size": config["moe_intermediate_size"],
            "shards": len(paths),
            "bytes": ckpt_bytes,
            "mb": round(ckpt_bytes / MB, 1),
            **gen,
        },
        "page_cache": "warm: every shard read once (after os.sync) before the timed read and before assemble",
        "repeat": args.repeat,
        "read": {
            "raw_read_s": round(raw_s, 3),
            "raw_read_runs_s": [round(x, 3) for x in raws],
            "load_file_lazy_s": round(load_s, 3),
            "warmup_read_s": round(warmup_s, 3),
            "note": "raw_read_s reads every byte (16 MB readinto); safetensors load_file maps the file and "
                    "reads nothing until a tensor is touched, so it is not a read time",
        },
        "import_floor": {"wall_s": round(imports["wall_s"], 3), "peak_rss_mb": round(imports["peak_rss_bytes"] / MB, 1),
                         "what": "python -c 'import edgeconv.cli, edgeconv.stages.assemble' (torch import)"},
        "plan": {"wall_s": round(planned["wall_s"], 3), "peak_rss_mb": round(planned["peak_rss_bytes"] / MB, 1)},
        "assemble": {
            "wall_s": round(run["wall_s"], 3),
            "wall_runs_s": [round(x, 3) for x in walls],
            "peak_rss_runs_mb": [round(r["peak_rss_bytes"] / MB, 1) for r in runs],
            "note": "wall_s, user_s, sys_s, timeline: the median run; peak_rss_mb: the largest of all runs",
            "user_s": round(run["user_s"], 3),
            "sys_s": round(run["sys_s"], 3),
            "peak_rss_mb": round(peak_rss / MB, 1),
            "polled_peak_rss_mb": round(run["polled_peak_rss_bytes"] / MB, 1),
            "polled_peak_at_s": None if run["polled_peak_at_s"] is None else round(run["polled_peak_at_s"], 2),
            "rss_timeline_s_mb": timeline,
            "stdout": run["output"],
        },
        "cold": cold,
        "output": check,
        "goals": {
            "peak_rss_over_checkpoint": round(rss_ratio, 4),
            "peak_rss_goal": RSS_GOAL,
            "peak_rss_met": rss_ratio <= RSS_GOAL,
            "assemble_over_read": round(time_ratio, 3),
            "time_goal": TIME_GOAL,
            "time_met": time_ratio <= TIME_GOAL,
        },
    }

    def yes(ok):
        return "MET" if ok else "MISSED"

    g = result["goals"]
    lines = [
        "== edgeconv assemble: memory and time ==",
        f"checkpoint     Qwen3-MoE synthetic, {config['num_hidden_layers']} layers x {config['num_experts']} experts "
        f"(top-{top_k}), {len(paths)} shards, {ckpt_bytes / MB:,.0f} MB ({'reused' if gen['reused'] else 'generated'})",
        f"machine        {result['machine']['cpus']} CPUs, {result['machine']['mem_total_gb']} GB RAM, "
        f"torch {result['machine']['torch']}",
        "page cache     warm for both (os.sync, then every shard read once before timing)",
        f"read all       {raw_s:.2f} s  median of {fmt_runs(raws)}: every byte of every shard, "
        f"{ckpt_bytes / MB / raw_s:,.0f} MB/s",
        f"assemble       {run['wall_s']:.2f} s  median of {fmt_runs(walls)} wall; median run "
        f"{run['user_s']:.2f} s user, {run['sys_s']:.2f} s sys; plan first:{top_k}, "
        f"dense width {check['dense_width']}",
        f"  of which     {imports['wall_s']:.2f} s / {imports['peak_rss_bytes'] / MB:,.0f} MB "
        "is python + torch import alone",
        f"peak RSS       {peak_rss / MB:,.0f} MB, largest of {args.repeat} runs (wait4 ru_maxrss; psutil 20 ms "
        f"polling {max(r['polled_peak_rss_bytes'] for r in runs) / MB:,.0f} MB)",
        f"output         {check['shards']} shard(s), {check['tensors']} tensors, {check['weights_bytes'] / MB:,.0f} MB "
        f"weights, check {'ok' if check['ok'] else 'FAILED: ' + '; '.join(check['problems'])}",
        f"RSS / size     {g['peak_rss_over_checkpoint']:.3f}   goal <= {RSS_GOAL:.2f}  {yes(g['peak_rss_met'])}",
        f"time / read    {g['assemble_over_read']:.2f}   goal <= {TIME_GOAL:.1f}   {yes(g['time_met'])}",
    ]
    if cold:
        lines.append(f"cold cache     read {cold['read_s']:.2f} s, assemble {cold['assemble_wall_s']:.2f} s, "
                     f"ratio {cold['assemble_over_read']:.2f} "
                     "(shards evicted with fadvise DONTNEED; not the goal figure)")
    print("\n".join(lines))
    result["printed"] = lines
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
