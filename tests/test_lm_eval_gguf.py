"""lm-eval on the artifacts: a tiny dense checkpoint in lm-eval's hf model and its F32 GGUF in edgeconv-gguf
(llama-cpp-python) score edgeconv's tasks alike; continuation log-probs are aligned by hand against llama.cpp's
logits; lm-eval's own gguf backend, fed llama-cpp-python's echoed logprobs, is off by one position."""

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # everything here is local: task YAMLs over local JSONL
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tiny  # noqa: E402
from click.testing import CliRunner  # noqa: E402

pytest.importorskip("lm_eval")
pytest.importorskip("llama_cpp")

from edgeconv.cli import main  # noqa: E402
from edgeconv.errors import EdgeconvError  # noqa: E402
from edgeconv.evaluation.lm_eval_run import results_rows, run_lm_eval  # noqa: E402
from edgeconv.evaluation.lm_eval_tasks import write_lm_eval_tasks  # noqa: E402
from edgeconv.evaluation.runtimes import log_softmax  # noqa: E402

MAX_LENGTH = 256


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny dense Qwen3 with a tokenizer (no BOS, as Qwen), and its F32 GGUF."""
    from edgeconv.families import family_for
    from edgeconv.planning.calibration_free import simple_plan
    from edgeconv.stages.assemble import assemble
    from edgeconv.stages.export_gguf import export_gguf

    root = tmp_path_factory.mktemp("lm-eval-models")
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), root / "moe"))
    dense = root / "dense"
    assemble(src, simple_plan(family_for(tiny.config_of(src)), "ids:1,4"), dense, progress=False)
    return {"dense": dense, "gguf": export_gguf(dense, root / "dense-F32.gguf", "F32").path}


@pytest.fixture(scope="module")
def models(student):
    """lm-eval's HFLM on the checkpoint and our GgufLM on the GGUF, same max_length."""
    from lm_eval.models.huggingface import HFLM

    from edgeconv.evaluation.lm_eval_gguf import GgufLM

    gguf = GgufLM(pretrained=str(student["gguf"]), max_length=MAX_LENGTH, n_threads=2)
    yield HFLM(pretrained=str(student["dense"]), dtype="float32", device="cpu", max_length=MAX_LENGTH,
               batch_size=1), gguf
    gguf.close()


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _direct(llm, context_ids, continuation_ids):
    """Sum of log p(continuation token | everything before it), straight from llama.cpp's logits rows."""
    ids = context_ids + continuation_ids
    llm.reset()
    llm.eval(ids)
    logp = log_softmax(np.array(llm.scores[: len(ids)]))
    return sum(logp[p - 1, ids[p]] for p in range(len(context_ids), len(ids)))


def test_loglikelihood_agrees_with_hf_and_with_the_logits_by_hand(models):
    hf, gguf = models
    long_context = "To be, or not to be, that is the question: " * 40  # past max_length: left-truncated
    requests = [("To be, or not", " to be"), ("Whether 'tis nobler in the mind ", "to suffer"),
                ("", "The slings and arrows"), ("def f(x):\n    return", " x + 1"), (long_context, " Whether"),
                ("To be, or not", " to die")]  # shares its context with the first: the KV cache is reused
    ours = gguf.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)
    theirs = hf.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)
    for (ctx, cont), (lp, greedy), (hf_lp, hf_greedy) in zip(requests, ours, theirs):
        assert lp == pytest.approx(hf_lp, abs=1e-3), (ctx[-20:], cont)
        assert greedy == hf_greedy
        assert lp < 0
    # by hand: the first request's continuation, token by token, from the rows before it
    ctx_ids, cont_ids = gguf._encode_pair(*requests[0])
    assert ctx_ids == gguf.tok_encode(requests[0][0]) and len(cont_ids) == 2
    assert ours[0][0] == pytest.approx(_direct(gguf.llm, ctx_ids, cont_ids), abs=1e-5)
    # a continuation that is the model's own greedy choice is greedy in both
    ids = gguf.tok_encode("To be, or not")
    token = int(np.argmax(gguf._rows(ids)[-1]))
    greedy_req = [("To be, or not", gguf.tok_decode([token]))]
    assert gguf._encode_pair(*greedy_req[0])[1] == [token]
    assert gguf.loglikelihood(_instances("loglikelihood", greedy_req), disable_tqdm=True)[0][1] is True
    assert hf.loglikelihood(_instances("loglikelihood", greedy_req), disable_tqdm=True)[0][1] is True


def test_rolling_and_generation_agree_with_hf(models):
    hf, gguf = models
    text = [("Now is the winter of our discontent\nMade glorious summer by this sun of York; " * 12,)]
    assert len(gguf.tok_encode(text[0][0])) > 2 * MAX_LENGTH  # three windows
    ours = gguf.loglikelihood_rolling(_instances("loglikelihood_rolling", text), disable_tqdm=True)
    theirs = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", text), disable_tqdm=True)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-4)
    gen = [("add 12+30=", {"until": ["\n"], "do_sample": False, "max_gen_toks": 8}),
           ("copy abc:", {"until": ["c"], "do_sample": False, "max_gen_toks": 12})]
    assert gguf.generate_until(_instances("generate_until", gen), disable_tqdm=True) == \
        hf.generate_until(_instances("generate_until", gen), disable_tqdm=True)


def test_lm_eval_gguf_backend_reads_echoed_logprobs_one_position_late(student, models):
    """Why lm-eval's `gguf` model is not used: llama-cpp-python's echoed prompt logprobs (what its server sends)
    give token i the log-prob from logits row i, the distribution of token i + 1, for a model without BOS; lm-eval
    sums them from the continuation's first token to the second-to-last entry."""
    from lm_eval.models.gguf import get_result

    from edgeconv.export.gguf.llamacpp import _llama_cpp

    _, gguf = models
    llm = _llama_cpp().Llama(model_path=str(student["gguf"]), n_ctx=64, logits_all=True, verbose=False, seed=0)
    try:
        ctx, cont = "To be, or not", " to be"
        ids = llm.tokenize((ctx + cont).encode(), add_bos=False, special=False)
        n_ctx = len(llm.tokenize(ctx.encode(), add_bos=False, special=False))
        assert not llm._model.add_bos_token() and len(ids) - n_ctx == 2
        echo = llm.create_completion(ctx + cont, max_tokens=1, echo=True, logprobs=5, temperature=0.0)
        logprobs = echo["choices"][0]["logprobs"]
        llm.reset()
        llm.eval(ids)
        logp = log_softmax(np.array(llm.scores[: len(ids)]))
        assert logprobs["token_logprobs"][1:] == pytest.approx([logp[i, ids[i]] for i in range(1, len(ids))],
                                                             abs=1e-4)  # row i, not row i - 1
        right = _direct(llm, ids[:n_ctx], ids[n_ctx:])
        assert gguf.loglikelihood(_instances("loglikelihood", [(ctx, cont)]), disable_tqdm=True)[0][0] == \
            pytest.approx(right, abs=1e-4)
        theirs, _ = get_result(logprobs, len(ctx))
        assert theirs == pytest.approx(logp[n_ctx, ids[n_ctx]], abs=1e-4)  # one token, from the wrong row
        assert abs(theirs - right) > 0.1
    finally:
        llm.close()


def test_edgeconv_tasks_score_alike_in_torch_and_gguf(student, small_eval, tmp_path):
    tasks = tmp_path / "tasks"
    write_lm_eval_tasks(tasks, small_eval)
    kw = dict(include_path=tasks, max_length=MAX_LENGTH, threads=2, log_samples=True)
    torch_out = run_lm_eval(student["dense"], "edgeconv", **kw)
    gguf_out = run_lm_eval(student["gguf"], "edgeconv", **kw)
    assert gguf_out["config"]["model"] == "edgeconv-gguf" and torch_out["config"]["model"] == "hf"
    t = {(task, metric): v for task, metric, v, _ in results_rows(torch_out["results"])}
    g = {(task, metric): v for task, metric, v, _ in results_rows(gguf_out["results"])}
    assert t.keys() == g.keys() and len({task for task, _ in t}) == 9
    for key, value in t.items():
        if key[1] in ("acc", "acc_norm", "exact_match"):
            assert abs(g[key] - value) <= 1e-3, key
        else:  # perplexities, bits per byte
            assert g[key] == pytest.approx(value, rel=1e-3), key
    # per document, the multiple-choice log-likelihoods (sums over ~60 tokens after a ~200-token context: the
    # float32 logits differ by ~1e-4 per token). Not the skills' 32-token generations: this random model's
    # top logits are close enough that its greedy babble may part after a dozen tokens.
    for ts, gs in zip(torch_out["samples"]["edgeconv_choice"], gguf_out["samples"]["edgeconv_choice"]):
        assert [r[0][0] for r in gs["resps"]] == pytest.approx([r[0][0] for r in ts["resps"]], rel=1e-4)


def test_eval_cli_lm_eval(student, small_eval, tmp_path):
    out = tmp_path / "lm.json"
    r = CliRunner().invoke(main, ["eval", str(student["gguf"]), "--data", str(small_eval), "--lm-eval",
                                  "edgeconv_choice,edgeconv_skill_a*", "--limit", "2", "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    results = json.loads(out.read_text())
    assert set(results) == {"edgeconv_choice", "edgeconv_skill_add"}
    assert 0 <= results["edgeconv_choice"]["acc,none"] <= 1
    r = CliRunner().invoke(main, ["eval", str(student["gguf"]), "--data", str(small_eval), "--lm-eval",
                                  "edgeconv_choice", "--limit", "2"])
    assert r.exit_code == 0, r.output
    assert "| edgeconv_choice | acc |" in r.output
    with pytest.raises(EdgeconvError, match="no lm-eval task or tag nosuchtask"):
        run_lm_eval(student["gguf"], "nosuchtask", data=small_eval)
