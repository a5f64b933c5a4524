"""The shipped demo models' card: metrics of the teacher, an untrained copy, the default dense student (before
any distillation), the dense demo model, and the same models in llama.cpp; the teacher's routing histogram on
held-out text.

    python benchmarks/demo/card.py [--workdir benchmarks/_work/card]

Writes benchmarks/results/demo_card.json, demo_card.md and demo_routing.png. Uses only the library and the
shipped assets: every number here can be reproduced on a fresh clone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from measure import machine  # noqa: E402

from edgeconv.demo import ASSETS, EVAL_DATA, demo_path  # noqa: E402
from edgeconv.evaluation.suite import EvalReport, evaluate, summary_table  # noqa: E402

RESULTS = Path(__file__).parents[1] / "results"


def untrained(name: str, out: Path) -> Path:
    """The same architecture and tokenizer with freshly initialised weights (seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (out / "config.json").exists():
        src = demo_path(name)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def cached_eval(label: str, path: Path, cache: Path) -> EvalReport:
    """A model's report, reused while the model's files are unchanged (the card is rebuilt piecemeal)."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    saved = cache / f"{label.replace(' ', '_').replace('/', '_')}.json"
    if saved.exists():
        entry = json.loads(saved.read_text())
        if entry["stamp"] == json.loads(json.dumps(stamp)):
            return EvalReport(**entry["report"])
    report = evaluate(path, EVAL_DATA, show_progress=False)
    cache.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"stamp": stamp, "report": report.model_dump()}))
    return report


def routing(work: Path) -> dict:
    """Per layer and expert, the share of held-out tokens routed to it (each token picks top-k experts), over
    Shakespeare, Python docs and skills."""
    from edgeconv.evaluation.eval_data import EvalData, held_out_mix
    from edgeconv.stages.calibrate import calibrate

    docs = held_out_mix(EvalData.load(EVAL_DATA))
    text = work / "routing-data.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_path("demo-moe"))
    available = sum(len(tok(d)["input_ids"]) for d in docs)
    result = calibrate(demo_path("demo-moe"), text, work / "routing-stats", tokens=available // 256 * 256 - 256,
                       seq_len=256, progress=False)
    stats = result.stats()
    tokens = stats.data["tokens"]
    return {str(i): (layer.count / tokens).tolist() for i, layer in sorted(stats.layers.items())}


def plot_routing(shares: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(shares, key=int)
    fig, axes = plt.subplots(len(layers), 1, figsize=(7, 1.3 * len(layers)), sharex=True, sharey=True)
    for ax, layer in zip(axes, layers):
        share = [100 * s for s in shares[layer]]
        ax.bar(range(len(share)), share, color="tab:blue")
        ax.axhline(1.0, color="tab:red", lw=0.8, ls="--")
        ax.axhline(100 * 2 / len(share), color="gray", lw=0.6, ls=":")
        ax.set_ylabel(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("expert")
    axes[-1].set_xticks(range(len(shares[layers[0]])))
    fig.suptitle("demo-moe: % of held-out tokens routed to each expert (top-2; dotted = uniform 12.5 %, "
                 "dashed = 1 %)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("benchmarks/_work/card"))
    a = p.parse_args()
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    from edgeconv.pipelines.convert import convert
    from edgeconv.stages.export_gguf import export_gguf

    t = time.time()
    student = convert("demo-moe", work / "student", data=None, progress=False).out
    convert_s = time.time() - t
    ggufs = {}
    for name, src in (("teacher", demo_path("demo-moe")), ("student", student)):
        for quant in ("F32", "F16"):
            path = work / f"{name}-{quant}.gguf"
            ggufs[f"{name} {quant}"] = path if path.exists() else export_gguf(src, path, quant).path
    models = {
        "teacher (torch)": demo_path("demo-moe"),
        "teacher F32 GGUF": ggufs["teacher F32"],
        "teacher F16 GGUF": ggufs["teacher F16"],
        "untrained teacher": untrained("demo-moe", work / "untrained-moe"),
        "student, undistilled (torch)": student,
        "student F32 GGUF": ggufs["student F32"],
        "student F16 GGUF": ggufs["student F16"],
    }
    if (ASSETS / "demo-dense" / "config.json").exists():
        models["demo-dense (torch)"] = demo_path("demo-dense")
        models["untrained dense"] = untrained("demo-dense", work / "untrained-dense")
    reports = {}
    for label, path in models.items():
        reports[label] = cached_eval(label, path, work / "reports")
        print(f"{label}: {reports[label].perplexity} {reports[label].seconds:.0f} s", flush=True)
    shares = routing(work)
    plot_routing(shares, RESULTS / "demo_routing.png")
    smallest = min(min(v) for v in shares.values())
    gguf_ppl_diff = {f"{m} {q}": max(abs(reports[f"{m} {q} GGUF"].perplexity[c] /
                                         reports[f"{m}, undistilled (torch)" if m == "student" else f"{m} (torch)"]
                                         .perplexity[c] - 1) for c in reports["teacher (torch)"].perplexity)
                     for m in ("teacher", "student") for q in ("F32", "F16")}
    card = {"machine": machine(), "convert_seconds": round(convert_s, 1),
            "reports": {k: v.model_dump() for k, v in reports.items()},
            "routing_token_share": shares, "smallest_expert_share": smallest,
            "gguf_vs_torch_max_perplexity_rel_diff": gguf_ppl_diff}
    (RESULTS / "demo_card.json").write_text(json.dumps(card, indent=1))
    table = summary_table(list(reports.items()))
    (RESULTS / "demo_card.md").write_text(
        "Command: `python benchmarks/demo/card.py`\n\n" + table +
        f"\n\nSmallest share of held-out tokens routed to one expert (any layer): {100 * smallest:.2f} %\n\n"
        "GGUF vs torch, largest relative perplexity difference over the corpora: " +
        ", ".join(f"{k} {100 * v:.3f} %" for k, v in gguf_ppl_diff.items()) + "\n")
    print(table)
    print(f"smallest expert share {100 * smallest:.2f} %; gguf vs torch {gguf_ppl_diff}")


if __name__ == "__main__":
    main()
