"""ONNX export: optimum-onnx for every supported teacher and student, onnxruntime's quantizers, the
onnxruntime-genai builder, the parity gate and bad inputs."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
import torch
from click.testing import CliRunner
from test_bad_inputs import assert_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeconv.cli import main
from edgeconv.errors import EdgeconvError
from edgeconv.export import parity as parity_mod
from edgeconv.export.onnx.exporter import GENAI_ARCHITECTURES, genai_logits, onnx_logits
from edgeconv.families import family_for
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble
from edgeconv.stages.export_onnx import export_onnx, export_onnx_genai

TEACHERS = ["Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM", "GptOssForCausalLM",
            "DeepseekV2ForCausalLM"]


def _pair(root, arch, seed, **overrides):
    src = tiny.add_tokenizer(tiny.save(tiny.build_model(arch, seed=seed, **overrides), root / arch))
    dense = root / f"dense-{arch}"
    assemble(src, simple_plan(family_for(tiny.config_of(src)), "ids:1,4"), dense, progress=False)
    return src, dense


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> checkpoint dir with tokenizer: MoE teachers and their assembled dense students."""
    root = tmp_path_factory.mktemp("onnx-models")
    out = {}
    for arch in TEACHERS:
        out[arch], out[f"dense-{arch}"] = _pair(root, arch, seed=3)
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Dense Qwen3 / Mistral students with head_dim 16 (onnxruntime's CPU GroupQueryAttention needs a multiple
    of 16)."""
    root = tmp_path_factory.mktemp("onnx-wide")
    return {arch: _pair(root, arch, seed=5, hidden_size=64, head_dim=16)[1]
            for arch in ("Qwen3MoeForCausalLM", "MixtralForCausalLM")}


def _torch_next_logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def _decode_step_with_cache(onnx_path, ids):
    """Prefill all but the last token, then feed the last one with the returned KV cache."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    n = len(ids) - 1
    feed = {"input_ids": np.array([ids[:n]]), "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n)[None]}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros([1 if isinstance(d, str) and "batch" in d else 0 if isinstance(d, str) else d
                                     for d in i.shape], np.float32)
    def only_inputs(d):  # GPT-OSS's graph has no position_ids: it derives positions from the mask
        return {k: v for k, v in d.items() if k in inputs}

    first = dict(zip(names, session.run(None, only_inputs(feed))))
    step = {"input_ids": np.array([ids[n:]]), "attention_mask": np.ones((1, n + 1), np.int64),
            "position_ids": np.array([[n]])}
    for name in names:
        if name.startswith("present"):
            step[name.replace("present", "past_key_values")] = first[name]
    return session.run(["logits"], only_inputs(step))[0][0, -1]


@pytest.mark.parametrize("name", TEACHERS + [f"dense-{a}" for a in TEACHERS])
def test_fp32_export_matches_torch(name, models, tmp_path):
    src = models[name]
    result = export_onnx(src, tmp_path / "out", "fp32")
    p = result.parity
    assert p.passed and p.top1_agreement == 1.0 and p.rel_diff < 1e-4 and abs(p.ppl_ratio - 1) < 1e-4, p
    assert p.routed == (name in TEACHERS)
    out = tmp_path / "out"
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "parity.json",
            "manifest.json"} <= {f.name for f in out.iterdir()}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]  # no temp dirs, no parity-failed file
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["format"] == "onnx" and report["precision"] == "fp32"
    assert report["files"]["model.onnx"] == (out / "model.onnx").stat().st_size > 0
    # KV cache in and out, and it works: one decode step with the cache matches torch's full forward.
    shapes = {i.name: i.shape for i in ort.InferenceSession(str(out / "model.onnx")).get_inputs()}
    inputs = set(shapes)
    config = tiny.config_of(src)
    n_layers = config["num_hidden_layers"]
    assert {f"past_key_values.{n_layers - 1}.value", "input_ids", "attention_mask"} <= inputs
    if config["model_type"] == "deepseek_v2":  # MLA caches keys and values of different widths per head
        assert shapes["past_key_values.0.key"][-1] == config["qk_nope_head_dim"] + config["qk_rope_head_dim"] == 12
        assert shapes["past_key_values.0.value"][-1] == config["v_head_dim"] == 8
    ids = AutoTokenizer.from_pretrained(out)(parity_mod.PROMPTS[2])["input_ids"][:20]
    np.testing.assert_allclose(_decode_step_with_cache(out / "model.onnx", ids), _torch_next_logits(src, ids),
                               atol=1e-3)


def test_tokenizer_hands_no_token_type_ids(models, tmp_path):
    src = models["dense-Qwen3MoeForCausalLM"]
    assert "token_type_ids" in AutoTokenizer.from_pretrained(src)("hello world")  # the source tokenizer does
    export_onnx(src, tmp_path / "out", "fp32")
    enc = AutoTokenizer.from_pretrained(tmp_path / "out")("hello world")
    assert set(enc) == {"input_ids", "attention_mask"}
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_input_names"] == [
        "input_ids", "attention_mask"]


def _op_types(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_and_int4_quantize_the_weights(models, tmp_path):
    src = models["dense-Qwen3MoeForCausalLM"]
    fp32 = export_onnx(src, tmp_path / "fp32", "fp32")
    int8 = export_onnx(src, tmp_path / "int8", "int8")
    assert int8.parity.passed and int8.parity.kind == "onnx:int8"
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= _op_types(tmp_path / "int8" / "model.onnx")
    int4 = export_onnx(src, tmp_path / "int4", "int4")
    assert int4.parity.passed and "MatMulNBits" in _op_types(tmp_path / "int4" / "model.onnx")
    nbits = [n for n in onnx.load(str(tmp_path / "int4" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    # every projection (q, k, v, o, gate, up, down per layer, lm_head) is 4-bit, in blocks of 32
    assert len(nbits) == 7 * tiny.config_of(src)["num_hidden_layers"] + 1
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in nbits)
    assert int4.files["model.onnx"] < fp32.files["model.onnx"]
    # quantization changes the logits (so the check compares something), within the int4 tolerance
    assert 1e-3 < int4.parity.max_abs_diff and abs(int4.parity.ppl_ratio - 1) <= 0.08
    report = json.loads((tmp_path / "int4" / "parity.json").read_text())
    assert report["conversion"]["block_size"] == 32 and report["conversion"]["symmetric"] is True


def test_fp16_runs_on_cpu_with_float32_io(models, tmp_path):
    src = models["dense-MixtralForCausalLM"]
    result = export_onnx(src, tmp_path / "fp16", "fp16")
    assert result.parity.passed and 1e-5 < result.parity.rel_diff < 3e-2
    model = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    weights = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    session = ort.InferenceSession(str(tmp_path / "fp16" / "model.onnx"))
    assert {i.type for i in session.get_inputs() if i.name.startswith("past")} == {"tensor(float)"}


@pytest.mark.parametrize("arch,precision", [("Qwen3MoeForCausalLM", "int4"), ("MixtralForCausalLM", "fp32")])
def test_genai_output_runs_in_onnxruntime_genai(wide, tmp_path, arch, precision):
    import onnxruntime_genai as og

    src, out = wide[arch], tmp_path / "genai"
    if arch == "MixtralForCausalLM":  # through the CLI (Mistral student)
        run = CliRunner().invoke(main, ["export", str(src), "--format", "onnx-genai", "--precision", precision,
                                        "--execution-provider", "cpu", "--out", str(out)])
        assert run.exit_code == 0, (run.output, run.exception)
        assert "passed" in run.stderr
    else:
        assert export_onnx_genai(src, out, precision).parity.passed
    assert (out / "genai_config.json").is_file()
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["format"] == "onnx-genai" and report["precision"] == precision
    # Independently of the stage: onnxruntime-genai's own tokenizer and generator, compared with torch.
    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    text = parity_mod.PROMPTS[1]
    full = AutoTokenizer.from_pretrained(src)(text, add_special_tokens=False)["input_ids"]
    assert list(tokenizer.encode(text)) == full
    ids = full[:40]  # the tiny models' context is 64
    got = genai_logits(out, [ids])[0]
    want = parity_mod.torch_logits(src, [ids])[0]
    check = parity_mod.compare(f"onnx-genai:{precision}", [want], [got], [ids])
    assert check.passed, check.failures
    if precision == "fp32":
        assert check.rel_diff < 1e-4
    else:
        assert check.max_abs_diff > 1e-3  # really 4-bit
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 5)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == len(ids) + 5


def test_genai_refuses_what_the_builder_cannot_do(models, wide, tmp_path):
    with pytest.raises(EdgeconvError, match="does not support OlmoeForCausalLM") as exc:
        export_onnx_genai(models["dense-OlmoeForCausalLM"], tmp_path / "a")
    assert all(a in str(exc.value) for a in GENAI_ARCHITECTURES)
    with pytest.raises(EdgeconvError, match="dense students"):
        export_onnx_genai(models["Qwen3MoeForCausalLM"], tmp_path / "b")
    with pytest.raises(EdgeconvError, match="multiple of 16"):
        export_onnx_genai(models["dense-Qwen3MoeForCausalLM"], tmp_path / "c")
    with pytest.raises(EdgeconvError, match="unknown onnx-genai quantization 'int8'"):
        export_onnx_genai(wide["Qwen3MoeForCausalLM"], tmp_path / "d", "int8")
    assert list(tmp_path.iterdir()) == []


def test_failing_parity_fails_the_export(models, tmp_path, monkeypatch):
    real = parity_mod.torch_logits

    def off(model_dir, ids):
        return [x + np.random.default_rng(0).normal(0, 1.0, x.shape).astype(np.float32) for x in real(model_dir, ids)]

    monkeypatch.setattr("edgeconv.stages.export_onnx.torch_logits", off)
    with pytest.raises(EdgeconvError, match="failed its parity check"):
        export_onnx(models["dense-Qwen3MoeForCausalLM"], tmp_path / "bad", "fp32")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.parity-failed.json"]
    report = json.loads((tmp_path / "bad.parity-failed.json").read_text())
    assert report["passed"] is False and report["files"]["model.onnx"] > 0


def test_parity_uses_the_onnx_logits(models, tmp_path, monkeypatch):
    """The artifact side of the check really is the exported graph: corrupt its logits and it fails."""
    def broken(path, ids):
        return [x[:, ::-1].copy() for x in onnx_logits(path, ids)]

    monkeypatch.setattr("edgeconv.stages.export_onnx.ox.onnx_logits", broken)
    with pytest.raises(EdgeconvError, match="failed its parity check"):
        export_onnx(models["OlmoeForCausalLM"], tmp_path / "bad", "int8")


def _granite_moe():
    """A tiny Granite-MoE: an architecture the ONNX export still refuses."""
    from transformers import GraniteMoeConfig

    config = GraniteMoeConfig(**tiny.COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def test_bad_export_inputs(models, tmp_path):
    src = models["dense-Qwen3MoeForCausalLM"]

    def run(*args):
        return CliRunner().invoke(main, ["export", *map(str, args)])

    assert_error(run(src, "--format", "onnx", "--precision", "int3", "--out", tmp_path / "a"),
                 "unknown ONNX quantization", "fp32, fp16, int8, int4")
    granite = tiny.add_tokenizer(tiny.save(_granite_moe(), tmp_path / "granite"))  # no ONNX config for it
    assert_error(run(granite, "--format", "onnx", "--out", tmp_path / "b"), "does not support GraniteMoeForCausalLM",
                 "qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v2")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_error(run(src, "--format", "onnx", "--out", blocker / "c"), "cannot write")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep")
    assert_error(run(src, "--format", "onnx", "--out", tmp_path / "d"), "edgeconv did not write",
                 "choose another --out")
    assert_error(run(src, "--format", "onnx", "--execution-provider", "cuda", "--out", tmp_path / "e"),
                 "--execution-provider is for --format onnx-genai")
    assert_error(run(src, "--format", "gguf", "--precision", "fp16", "--out", tmp_path / "f.gguf"), "--quant")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "file", "granite"]  # nothing partial left
    assert (tmp_path / "d" / "mine.txt").read_text() == "keep"


def test_cli_export_int8_then_refuses_to_overwrite_without_force(models, tmp_path):
    src = models["dense-Qwen2MoeForCausalLM"]
    args = ["export", str(src), "--format", "onnx", "--quant", "int8", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "perplexity ratio" in result.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["stage"] == "onnx" and "model.onnx" in manifest["files"]
    fp32 = ["export", str(src), "--format", "onnx", "--precision", "fp32", "--out", str(tmp_path / "o")]
    assert_error(CliRunner().invoke(main, fp32), "holds another edgeconv", "--force")
    forced = CliRunner().invoke(main, fp32 + ["--force"])
    assert forced.exit_code == 0 and json.loads((tmp_path / "o" / "parity.json").read_text())["precision"] == "fp32"
