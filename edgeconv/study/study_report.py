"""The study's tables (markdown) and plots (matplotlib Agg), written next to the rows and optionally copied
to a results directory."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

FACTORS = ("scoring", "grouping", "scaling", "experts")


def _distinct(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("same_as") is None]


def factor_effects(rows: list[dict]) -> dict[str, dict]:
    """Per factor: the geometric-mean perplexity of each level over the variants that have it, and the spread
    (worst / best level mean); a larger spread means the factor matters more. Grouping 'none' exists only at
    K = G, where every grouping makes its plan, so its rows (repeats) are left out when other groupings are
    in the grid; the grouping effect is taken over K > G only, where the groupings differ."""
    groupings = {r["grouping"] for r in rows}
    base = [r for r in rows if r.get("ppl") and (r["grouping"] != "none" or groupings == {"none"})]
    out = {}
    for f in FACTORS:
        subset = [r for r in base if r["experts"] > r["groups"]] if f == "grouping" else base
        levels: dict[str, list[float]] = {}
        for r in subset:
            levels.setdefault(str(r[f]), []).append(math.log(r["ppl"]))
        means = {k: math.exp(sum(v) / len(v)) for k, v in levels.items()}
        spread = max(means.values()) / min(means.values()) if means else float("nan")
        out[f] = {"levels": dict(sorted(means.items(), key=lambda kv: kv[1])), "spread": spread,
                  "variants": len(subset)}
    return out


def _fmt(v, pct: bool = False, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.{digits}f} %" if pct else f"{v:,.{digits}f}"


def prescreen_markdown(rows: list[dict]) -> str:
    corpora = list(next((r["perplexity"] for r in rows if r.get("perplexity")), {}))
    head = ["rank", "variant", *[f"ppl {c}" for c in corpora], "ppl (geo. mean)", "MC acc", "MC acc_norm",
            "same plan as"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    ranked = sorted(rows, key=lambda r: (r["ppl"] if r.get("ppl") else math.inf, r["name"]))
    for i, r in enumerate(ranked, 1):
        mark = " (paper default)" if r.get("paper_default") else ""
        cells = [str(i), f"`{r['name']}`{mark}", *[_fmt(r["perplexity"].get(c)) for c in corpora], _fmt(r["ppl"]),
                 _fmt(r["choice_acc"], True), _fmt(r["choice_acc_norm"], True),
                 f"`{r['same_as']}`" if r.get("same_as") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def effects_markdown(effects: dict[str, dict]) -> str:
    lines = ["| factor | spread (worst / best level) | levels, best first (geo. mean perplexity) |", "|---|---|---|"]
    for f, e in sorted(effects.items(), key=lambda kv: -(kv[1]["spread"] if kv[1]["levels"] else 0)):
        levels = ", ".join(f"{k} {v:,.0f}" for k, v in e["levels"].items())
        lines.append(f"| {f} | {e['spread']:.2f}x | {levels} ({e['variants']} variants) |")
    return "\n".join(lines)


def final_markdown(final: list[dict]) -> str:
    if not final:
        return ""
    corpora = list(next((r["perplexity"] for r in final if r.get("perplexity")), {}))
    skills = list(next((r["exact_match"] for r in final if r.get("exact_match")), {}))
    head = ["model", "kind", "params (M)", *[f"ppl {c}" for c in corpora], *skills, "skills mean", "MC acc",
            "MC acc_norm", "distill wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in final:
        em = r.get("exact_match") or {}
        params = r.get("params")
        cells = [f"`{r['name']}`", r["kind"], _fmt(params / 1e6 if params else None, digits=2),
                 *[_fmt(r["perplexity"].get(c)) for c in corpora], *[_fmt(em.get(s), True, 0) for s in skills],
                 _fmt(r.get("exact_match_mean"), True), _fmt(r["choice_acc"], True), _fmt(r["choice_acc_norm"], True),
                 _fmt(r.get("distill_seconds"), digits=0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_markdown(c: dict | None) -> str:
    if not c:
        return ""
    return "\n".join([
        (f"MoE-to-dense `{c['moe_to_dense']}` vs dense-to-dense `{c['dense_to_dense']}` "
        f"({c['params_moe_to_dense'] / 1e6:.2f} M vs {c['params_dense_to_dense'] / 1e6:.2f} M parameters, "
        f"{c['distill_tokens']:,} distillation tokens each):"),
        "",
        "| figure | MoE-to-dense minus dense-to-dense |",
        "|---|---|",
        f"| multiple choice acc | {c['choice_acc_pp']:+.1f} pp |",
        f"| multiple choice acc_norm | {c['choice_acc_norm_pp']:+.1f} pp |",
        f"| skills exact match, mean | {c['exact_match_mean_pp']:+.1f} pp |",
        f"| perplexity (geo. mean), ratio | {c['ppl_ratio']:.3f}x |",
        f"| distillation wall-clock, dense-to-dense / MoE-to-dense | {c['distill_time_ratio']:.2f}x |",
    ])


def plot_prescreen(rows: list[dict], png: Path) -> Path | None:
    """Heatmap of log perplexity: one panel per scaling, scorings down, (K, grouping) across."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.get("ppl")]
    if not rows:
        return None
    scalings = sorted({r["scaling"] for r in rows})
    scorings = sorted({r["scoring"] for r in rows})
    cols = sorted({(r["experts"], r["grouping"]) for r in rows})
    value = {(r["scaling"], r["scoring"], r["experts"], r["grouping"]): math.log10(r["ppl"]) for r in rows}
    lo, hi = min(value.values()), max(value.values())
    fig = Figure(figsize=(1.6 + 0.55 * len(cols) * len(scalings), 1.2 + 0.42 * len(scorings)), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(scalings), squeeze=False)[0]
    for ax, scaling in zip(axes, scalings):
        grid = [[value.get((scaling, s, k, g), math.nan) for k, g in cols] for s in scorings]
        im = ax.imshow(grid, cmap="viridis_r", vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(len(cols)), [f"K{k} {g}" for k, g in cols], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(scorings)), scorings, fontsize=8)
        ax.set_title(f"scaling: {scaling}", fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{10 ** v:.0f}", ha="center", va="center", fontsize=5.5,
                            color="white" if v > (lo + hi) / 2 else "black")
    fig.colorbar(im, ax=list(axes), label="log10 perplexity before distillation (lower is better)", shrink=0.8)
    fig.suptitle("Prescreen: every variant, undistilled (geo. mean perplexity over the held-out corpora)", fontsize=9)
    fig.savefig(png, bbox_inches="tight")
    return png


def plot_final(final: list[dict], png: Path) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not final:
        return None
    fig = Figure(figsize=(10, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    names = [r["name"] for r in final]
    colors = [{"moe-to-dense": "#1f77b4", "dense-to-dense": "#ff7f0e"}.get(r["kind"], "#7f7f7f") for r in final]
    series = [("perplexity, geo. mean (lower is better)", [r.get("ppl") or 0 for r in final]),
              ("skills exact match, mean %", [100 * (r.get("exact_match_mean") or 0) for r in final]),
              ("multiple choice acc %", [100 * (r.get("choice_acc") or 0) for r in final])]
    for ax, (title, values) in zip(axes, series):
        ax.barh(range(len(final)), values, color=colors)
        ax.set_yticks(range(len(final)), names if ax is axes[0] else [""] * len(final), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("After distillation (blue: MoE-to-dense, orange: dense-to-dense, gray: references)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    return png


def write_report(result, results: Path | None = None) -> dict:
    out = Path(result.out)
    effects = factor_effects(result.prescreen)
    parts = ["## Prescreen (before distillation)", "", effects_markdown(effects), "",
             prescreen_markdown(result.prescreen)]
    if result.final:
        parts += ["", "## After distillation", "", final_markdown(result.final)]
    if result.comparison:
        parts += ["", "## MoE-to-dense vs dense-to-dense at matched size", "", comparison_markdown(result.comparison)]
    markdown = "\n".join(parts) + "\n"
    (out / "sweep.md").write_text(markdown)
    (out / "effects.json").write_text(json.dumps(effects, indent=2) + "\n")
    if result.comparison:
        (out / "comparison.json").write_text(json.dumps(result.comparison, indent=2) + "\n")
    files = [out / "sweep.md", out / "effects.json", out / "prescreen.jsonl"]
    files += [p for p in (plot_prescreen(result.prescreen, out / "prescreen.png"),
                          plot_final(result.final, out / "final.png")) if p]
    files += [p for p in (out / "final.jsonl", out / "comparison.json") if p.exists()]
    if results:
        results = Path(results)
        results.mkdir(parents=True, exist_ok=True)
        files = [Path(shutil.copy(p, results / p.name)) for p in files]
    return {"markdown": markdown, "files": files}
