"""The shipped demo models: small, bf16, the default MODEL, and usable end to end."""

import json
import logging
import struct

import pytest
from click.testing import CliRunner

from edgeconv.cli import main
from edgeconv.demo import CALIBRATION_DATA, DEMO_MODELS, EVAL_DATA, demo_path
from edgeconv.io.checkpoint import resolve_model_path


def _header(path):
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(n))


def _params(name):
    return sum(
        v["shape"][0] * (v["shape"][1] if len(v["shape"]) > 1 else 1)
        for f in demo_path(name).glob("*.safetensors") for k, v in _header(f).items() if k != "__metadata__"
    )


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_shipped_model_is_small_bf16_with_tokenizer(name):
    path = demo_path(name)
    files = list(path.glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) <= 50e6
    assert {v["dtype"] for f in files for k, v in _header(f).items() if k != "__metadata__"} == {"BF16"}
    assert (path / "tokenizer.json").exists()
    assert resolve_model_path(name) == path


def test_dense_demo_has_the_teachers_total_parameter_count():
    moe, dense = _params("demo-moe"), _params("demo-dense")
    assert moe <= 25e6 and abs(dense / moe - 1) < 0.01


def test_inspect_without_argument_describes_the_demo_teacher():
    r = CliRunner().invoke(main, ["inspect", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["architecture"] == "Qwen3MoeForCausalLM" and info["num_experts"] == 16 and info["top_k"] == 2
    assert info["expert_width"] % 256 == 0


def test_teacher_routes_to_every_expert_on_held_out_data(tmp_path):
    from edgeconv.evaluation.eval_data import EvalData, held_out_mix
    from edgeconv.stages.calibrate import calibrate

    # Shakespeare, Python docs and skills; 16k tokens of each text corpus, all skills
    docs = held_out_mix(EvalData.load(EVAL_DATA), chars_per_corpus=50_000)
    (tmp_path / "held-out.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stats = calibrate("demo-moe", tmp_path / "held-out.jsonl", tmp_path / "stats", tokens=36864, seq_len=256,
                      progress=False).stats()
    for layer in stats.layers.values():
        assert (layer.count / stats.data["tokens"]).min() >= 0.01


def test_convert_with_defaults_on_the_shipped_teacher_gives_a_working_student(tmp_path, caplog):
    from edgeconv.evaluation.suite import evaluate
    from edgeconv.pipelines.convert import convert

    caplog.set_level(logging.INFO, logger="edgeconv")
    student = convert("demo-moe", tmp_path / "student", data=None, progress=False).out
    notes = [r.getMessage() for r in caplog.records]
    assert any(str(CALIBRATION_DATA.name) in n for n in notes)  # says which text it calibrated on
    cfg = json.loads((student / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["intermediate_size"] == 2 * 256
    report = evaluate(student, EVAL_DATA, tokens=2048, examples=1, choices=8, show_progress=False)
    vocab = cfg["vocab_size"]
    # An untrained model sits near the vocabulary size (4,300 here); the undistilled student keeps part of
    # what the teacher learned (about 500 on the full held-out set, the teacher 104).
    assert all(ppl < vocab / 5 for ppl in report.perplexity.values()), report.perplexity


@pytest.mark.parametrize("quant", ["F32", "F16"])
def test_teacher_perplexity_in_llama_cpp_matches_torch(quant, tmp_path):
    from edgeconv.evaluation.suite import evaluate
    from edgeconv.stages.export_gguf import export_gguf

    gguf = export_gguf("demo-moe", tmp_path / f"teacher-{quant}.gguf", quant).path
    kw = dict(tokens=4096, window=256, examples=2, choices=8, show_progress=False)
    torch_report, gguf_report = evaluate(demo_path("demo-moe"), EVAL_DATA, **kw), evaluate(gguf, EVAL_DATA, **kw)
    assert gguf_report.perplexity_tokens == torch_report.perplexity_tokens
    for corpus, ppl in torch_report.perplexity.items():
        assert gguf_report.perplexity[corpus] == pytest.approx(ppl, rel=0.005)
