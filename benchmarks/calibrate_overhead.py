#!/usr/bin/env python
"""Overhead of `edgeconv calibrate` over a plain teacher forward on the same tokens, and peak RSS of both.

1. Writes (or reuses) in --workdir a synthetic corpus (JSONL, a "text" field per document: pseudo-English
   words drawn with Zipf-like frequencies from a fixed list of made-up words, fixed seed), a byte-level BPE
   tokenizer trained on it with `tokenizers` (vocab = the model's vocab_size, eos `<|endoftext|>`), and a
   random Qwen3MoeForCausalLM built with `Qwen3MoeConfig` + `AutoModelForCausalLM.from_config`, saved with
   save_pretrained in bf16 (hidden 512, 32 experts of width 256, top-4, 8 layers, 8/2 heads of dim 64,
   vocab 8192 by default).
2. Plain forward, in its own process: `AutoModelForCausalLM.from_pretrained(dtype=float32,
   attn_implementation="eager")`, token ids from `edgeconv.io.text_data.token_sequences` (the very
   function calibrate uses, so the ids are identical: their sha256 is checked against calibrate's manifest),
   then `model.model(input_ids=batch, use_cache=False)` under torch.no_grad over the same batches (no final
   norm or lm_head: calibration stops before them too). Timed: the whole process, and the forward loop alone.
3. `edgeconv calibrate MODEL --data ... --tokens N --seq-len L --batch-size B --out OUT --no-progress --force`
   in its own process: the whole process's wall time, plus `seconds` from OUT/manifest.json (the
   layer-by-layer run alone: meta skeleton, embeddings, every layer's weights read and run).
4. Both are run --repeat times, alternating (forward, calibrate, forward, calibrate, ...); medians are
   reported. Peak RSS is ru_maxrss from os.wait4 of that one process, taken in a tiny fork/exec wrapper
   (see WRAPPER; the same as benchmarks/assemble_memory.py), largest of the runs.
5. Prints

     inner:  calibrate "seconds" / plain forward loop         goal <= 1.3  (the goal figure)
     whole:  calibrate process wall / plain forward process wall

   and writes the result block as JSON to benchmarks/results/calibrate_overhead.json.

With --profile, also runs `edgeconv.stages.calibrate.calibrate` once in-process under cProfile (in a
subprocess), saves the pstats to the workdir and prints the top functions by internal time.

Usage:  python benchmarks/calibrate_overhead.py [--tokens 32768] [--seq-len 512] [--batch-size 4]
                                                 [--repeat 3] [--profile] [--workdir benchmarks/_work]
MB here means 10^6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import edgeconv_command, run_measured  # noqa: E402  (shared with the other benchmarks)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MB = 1e6
GB = 1e9
GOAL = 1.3
GENERATOR_VERSION = 1  # bump when the generated corpus / tokenizer / model change, so old ones are not reused

SHAPE = dict(
    hidden_size=512,
    intermediate_size=2048,
    moe_intermediate_size=256,
    num_experts=32,
    num_experts_per_tok=4,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=8192,
)
EOS = "<|endoftext|>"


# --- synthetic corpus, tokenizer, model ---------------------------------------------------------------

def make_corpus(path: Path, words: int, seed: int) -> None:
    """JSONL documents of pseudo-English sentences: made-up words with Zipf-like frequencies."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "w", "st", "tr", "ch", "sh", "th",
              "pl", "gr"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "ee", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "m", "th"]
    vocab = set()
    while len(vocab) < 3000:
        vocab.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.choice([1, 1, 2, 2, 3]))))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    weights = [1.0 / (r + 1) for r in range(len(vocab))]
    punct = [".", ".", ".", "?", "!"]
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        while written < words:
            sentences = []
            for _ in range(rng.randint(3, 12)):
                n = rng.randint(4, 18)
                ws = rng.choices(vocab, weights, k=n)
                ws[0] = ws[0].capitalize()
                for i in range(1, n - 1):
                    if rng.random() < 0.06:
                        ws[i] += ","
                sentences.append(" ".join(ws) + rng.choice(punct))
                written += n
            fh.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    tmp.replace(path)


def corpus_texts(path: Path):
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)["text"]


def make_tokenizer(model_dir: Path, corpus: Path, vocab_size: int) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus_texts(corpus), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=4096)
    fast.save_pretrained(model_dir)


def make_model(model_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    config = Qwen3MoeConfig(
        **SHAPE,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=4096,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)


def prepare(work: Path, corpus_words: int, seed: int) -> tuple[Path, Path, dict]:
    """Corpus, tokenizer and model in `work`, reused when made by the same generator with the same settings."""
    model_dir = work / "calibrate-qwen3moe-random"
    corpus = work / "calibrate-corpus.jsonl"
    meta = {"generator_version": GENERATOR_VERSION, "shape": SHAPE, "corpus_words": corpus_words, "seed": seed,
            "dtype": "bfloat16"}
    meta_file = model_dir / "edgeconv_bench_meta.json"
    try:
        if json.loads(meta_file.read_text()) == meta and corpus.is_file():
            return model_dir, corpus, {"reused": True, "seconds": 0.0}
    except (OSError, json.JSONDecodeError):
        pass
    t0 = time.perf_counter()
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    print(f"generating corpus ({corpus_words:,} words), tokenizer and model in {work} ...", flush=True)
    make_corpus(corpus, corpus_words, seed)
    make_tokenizer(model_dir, corpus, SHAPE["vocab_size"])
    # The model in a child process, so this process never imports torch (its RSS does not matter, but the
    # wrapper measuring the children is forked from here and stays small either way).
    subprocess.run([sys.executable, __file__, "_make_model", str(model_dir), str(seed)], check=True)
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")  # last: marks it complete
    seconds = time.perf_counter() - t0
    print(f"generated in {seconds:.1f} s", flush=True)
    return model_dir, corpus, {"reused": False, "seconds": round(seconds, 2)}


# --- the plain forward (child process) ----------------------------------------------------------------

def plain_forward(model_dir: str, data: str, tokens: int, seq_len: int, batch_size: int, result: str) -> None:
    t0 = time.perf_counter()
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeconv.io.text_data import token_sequences

    t_import = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, _ = token_sequences(tokenizer, Path(data), tokens, seq_len)
    t_tok = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    t_load = time.perf_counter()
    batches = [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]
    checksum = 0.0
    with torch.no_grad():
        t_fwd0, cpu0 = time.perf_counter(), time.process_time()
        for batch in batches:
            out = model.model(input_ids=batch, use_cache=False).last_hidden_state
            checksum += float(out[:, -1].double().sum())
        t_fwd, cpu = time.perf_counter(), time.process_time() - cpu0
    with open(result, "w") as fh:
        json.dump({
            "tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "tokens": ids.numel(),
            "batches": len(batches),
            "import_s": t_import - t0,
            "tokenize_s": t_tok - t_import,
            "load_s": t_load - t_tok,
            "forward_s": t_fwd - t_fwd0,
            "forward_cpu_s": cpu,
            "in_process_s": t_fwd - t0,
            "torch_threads": torch.get_num_threads(),
            "checksum": checksum,
        }, fh)


def profile_calibrate(model_dir: str, data: str, tokens: int, seq_len: int, batch_size: int, out: str,
                      pstats_file: str) -> None:
    import cProfile
    import pstats

    from edgeconv.stages.calibrate import calibrate

    prof = cProfile.Profile()
    prof.enable()
    result = calibrate(model_dir, data, out, tokens=tokens, seq_len=seq_len, batch_size=batch_size, force=True,
                       progress=False)
    prof.disable()
    prof.dump_stats(pstats_file)
    print(f"calibrate seconds (manifest, under cProfile): {result.manifest['summary']['seconds']}")
    st = pstats.Stats(prof)
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(40)


# --- measuring ----------------------------------------------------------------------------------------




def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    versions = subprocess.run(
        [sys.executable, "-c", "import torch, transformers; print(torch.__version__, transformers.__version__, "
                               "torch.get_num_threads())"],
        capture_output=True, text=True, check=True).stdout.split()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "edgeconv"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "mem_total_gb": round(mem / GB, 1),
        "python": platform.python_version(),
        "torch": versions[0],
        "transformers": versions[1],
        "torch_threads": int(versions[2]),
        "platform": platform.platform(),
        "edgeconv_commit": commit.strip() + (" (+ uncommitted changes under edgeconv/)" if dirty else ""),
    }


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_runs(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_make_model":
        make_model(Path(sys.argv[2]), int(sys.argv[3]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_forward":
        a = sys.argv[2:]
        plain_forward(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_profile":
        a = sys.argv[2:]
        profile_calibrate(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5], a[6])
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per forward, for both (calibrate's default)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; medians are reported")
    ap.add_argument("--corpus-words", type=int, default=400_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also profile calibrate in-process with cProfile")
    ap.add_argument("--workdir", type=Path, default=HERE / "_work")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "calibrate_overhead.json")
    args = ap.parse_args()

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir, corpus, gen = prepare(work, args.corpus_words, args.seed)
    ckpt_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    stats_dir = work / "calibrate-stats"
    fwd_json = work / "plain-forward.json"

    fwd_cmd = [sys.executable, str(Path(__file__).resolve()), "_forward", str(model_dir), str(corpus),
               str(args.tokens), str(args.seq_len), str(args.batch_size), str(fwd_json)]
    cmd = edgeconv_command()
    cal_cmd = cmd + ["calibrate", str(model_dir), "--data", str(corpus), "--tokens", str(args.tokens),
                     "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--out", str(stats_dir),
                     "--no-progress", "--force"]
    imports = run_measured([sys.executable, "-c", "import edgeconv.cli, edgeconv.stages.calibrate"],
                           work / "import.log")

    fwds, cals = [], []
    for i in range(args.repeat):
        f = run_measured(fwd_cmd, work / f"plain-forward-{i + 1}.log")
        f["inner"] = json.loads(fwd_json.read_text())
        fwds.append(f)
        print(f"plain forward {i + 1}/{args.repeat}: process {f['wall_s']:.2f} s, forward loop "
              f"{f['inner']['forward_s']:.2f} s, peak RSS {f['peak_rss_bytes'] / MB:,.0f} MB; other processes "
              f"used {f['other_cpu_s']:.1f} CPU s meanwhile", flush=True)
        shutil.rmtree(stats_dir, ignore_errors=True)  # an existing result with the same key would be a no-op
        c = run_measured(cal_cmd, work / f"calibrate-{i + 1}.log")
        c["manifest"] = json.loads((stats_dir / "manifest.json").read_text())
        cals.append(c)
        print(f"calibrate     {i + 1}/{args.repeat}: process {c['wall_s']:.2f} s, layer-by-layer "
              f"{c['manifest']['summary']['seconds']:.2f} s, peak RSS {c['peak_rss_bytes'] / MB:,.0f} MB; "
              f"other processes used {c['other_cpu_s']:.1f} CPU s meanwhile", flush=True)

    manifest = cals[-1]["manifest"]
    same_tokens = all(f["inner"]["tokens_sha256"] == c["manifest"]["inputs"]["tokens_sha256"]
                      for f in fwds for c in cals)
    summary = manifest["summary"]
    f_wall = med([f["wall_s"] for f in fwds])
    f_loop = med([f["inner"]["forward_s"] for f in fwds])
    f_load = med([f["inner"]["load_s"] for f in fwds])
    c_wall = med([c["wall_s"] for c in cals])
    c_inner = med([c["manifest"]["summary"]["seconds"] for c in cals])
    f_rss = max(f["peak_rss_bytes"] for f in fwds)
    c_rss = max(c["peak_rss_bytes"] for c in cals)
    inner_ratio = c_inner / f_loop
    whole_ratio = c_wall / f_wall
    f_cpu = med([f["user_s"] + f["sys_s"] for f in fwds])
    c_cpu = med([c["user_s"] + c["sys_s"] for c in cals])
    cpu_ratio = c_cpu / f_cpu
    ntok = fwds[0]["inner"]["tokens"]
    layers = SHAPE["num_hidden_layers"]

    profile = None
    if args.profile:
        pstats_file = work / "calibrate.pstats"
        prof_log = work / "calibrate-profile.log"
        with open(prof_log, "w") as fh:
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "_profile", str(model_dir), str(corpus),
                            str(args.tokens), str(args.seq_len), str(args.batch_size),
                            str(work / "calibrate-stats-prof"), str(pstats_file)],
                           stdout=fh, stderr=subprocess.STDOUT, check=True)
        profile = {"pstats": str(pstats_file), "log": str(prof_log)}
        print(f"cProfile of calibrate: {prof_log} (pstats {pstats_file})", flush=True)

    result = {
        "command": "python benchmarks/calibrate_overhead.py " + " ".join(sys.argv[1:]),
        "calibrate_command": "edgeconv " + " ".join(cal_cmd[len(cmd):]).replace(str(work), "<workdir>"),
        "machine": machine(),
        "model": {
            "architecture": "Qwen3MoeForCausalLM (random, AutoModelForCausalLM.from_config)",
            **SHAPE,
            "saved_dtype": "bfloat16",
            "run_dtype": "float32 (both)",
            "attention": "eager (both)",
            "checkpoint_bytes": ckpt_bytes,
            "checkpoint_mb": round(ckpt_bytes / MB, 1),
            **gen,
        },
        "data": {"corpus": "synthetic pseudo-English JSONL", "tokens": ntok, "seq_len": args.seq_len,
                 "batch_size": args.batch_size, "same_token_ids": same_tokens,
                 "tokens_sha256": fwds[0]["inner"]["tokens_sha256"]},
        "repeat": args.repeat,
        "import_floor": {"wall_s": round(imports["wall_s"], 3),
                         "peak_rss_mb": round(imports["peak_rss_bytes"] / MB, 1)},
        "plain_forward": {
            "what": "from_pretrained(float32, eager) + model.model(input_ids=batch, use_cache=False), no lm_head",
            "process_wall_s": round(f_wall, 3),
            "process_wall_runs_s": [round(f["wall_s"], 3) for f in fwds],
            "forward_loop_s": round(f_loop, 3),
            "forward_loop_runs_s": [round(f["inner"]["forward_s"], 3) for f in fwds],
            "load_s": round(f_load, 3),
            "import_s": round(med([f["inner"]["import_s"] for f in fwds]), 3),
            "tokenize_s": round(med([f["inner"]["tokenize_s"] for f in fwds]), 3),
            "peak_rss_mb": round(f_rss / MB, 1),
            "peak_rss_runs_mb": [round(f["peak_rss_bytes"] / MB, 1) for f in fwds],
            "user_s": [round(f["user_s"], 2) for f in fwds],
            "other_processes_cpu_s": [round(f["other_cpu_s"], 1) for f in fwds],
        },
        "calibrate": {
            "process_wall_s": round(c_wall, 3),
            "process_wall_runs_s": [round(c["wall_s"], 3) for c in cals],
            "layer_by_layer_s": round(c_inner, 3),
            "layer_by_layer_runs_s": [c["manifest"]["summary"]["seconds"] for c in cals],
            "tokens_per_second": summary["tokens_per_second"],
            "unused_experts": summary["unused_experts"],
            "peak_rss_mb": round(c_rss / MB, 1),
            "peak_rss_runs_mb": [round(c["peak_rss_bytes"] / MB, 1) for c in cals],
            "user_s": [round(c["user_s"], 2) for c in cals],
            "other_processes_cpu_s": [round(c["other_cpu_s"], 1) for c in cals],
        },
        "goals": {
            "inner_ratio": round(inner_ratio, 3),
            "whole_ratio": round(whole_ratio, 3),
            "cpu_ratio": round(cpu_ratio, 3),
            "goal": GOAL,
            "goal_figure": "inner_ratio",
            "met": inner_ratio <= GOAL,
        },
        "profile": profile,
    }

    def yes(ok):
        return "MET" if ok else "MISSED"

    m = result["machine"]
    lines = [
        "== edgeconv calibrate: overhead over a plain teacher forward ==",
        f"model          random Qwen3-MoE, {layers} layers x {SHAPE['num_experts']} experts of "
        f"{SHAPE['moe_intermediate_size']} "
        f"(top-{SHAPE['num_experts_per_tok']}), hidden {SHAPE['hidden_size']}, vocab {SHAPE['vocab_size']}, "
        f"bf16 safetensors {ckpt_bytes / MB:,.0f} MB ({'reused' if gen['reused'] else 'generated'}); "
        "run in fp32, eager attention",
        f"machine        {m['cpus']} CPUs, {m['mem_total_gb']} GB RAM, torch {m['torch']} "
        f"({m['torch_threads']} threads), "
        f"transformers {m['transformers']}",
        f"data           {ntok:,} tokens = {ntok // args.seq_len} x {args.seq_len}, batch {args.batch_size}; "
        f"identical token ids: {'yes' if same_tokens else 'NO'}",
        f"plain forward  loop {f_loop:.2f} s  median of {fmt_runs([f['inner']['forward_s'] for f in fwds])} s "
        f"(model.model, no lm_head); process {f_wall:.2f} s  median of {fmt_runs([f['wall_s'] for f in fwds])} s "
        f"(from_pretrained {f_load:.2f} s)",
        f"calibrate      layer-by-layer {c_inner:.2f} s  median of "
        f"{fmt_runs([c['manifest']['summary']['seconds'] for c in cals])} s (manifest 'seconds'); "
        f"process {c_wall:.2f} s  median of {fmt_runs([c['wall_s'] for c in cals])} s",
        f"contention     CPU s used by other processes during each run: plain forward "
        f"{fmt_runs([f['other_cpu_s'] for f in fwds])}, calibrate {fmt_runs([c['other_cpu_s'] for c in cals])}",
        f"  import floor {imports['wall_s']:.2f} s / {imports['peak_rss_bytes'] / MB:,.0f} MB "
        "(python + torch + edgeconv import)",
        f"peak RSS       plain forward {f_rss / MB:,.0f} MB, calibrate {c_rss / MB:,.0f} MB "
        f"(largest of {args.repeat} runs each, "
        f"wait4 ru_maxrss); checkpoint {ckpt_bytes / MB:,.0f} MB bf16 = {2 * ckpt_bytes / MB:,.0f} MB as fp32",
        f"inner ratio    {inner_ratio:.2f}   calibrate 'seconds' / plain forward loop     "
        f"goal <= {GOAL}  {yes(inner_ratio <= GOAL)}",
        f"whole ratio    {whole_ratio:.2f}   calibrate process / plain forward process    (not the goal figure)",
        f"CPU ratio      {cpu_ratio:.2f}   calibrate process CPU s / plain forward process CPU s "
        f"({c_cpu:.1f} / {f_cpu:.1f}; "
        f"less sensitive to other load)",
    ]
    print("\n".join(lines))
    result["printed"] = lines
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if same_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
