"""Model cards the Hugging Face Hub understands (issue 20): README.md in every dense checkpoint edgeconv writes
(assemble, distill, prune), NAME.md beside a GGUF export; huggingface_hub.ModelCard loads each and its data holds
base_model (the teacher), library_name, pipeline_tag, tags and license, and the text holds the method (the plan, the
calibration, the distillation) and, for exports, the parity table. The bundle's card: tests/test_build.py."""

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from edgeconv.calibration.stats import CalibrationStats
from edgeconv.config import DistillConfig
from edgeconv.io.output_dir import read_manifest
from edgeconv.planning.from_stats import stats_plan
from edgeconv.reporting.model_card import BENCH_END, BENCH_START, with_bench
from edgeconv.stages.assemble import assemble
from edgeconv.stages.distill import distill
from edgeconv.stages.export_gguf import export_gguf
from edgeconv.stages.prune import prune


@pytest.fixture(scope="module")
def teacher(calibrated, tmp_path_factory):
    """A tiny Qwen3-MoE whose card declares a license, and its calibration statistics."""
    src, stats = calibrated["Qwen3MoeForCausalLM"]
    copy = tmp_path_factory.mktemp("card") / "tiny-qwen3-moe"
    shutil.copytree(src, copy)
    (copy / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n\n# a tiny teacher\n")
    return copy, stats


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    src, stats = teacher
    plan = stats_plan(CalibrationStats.load(stats), groups=2, model=src, stats_path=str(stats))
    out = tmp_path_factory.mktemp("card-student") / "tiny-dense"
    assemble(src, plan, out, progress=False)
    return out


def card_data(path) -> tuple[dict, str]:
    card = ModelCard.load(path)
    return card.data.to_dict(), card.text


def test_assembled_student_card(student, teacher, corpus):
    data, text = card_data(student / "README.md")
    assert data["base_model"] == "tiny-qwen3-moe" and data["license"] == "mit"  # the teacher, and its card's license
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert "base_model_relation" not in data  # none of the Hub's relations is what a MoE-to-dense student is
    assert {"moe-to-dense", "qwen3", "qwen3_moe"} <= set(data["tags"]) and "distillation" not in data["tags"]
    assert "experts pruned and merged into a dense model" in text  # ... so the card says what it is
    for fact in ("`do-acp`", "`cp`", "2 of 8, merged into 2 groups", f"`{corpus.name}`", "512 tokens",
                 "Experts kept, per MoE layer"):
        assert fact in text, fact
    assert (student / "README.md").name in read_manifest(student)["files"]  # hashed like every other file


def test_distilled_student_card(student, teacher, corpus, tmp_path):
    src, _ = teacher
    cfg = DistillConfig(tokens=1024, seq_len=32, batch_size=8, checkpoint_every=1000)
    out = tmp_path / "distilled"
    distill(src, student, corpus, out, cfg, progress=False)
    data, text = card_data(out / "README.md")
    assert data["base_model"] == "tiny-qwen3-moe" and data["license"] == "mit"
    assert {"moe-to-dense", "distillation"} <= set(data["tags"])
    assert "then knowledge distillation from the MoE" in text
    assert f"1,024 tokens of `{corpus.name}`" in text and "`do-acp`" in text  # the plan came along (plan.json)
    assert json.loads((out / "plan.json").read_text()) == json.loads((student / "plan.json").read_text())


def test_gguf_export_card(student, tmp_path):
    export_gguf(student, tmp_path / "s.gguf", "Q8_0")
    data, text = card_data(tmp_path / "s.md")
    assert data["base_model"] == "tiny-qwen3-moe" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "llama-cpp-python" and data["pipeline_tag"] == "text-generation"
    assert {"gguf", "moe-to-dense"} <= set(data["tags"]) and data["license"] == "mit"
    assert "| perplexity, artifact / torch |" in text and "within 2%" in text  # the parity table, Q8_0's tolerance
    assert "`do-acp`" in text


def test_a_teacher_export_is_a_quantization_of_the_teacher(teacher, tmp_path):
    src, _ = teacher
    export_gguf(src, tmp_path / "t.gguf", "F16")
    data, _ = card_data(tmp_path / "t.md")
    assert data["base_model"] == "tiny-qwen3-moe" and data["base_model_relation"] == "quantized"
    assert data["license"] == "mit" and "moe-to-dense" not in data["tags"]


def test_pruned_card(tmp_path):
    from edgeconv.demo import demo_path

    out = tmp_path / "pruned"
    prune(demo_path("demo-dense"), out, ffn_width=256, tokens=512)
    data, text = card_data(out / "README.md")
    assert data["base_model"] == "demo-dense" and data["license"] == "apache-2.0"  # the demo model's own card
    assert "pruning" in data["tags"] and "width-pruned" in text and "4,096 -> 256" in text


def test_the_bench_headline_replaces_its_placeholder():
    card = f"---\nbase_model: x\n---\n\n# x\n\n{BENCH_START}\nnot measured\n{BENCH_END}\n\nmore\n"
    results = {"device": {"processor": "CPU X", "logical_cores": 2}, "runtime": {"version": "llama-cpp-python 0.3.36",
               "threads": 2}, "load_s": 0.1, "rss_after_load_mb": 70.0, "peak_rss_mb": 80.0, "decode_tok_s": 2000.0,
               "speed": [{"prompt_tokens": 64, "ttft_ms": 9.5}],
               "accuracy": {"perplexity": {"shakespeare": 100.0}, "exact_match_mean": 0.5, "choice_acc": 0.25}}
    new = with_bench(card, results, "here")
    assert "not measured" not in new and "2,000 tok/s" in new and "shakespeare 100.0" in new and new.endswith("more\n")
    assert with_bench(new, results, "here") == new  # idempotent: a skipped bench stage changes nothing
    assert ModelCard(new).data.base_model == "x"


def test_onnx_export_card(student, tmp_path):
    """An ONNX export's directory holds its card too: an int8 export is a quantization of the teacher's student."""
    from edgeconv.stages.export_onnx import export_onnx

    export_onnx(student, tmp_path / "onnx", "int8")
    data, text = card_data(tmp_path / "onnx" / "README.md")
    assert data["base_model"] == "tiny-qwen3-moe" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "onnxruntime" and data["pipeline_tag"] == "text-generation"
    assert {"onnx", "moe-to-dense", "qwen3"} <= set(data["tags"]) and data["license"] == "mit"
    assert "| perplexity, artifact / torch |" in text and "quantized for onnxruntime" in text
    assert "README.md" in read_manifest(tmp_path / "onnx")["files"]  # hashed like every other file


def test_onnx_genai_export_card(tmp_path):
    """An onnxruntime-genai export's card names the execution provider it was built for; fp32 is no quantization."""
    import tiny

    from edgeconv.families import family_for
    from edgeconv.planning.calibration_free import simple_plan
    from edgeconv.stages.export_onnx import export_onnx_genai

    src = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=5, hidden_size=64, head_dim=16),
                                       tmp_path / "wide-moe"))
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# a tiny teacher\n")
    dense = tmp_path / "wide-dense"
    assemble(src, simple_plan(family_for(tiny.config_of(src)), "ids:1,4"), dense, progress=False)
    export_onnx_genai(dense, tmp_path / "genai", "fp32")
    data, text = card_data(tmp_path / "genai" / "README.md")
    assert data["base_model"] == "wide-moe" and "base_model_relation" not in data
    assert data["library_name"] == "onnxruntime-genai" and data["pipeline_tag"] == "text-generation"
    assert {"onnx", "onnxruntime-genai", "moe-to-dense"} <= set(data["tags"]) and data["license"] == "apache-2.0"
    assert "built for the CPU execution provider" in text and "og.Model(" in text
