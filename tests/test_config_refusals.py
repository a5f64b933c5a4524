"""Refusals that depend on config.json alone come while planning: `build --dry-run` says them, nothing is written."""

import pytest
import tiny
from click.testing import CliRunner
from test_bad_inputs import assert_error

from edgeconv.cli import main
from edgeconv.errors import EdgeconvError
from edgeconv.export.gguf.arch import check_config


def dry_run(src, tmp_path, *args):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["build", str(src), "--target", "laptop", "--out", str(out), "--dry-run",
                                       "--no-measure", *args])
    assert not out.exists() and not out.with_name("bundle.work").exists()  # nothing written, refused or not
    return result


def test_deepseek_without_q_lora_is_refused_by_the_dry_run(tmp_path):
    """llama.cpp takes a DeepSeek-V2 without q LoRA only as V2-Lite, which it recognises by its 27 layers."""
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("DeepseekV2ForCausalLM", q_lora_rank=None), tmp_path / "ds"))
    assert_error(dry_run(src, tmp_path), "no q LoRA", "27 layers", "ONNX")


def test_onnx_genai_families_are_refused_by_the_dry_run(tmp_path):
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("OlmoeForCausalLM"), tmp_path / "olmoe"))
    assert_error(dry_run(src, tmp_path, "--format", "onnx-genai"), "does not support OlmoeForCausalLM", "gguf")


def test_gpt_oss_with_released_yarn_plans_a_gguf_student(tmp_path):
    """truncate: false (every released GPT-OSS) no longer stops a build: the student gets llama.cpp's YaRN."""
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("GptOssForCausalLM"), tmp_path / "gpt-oss"))
    assert tiny.config_of(src)["rope_scaling"]["truncate"] is False
    result = dry_run(src, tmp_path)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("arch, extra, phrase", [
    ("GptOssForCausalLM", {}, "truncate=false"),
    ("DeepseekV2ForCausalLM", {"q_lora_rank": None}, "27 layers"),
    ("Qwen2MoeForCausalLM", {"mlp_only_layers": [0]}, "needs every layer to be MoE"),
])
def test_what_the_gguf_writer_refuses_is_known_from_the_config(arch, extra, phrase):
    """The teachers' configs as they are (a teacher GGUF for `bench --teacher`): the same refusals as the writer's
    (tests/test_export_gguf.py::test_gguf_refuses_what_llama_cpp_cannot_run), from config.json alone."""
    with pytest.raises(EdgeconvError, match=phrase):
        check_config(tiny.build_model(arch, **extra).config.to_dict() | {"architectures": [arch]})
