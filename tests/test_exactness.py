"""The method's anchor: with uniform routing over all E experts, MoE == dense built from all E experts / E."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
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


def load(path):
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    return model.eval(), info


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_uniform_router_all_experts_is_exact(arch, uniform_checkpoints, tmp_path):
    src = uniform_checkpoints[arch]
    family = family_for(tiny.config_of(src))
    plan = simple_plan(family, f"first:{tiny.E}", "uniform")
    assemble(src, plan, tmp_path / "dense", progress=False)

    moe, _ = load(src)
    dense, info = load(tmp_path / "dense")
    assert type(dense).__name__ == DENSE_CLASS[arch]
    # Every dense parameter came from the files: nothing missing, nothing left over.
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = moe(ids).logits, dense(ids).logits
    # fp32 throughout; only summation order differs (E expert outputs vs one wide matmul).
    assert (want - got).abs().max().item() <= 1e-5
