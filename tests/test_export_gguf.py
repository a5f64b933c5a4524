"""GGUF export: every family llama.cpp supports round-trips, loads in llama.cpp and matches torch."""

import json

import gguf
import numpy as np
import pytest
import tiny
from click.testing import CliRunner
from test_bad_inputs import assert_error

from edgeconv.cli import main
from edgeconv.errors import EdgeconvError
from edgeconv.export import parity as parity_mod
from edgeconv.families import family_for
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble
from edgeconv.stages.export_gguf import export_gguf

TEACHERS = tiny.ARCHS
# llama.cpp implements YaRN only with a truncated correction range (see test_gguf_refuses_what_llama_cpp_cannot_run).
GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
                "original_max_position_embeddings": 4096}
OVERRIDES = {"Qwen2MoeForCausalLM": {"mlp_only_layers": []},  # llama.cpp's qwen2moe: every layer MoE
             "GptOssForCausalLM": {"rope_scaling": GPT_OSS_YARN}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> checkpoint dir with tokenizer: MoE teachers and their assembled dense students."""
    root = tmp_path_factory.mktemp("gguf-models")
    out = {}
    for arch in TEACHERS:
        src = tiny.add_tokenizer(tiny.save(tiny.build_model(arch, seed=3, **OVERRIDES.get(arch, {})), root / arch))
        out[arch] = src
        dense = root / f"dense-{arch}"
        assemble(src, simple_plan(family_for(tiny.config_of(src)), "ids:1,4"), dense, progress=False)
        out[f"dense-{arch}"] = dense
    return out


@pytest.mark.parametrize("name", TEACHERS + [f"dense-{a}" for a in TEACHERS])
def test_f32_round_trip_loads_and_matches_torch(name, models, tmp_path):
    src = models[name]
    result = export_gguf(src, tmp_path / f"{name}.gguf", "F32")
    assert result.parity.passed and result.parity.top1_agreement == 1.0
    reader = gguf.GGUFReader(result.path)
    names = {t.name for t in reader.tensors}
    config = tiny.config_of(src)
    n_layers = config["num_hidden_layers"]
    by_layer = [{n.split(".", 2)[2] for n in names if n.startswith(f"blk.{i}.")} for i in range(n_layers)]
    kinds = {frozenset(s) for s in by_layer}  # all layers alike, or dense and MoE layers each alike
    assert len(kinds) == (2 if name == "DeepseekV2ForCausalLM" else 1)
    # Every HF tensor is accounted for: per-expert tensors become one stacked tensor per projection.
    ckpt = Checkpoint(src)
    kept = [n for n in ckpt.names() if ".experts." not in n]
    split = sum(n.endswith("kv_b_proj.weight") for n in ckpt.names())  # MLA: k_b and v_b
    expected = len(kept) + split
    moe_layers = sum(any("ffn_gate_exps" in p for p in s) for s in by_layer)
    per_moe_layer = 6 if "GptOss" in name else 3
    assert len(names) == expected + moe_layers * per_moe_layer
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= names
    experts = config.get("num_experts") or config.get("num_local_experts")
    exps = [t for t in reader.tensors if t.name == "blk.0.ffn_gate_exps.weight"]
    if name in TEACHERS and name != "DeepseekV2ForCausalLM":  # its layer 0 is dense
        assert exps and list(exps[0].shape) == [config["hidden_size"],
                                                config.get("moe_intermediate_size") or config["intermediate_size"],
                                                experts]
    # Header keys llama.cpp would otherwise guess.
    arch = reader.fields["general.architecture"].contents()
    if arch != "deepseek2":  # MLA writes its compressed widths instead (checked by llama.cpp loading it)
        assert reader.fields[f"{arch}.attention.key_length"].contents() == config.get("head_dim", 8)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    saved = json.loads((tmp_path / f"{name}.parity.json").read_text())
    assert saved["passed"] and saved["format"] == "gguf" and saved["sha256"]
    assert (tmp_path / f"{name}.Modelfile").read_text().startswith("# Ollama")
    assert "parity vs torch" in (tmp_path / f"{name}.md").read_text()


def test_quantized_types_and_their_real_mix(models, tmp_path):
    src = models["dense-Qwen3MoeForCausalLM"]
    f16 = export_gguf(src, tmp_path / "f16.gguf", "F16")
    assert f16.type_mix.get("F16", 0) > 0 and f16.parity.passed
    q8 = export_gguf(src, tmp_path / "q8.gguf", "Q8_0")
    assert q8.type_mix.get("Q8_0", 0) > 0
    # hidden 32 is not a multiple of 256: Q4_K_M silently falls back for every matrix, and we say so.
    q4 = export_gguf(src, tmp_path / "q4.gguf", "Q4_K_M")
    assert q4.fallbacks and "Q4_K" not in q4.type_mix
    report = json.loads((tmp_path / "q4.parity.json").read_text())
    assert report["k_quant_fallbacks"] == q4.fallbacks and "fell back" in (tmp_path / "q4.md").read_text()


def _tensors(path):
    reader = gguf.GGUFReader(path)
    return reader, [(t.name, t.tensor_type.name, bytes(np.asarray(t.data).tobytes())) for t in reader.tensors]


@pytest.mark.parametrize("name", ["MixtralForCausalLM", "DeepseekV2ForCausalLM", "GptOssForCausalLM",
                                  "dense-Qwen3MoeForCausalLM", "dense-OlmoeForCausalLM", "bf16"])
def test_q8_0_written_directly_is_what_llama_cpps_quantizer_writes(name, models, tmp_path, monkeypatch):
    """Q8_0 is quantized by gguf-py in edgeconv's writer, with no float intermediate: the same tensor types (those
    llama.cpp cannot quantize included, e.g. MLA's 16-wide tensors) and bytes as llama-quantize from a float file.
    A few rows at a time (here 100 values, so tensors are cut into uneven pieces)."""
    from edgeconv.export.gguf import llamacpp, writer
    from edgeconv.export.gguf.writer import write_gguf

    monkeypatch.setattr(writer, "Q8_0_CHUNK", 100)

    src = models.get(name)
    if name == "bf16":  # a bf16 checkpoint: llama.cpp then quantizes from BF16
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(models["dense-Qwen3MoeForCausalLM"], dtype=torch.bfloat16)
        src = tiny.add_tokenizer(tiny.save(model, tmp_path / "bf16-model"))
    direct = export_gguf(src, tmp_path / "direct.gguf", "Q8_0")
    assert direct.parity.passed
    base = "BF16" if name == "bf16" else "F32"
    write_gguf(src, tmp_path / "base.gguf", base)
    llamacpp.quantize(tmp_path / "base.gguf", tmp_path / "llama.gguf", "Q8_0")
    # llama.cpp writes the tensors in its loader's order; edgeconv in the checkpoint's
    ours, theirs = sorted(_tensors(direct.path)[1]), sorted(_tensors(tmp_path / "llama.gguf")[1])
    assert [(n, t) for n, t, _ in ours] == [(n, t) for n, t, _ in theirs]
    assert "Q8_0" in {t for _, t, _ in ours}
    for (n, _, a), (_, _, b) in zip(ours, theirs, strict=True):
        assert a == b, n
    reader = gguf.GGUFReader(direct.path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert not (tmp_path / "direct.parity.json").read_text().count("base-")  # no intermediate was named


@pytest.fixture(scope="module")
def wide_dense(tmp_path_factory):
    """A dense Qwen3 student whose widths are multiples of 256, so every k-quant applies."""
    root = tmp_path_factory.mktemp("wide")
    src = tiny.build_model("Qwen3MoeForCausalLM", seed=4, weight_std=0.06, hidden_size=256, moe_intermediate_size=256,
                           head_dim=64, num_hidden_layers=2)
    src = tiny.add_tokenizer(tiny.save(src, root / "moe"))
    assemble(src, simple_plan(family_for(tiny.config_of(src))), root / "dense", progress=False)
    return root / "dense"


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q6_K"])
def test_k_quants_apply_at_multiples_of_256(wide_dense, tmp_path, quant):
    result = export_gguf(wide_dense, tmp_path / f"{quant}.gguf", quant)
    assert result.fallbacks == []
    assert result.type_mix.get(quant[:4], 0) > 0 or result.type_mix.get("Q6_K", 0) > 0
    assert result.parity.passed and abs(result.parity.ppl_ratio - 1) <= 0.05


def test_failing_parity_fails_the_export(models, tmp_path, monkeypatch):
    real = parity_mod.torch_logits

    def off(model_dir, ids, config_overrides=None):
        return [x + np.random.default_rng(0).normal(0, 1.0, x.shape).astype(np.float32) for x in real(model_dir, ids)]

    monkeypatch.setattr("edgeconv.stages.export_gguf.torch_logits", off)
    with pytest.raises(EdgeconvError, match="failed its parity check"):
        export_gguf(models["dense-Qwen3MoeForCausalLM"], tmp_path / "bad.gguf", "F32")
    assert not (tmp_path / "bad.gguf").exists()
    assert json.loads((tmp_path / "bad.parity-failed.json").read_text())["passed"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["bad.parity-failed.json"]


def test_bad_export_inputs(models, tmp_path):
    src = models["dense-Qwen3MoeForCausalLM"]

    def run(*args):
        return CliRunner().invoke(main, ["export", *map(str, args)])

    assert_error(run(src, "--quant", "Q3_X", "--out", tmp_path / "a.gguf"), "unknown GGUF quantization", "Q4_K_M")
    foo = tmp_path / "foo"
    foo.mkdir()
    config = tiny.config_of(src) | {"architectures": ["FooForCausalLM"]}
    (foo / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name.startswith("tokenizer") or f.name.endswith("index.json"):
            (foo / f.name).write_bytes(f.read_bytes())
    assert_error(run(foo, "--quant", "F16", "--out", tmp_path / "b.gguf"), "does not support FooForCausalLM", "ONNX")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_error(run(src, "--quant", "F16", "--out", blocker / "c.gguf"), "cannot write")
    (tmp_path / "d.gguf").write_text("old")
    assert_error(run(src, "--quant", "F16", "--out", tmp_path / "d.gguf"), "exists", "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf", "file", "foo"]  # nothing partial left


def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path):
    """Checked before writing anything: each of these loads in llama.cpp but would not match torch, or not load."""
    cases = {
        "yarn": ("GptOssForCausalLM", {}, "truncate=false"),  # GPT-OSS's own default rope scaling
        "lite": ("DeepseekV2ForCausalLM", {"q_lora_rank": None}, "27 layers"),
        "dense-layer": ("Qwen2MoeForCausalLM", {"mlp_only_layers": [0]}, "needs every layer to be MoE"),
    }
    for name, (arch, extra, phrase) in cases.items():
        src = tiny.add_tokenizer(tiny.save(tiny.build_model(arch, **extra), tmp_path / name))
        with pytest.raises(EdgeconvError, match=phrase):
            export_gguf(src, tmp_path / "out" / f"{name}.gguf", "F16")
    assert not (tmp_path / "out").exists(), "a refused export leaves nothing, not even the directory it made"


def test_importance_matrix_guides_the_quantizer(wide_dense, tmp_path):
    corpus = tiny.write_corpus(tmp_path / "calib.jsonl")
    plain = export_gguf(wide_dense, tmp_path / "plain.gguf", "Q4_K_M")
    guided = export_gguf(wide_dense, tmp_path / "guided.gguf", "Q4_K_M", imatrix_data=corpus, imatrix_tokens=1024)
    assert guided.parity.passed
    report = json.loads((tmp_path / "guided.parity.json").read_text())
    assert report["imatrix"]["tensors"] >= 7 * 2  # q, k, v, o, gate, up, down in both layers
    # Same weights, same type mix, different bytes: the importance vectors changed the rounding choices.
    assert guided.type_mix == plain.type_mix
    assert (tmp_path / "guided.gguf").read_bytes() != (tmp_path / "plain.gguf").read_bytes()
    with pytest.raises(EdgeconvError, match="applies to quantized types"):
        export_gguf(wide_dense, tmp_path / "f16.gguf", "F16", imatrix_data=corpus)
