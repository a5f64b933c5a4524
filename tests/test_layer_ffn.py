"""With a random router and a K-expert plan, each dense FFN equals the scaled sum of the kept experts."""

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from edgeconv.families import family_for
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble

KEEP = "ids:1,4,6"  # three experts, not the first ones, in every MoE layer
K = 3


def expert_outputs(arch, mlp, x):
    """Each expert's FFN output, computed from the MoE module in memory (transformers' own code)."""
    if arch == "GptOssForCausalLM":  # fused parameters: the expert loop of GptOssExperts, unrolled
        ex = mlp.experts
        outs = []
        for e in range(ex.num_experts):
            gate_up = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
            gate, up = gate_up[..., ::2].clamp(max=ex.limit), gate_up[..., 1::2].clamp(-ex.limit, ex.limit)
            outs.append(((up + 1) * gate * torch.sigmoid(gate * ex.alpha)) @ ex.down_proj[e] + ex.down_proj_bias[e])
        return outs
    return [expert(x) for expert in mlp.experts]


def shared_output(arch, mlp, x):
    if arch == "Qwen2MoeForCausalLM":
        return 0.5 * mlp.shared_expert(x)  # documented constant without calibration: sigmoid(0)
    if arch == "DeepseekV2ForCausalLM":
        return mlp.shared_experts(x)
    return 0


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_dense_ffn_is_scaled_sum_of_kept_experts(arch, random_checkpoints, tmp_path):
    moe, src = random_checkpoints[arch]
    family = family_for(tiny.config_of(src))
    assemble(src, simple_plan(family, KEEP, "uniform"), tmp_path / "dense", progress=False)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    x = torch.randn(5, family.hidden_size, generator=torch.Generator().manual_seed(3))
    checked = 0
    with torch.no_grad():
        for layer in family.moe_layers():
            block = getattr(moe.model.layers[layer], "block_sparse_moe", None) or moe.model.layers[layer].mlp
            outs = expert_outputs(arch, block, x)
            want = sum(outs[e] for e in (1, 4, 6)) * (family.routed_scale() / K) + shared_output(arch, block, x)
            got = dense.model.layers[layer].mlp(x.unsqueeze(0))
            got = (got[0] if isinstance(got, tuple) else got).squeeze(0)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), f"layer {layer}"
            checked += 1
    assert checked == len(family.moe_layers()) >= 1


def test_source_dense_layers_are_copied_and_padded(random_checkpoints, tmp_path):
    """Qwen2-MoE layer 0 is dense in the source: same output after zero-padding to the new width."""
    moe, src = random_checkpoints["Qwen2MoeForCausalLM"]
    family = family_for(tiny.config_of(src))
    assemble(src, simple_plan(family, KEEP, "uniform"), tmp_path / "dense", progress=False)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    assert dense.config.intermediate_size == K * 16 + 24 > 40
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.allclose(dense.model.layers[0].mlp(x), moe.model.layers[0].mlp(x), atol=1e-6)
