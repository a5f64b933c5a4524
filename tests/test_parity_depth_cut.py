"""The GGUF parity check on a depth cut: the exported file's own bytes for its first N layers, run by llama.cpp,
against torch running the same N layers (edgeconv.export.gguf.depth_cut)."""

import json

import gguf
import numpy as np
import pytest
import tiny
from click.testing import CliRunner
from test_bad_inputs import assert_error

from edgeconv.cli import main
from edgeconv.export.gguf.depth_cut import cut_gguf, cut_refusal, default_cut
from edgeconv.families import family_for
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages import export_gguf as export_gguf_mod
from edgeconv.stages.assemble import assemble
from edgeconv.stages.export_gguf import export_gguf

SLIDING, FULL = "sliding_attention", "full_attention"
GPT_OSS = {"num_hidden_layers": 4, "layer_types": [SLIDING, FULL, SLIDING, FULL],
           "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                            "truncate": True, "original_max_position_embeddings": 4096}}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """4-layer models: a Qwen3-MoE teacher, its dense student, a GPT-OSS teacher (sliding and full layers)."""
    root = tmp_path_factory.mktemp("deep")
    qwen = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=5, num_hidden_layers=4),
                                        root / "qwen3moe"))
    dense = root / "dense"
    assemble(qwen, simple_plan(family_for(tiny.config_of(qwen)), "ids:1,4"), dense, progress=False)
    gpt = tiny.add_tokenizer(tiny.save(tiny.build_model("GptOssForCausalLM", seed=5, **GPT_OSS), root / "gptoss"))
    return {"teacher": qwen, "student": dense, "gpt-oss": gpt}


@pytest.mark.parametrize("name", ["teacher", "student", "gpt-oss"])
def test_cut_parity_matches_torch_at_f32_and_publishes_the_whole_file(name, deep, tmp_path):
    result = export_gguf(deep[name], tmp_path / "m.gguf", "F32", parity_layers=2)
    assert result.parity.passed and result.parity.top1_agreement == 1.0
    report = json.loads((tmp_path / "m.parity.json").read_text())
    assert report["parity_depth"] == {"layers": 2, "of": 4, "why": "--parity-layers 2"}
    reader = gguf.GGUFReader(result.path)  # the published file keeps every layer; the cut is gone
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.block_count"].contents() == 4
    assert any(t.name.startswith("blk.3.") for t in reader.tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf", "m.md", "m.parity.json"]
    assert "first 2 of 4 layers" in (tmp_path / "m.md").read_text()


def test_torch_must_run_the_same_layers(deep, tmp_path, monkeypatch):
    """The check can fail: the 2-layer GGUF against the 4-layer torch model misses the F32 tolerance."""
    monkeypatch.setattr(export_gguf_mod, "cut_overrides", lambda config, layers: {})
    with pytest.raises(Exception, match="failed its parity check"):
        export_gguf(deep["student"], tmp_path / "m.gguf", "F32", parity_layers=2)


def test_the_cut_holds_the_files_bytes(deep, tmp_path):
    full = export_gguf(deep["teacher"], tmp_path / "q8.gguf", "Q8_0", parity_layers=0).path
    info = cut_gguf(full, tmp_path / "cut.gguf", 1)
    a, b = gguf.GGUFReader(full), gguf.GGUFReader(tmp_path / "cut.gguf")
    assert info == {"layers": 1, "of": 4, "tensors": len(b.tensors), "bytes": (tmp_path / "cut.gguf").stat().st_size}
    src = {t.name: t for t in a.tensors}
    assert {t.name for t in b.tensors} == {n for n in src if not n.startswith(("blk.1.", "blk.2.", "blk.3."))}
    for t in b.tensors:
        assert t.tensor_type == src[t.name].tensor_type
        assert np.array_equal(np.asarray(t.data), np.asarray(src[t.name].data))
    assert b.fields["qwen3moe.block_count"].contents() == 1
    kv = lambda r: {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}  # noqa: E731
    assert {k: v for k, v in kv(b).items() if k != "qwen3moe.block_count"} == \
        {k: v for k, v in kv(a).items() if k != "qwen3moe.block_count"}


def test_auto_cuts_a_file_larger_than_memory(deep, tmp_path, monkeypatch):
    import edgeconv.forward.layer_by_layer as lbl

    full = export_gguf(deep["gpt-oss"], tmp_path / "whole.gguf", "F16")
    assert json.loads((tmp_path / "whole.parity.json").read_text())["parity_depth"]["layers"] == 4
    monkeypatch.setattr(lbl, "available_bytes", lambda device, processes=1: full.path.stat().st_size // 4)
    export_gguf(deep["gpt-oss"], tmp_path / "cut.gguf", "F16")
    depth = json.loads((tmp_path / "cut.parity.json").read_text())["parity_depth"]
    assert depth["layers"] == 2 and depth["of"] == 4 and "exceeds" in depth["why"]


def _config(arch: str, **fields) -> dict:
    return tiny.tiny_config(arch).to_dict() | {"architectures": [arch]} | fields


def test_default_cut_holds_every_kind_of_layer():
    qwen3 = _config("Qwen3MoeForCausalLM", num_hidden_layers=48)
    assert default_cut(qwen3) == 2
    deepseek = _config("DeepseekV2ForCausalLM", num_hidden_layers=27)
    assert default_cut(deepseek) == 2
    assert default_cut(deepseek | {"first_k_dense_replace": 3}) == 4  # a MoE layer after the dense ones
    assert default_cut(_config("Qwen2MoeForCausalLM", num_hidden_layers=24, mlp_only_layers=[0, 1])) == 3
    assert default_cut(qwen3 | {"layer_types": [SLIDING] * 2 + [FULL] * 46}) == 3
    assert default_cut(qwen3 | {"num_hidden_layers": 1}) == 1


def test_cuts_llama_cpp_cannot_run_are_refused(deep, tmp_path):
    lite = _config("DeepseekV2ForCausalLM", num_hidden_layers=27, q_lora_rank=None)
    assert "27 layers" in cut_refusal(lite, 2)
    assert cut_refusal(lite, 27) is None
    assert cut_refusal(lite | {"q_lora_rank": 16}, 2) is None
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(deep["student"]), "--quant", "F32", "--parity-layers", "5",
                                  "--out", str(tmp_path / "m.gguf")])
    assert_error(result, "--parity-layers 5: the model has 4 layers")
    assert not list(tmp_path.iterdir())


def test_cli_passes_the_depth(deep, tmp_path):
    result = CliRunner().invoke(main, ["export", str(deep["student"]), "--quant", "F32", "--parity-layers", "3",
                                       "--out", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.parity.json").read_text())["parity_depth"]["layers"] == 3
