"""Calibration: our MoE block equals transformers', and layer-by-layer statistics equal a full forward's."""

from dataclasses import fields

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from edgeconv.calibration.moe_block import CalibratedMoeBlock
from edgeconv.calibration.stats import CalibrationStats, LayerStats
from edgeconv.families import family_for
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.text_data import token_sequences
from edgeconv.stages.calibrate import calibrate, load_tokenizer


def moe_module(model, family, layer):
    module = model.model.layers[layer]
    return getattr(module, "block_sparse_moe", None) or module.mlp


def fresh_block(family, ckpt, layer, stride=1, gram=0):
    st = LayerStats.zeros(layer, family.num_experts, family.hidden_size,
                          family.read_shared_gate(ckpt, layer) is not None)
    return st, CalibratedMoeBlock(family, ckpt, layer, st, stride, gram)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_block_computed_from_files_equals_transformers_block(arch, random_checkpoints):
    model, src = random_checkpoints[arch]
    ckpt = Checkpoint(src)
    family = family_for(ckpt.config)
    x = torch.randn(2, 7, family.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for layer in family.moe_layers():
            want = moe_module(model, family, layer)(x)
            got = fresh_block(family, ckpt, layer)[1](x)
            want = want[0] if isinstance(want, tuple) else want
            got = got[0] if isinstance(got, tuple) else got
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), layer


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_layer_by_layer_stats_equal_full_forward_with_hooks(arch, calibrated, corpus):
    src, stats_dir = calibrated[arch]
    stats = CalibrationStats.load(stats_dir)
    ckpt = Checkpoint(src)
    family = family_for(ckpt.config)
    ids, _ = token_sequences(load_tokenizer(ckpt), corpus, 512, 32)
    # Reference: the whole model in memory, one forward per batch, hooks feeding each MoE block's input to
    # a statistics collector of its own.
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    ref = {}
    for layer in family.moe_layers():
        st, block = fresh_block(family, ckpt, layer, stride=max(1, ids.numel() // 64), gram=64)
        ref[layer] = st
        moe_module(model, family, layer).register_forward_pre_hook(lambda m, args, b=block: [b(args[0]), None][1])
    with torch.no_grad():
        for i in range(0, len(ids), 3):
            model(ids[i : i + 3])
    assert set(stats.layers) == set(ref)
    for layer, st in ref.items():
        got = stats.layers[layer]
        assert torch.equal(got.count, st.count), layer  # same routing decisions, token for token
        assert got.tokens == st.tokens == ids.numel() and got.gram_tokens == st.gram_tokens == 64
        for f in fields(LayerStats):
            a, b = getattr(got, f.name), getattr(st, f.name)
            if isinstance(a, torch.Tensor):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (layer, f.name)
        if got.shared_gate_sum is not None:
            assert got.shared_gate_sum == pytest.approx(st.shared_gate_sum, rel=1e-5)


def test_spilled_activations_give_the_same_statistics(calibrated, corpus, tmp_path):
    src, stats_dir = calibrated["Qwen3MoeForCausalLM"]
    spilled = calibrate(src, corpus, tmp_path / "s", tokens=512, seq_len=32, batch_size=3, gram_tokens=64,
                        max_activation_bytes=1024, progress=False)
    a, b = CalibrationStats.load(stats_dir), spilled.stats()
    for layer in a.layers:
        assert torch.equal(a.layers[layer].count, b.layers[layer].count)
        assert torch.allclose(a.layers[layer].gram_sum, b.layers[layer].gram_sum)
    assert not list(tmp_path.glob("edgeconv-acts-*")), "spill files must be removed"


def test_stats_hold_what_scorers_need(calibrated):
    stats = CalibrationStats.load(calibrated["Qwen2MoeForCausalLM"][1])
    st = stats.layers[1]
    assert st.count.sum() == 2 * st.tokens  # top-2: two routing slots per token
    assert torch.all(st.cp <= 1) and torch.all(st.cp[st.count > 0] > 0)
    assert 0 < st.shared_gate_mean < 1
    assert st.gram.shape == (8, 8) and torch.allclose(st.gram, st.gram.t())
    assert torch.all(torch.linalg.eigvalsh(st.gram) > -1e-6)  # a Gram matrix is positive semi-definite
    assert stats.data["tokens"] == 512 and (stats.model["fingerprint"]
                                            == Checkpoint(calibrated["Qwen2MoeForCausalLM"][0]).fingerprint)


def test_calibrate_rerun_is_skipped(calibrated, corpus):
    src, stats_dir = calibrated["MixtralForCausalLM"]
    again = calibrate(src, corpus, stats_dir, tokens=512, seq_len=32, batch_size=3, gram_tokens=64, progress=False)
    assert again.skipped
