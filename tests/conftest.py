import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def uniform_checkpoints(tmp_path_factory):
    """arch -> checkpoint dir of a tiny MoE with zeroed routers and top_k = E (uniform routing)."""
    root = tmp_path_factory.mktemp("uniform")
    return {a: tiny.save(tiny.build_model(a, top_k=tiny.E, uniform_router=True), root / a) for a in tiny.ARCHS}


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory):
    """arch -> (model, checkpoint dir) of a tiny MoE with a random router and top-2 routing."""
    root = tmp_path_factory.mktemp("random")
    out = {}
    for a in tiny.ARCHS:
        model = tiny.build_model(a, top_k=2, seed=1)
        out[a] = (model, tiny.save(model, root / a))
    return out


@pytest.fixture(scope="session")
def qwen3_dir(random_checkpoints):
    return random_checkpoints["Qwen3MoeForCausalLM"][1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return tiny.write_corpus(tmp_path_factory.mktemp("data") / "calib.jsonl")


@pytest.fixture(scope="session")
def calibrated(random_checkpoints, corpus, tmp_path_factory):
    """arch -> (checkpoint dir with tokenizer, stats dir) from a 512-token calibration run."""
    from edgeconv.stages.calibrate import calibrate

    root = tmp_path_factory.mktemp("calibrated")
    out = {}
    for arch, (_, src) in random_checkpoints.items():
        tiny.add_tokenizer(src)
        stats = calibrate(src, corpus, root / arch, tokens=512, seq_len=32, batch_size=3, gram_tokens=64,
                          progress=False)
        out[arch] = (src, stats.out)
    return out


@pytest.fixture(scope="session")
def small_eval(tmp_path_factory):
    """The shipped evaluation data cut down: 6,000 characters per corpus, 2 examples per skill, 8 choice items."""
    import json

    from edgeconv.demo import EVAL_DATA
    from edgeconv.evaluation.eval_data import EvalData

    out = tmp_path_factory.mktemp("small-eval")
    ev = EvalData.load(EVAL_DATA)
    (out / "text.jsonl").write_text("".join(json.dumps({"corpus": c, "name": "x", "text": d[0][:6000]}) + "\n"
                                            for c, d in ev.texts.items()))
    (out / "skills.jsonl").write_text("".join(json.dumps({"skill": s, "prompt": p, "answer": a}) + "\n"
                                              for s, ex in ev.skills.items() for p, a in ex[:2]))
    (out / "choice.jsonl").write_text("".join(json.dumps(c) + "\n" for c in ev.choices[:4] + ev.choices[-4:]))
    return out
