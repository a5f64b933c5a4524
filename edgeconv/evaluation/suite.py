"""The evaluation suite: held-out perplexity per corpus, exact match per skill, multiple-choice accuracy.

Perplexity: each corpus's documents joined with EOS, the first `tokens` cut into non-overlapping windows of
`window` tokens; every token but a window's first is scored (so each has 1..window-1 tokens of context).
Exact match: greedy decoding after the prompt until a newline; the text, stripped, must equal the answer.
Multiple choice: the choice with the highest summed log-probability after the context (`acc`), and per
character of the choice (`acc_norm`, lm-eval's length normalisation); chance is 25 %.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from edgeconv.evaluation.eval_data import EvalData
from edgeconv.evaluation.runtimes import Runtime, open_runtime
from edgeconv.progress import item_progress


class EvalReport(BaseModel):
    model: str
    runtime: str
    data: str
    perplexity: dict[str, float]
    perplexity_tokens: dict[str, int]
    exact_match: dict[str, float]
    exact_match_examples: int
    choice_acc: float
    choice_acc_norm: float
    choice_items: int
    seconds: float


def perplexity(rt: Runtime, docs: list[str], tokens: int, window: int) -> tuple[float, int]:
    return _perplexity(rt.token_logprobs(_windows(rt, docs, tokens, window)))


def _windows(rt: Runtime, docs: list[str], tokens: int, window: int) -> list[list[int]]:
    ids: list[int] = []
    for doc in docs:
        ids.extend(rt.encode(doc))
        if rt.eos_id is not None:
            ids.append(rt.eos_id)
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    return [w for w in windows if len(w) >= 2]


def _perplexity(logprobs: list[np.ndarray]) -> tuple[float, int]:
    nll, count = 0.0, 0
    for lp in logprobs:
        nll -= float(lp.sum())
        count += len(lp)
    return math.exp(nll / count), count


def solved(rt: Runtime, prompt: str, answer: str, max_new: int = 32) -> bool:
    return rt.greedy(rt.encode(prompt), max_new).strip() == answer


def choice_scores(rt: Runtime, item: dict) -> tuple[int, int]:
    """(index by summed log-probability, index by log-probability per character). As lm-eval does, the
    context's trailing whitespace moves to the front of each choice and the pair is tokenized as one text,
    so a byte-level BPE that merges whitespace across the boundary scores what it would really see."""
    seqs, spans = _choice_sequences(rt, item)
    return _choice_pick(item, rt.token_logprobs(seqs), spans)


def _choice_sequences(rt: Runtime, item: dict) -> tuple[list[list[int]], list[int]]:
    context = item["context"]
    lead = context[len(context.rstrip()):]
    context = context[: len(context) - len(lead)]
    n_context = len(rt.encode(context))
    seqs, spans = [], []
    for choice in item["choices"]:
        whole = rt.encode(context + lead + choice)
        seqs.append(whole)
        spans.append(len(whole) - n_context)
    return seqs, spans


def _choice_pick(item: dict, logprobs: list[np.ndarray], spans: list[int]) -> tuple[int, int]:
    sums = [float(lp[-n:].sum()) for lp, n in zip(logprobs, spans)]
    norm = [s / max(1, len(c)) for s, c in zip(sums, item["choices"])]
    return int(np.argmax(sums)), int(np.argmax(norm))


def evaluate(model: str | Path, data: Path, *, runtime: str | None = None, tokens: int = 16_384,
             window: int = 256, examples: int = 50, choices: int = 200, threads: int | None = None,
             show_progress: bool = True, forward=None) -> EvalReport:
    """Run the suite on one model in one runtime. `forward` (edgeconv.forward's ForwardOptions): device, dtype and
    whole model or layer by layer, for the torch runtime. A runtime that prefers batches (a model run layer by
    layer) gets each part of the suite in one call: all perplexity windows, all greedy prompts, all choices."""
    start = time.time()
    ev = EvalData.load(data)
    rt = open_runtime(Path(model), runtime, threads, forward)
    try:
        items = _spread(ev.choices, choices)
        skills = {skill: exs[:examples] for skill, exs in ev.skills.items()} if examples > 0 else {}
        total = len(ev.texts) + sum(len(v) for v in skills.values()) + len(items)
        with item_progress(show_progress) as bar:
            task = bar.add_task(f"eval ({rt.name})", total=total)

            def advance(n: int) -> None:
                bar.advance(task, n)

            run = _batched if rt.prefers_batches else _one_by_one
            ppl, counts, em, hits = run(rt, ev, skills, items, tokens, window, advance)
    finally:
        rt.close()
    n = max(1, len(items))
    return EvalReport(model=str(model), runtime=rt.name, data=str(data), perplexity=ppl, perplexity_tokens=counts,
                      exact_match=em, exact_match_examples=examples, choice_acc=hits[0] / n,
                      choice_acc_norm=hits[1] / n, choice_items=len(items), seconds=round(time.time() - start, 1))


def _one_by_one(rt: Runtime, ev: EvalData, skills: dict, items: list[dict], tokens: int, window: int, advance):
    ppl, counts, em = {}, {}, {}
    hits = [0, 0]
    for corpus, docs in ev.texts.items():
        ppl[corpus], counts[corpus] = perplexity(rt, docs, tokens, window)
        advance(1)
    for skill, chosen in skills.items():
        hit = 0
        for prompt, answer in chosen:
            hit += solved(rt, prompt, answer)
            advance(1)
        em[skill] = hit / len(chosen)
    for item in items:
        acc, acc_norm = choice_scores(rt, item)
        hits[0] += acc == item["label"]
        hits[1] += acc_norm == item["label"]
        advance(1)
    return ppl, counts, em, hits


def _batched(rt: Runtime, ev: EvalData, skills: dict, items: list[dict], tokens: int, window: int, advance):
    """The same numbers as _one_by_one, with one runtime call per part of the suite."""
    ppl, counts, em = {}, {}, {}
    windows = {corpus: _windows(rt, docs, tokens, window) for corpus, docs in ev.texts.items()}
    scored = iter(rt.token_logprobs([w for ws in windows.values() for w in ws]))
    for corpus, ws in windows.items():
        ppl[corpus], counts[corpus] = _perplexity([next(scored) for _ in ws])
    advance(len(windows))
    pairs = [(skill, prompt, answer) for skill, chosen in skills.items() for prompt, answer in chosen]
    texts = rt.greedy_batch([rt.encode(prompt) for _, prompt, _ in pairs], 32)
    for skill, chosen in skills.items():
        right = [text.strip() == answer for (s, _, answer), text in zip(pairs, texts) if s == skill]
        em[skill] = sum(right) / len(chosen)
    advance(len(pairs))
    hits = [0, 0]
    built = [_choice_sequences(rt, item) for item in items]
    scored = iter(rt.token_logprobs([seq for seqs, _ in built for seq in seqs]))
    for item, (seqs, spans) in zip(items, built):
        acc, acc_norm = _choice_pick(item, [next(scored) for _ in seqs], spans)
        hits[0] += acc == item["label"]
        hits[1] += acc_norm == item["label"]
    advance(len(items))
    return ppl, counts, em, hits


def _spread(items: list[dict], n: int) -> list[dict]:
    """`n` items taken evenly across corpora (the file lists one corpus after another)."""
    by_corpus: dict[str, list[dict]] = {}
    for item in items:
        by_corpus.setdefault(item["corpus"], []).append(item)
    per = max(1, n // max(1, len(by_corpus)))
    return [item for group in by_corpus.values() for item in group[:per]]


def summary_table(reports: list[tuple[str, EvalReport]]) -> str:
    """A markdown table, one column per report."""
    cols = [name for name, _ in reports]
    rows = []
    first = reports[0][1]
    for corpus in first.perplexity:
        rows.append([f"perplexity {corpus} (lower is better)"] + [f"{r.perplexity[corpus]:.2f}" for _, r in reports])
    for skill in first.exact_match:
        rows.append([f"exact match {skill}"] + [f"{100 * r.exact_match[skill]:.0f} %" for _, r in reports])
    rows.append(["multiple choice acc"] + [f"{100 * r.choice_acc:.1f} %" for _, r in reports])
    rows.append(["multiple choice acc_norm"] + [f"{100 * r.choice_acc_norm:.1f} %" for _, r in reports])
    lines = ["| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
