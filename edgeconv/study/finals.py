"""Stage 2 of the study: the best prescreen variants and the paper's default distilled with one budget and
evaluated in full, the dense-to-dense baseline pruned and distilled the same way, and the references.

Each model is one resumable row of final.jsonl; assemble, prune and distill are themselves resumable stages,
so a killed sweep picks up inside the distillation it was running.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from edgeconv.study.prescreen import append_row, read_rows, report_metrics

logger = logging.getLogger(__name__)

ROWS = "final.jsonl"


def choose_finalists(rows: list[dict], top: int) -> list[dict]:
    """The paper's default (if in the grid), then the `top` best distinct variants by perplexity."""
    distinct = sorted((r for r in rows if r.get("same_as") is None and r.get("ppl")),
                      key=lambda r: (r["ppl"], r["name"]))
    default = [r for r in rows if r.get("paper_default")]  # rows of one plan carry the same figures
    best = [r for r in distinct if not default or r["plan"] != default[0]["plan"]][:top]
    return default + best


def _evaluate(model: Path, eval_data: Path, options: dict) -> dict:
    from edgeconv.evaluation.suite import evaluate

    return report_metrics(evaluate(model, eval_data, show_progress=False, **options))


def _distill_row(name: str, kind: str, result, params: int, metrics: dict, undistilled: dict | None,
                 extra: dict) -> dict:
    s = result.manifest["summary"]
    return {"name": name, "kind": kind, "params": params, **metrics,
            "distill_tokens": s["tokens"], "distill_seconds": s["seconds"], "distill_train_seconds": s["train_seconds"],
            "distill_tokens_per_second": s["train_tokens_per_second"], "distill_final_loss": s["final_loss"],
            "undistilled": undistilled, **extra}


class FinalRows:
    """final.jsonl: the rows found there (a resumed run skips them) and the rows of this run, in order."""

    def __init__(self, out: Path):
        self.path = out / ROWS
        self.done = {r["name"]: r for r in read_rows(self.path)}
        self.rows: list[dict] = []

    def keep(self, row: dict) -> dict:
        if row["name"] not in self.done:
            append_row(self.path, row)
            self.done[row["name"]] = row
        self.rows.append(self.done[row["name"]])
        return self.done[row["name"]]


def run_finals(
    model: Path,
    out: Path,
    rows: list[dict],
    *,
    top: int,
    distill_tokens: int,
    distill_data: Path,
    distill_options: dict,
    eval_data: Path,
    eval_options: dict,
    progress: bool = True,
) -> list[dict]:
    """The teacher evaluated, then the finalists (choose_finalists) assembled, distilled and evaluated."""
    from edgeconv.config import DistillConfig
    from edgeconv.stages.assemble import assemble
    from edgeconv.stages.distill import distill

    cfg = DistillConfig.make(tokens=distill_tokens, **distill_options)
    final = FinalRows(out)
    done, keep = final.done, final.keep
    if "teacher" not in done:
        logger.info(f"final: evaluating the teacher {model.name}")
    keep(done.get("teacher") or {"name": "teacher", "kind": "reference", "params": None, "source": str(model),
                                  **_evaluate(model, eval_data, eval_options)})
    finalists = choose_finalists(rows, top)
    for i, r in enumerate(finalists, 1):
        if r["name"] in done:
            keep(done[r["name"]])
            continue
        slug = r["name"].replace("/", "_")
        base = out / "final" / slug
        logger.info(f"final [{i}/{len(finalists)}] {r['name']}: assemble, distill {cfg.trained_tokens:,} tokens, "
                    "evaluate")
        assembled = assemble(model, out / "plans" / f"{slug}.json", base / "student", progress=False)
        result = distill(model, base / "student", distill_data, base / "distilled", cfg, progress=progress)
        keep(_distill_row(r["name"], "moe-to-dense", result, assembled.manifest["summary"]["dense_params"],
                          _evaluate(base / "distilled", eval_data, eval_options),
                          {k: r.get(k) for k in ("ppl", "perplexity", "choice_acc", "choice_acc_norm")},
                          {"variant": {k: r[k] for k in ("scoring", "grouping", "scaling", "experts", "groups")},
                           "paper_default": bool(r.get("paper_default")), "prescreen_ppl": r.get("ppl")}))
    return final.rows


def run_dense_baseline(
    out: Path,
    rows: list[dict],
    dense: Path,
    *,
    top: int,
    distill_tokens: int,
    distill_data: Path,
    distill_options: dict,
    eval_data: Path,
    eval_options: dict,
    prescreen_options: dict,
    progress: bool = True,
) -> tuple[list[dict], dict | None]:
    """The dense source evaluated, then pruned to the size of the finalists' reference (the paper's default if it
    is one), distilled from itself with the same budget and evaluated; its rows and the comparison with that
    reference (None when no finalist has a row yet)."""
    from edgeconv.config import DistillConfig
    from edgeconv.io.checkpoint import resolve_model_path
    from edgeconv.stages.distill import distill
    from edgeconv.stages.prune import prune

    cfg = DistillConfig.make(tokens=distill_tokens, **distill_options)
    final = FinalRows(out)
    done, keep = final.done, final.keep
    dense = resolve_model_path(dense)  # a demo name or hub id -> its directory
    moe_rows = [done[r["name"]] for r in choose_finalists(rows, top) if r["name"] in done]
    if not moe_rows:
        return [], None
    reference = next((r for r in moe_rows if r.get("paper_default")), moe_rows[0])
    name = f"dense-to-dense/{Path(dense).name}"
    if f"dense source/{Path(dense).name}" not in done:
        logger.info(f"final: evaluating the dense source {dense}")
    keep(done.get(f"dense source/{Path(dense).name}") or {
        "name": f"dense source/{Path(dense).name}", "kind": "reference", "params": None, "source": str(dense),
        **_evaluate(Path(dense), eval_data, eval_options)})
    if name not in done:
        base = out / "final" / "dense-to-dense"
        logger.info(f"final: {name}: prune to {reference['params']:,} parameters, distill {cfg.trained_tokens:,} "
                    "tokens from the dense source, evaluate")
        pruned = prune(dense, base / "pruned", params=reference["params"], progress=progress)
        undistilled = _evaluate(base / "pruned", eval_data, prescreen_options)
        result = distill(dense, base / "pruned", distill_data, base / "distilled", cfg, progress=progress)
        keep(_distill_row(name, "dense-to-dense", result, pruned.manifest["summary"]["params"],
                          _evaluate(base / "distilled", eval_data, eval_options),
                          {k: undistilled.get(k) for k in ("ppl", "perplexity", "choice_acc", "choice_acc_norm")},
                          {"pruned": {k: pruned.manifest["summary"][k]
                                      for k in ("ffn_width", "kv_heads", "source_params")}}))
    else:
        keep(done[name])
    return final.rows, compare(reference, done[name])


def compare(moe: dict, dense: dict) -> dict:
    """MoE-to-dense minus dense-to-dense, in points; perplexity and distillation time as ratios."""
    def pp(key):
        a, b = moe.get(key), dense.get(key)
        return None if a is None or b is None else 100 * (a - b)

    return {
        "moe_to_dense": moe["name"],
        "dense_to_dense": dense["name"],
        "params_moe_to_dense": moe["params"],
        "params_dense_to_dense": dense["params"],
        "distill_tokens": moe["distill_tokens"],
        "choice_acc_pp": pp("choice_acc"),
        "choice_acc_norm_pp": pp("choice_acc_norm"),
        "exact_match_mean_pp": pp("exact_match_mean"),
        "ppl_ratio": moe["ppl"] / dense["ppl"] if moe.get("ppl") and dense.get("ppl") else math.nan,
        "distill_time_ratio": dense["distill_seconds"] / moe["distill_seconds"],
        "distill_seconds_moe_to_dense": moe["distill_seconds"],
        "distill_seconds_dense_to_dense": dense["distill_seconds"],
    }
