"""Stage 1 of the study: every variant of the grid planned from one calibration, assembled and evaluated
before any distillation.

Resumable: one JSONL row per variant is appended as soon as it is known; a rerun skips the variants it
finds. Parallel where cheap: planning runs here (milliseconds per variant), assembling and evaluating one
student runs in a pool of `jobs` worker processes with `threads` torch threads each, and variants that
yield the same plan (same digest) are assembled and evaluated once.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from edgeconv.progress import item_progress
from edgeconv.study.variants import Variant, plan_digest
from edgeconv.training.metrics import read as read_rows  # the same tolerant JSONL reader

logger = logging.getLogger(__name__)

ROWS = "prescreen.jsonl"


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def report_metrics(report) -> dict:
    """The figures a study row keeps from an EvalReport; `ppl` is the geometric mean over the corpora."""
    ppl = report.perplexity
    em = report.exact_match
    return {
        "perplexity": ppl,
        "ppl": math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl)) if ppl else None,
        "exact_match": em,
        "exact_match_mean": sum(em.values()) / len(em) if em else None,
        "choice_acc": report.choice_acc,
        "choice_acc_norm": report.choice_acc_norm,
        "eval_seconds": report.seconds,
    }


def assemble_and_evaluate(model: str, plan_path: str, student: str, eval_data: str, eval_options: dict,
                          threads: int, keep: bool) -> dict:
    """One worker task: assemble the plan's student, evaluate it, delete it unless kept."""
    import torch

    from edgeconv.evaluation.suite import evaluate
    from edgeconv.stages.assemble import assemble

    torch.set_num_threads(threads)
    result = assemble(model, plan_path, student, progress=False)
    report = evaluate(student, Path(eval_data), threads=threads, show_progress=False, **eval_options)
    row = {**report_metrics(report), "params": result.manifest["summary"].get("dense_params")}
    if not keep:
        shutil.rmtree(student, ignore_errors=True)
    return row


def prescreen(
    model: Path,
    stats,
    variants: list[Variant],
    out: Path,
    *,
    eval_data: Path,
    eval_options: dict,
    seed: int = 0,
    jobs: int = 1,
    threads: int = 1,
    keep: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Rows (one per variant, in grid order) with the student's pre-distillation metrics."""
    from edgeconv.planning.from_stats import stats_plan

    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / ROWS
    done = {r["name"]: r for r in read_rows(rows_path)}
    by_digest: dict[str, dict] = {r["plan"]: r for r in done.values() if r.get("same_as") is None}
    plans_dir = out / "plans"
    plans_dir.mkdir(exist_ok=True)
    pending: dict[str, list[Variant]] = {}  # digest -> variants waiting for its evaluation
    for v in variants:
        if v.name in done:
            continue
        plan = stats_plan(stats, experts=v.experts, groups=v.groups, scoring=v.scoring, grouping=v.grouping,
                          scaling=v.scaling, seed=seed, model=model)
        plan.save(plans_dir / f"{v.slug}.json")
        digest = plan_digest(plan)
        if digest in by_digest:  # evaluated by an earlier run: this variant only points at it
            row = _row(v, digest, by_digest[digest], same_as=by_digest[digest]["name"])
            append_row(rows_path, row)
            done[v.name] = row
        else:
            pending.setdefault(digest, []).append(v)
    if pending:
        logger.info(f"prescreen: {len(pending)} distinct students to assemble and evaluate "
                    f"({sum(map(len, pending.values()))} variants; {len(done)} already done) -> {rows_path}")
    students = out / "students"
    with item_progress(progress) as bar, ProcessPoolExecutor(max_workers=max(1, jobs),
                                                             mp_context=get_context("spawn")) as pool:
        task = bar.add_task("prescreen (assemble + eval)", total=len(pending))
        futures = {
            pool.submit(assemble_and_evaluate, str(model), str(plans_dir / f"{vs[0].slug}.json"),
                        str(students / digest), str(eval_data), eval_options, threads, keep): digest
            for digest, vs in pending.items()
        }
        for fut in as_completed(futures):
            digest = futures[fut]
            metrics = fut.result()
            first = pending[digest][0]
            for v in pending[digest]:
                row = _row(v, digest, metrics, same_as=None if v is first else first.name)
                append_row(rows_path, row)
                done[v.name] = row
            bar.advance(task)
    return [done[v.name] for v in variants]


METRIC_KEYS = ("perplexity", "ppl", "exact_match", "exact_match_mean", "choice_acc", "choice_acc_norm",
               "eval_seconds", "params")


def _row(v: Variant, digest: str, metrics: dict, same_as: str | None) -> dict:
    return {**v.as_dict(), "plan": digest, "same_as": same_as, "paper_default": v.is_paper_default,
            **{k: metrics.get(k) for k in METRIC_KEYS}}
