"""Dense-to-dense width pruning (the study's baseline): exact when only dead channels or heads are removed,
importance hand-checked, parameter matching, bad inputs."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from edgeconv.errors import EdgeconvError
from edgeconv.stages.prune import prune
from edgeconv.study.dense_prune import (
    importance,
    keep_top,
    param_count,
    width_for_params,
)

WIDTH = 48


def _dense(path, dead_channels=(), dead_kv=(), arch="qwen3"):
    """A tiny dense model; `dead_channels` get zero up_proj rows, `dead_kv` key/value heads zero v_proj rows
    (so those channels and heads output exactly zero everywhere)."""
    common = {**tiny.COMMON, "intermediate_size": WIDTH}
    config = tf.Qwen3Config(**common, head_dim=8) if arch == "qwen3" else tf.Qwen2Config(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[list(dead_channels)] = 0
            d = config.head_dim if arch == "qwen3" else config.hidden_size // config.num_attention_heads
            for g in dead_kv:
                layer.self_attn.v_proj.weight[g * d:(g + 1) * d] = 0
                if layer.self_attn.v_proj.bias is not None:
                    layer.self_attn.v_proj.bias[g * d:(g + 1) * d] = 0
    model.save_pretrained(path)
    tiny.add_tokenizer(path)
    return model


def _logits(model_or_path, ids):
    model = model_or_path if isinstance(model_or_path, torch.nn.Module) else \
        AutoModelForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 8, 1, 300]])


def test_keeping_everything_is_the_source(tmp_path, corpus):
    src = _dense(tmp_path / "src")
    res = prune(tmp_path / "src", tmp_path / "out", data=corpus, ffn_width=WIDTH, tokens=512, seq_len=32)
    assert torch.equal(_logits(src, IDS), _logits(tmp_path / "out", IDS))
    assert res.manifest["summary"]["params"] == res.manifest["summary"]["source_params"]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_removing_dead_channels_and_heads_is_exact(tmp_path, corpus, arch):
    dead = list(range(0, WIDTH, 2))  # every other channel
    src = _dense(tmp_path / "src", dead_channels=dead, dead_kv=[0], arch=arch)
    res = prune(tmp_path / "src", tmp_path / "out", data=corpus, ffn_width=WIDTH // 2, kv_heads=1,
                tokens=512, seq_len=32)
    diff = (_logits(src, IDS) - _logits(tmp_path / "out", IDS)).abs().max()
    assert diff < 1e-5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["intermediate_size"], config["num_key_value_heads"], config["num_attention_heads"]) == (24, 1, 2)
    kept = json.loads((tmp_path / "out" / "importance.json").read_text())
    assert all(v["kv_groups"] == [1] and v["kept_channels"] == list(range(1, WIDTH, 2)) for v in kept.values())
    assert all(v["channels"][c] == 0 for v in kept.values() for c in dead)  # dead channels scored exactly 0
    assert res.manifest["summary"]["params"] == param_count(config)


def test_importance_by_hand():
    """One layer, FFN activations known: mean |x| over tokens for channels, mean L2 norm per head."""
    config = tf.Qwen3Config(**{**tiny.COMMON, "num_hidden_layers": 1}, intermediate_size=4, head_dim=8)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    seen = {}
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("ffn", a[0].clone()))
    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("attn", a[0].clone()))
    imp = importance(model, IDS)[0]
    ffn = seen["ffn"].reshape(-1, 4)
    attn = seen["attn"].reshape(-1, 4, 8)
    assert torch.allclose(imp["channels"].float(), ffn.abs().mean(0), atol=1e-6)
    assert torch.allclose(imp["heads"].float(), attn.norm(dim=-1).mean(0), atol=1e-6)
    assert keep_top(torch.tensor([0.1, 3.0, 3.0, 0.5]), 2) == [1, 2]


def test_parameter_matching():
    config = {**tiny.COMMON, "model_type": "qwen3", "head_dim": 8, "intermediate_size": 400}
    w = width_for_params(config, param_count(config, 96))
    assert w == 96
    assert param_count(config, width_for_params(config, param_count(config, 96) - 1)) < param_count(config, 96)


def test_rerun_is_skipped(tmp_path, corpus):
    _dense(tmp_path / "src")
    kw = {"data": corpus, "ffn_width": 16, "tokens": 512, "seq_len": 32}
    assert not prune(tmp_path / "src", tmp_path / "out", **kw).skipped
    assert prune(tmp_path / "src", tmp_path / "out", **kw).skipped


def test_bad_inputs(tmp_path, corpus, qwen3_dir):
    with pytest.raises(EdgeconvError, match="is a Mixture-of-Experts"):
        prune(qwen3_dir, tmp_path / "o", data=corpus, ffn_width=8)
    _dense(tmp_path / "src")
    with pytest.raises(EdgeconvError, match="FFN has 48 channels"):
        prune(tmp_path / "src", tmp_path / "o", data=corpus, ffn_width=64)
    with pytest.raises(EdgeconvError, match="key/value heads"):
        prune(tmp_path / "src", tmp_path / "o", data=corpus, ffn_width=8, kv_heads=3)
    with pytest.raises(EdgeconvError, match="exactly one of"):
        prune(tmp_path / "src", tmp_path / "o", data=corpus)
    with pytest.raises(EdgeconvError, match="no room for an FFN"):
        prune(tmp_path / "src", tmp_path / "o", data=corpus, params=1000)


def test_cli(tmp_path, corpus):
    from click.testing import CliRunner

    from edgeconv.cli import main

    _dense(tmp_path / "src")
    _dense(tmp_path / "like")  # same architecture: --params DIR matches its count, so nothing is cut
    r = CliRunner().invoke(main, ["prune", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--params",
                                  str(tmp_path / "like"), "--data", str(corpus), "--tokens", "512"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "config.json").read_text())["intermediate_size"] == WIDTH
    r = CliRunner().invoke(main, ["prune", str(tmp_path / "src"), "--out", str(tmp_path / "o2"), "--params", "lots"])
    assert r.exit_code == 2 and "is not a count or a checkpoint directory" in r.output
