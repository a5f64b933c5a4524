"""Dense2MoE upcycling: exact with no runs, exact up to the removed attention with a fused run and the router
pinned, similarity figures hand-checked, run selection, bad inputs."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from edgeconv.dense2moe.redundancy import Run, measure, parse_runs, select_runs
from edgeconv.errors import EdgeconvError
from edgeconv.stages.upcycle import upcycle

IDS = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 8, 1, 300, 11, 12]])


def _source(path, layers=4):
    torch.manual_seed(0)
    config = tf.Qwen3Config(**{**tiny.COMMON, "num_hidden_layers": layers}, intermediate_size=48, head_dim=8)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)  # norms away from 1 so the folding is exercised
    model.save_pretrained(path)
    tiny.add_tokenizer(path)
    return model.eval()


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _reference(src, ids, run: Run | None):
    """The source's own modules: the absorbed layers' attention dropped and their MLPs reading the run's
    first layer's post-attention residual, in parallel with its MLP."""
    m = src.model
    h = m.embed_tokens(ids)
    pe = m.rotary_emb(h, torch.arange(ids.shape[1])[None])
    absorbed = set(run.absorbed) if run else set()
    with torch.no_grad():
        for i, layer in enumerate(m.layers):
            if i in absorbed:
                continue
            h = h + layer.self_attn(layer.input_layernorm(h), position_embeddings=pe, attention_mask=None)[0]
            out = layer.mlp(layer.post_attention_layernorm(h))
            if run and i == run.first:
                for a in run.absorbed:
                    out = out + m.layers[a].mlp(m.layers[a].post_attention_layernorm(h))
            h = h + out
        return src.lm_head(m.norm(h))


def _pin(model):
    """Router logits 0 for every layer: each chosen expert gets weight 2 * sigmoid(0) = 1."""
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.zero_()
    return model


def test_no_runs_is_the_source(tmp_path, corpus):
    src = _source(tmp_path / "src")
    upcycle(tmp_path / "src", tmp_path / "out", runs="none", data=corpus, tokens=512, seq_len=32)
    out = _load(tmp_path / "out")
    assert type(out).__name__ == "Glm4MoeForCausalLM"
    with torch.no_grad():
        assert (out(IDS).logits - src(IDS).logits).abs().max() < 1e-5


@pytest.mark.parametrize("split,top_k", [(1, 1), (2, 2)])
def test_fused_run_differs_only_by_the_removed_attention(tmp_path, corpus, split, top_k):
    """Run 1-2 of 4 layers: layer 1 keeps attention, layer 2's MLP becomes its expert(s), layer 3 stays (an MoE
    holder with zero experts). split=2, top-2: the two halves of layer 2's MLP, both chosen, sum to it."""
    src = _source(tmp_path / "src")
    res = upcycle(tmp_path / "src", tmp_path / "out", runs="1-2", split=split, top_k=top_k, data=corpus,
                  tokens=512, seq_len=32)
    out = _pin(_load(tmp_path / "out"))
    with torch.no_grad():
        got = out(IDS).logits
    assert (got - _reference(src, IDS, Run(first=1, last=2))).abs().max() < 1e-4
    assert (got - src(IDS).logits).abs().max() > 1e-2  # and it is not the source
    plan = json.loads((tmp_path / "out" / "upcycle_plan.json").read_text())
    assert plan["removed_attention_layers"] == [2] and plan["layers"] == 3
    assert [k["kind"] for k in plan["layer_map"]] == ["dense", "fused", "moe-holder (zero experts, pinned)"]
    assert res.manifest["summary"]["params"] == sum(p.numel() for p in out.parameters())


def test_router_bias_pins_the_choice(tmp_path, corpus):
    """A random router cannot move a token off the only real expert: the spare slot's bias is -1e4."""
    src = _source(tmp_path / "src")
    upcycle(tmp_path / "src", tmp_path / "out", runs="1-2", data=corpus, tokens=512, seq_len=32)
    out = _load(tmp_path / "out")
    gate = out.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.tolist() == [0.0, -1e4]
    idx, weights = gate(torch.randn(20, 32))
    assert idx.unique().tolist() == [0]
    assert ((weights - 1).abs() < 0.2).all()  # 2 * sigmoid(small logit): about 1 at initialisation
    del src


def test_similarity_figures_by_hand(tmp_path):
    src = _source(tmp_path / "src")
    fig = measure(src, IDS)
    with torch.no_grad():
        hs = src(IDS, output_hidden_states=True).hidden_states  # the last one is after the final norm
    for i in range(len(src.model.layers) - 1):
        want = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean()
        assert fig["layer_similarity"][i] == pytest.approx(float(want), abs=1e-5)
    assert fig["mlp_input_similarity"][0] == 0.0


def test_run_selection():
    fig = {"layer_similarity": [0.5, 0.95, 0.97, 0.6, 0.99, 0.99],
           "mlp_input_similarity": [0.0, 0.92, 0.99, 0.99, 0.95, 0.8]}
    assert [r.label() for r in select_runs(fig, 0.9)] == ["0-2", "3-4"]
    assert [r.label() for r in select_runs(fig, 0.96)] == ["1-2"]
    assert select_runs(fig, 0.999) == []
    assert [r.label() for r in parse_runs("4-5,1-2", 6)] == ["1-2", "4-5"]
    with pytest.raises(EdgeconvError, match="overlap"):
        parse_runs("1-3,3-4", 6)
    with pytest.raises(EdgeconvError, match="0 <= FIRST < LAST < 6"):
        parse_runs("4-6", 6)


def test_bad_inputs(tmp_path, corpus, qwen3_dir):
    with pytest.raises(EdgeconvError, match="already a Mixture-of-Experts"):
        upcycle(qwen3_dir, tmp_path / "o", data=corpus, tokens=512, seq_len=32)
    _source(tmp_path / "src")
    with pytest.raises(EdgeconvError, match="covers every layer"):
        upcycle(tmp_path / "src", tmp_path / "o", runs="0-3", data=corpus, tokens=512, seq_len=32)
    with pytest.raises(EdgeconvError, match="selects no layer to fuse.*nothing was written"):
        upcycle(tmp_path / "src", tmp_path / "o", runs="auto", threshold=1.01, data=corpus, tokens=512, seq_len=32)
    assert not (tmp_path / "o").exists()
    with pytest.raises(EdgeconvError, match="must divide the FFN width 48"):
        upcycle(tmp_path / "src", tmp_path / "o", runs="1-2", split=5, data=corpus, tokens=512, seq_len=32)


def test_distill_the_upcycled_student(tmp_path, corpus):
    """The upcycle output is an MoE on purpose: distill accepts it (and still refuses other MoE students)."""
    from edgeconv.config import DistillConfig
    from edgeconv.stages.distill import distill

    _source(tmp_path / "src")
    upcycle(tmp_path / "src", tmp_path / "up", runs="1-2", data=corpus, tokens=512, seq_len=32)
    cfg = DistillConfig(tokens=64, seq_len=16, batch_size=2)
    res = distill(tmp_path / "src", tmp_path / "up", corpus, tmp_path / "d", cfg, progress=False)
    out = _load(tmp_path / "d")
    assert type(out).__name__ == "Glm4MoeForCausalLM"
    before = _load(tmp_path / "up").model.layers[1].mlp.gate.weight
    assert not torch.equal(out.model.layers[1].mlp.gate.weight, before)  # the router trained
    assert res.manifest["summary"]["final_loss"] is not None


@pytest.mark.parametrize("runs", ["1-2", "none"])
def test_gguf_export_loads_in_llama_cpp_and_matches_torch(tmp_path, corpus, runs):
    """llama.cpp's glm4moe takes the mix (leading dense layers, a fused layer, a zero-expert holder) with GQA;
    the export's own parity gate compares its logits with torch's."""
    from edgeconv.stages.export_gguf import export_gguf

    _source(tmp_path / "src")
    upcycle(tmp_path / "src", tmp_path / "up", runs=runs, data=corpus, tokens=512, seq_len=32, seed=1)
    res = export_gguf(tmp_path / "up", tmp_path / "up.gguf", "F32")
    assert res.parity.passed, res.parity.as_dict()
    p = res.parity
    # within the F32 gate (1e-2 of the largest logit; llama.cpp keeps its KV cache in f16): 1.1e-3 measured
    assert p.top1_agreement == 1.0 and p.positions_over_tolerance == 0 and p.rel_diff < 5e-3, p.as_dict()


def test_onnx_export_matches_torch(tmp_path, corpus):
    """optimum-onnx with edgeconv's GLM-4-MoE config (Qwen3 attention, every expert in the graph); the export's
    parity gate compares onnxruntime's logits with torch's, and routing is not frozen at trace time."""
    from edgeconv.stages.export_onnx import export_onnx

    _source(tmp_path / "src")
    upcycle(tmp_path / "src", tmp_path / "up", runs="1-2", split=2, data=corpus, tokens=512, seq_len=32, seed=1)
    res = export_onnx(tmp_path / "up", tmp_path / "onnx", "fp32")
    p = res.parity
    assert p.passed and p.top1_agreement == 1.0 and p.rel_diff < 1e-4, p.as_dict()
