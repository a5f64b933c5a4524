"""One Pareto plot for every way this project makes an edge model from the demo models, all benchmarked with
the same runner (the bundle's bench.py, llama.cpp, GGUF at one quantization, one thread):

- the MoE teacher demo-moe, and its MoE-to-dense students distilled in the study (`edgeconv sweep`);
- the dense demo model demo-dense, its dense-to-dense pruned baseline (distilled in the study), and its
  Dense2MoE upcycles (`edgeconv upcycle`, distilled here from demo-dense with the study's budget).

Every step is skipped when its output exists (rerun after an interruption). Needs the study first:

    edgeconv sweep demo-moe --out benchmarks/_work/study --distill-tokens 262144 --distill-lr 1e-3 \\
        --dense demo-dense --results benchmarks/results/study
    python benchmarks/pareto.py                  # -> benchmarks/results/study/pareto.{png,md,json}

Accuracy is the runner's mean exact match over the six skills (50 examples each) and its perplexity (geometric
mean over the two held-out corpora; multiple choice, 27-29 % for every model here, is in the table only); latency
is decode milliseconds per token after the shortest prompt; memory is the runner's peak RSS (weights are
memory-mapped: pages of experts never chosen are never read).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STUDY = ROOT / "_work" / "study"
WORK = ROOT / "_work" / "pareto"
RESULTS = ROOT / "results" / "study"
# name -> (upcycle options): the automatic choice at one threshold, and the one run GLM-4-MoE holds without
# zero-expert holder layers (a run ending at the last layer).
UPCYCLES = {"upcycle auto t=0.96": {"runs": "auto", "threshold": 0.96}, "upcycle runs 3-5": {"runs": "3-5"}}
KIND_COLORS = {"MoE teacher": "#d62728", "MoE-to-dense": "#1f77b4", "dense source": "#2ca02c",
               "dense-to-dense": "#ff7f0e", "Dense2MoE": "#9467bd"}


def models(study: Path) -> list[tuple[str, str, Path]]:
    """(label, kind, checkpoint) of everything on the plot that the study made."""
    from edgeconv.demo import demo_path

    final = [json.loads(line) for line in (study / "final.jsonl").read_text().splitlines()]
    out = [("demo-moe (teacher)", "MoE teacher", demo_path("demo-moe")),
           ("demo-dense", "dense source", demo_path("demo-dense"))]
    for r in final:
        if r["kind"] == "moe-to-dense":
            tag = " (paper default)" if r.get("paper_default") else ""
            out.append((r["name"] + tag, "MoE-to-dense", study / "final" / r["name"].replace("/", "_") / "distilled"))
        elif r["kind"] == "dense-to-dense":
            out.append(("dense-to-dense pruned", "dense-to-dense", study / "final" / "dense-to-dense" / "distilled"))
    return out


def upcycled(study: Path, log) -> list[tuple[str, str, Path, dict]]:
    from edgeconv.config import DistillConfig
    from edgeconv.demo import DISTILL_DATA, demo_path
    from edgeconv.stages.distill import distill
    from edgeconv.stages.upcycle import upcycle

    final = [json.loads(line) for line in (study / "final.jsonl").read_text().splitlines()]
    ref = next(r for r in final if r["kind"] == "dense-to-dense")
    cfg = DistillConfig.make(tokens=ref["distill_tokens"], lr=json.loads(
        (study / "final" / "dense-to-dense" / "distilled" / "manifest.json").read_text())["options"]["lr"])
    out = []
    for label, options in UPCYCLES.items():
        base = WORK / label.replace(" ", "_").replace("=", "")
        up = upcycle(demo_path("demo-dense"), base / "upcycled", **options)
        log(f"{label}: runs {up.plan['fused_runs']}, {up.plan['layers']} layers, {up.plan['params']:,} params "
            f"({up.plan['active_params']:,} active)")
        res = distill(demo_path("demo-dense"), base / "upcycled", DISTILL_DATA, base / "distilled", cfg)
        out.append((label, "Dense2MoE", base / "distilled",
                    {"plan": {k: up.plan[k] for k in ("fused_runs", "layers", "params", "active_params",
                                                      "removed_attention_layers")},
                     "distill_seconds": res.manifest["summary"]["seconds"]}))
    return out


def bench_one(label: str, kind: str, ckpt: Path, quant: str, threads: int, log) -> dict:
    from edgeconv.device.local_bench import resolve, run_runner
    from edgeconv.stages.export_gguf import export_gguf

    slug = label.replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "").replace("=", "")
    gguf_path = WORK / "gguf" / f"{slug}-{quant}.gguf"
    if not gguf_path.with_suffix(".parity.json").is_file():
        log(f"export {label} -> {gguf_path.name}")
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(ckpt, gguf_path, quant, force=True)
    out = WORK / "bench" / f"{slug}.json"
    if not out.is_file():
        log(f"bench {label}")
        run_runner(resolve(gguf_path), out, role="teacher" if kind in ("MoE teacher", "dense source") else "student",
                   label=label, threads=threads, quick=False, eval_data=None,
                   extra=["--prompt-lengths", "64", "--repeats", "3"])
    return json.loads(out.read_text())


def summarize(label: str, kind: str, result: dict, extra: dict | None = None) -> dict:
    acc = result.get("accuracy") or {}
    speed = min(result.get("speed") or [{"prompt_tokens": 0}], key=lambda r: r["prompt_tokens"])
    decode = result.get("decode_tok_s") or speed.get("decode_tok_s")
    return {"label": label, "kind": kind, "bytes": result["model"].get("bytes"),
            "peak_rss_mb": result.get("peak_rss_mb"),
            "decode_tok_s": decode, "decode_ms_per_token": 1000 / decode if decode else None,
            "ttft_ms": speed.get("ttft_ms"), "exact_match_mean": acc.get("exact_match_mean"),
            "exact_match": acc.get("exact_match"), "choice_acc": acc.get("choice_acc"),
            "perplexity": acc.get("perplexity"), "ppl": _geo(acc.get("perplexity")), **(extra or {})}


def _geo(ppl: dict | None) -> float | None:
    values = [v for v in (ppl or {}).values() if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal points (lower x, higher y), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    best, keep = -math.inf, []
    for i in order:
        if points[i][1] > best:
            keep.append(i)
            best = points[i][1]
    return keep


def plot(rows: list[dict], png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [("decode_ms_per_token", "decode latency (ms / token, 1 thread), lower is better"),
              ("peak_rss_mb", "peak RSS while benchmarking (MB), lower is better")]
    metrics = [("exact_match_mean", "skills exact match, mean (%), higher is better", 100.0),
               ("ppl", "perplexity, geo. mean of the two corpora, lower is better", -1.0)]
    for row_i, (ykey, ytitle, sign) in enumerate(metrics):
        for col_i, (xkey, xtitle) in enumerate(panels):
            ax = axes[row_i][col_i]
            pts = [r for r in rows if r.get(xkey) and r.get(ykey) is not None]
            xy = [(r[xkey], abs(sign) * r[ykey]) for r in pts]
            for r, (x, y) in zip(pts, xy):
                ax.scatter(x, y, s=55, color=KIND_COLORS.get(r["kind"], "gray"), edgecolor="black", linewidth=0.5,
                           zorder=3)
                ax.annotate(r["label"], (x, y), fontsize=6, xytext=(4, 3), textcoords="offset points")
            front = [xy[i] for i in frontier([(x, sign * y) for x, y in xy])]  # frontier wants higher = better
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", alpha=0.4, lw=1,
                    linestyle="--")
            ax.set_xlabel(xtitle, fontsize=8)
            ax.set_ylabel(ytitle, fontsize=8)
            ax.grid(alpha=0.3)
            ax.set_xlim(left=0)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", label=k)
               for k, c in KIND_COLORS.items()] + [Line2D([], [], color="black", alpha=0.4, linestyle="--",
                                                         label="Pareto frontier")]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8)
    fig.suptitle("Edge models from the demo MoE and the demo dense model: accuracy vs latency and memory "
                 "(GGUF Q4_K_M, llama.cpp, same runner)", fontsize=10, y=0.995)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(png)


def markdown(rows: list[dict]) -> str:
    head = ["model", "kind", "GGUF MB", "peak RSS MB", "decode ms/token", "TTFT ms", "skills mean", "MC acc",
            "ppl (geo. mean)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        ppl = [v for v in (r.get("perplexity") or {}).values() if v]
        geo = math.exp(sum(map(math.log, ppl)) / len(ppl)) if ppl else None
        cells = [r["label"], r["kind"], f"{r['bytes'] / 1e6:.1f}" if r.get("bytes") else "-",
                 f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-",
                 f"{r['decode_ms_per_token']:.2f}" if r.get("decode_ms_per_token") else "-",
                 f"{r['ttft_ms']:.1f}" if r.get("ttft_ms") else "-",
                 f"{100 * r['exact_match_mean']:.1f} %" if r.get("exact_match_mean") is not None else "-",
                 f"{100 * r['choice_acc']:.1f} %" if r.get("choice_acc") is not None else "-",
                 f"{geo:.1f}" if geo else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=STUDY)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    log = print
    logging.getLogger("edgeconv").addHandler(logging.StreamHandler(sys.stdout))  # the library's progress lines
    logging.getLogger("edgeconv").setLevel(logging.INFO)
    rows = []
    for label, kind, ckpt in models(args.study):
        rows.append(summarize(label, kind, bench_one(label, kind, ckpt, args.quant, args.threads, log)))
    for label, kind, ckpt, extra in upcycled(args.study, log):
        rows.append(summarize(label, kind, bench_one(label, kind, ckpt, args.quant, args.threads, log), extra))
    args.results.mkdir(parents=True, exist_ok=True)
    plot(rows, args.results / "pareto.png")
    (args.results / "pareto.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.results / "pareto.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
