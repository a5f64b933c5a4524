"""The evaluation suite: metrics hand-checked on scripted runtimes, and the same numbers across runtimes."""

import json
import math

import numpy as np
import pytest
import tiny
from click.testing import CliRunner

from edgeconv.cli import main
from edgeconv.demo import EVAL_DATA
from edgeconv.errors import EdgeconvError
from edgeconv.evaluation.eval_data import EvalData, choice_items, write_eval_data
from edgeconv.evaluation.runtimes import Runtime, detect_runtime
from edgeconv.evaluation.suite import choice_scores, evaluate, perplexity, solved


class Scripted(Runtime):
    """Characters as tokens (vocab 128); logits from a function of the prefix."""

    name = "scripted"
    eos_id = 0

    def __init__(self, next_logits):
        self.next_logits = next_logits

    def encode(self, text):
        return [ord(c) % 128 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def logits(self, ids):
        return np.stack([self.next_logits(ids[: i + 1]) for i in range(len(ids))])


def test_uniform_model_has_perplexity_equal_to_vocab():
    rt = Scripted(lambda prefix: np.zeros(128))
    ppl, count = perplexity(rt, ["hello world", "second doc"], tokens=1000, window=4)
    assert ppl == pytest.approx(128, rel=1e-9)
    # 11 + 1 + 10 + 1 = 23 ids in windows of 4: 5 full windows (3 scored each) and one of 3 (2 scored)
    assert count == 5 * 3 + 2


def test_perplexity_of_a_model_that_knows_the_next_character():
    text = "abcabcabcabc"

    def oracle(prefix):  # puts log-odds 5 on the true next character of the cycle
        logits = np.zeros(128)
        logits[ord("abc"[("abc".index(chr(prefix[-1])) + 1) % 3]) if chr(prefix[-1]) in "abc" else 0] = 5.0
        return logits

    rt = Scripted(oracle)
    ppl, count = perplexity(rt, [text], tokens=12, window=12)
    p = math.exp(5) / (math.exp(5) + 127)
    assert count == 11 and ppl == pytest.approx(1 / p, rel=1e-9)


def test_exact_match_stops_at_newline_and_strips():
    answer = " 42\nnext"

    def speaker(prefix):  # says the answer after "=", one character at a time
        text = "".join(chr(i) for i in prefix)
        said = text.split("=", 1)[1] if "=" in text else ""
        logits = np.zeros(128)
        logits[ord(answer[len(said)]) if len(said) < len(answer) else 0] = 9.0
        return logits

    rt = Scripted(speaker)
    assert solved(rt, "add 40+2=", "42")
    assert not solved(rt, "add 40+2=", "4")


def test_choice_picks_the_most_likely_continuation_and_normalises_by_length():
    def likes_x(prefix):
        logits = np.zeros(128)
        logits[ord("x")] = 4.0
        return logits

    rt = Scripted(likes_x)
    item = {"context": "ctx:", "choices": ["yy", "xxxx", "x", "zz"], "label": 2}
    # summed log-probability favours the shortest all-x choice; per character, any all-x choice ties and
    # the first of them ("xxxx") wins the argmax
    assert choice_scores(rt, item) == (2, 1)


def test_choice_items_are_well_formed():
    import random

    docs = ["\n".join(f"doc {d} line {i} with enough words to qualify here" for i in range(30)) for d in range(5)]
    items = choice_items(docs, "c", 20, random.Random(0))
    assert len(items) == 20
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        true = item["choices"][item["label"]]
        doc = next(d for d in docs if true in d)
        assert item["context"].endswith("\n") and doc.split(true)[0].endswith(item["context"])


def test_shipped_eval_data_loads():
    ev = EvalData.load(EVAL_DATA)
    assert set(ev.texts) == {"shakespeare", "pydocs"}
    assert set(ev.skills) == {"add", "copy", "reverse", "sort", "brackets", "recall"}
    assert all(len(v) == 100 for v in ev.skills.values())
    assert len(ev.choices) == 400 and {c["corpus"] for c in ev.choices} == {"shakespeare", "pydocs"}


def test_eval_data_round_trip(tmp_path):
    texts = {"a": [("d1", "\n".join(f"alpha line number {i} of the first text" for i in range(40)))],
             "b": [("d2", "\n".join(f"beta line number {i} of the second text" for i in range(40)))]}
    counts = write_eval_data(tmp_path, texts, skill_examples=3, choice_per_corpus=5)
    ev = EvalData.load(tmp_path)
    assert counts["skills"] == 18 and sum(map(len, ev.skills.values())) == 18
    assert ev.texts["a"][0] == texts["a"][0][1] and len(ev.choices) == 10


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny dense Qwen3 with a tokenizer, and its F32 GGUF."""
    from edgeconv.families import family_for
    from edgeconv.planning.calibration_free import simple_plan
    from edgeconv.stages.assemble import assemble
    from edgeconv.stages.export_gguf import export_gguf

    root = tmp_path_factory.mktemp("eval-models")
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), root / "moe"))
    dense = root / "dense"
    assemble(src, simple_plan(family_for(tiny.config_of(src)), "ids:1,4"), dense, progress=False)
    gguf = export_gguf(dense, root / "dense-F32.gguf", "F32").path
    return {"moe": src, "dense": dense, "gguf": gguf}


def test_torch_and_f32_gguf_agree(student, small_eval):
    kw = dict(tokens=1024, window=128, examples=2, choices=8, show_progress=False)
    t = evaluate(student["dense"], small_eval, **kw)
    g = evaluate(student["gguf"], small_eval, **kw)
    assert (t.runtime, g.runtime) == ("torch", "gguf")
    assert t.perplexity_tokens == g.perplexity_tokens  # same tokenization in llama.cpp
    for corpus in t.perplexity:
        assert g.perplexity[corpus] == pytest.approx(t.perplexity[corpus], rel=0.005)
    assert t.choice_items == 8


def test_onnx_runtime_agrees_with_torch(student, small_eval, tmp_path):
    from edgeconv.stages.export_onnx import export_onnx

    onnx_dir = export_onnx(student["dense"], tmp_path / "onnx", "fp32").path
    assert detect_runtime(onnx_dir) == "onnx"
    kw = dict(tokens=512, window=128, examples=1, choices=4, show_progress=False)
    t = evaluate(student["dense"], small_eval, **kw)
    o = evaluate(onnx_dir, small_eval, **kw)
    for corpus in t.perplexity:
        assert o.perplexity[corpus] == pytest.approx(t.perplexity[corpus], rel=1e-4)
    assert o.exact_match == t.exact_match and o.choice_acc == t.choice_acc


def test_eval_cli_writes_report_and_lm_eval_tasks(student, small_eval, tmp_path):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", str(student["dense"]), "--data", str(small_eval), "--tokens", "256",
                                  "--examples", "1", "--choices", "2", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert set(report["exact_match"]) == {"add", "copy", "reverse", "sort", "brackets", "recall"}
    assert "perplexity pydocs" in r.output
    r = CliRunner().invoke(main, ["eval", "--data", str(small_eval), "--lm-eval-tasks", str(tmp_path / "tasks")])
    assert r.exit_code == 0, r.output
    names = sorted(p.stem for p in (tmp_path / "tasks").glob("*.yaml"))
    assert names == sorted(["edgeconv_choice", "edgeconv_text_shakespeare", "edgeconv_text_pydocs"]
                           + [f"edgeconv_skill_{s}" for s in ("add", "copy", "reverse", "sort", "brackets", "recall")])


def test_lm_eval_runs_the_tasks_and_agrees_on_multiple_choice(student, small_eval, tmp_path):
    """lm-eval's own HF runner on our YAMLs: multiple-choice accuracy equals edgeconv's on the same items."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from edgeconv.evaluation.lm_eval_tasks import write_lm_eval_tasks

    write_lm_eval_tasks(tmp_path / "tasks", small_eval)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={student['dense']},dtype=float32,max_length=1024",
                                  tasks=["edgeconv_choice", "edgeconv_skill_add", "edgeconv_text_pydocs"],
                                  task_manager=manager, batch_size=1, device="cpu")["results"]
    ours = evaluate(student["dense"], small_eval, tokens=256, examples=2, choices=8, show_progress=False)
    assert res["edgeconv_choice"]["acc,none"] == pytest.approx(ours.choice_acc)
    assert res["edgeconv_skill_add"]["exact_match,none"] == pytest.approx(ours.exact_match["add"])
    assert res["edgeconv_text_pydocs"]["word_perplexity,none"] > 1


def test_bad_eval_inputs(tmp_path, student):
    with pytest.raises(EdgeconvError, match="lacks text.jsonl"):
        EvalData.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeconvError, match="not a model edgeconv can evaluate"):
        detect_runtime(tmp_path / "empty")
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "missing-model")])
    assert r.exit_code == 2 and "does not exist" in r.output
