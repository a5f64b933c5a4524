#!/usr/bin/env python
"""Export cost and exported speed: GGUF and ONNX export wall time / peak RSS against model size, and llama.cpp
decode tokens/s of a dense student against its MoE teacher at F16, Q8_0 and Q4_K_M, all in one run.

    python benchmarks/export.py [--workdir benchmarks/_work/export] [--decode-tokens 128]

The teacher is a random Qwen3-MoE (hidden 512, 16 experts of width 512, top-2, 8 layers, vocab 8192; widths
multiples of 256 so every k-quant applies) with a byte-level BPE trained here; the student is its top-2 dense
conversion (`edgeconv plan --experts first:2` + `edgeconv assemble`: which experts are kept does not change
speed). Every export runs through `edgeconv export` in its own process (parity check included, as users run
it). Decode speed: prompt of 32 tokens, then `--decode-tokens` greedy steps of one token, timed apart from
the prefill, 2 threads, each GGUF in its own process. Results: stdout and benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import edgeconv_command, machine, measured  # noqa: E402

ROOT = Path(__file__).resolve().parent
QUANTS = ["F16", "Q8_0", "Q4_K_M"]

DECODE = r"""
import json, sys, time
import llama_cpp
from llama_cpp._logger import set_verbose
set_verbose(False)
path, n_decode = sys.argv[1], int(sys.argv[2])
llm = llama_cpp.Llama(model_path=path, n_ctx=n_decode + 64, n_threads=2, verbose=False)
prompt = list(range(10, 42))
t0 = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - t0
tok = int(llm.scores[len(prompt) - 1].argmax())
t0 = time.perf_counter()
for _ in range(n_decode):
    llm.eval([tok])
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
decode = time.perf_counter() - t0
print(json.dumps({"prefill_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": n_decode / decode}))
"""


def synthetic_text(path: Path, words: int = 200_000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "me", "sun", "lo", "an", "ber", "qui", "del", "ost", "ur", "ne", "py", "zo", "ath"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    with open(path, "w") as fh:
        for _ in range(words // 50):
            fh.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(50)) + "."}) + "\n")
    return path


def build_teacher(out: Path, corpus: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                            num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                            num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=2048,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.05 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    model.save_pretrained(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(out)


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "_work" / "export")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--skip-onnx", action="store_true")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ec = edgeconv_command()
    corpus = work / "corpus.jsonl"
    if not corpus.exists():
        synthetic_text(corpus)
    teacher, student = work / "teacher", work / "student"
    if not (teacher / "config.json").exists():
        build_teacher(teacher, corpus)
    if not (student / "manifest.json").exists():
        subprocess.run([*ec, "plan", str(teacher), "--experts", "first:2", "--out", str(work / "plan.json")],
                       check=True)
        subprocess.run([*ec, "assemble", str(teacher), "--plan", str(work / "plan.json"), "--out", str(student),
                        "--force", "--no-progress"], check=True)
    results = {"machine": machine(), "models": {}, "gguf": [], "onnx": [], "decode": []}
    for name, path in (("teacher", teacher), ("student", student)):
        results["models"][name] = {"bytes": sum(p.stat().st_size for p in path.glob("*.safetensors"))}
    for name, path in (("teacher", teacher), ("student", student)):
        for quant in QUANTS:
            out = work / "gguf" / f"{name}-{quant}.gguf"
            run = measured([*ec, "export", str(path), "--quant", quant, "--out", str(out), "--force"],
                           work / f"export-{name}-{quant}.log")
            if run["returncode"]:
                print(run["output"], file=sys.stderr)
                return 1
            parity = json.loads(out.with_suffix(".parity.json").read_text())
            results["gguf"].append({"model": name, "quant": quant, "wall_s": run["wall_s"],
                                    "peak_rss_bytes": run["peak_rss_bytes"], "artifact_bytes": out.stat().st_size,
                                    "parity_ppl_ratio": parity["ppl_ratio"], "type_mix": parity["type_mix"]})
            speed = subprocess.run([sys.executable, "-c", DECODE, str(out), str(args.decode_tokens)], check=True,
                                   capture_output=True, text=True)
            results["decode"].append({"model": name, "quant": quant,
                                      **json.loads(speed.stdout.strip().splitlines()[-1])})
    if not args.skip_onnx:
        for name, path in (("teacher", teacher), ("student", student)):
            out = work / "onnx" / f"{name}-fp32"
            run = measured([*ec, "export", str(path), "--format", "onnx", "--quant", "fp32", "--out", str(out),
                            "--force"], work / f"export-onnx-{name}.log")
            entry = {"model": name, "precision": "fp32", "wall_s": run["wall_s"],
                     "peak_rss_bytes": run["peak_rss_bytes"], "returncode": run["returncode"]}
            if run["returncode"] == 0:
                entry["artifact_bytes"] = size_of(out)
            else:
                entry["error"] = run["output"].splitlines()[-1] if run["output"] else "failed"
            results["onnx"].append(entry)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "export.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    return 0


def report(r: dict) -> str:
    mb = lambda b: f"{b / 1e6:,.1f} MB"  # noqa: E731
    lines = [
        "== edgeconv export: cost and exported speed ==",
        f"machine        {r['machine']['cpus']} CPUs, {r['machine']['ram_gb']} GB RAM, torch {r['machine']['torch']}",
        f"teacher        Qwen3-MoE random, 16 experts top-2, {mb(r['models']['teacher']['bytes'])} safetensors (fp32)",
        f"student        its top-2 dense conversion, {mb(r['models']['student']['bytes'])} safetensors (fp32)",
        "",
        "GGUF export (write + llama.cpp quantize + parity check), one process each:",
        f"  {'model':8} {'quant':7} {'wall s':>7} {'peak RSS':>10} {'RSS/size':>9} {'artifact':>10} {'ppl ratio':>9}",
    ]
    for g in r["gguf"]:
        size = r["models"][g["model"]]["bytes"]
        lines.append(f"  {g['model']:8} {g['quant']:7} {g['wall_s']:7.1f} {mb(g['peak_rss_bytes']):>10} "
                     f"{g['peak_rss_bytes'] / size:9.2f} {mb(g['artifact_bytes']):>10} {g['parity_ppl_ratio']:9.4f}")
    if r["onnx"]:
        lines += ["", "ONNX export (optimum + parity check):"]
        for o in r["onnx"]:
            if o["returncode"] == 0:
                size = r["models"][o["model"]]["bytes"]
                lines.append(f"  {o['model']:8} {o['precision']:7} {o['wall_s']:7.1f} {mb(o['peak_rss_bytes']):>10} "
                             f"{o['peak_rss_bytes'] / size:9.2f} {mb(o['artifact_bytes']):>10}")
            else:
                lines.append(f"  {o['model']:8} {o['precision']:7} failed: {o['error']}")
    lines += ["", "llama.cpp decode, 2 threads (tokens/s), student vs teacher at the same quantization:"]
    by = {(d["model"], d["quant"]): d for d in r["decode"]}
    for q in QUANTS:
        s, t = by[("student", q)], by[("teacher", q)]
        lines.append(f"  {q:7} student {s['decode_tokens_per_s']:8.1f}  teacher {t['decode_tokens_per_s']:8.1f}  "
                     f"ratio {s['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}x   "
                     f"(prefill {s['prefill_tokens_per_s']:.0f} vs {t['prefill_tokens_per_s']:.0f} tokens/s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
