"""The method's anchor: with uniform routing over all E experts, MoE == dense built from all E experts / E."""

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from edgeconv.families import family_for
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble

DENSE_CLASS = {
    "Qwen3MoeForCausalLM": "Qwen3ForCausalLM",
    "Qwen2MoeForCausalLM": "Qwen2ForCausalLM",
    "MixtralForCausalLM": "MistralForCausalLM",
    "OlmoeForCausalLM": "OlmoeForCausalLM",
    "DeepseekV2ForCausalLM": "DeepseekV2ForCausalLM",
    "GptOssForCausalLM": "GptOssForCausalLM",
}


def load(path, **overrides):
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True, **overrides
    )
    return model.eval(), info


def llama_cpp_rope(config: dict) -> dict:
    """The teacher as its student runs it: a GPT-OSS student gets llama.cpp's truncated YaRN (families/gpt_oss.py),
    so the anchor compares it with the teacher under the same rope."""
    scaling = config.get("rope_scaling") or {}
    return {"rope_scaling": {**scaling, "truncate": True}} if scaling.get("truncate") is False else {}


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_uniform_router_all_experts_is_exact(arch, uniform_checkpoints, tmp_path):
    src = uniform_checkpoints[arch]
    family = family_for(tiny.config_of(src))
    plan = simple_plan(family, f"first:{tiny.E}", "uniform")
    assemble(src, plan, tmp_path / "dense", progress=False)

    moe, _ = load(src, **llama_cpp_rope(tiny.config_of(src)))
    dense, info = load(tmp_path / "dense")
    assert type(dense).__name__ == DENSE_CLASS[arch]
    # Every dense parameter came from the files: nothing missing, nothing left over.
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = moe(ids).logits, dense(ids).logits
    # fp32 throughout; only summation order differs (E expert outputs vs one wide matmul).
    assert (want - got).abs().max().item() <= 1e-5


def test_gpt_oss_student_gets_llama_cpps_yarn(uniform_checkpoints, tmp_path):
    """Released GPT-OSS configs say truncate: false; the student is assembled with truncate: true (what llama.cpp
    runs), and only that key of its rope scaling differs from the teacher's."""
    src = uniform_checkpoints["GptOssForCausalLM"]
    teacher = tiny.config_of(src)["rope_scaling"]
    assert teacher["truncate"] is False  # transformers' GptOssConfig default, as released
    assemble(src, simple_plan(family_for(tiny.config_of(src)), "first:2"), tmp_path / "dense", progress=False)
    assert tiny.config_of(tmp_path / "dense")["rope_scaling"] == {**teacher, "truncate": True}
