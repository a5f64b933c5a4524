"""`edgeconv sweep`: the grid, plan dedupe, prescreen rows that are real evaluations, distillation of the
finalists next to the dense-to-dense baseline, the report, resume, and bad input."""

from __future__ import annotations

import pytest
import tiny
import torch
import transformers as tf
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from edgeconv.cli import main
from edgeconv.errors import EdgeconvError
from edgeconv.pipelines.sweep import default_ks, sweep
from edgeconv.study.finals import choose_finalists, compare
from edgeconv.study.study_report import factor_effects, write_report
from edgeconv.study.variants import grid, parse_ks

EVAL = {"examples": 0, "choices": 8}
FINAL_EVAL = {"examples": 2, "choices": 8, "tokens": 256}


def test_grid():
    v = grid(["do-acp", "random"], ["none", "random", "dominant"], ["cp", "uniform"], [2, 4], 2, 8)
    # K=2: 2 scorings x 3 groupings x 2 scalings; K=4: 'none' impossible, so 2 x 2 x 2
    assert len(v) == 12 + 8
    assert all(x.experts == x.groups for x in v if x.grouping == "none")
    assert sum(x.is_paper_default for x in v) == 1
    assert default_ks(2, 16) == [2, 4, 8] and default_ks(8, 8) == [8]
    with pytest.raises(EdgeconvError, match="K=1 is outside 2..8"):
        grid(["do-acp"], ["none"], ["cp"], [1], 2, 8)
    with pytest.raises(EdgeconvError, match="known scoring methods: acp, cp, do-acp"):
        grid(["do-acp", "doacp"], ["none"], ["cp"], [2], 2, 8)
    with pytest.raises(EdgeconvError, match="comma list of integers"):
        parse_ks("2,four")


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory):
    """A tiny dense Qwen3 with the tiny MoE's vocabulary, hidden size and tokenizer, wider FFN (48)."""
    path = tmp_path_factory.mktemp("dense-src")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tf.Qwen3Config(**tiny.COMMON, intermediate_size=48, head_dim=8))
    model.save_pretrained(path)
    tiny.add_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def study(qwen3_dir, corpus, small_eval, dense_source, tmp_path_factory):
    tiny.add_tokenizer(qwen3_dir)
    out = tmp_path_factory.mktemp("study")
    kw = {"data": corpus, "calibration_tokens": 512, "seq_len": 32, "scorings": "do-acp,frequency",
              "groupings": "none,random", "scalings": "cp", "ks": "2,4", "eval_data": small_eval, "eval_options": EVAL,
              "final_eval_options": FINAL_EVAL,
              "jobs": 1, "distill_tokens": 64, "top": 1, "distill_data": corpus,
              "distill_options": {"seq_len": 16, "batch_size": 2, "checkpoint_every": 1}, "dense": dense_source,
              "progress": False}
    return out, kw, sweep(qwen3_dir, out, **kw)


def test_prescreen_rows(study, qwen3_dir, small_eval):
    out, _, result = study
    rows = {r["name"]: r for r in result.prescreen}
    assert len(rows) == 6  # K=2: 2 scorings x (none, random); K=4: 2 scorings x random
    # at K = G the random grouping is pure pruning: same plan, evaluated once
    assert rows["do-acp/random/cp/K2"]["same_as"] == "do-acp/none/cp/K2"
    assert rows["do-acp/random/cp/K2"]["ppl"] == rows["do-acp/none/cp/K2"]["ppl"]
    assert rows["do-acp/random/cp/K4"]["same_as"] is None
    assert rows["do-acp/none/cp/K2"]["paper_default"]
    # a row is a real evaluation of the student its plan assembles to
    from edgeconv.evaluation.suite import evaluate
    from edgeconv.stages.assemble import assemble

    assemble(qwen3_dir, out / "plans" / "frequency_random_cp_K4.json", out / "check", progress=False)
    report = evaluate(out / "check", small_eval, show_progress=False, **EVAL)
    assert report.perplexity == rows["frequency/random/cp/K4"]["perplexity"]
    assert not (out / "students").exists() or not any((out / "students").iterdir())  # deleted after evaluation


def test_finals_and_dense_baseline(study):
    _out, _, result = study
    final = {r["name"]: r for r in result.final}
    assert final["teacher"]["kind"] == "reference"
    default = final["do-acp/none/cp/K2"]
    assert default["kind"] == "moe-to-dense" and default["distill_tokens"] == 64
    assert set(default["exact_match"]) == {"add", "brackets", "copy", "recall", "reverse", "sort"}
    baseline = final["dense-to-dense/" + next(n.split("/")[1] for n in final if n.startswith("dense-to-dense"))]
    assert baseline["params"] == default["params"]  # matched size: the pruned FFN is the student's width
    assert baseline["pruned"]["ffn_width"] == 2 * 16
    c = result.comparison
    assert c["moe_to_dense"] == "do-acp/none/cp/K2"
    assert c["choice_acc_pp"] == pytest.approx(100 * (default["choice_acc"] - baseline["choice_acc"]))
    assert c["distill_time_ratio"] == pytest.approx(baseline["distill_seconds"] / default["distill_seconds"])
    assert len([r for r in result.final if r["kind"] == "moe-to-dense"]) == 2  # the default and the top-1 other


def test_report_and_resume(study, qwen3_dir, tmp_path):
    out, kw, result = study
    written = write_report(result, tmp_path / "results")
    names = {p.name for p in written["files"]}
    assert {"sweep.md", "prescreen.png", "final.png", "prescreen.jsonl", "final.jsonl", "comparison.json"} <= names
    assert "MoE-to-dense minus dense-to-dense" in written["markdown"]
    before = [(out / f).read_text() for f in ("prescreen.jsonl", "final.jsonl")]
    again = sweep(qwen3_dir, out, **kw)  # everything done: nothing re-evaluated, the rows are those on disk
    assert [(out / f).read_text() for f in ("prescreen.jsonl", "final.jsonl")] == before
    assert again.comparison == result.comparison


def test_effects_leave_out_repeats():
    rows = [
        {"scoring": s, "grouping": g, "scaling": "cp", "experts": k, "groups": 2, "ppl": p}
        for s, g, k, p in [("a", "none", 2, 100.0), ("a", "random", 2, 100.0), ("b", "none", 2, 400.0),
                           ("b", "random", 2, 400.0), ("a", "random", 4, 50.0), ("b", "random", 4, 200.0)]
    ]
    e = factor_effects(rows)
    assert e["scoring"]["spread"] == pytest.approx(4.0)
    assert e["grouping"]["levels"] == {"random": pytest.approx(100.0)}  # K > G only
    assert e["experts"]["levels"]["4"] == pytest.approx(100.0) and e["experts"]["levels"]["2"] == pytest.approx(200.0)


def test_finalists_and_compare():
    rows = [{"name": n, "plan": p, "ppl": v, "same_as": s, "paper_default": d}
            for n, p, v, s, d in [("x", "1", 10, None, False), ("def", "2", 30, None, True), ("y", "1", 10, "x", False),
                                  ("z", "3", 20, None, False)]]
    assert [r["name"] for r in choose_finalists(rows, 2)] == ["def", "x", "z"]
    c = compare({"name": "m", "params": 5, "distill_tokens": 8, "choice_acc": 0.30, "choice_acc_norm": 0.2,
                 "exact_match_mean": 0.5, "ppl": 50, "distill_seconds": 10},
                {"name": "d", "params": 5, "choice_acc": 0.25, "choice_acc_norm": 0.3, "exact_match_mean": 0.5,
                 "ppl": 100, "distill_seconds": 16})
    assert (c["choice_acc_pp"], c["ppl_ratio"], c["distill_time_ratio"]) == (pytest.approx(5.0), 0.5, 1.6)


def test_cli_bad_inputs(qwen3_dir, tmp_path):
    r = CliRunner().invoke(main, ["sweep", str(qwen3_dir), "--out", str(tmp_path / "s"), "--scoring", "do-acpp"])
    assert r.exit_code == 2 and "did you mean 'do-acp'" in r.output
    r = CliRunner().invoke(main, ["sweep", str(qwen3_dir), "--out", str(tmp_path / "s"), "--dense", str(qwen3_dir)])
    assert r.exit_code == 2 and "is a Mixture-of-Experts" in r.output
    assert not (tmp_path / "s").exists()  # nothing written before the inputs are known to be good
    r = CliRunner().invoke(main, ["sweep", str(qwen3_dir), "--out", str(tmp_path / "s"), "--k", "2,99"])
    assert r.exit_code == 2 and "K=99 is outside" in r.output
