"""Every on-disk layout a family has shipped assembles to the same dense weights."""

import json

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from edgeconv.families import family_for
from edgeconv.families.layouts import dequantize_mxfp4
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble


def dense_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assemble_both(a, b, tmp_path, experts="ids:0,3,5"):
    family = family_for(tiny.config_of(a))
    plan = simple_plan(family, experts, "uniform")
    assemble(a, plan, tmp_path / "from_a", progress=False)
    assemble(b, plan, tmp_path / "from_b", progress=False)
    return dense_tensors(tmp_path / "from_a"), dense_tensors(tmp_path / "from_b")


FUSABLE = [a for a in tiny.ARCHS if a != "GptOssForCausalLM"]


@pytest.mark.parametrize("arch", FUSABLE)
def test_per_expert_and_fused_layouts_agree(arch, random_checkpoints, tmp_path):
    src = random_checkpoints[arch][1]
    fused = tiny.fuse_experts(src, tmp_path / "fused")
    family = family_for(tiny.config_of(src))
    assert type(family.layout(Checkpoint(src), family.moe_layers()[0])).__name__ == "PerExpert"
    assert type(family.layout(Checkpoint(fused), family.moe_layers()[0])).__name__ == "FusedGateUp"
    a, b = assemble_both(src, fused, tmp_path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_mixtral_v4_names_are_read(random_checkpoints):
    src = random_checkpoints["MixtralForCausalLM"][1]
    names = Checkpoint(src).names()
    assert any(".block_sparse_moe.experts.0.w1.weight" in n for n in names)


def _quantize_like_release(w_t):
    """Random MXFP4 codes with the shapes GPT-OSS ships: [E, rows, cols/32, 16] blocks, [E, rows, cols/32] scales."""
    E, rows, cols = w_t.shape
    g = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 130, (E, rows, cols // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


def test_gpt_oss_mxfp4_matches_bf16(random_checkpoints, tmp_path):
    """A released-style MXFP4 checkpoint and its bf16 dequantization (by transformers) assemble identically."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = random_checkpoints["GptOssForCausalLM"][1]
    tensors = dense_tensors(src)
    mx, bf = {}, {}
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            blocks, scales = _quantize_like_release(t.transpose(1, 2))
            mx[name + "_blocks"], mx[name + "_scales"] = blocks, scales
            bf[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        else:
            mx[name] = bf[name] = t.to(torch.bfloat16)
    for d, ts in (("mx", mx), ("bf", bf)):
        (tmp_path / d).mkdir()
        save_file(ts, tmp_path / d / "model.safetensors", metadata={"format": "pt"})
        config = tiny.config_of(src)
        if d == "mx":
            config["quantization_config"] = {"quant_method": "mxfp4"}
        (tmp_path / d / "config.json").write_text(json.dumps(config))
    family = family_for(tiny.config_of(src))
    assert type(family.layout(Checkpoint(tmp_path / "mx"), 0)).__name__ == "GptOssMxfp4"
    a, b = assemble_both(tmp_path / "mx", tmp_path / "bf", tmp_path)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert "quantization_config" not in json.loads((tmp_path / "from_a" / "config.json").read_text())


def test_mxfp4_dequantization_by_hand():
    # One row of 32 values: codes 0x21 -> low nibble 1 (+0.5), high nibble 2 (+1.0); code 0x9F -> 15 (-6.0), 9 (-0.5).
    blocks = torch.tensor([[[0x21] * 8 + [0x9F] * 8]], dtype=torch.uint8)
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2 ** (128 - 127) = 2
    values = dequantize_mxfp4(blocks, scales, torch.float32)[0]
    assert values[:16].tolist() == [1.0, 2.0] * 8
    assert values[16:].tolist() == [-12.0, -1.0] * 8
