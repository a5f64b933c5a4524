"""The one table of quantization types (edgeconv/quant.py): every entry walked against the parity gate, llama.cpp,
the memory planner and the exporters' defaults; `build` refuses a type its format lacks at planning; the
memory-fit hint names only options `build` has; `export` and `build` spell quantization --quant."""

import inspect
import json
import re
from dataclasses import asdict

import numpy as np
import pytest
from click.testing import CliRunner
from test_bad_inputs import assert_error

from edgeconv.cli import _export_quant, main
from edgeconv.device import runner
from edgeconv.device.memory_fit import bits_per_weight, quants_below
from edgeconv.device.profiles import PROFILE_DIR, get_target, load_profile
from edgeconv.errors import EdgeconvError
from edgeconv.export import parity
from edgeconv.quant import FORMATS, TABLE, default_quant, get_quant, quant_names, quants

# Mixtral-8x7B's config.json: the plan reads the config alone, and this one does not fit a 5 GB Jetson.
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- the table, walked ------------------------------------------------------------------------------------------


def test_every_entry_is_looked_up_by_format_and_name():
    assert {q.format for q in TABLE} == set(FORMATS)
    assert len({q.key for q in TABLE}) == len(TABLE)
    for q in TABLE:
        assert get_quant(q.format, q.name) is q
        assert q.bits > 0 and bits_per_weight(q.format, q.name) == q.bits  # what memory planning uses
        assert q.help and "\n" not in q.help
    for fmt in FORMATS:
        assert [q.default for q in quants(fmt)].count(True) == 1
        bits = [q.bits for q in quants(fmt)]
        assert bits == sorted(bits, reverse=True)  # widest first: the order the help and the planner list them


def test_unknown_names_fail_with_the_names_of_that_format():
    with pytest.raises(EdgeconvError, match="unknown onnx-genai quantization 'int8'") as err:
        get_quant("onnx-genai", "int8")
    assert "fp32, fp16, int4" in err.value.line()
    with pytest.raises(EdgeconvError, match="unknown GGUF quantization 'int4'") as err:
        get_quant("gguf", "int4")
    assert "F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0" in err.value.line()
    with pytest.raises(EdgeconvError, match="unknown format"):
        get_quant("tflite", "int8")


def test_every_tolerance_is_the_parity_gates_for_its_artifact_type():
    """compare(FORMAT:NAME) records and applies the entry's tolerance: the perplexity check fails exactly where the
    ratio leaves the entry's band, for a sweep of artifacts on both sides of every band."""
    rng = np.random.default_rng(0)
    reference = [rng.normal(0, 3, (24, 64)).astype(np.float32) for _ in range(3)]
    ids = [list(rng.integers(0, 64, 24)) for _ in range(3)]
    for q in TABLE:
        assert parity.tolerance(q.key) == q.tolerance
        same = parity.compare(q.key, reference, reference, ids)
        assert same.passed and same.tolerance == asdict(q.tolerance) and same.kind == q.key
        sides = set()
        for t in np.linspace(0.8, 1.2, 41):  # sharper or flatter logits: the perplexity moves, the top-1s do not
            p = parity.compare(q.key, reference, [r * t for r in reference], ids)
            off = abs(p.ppl_ratio - 1) > q.tolerance.ppl
            assert any("perplexity ratio" in f for f in p.failures) == off, (q.key, t, p.ppl_ratio)
            sides.add(off)
        assert sides == {True, False}, q.key
    with pytest.raises(EdgeconvError, match="no parity tolerance"):
        parity.tolerance("Q4_K_M")


def test_every_gguf_entry_is_a_type_llama_cpp_and_gguf_know():
    import gguf
    import llama_cpp

    for q in quants("gguf"):
        number = gguf.LlamaFileType[q.ftype].value
        assert getattr(llama_cpp, q.llama_ftype) == number, q.name  # what llama.cpp's quantizer is given
        assert runner.GGUF_FILE_TYPES[number] == q.name  # what bench.py reads back from general.file_type
        assert q.ftype.removeprefix("MOSTLY_").removeprefix("ALL_") == q.name  # edgeconv bench's gguf_quant
        widest = gguf.GGMLQuantizationType[q.widest]
        block = gguf.GGML_QUANT_SIZES[widest][0]
        assert q.k_quant == (block == gguf.QK_K == 256), q.name  # k-quants: rows in blocks of 256
        if q.float_type:  # written by edgeconv itself
            assert gguf.GGMLQuantizationType[q.float_type].name == q.name == q.widest and not q.k_quant
    for fmt in ("onnx", "onnx-genai"):
        assert all(q.ftype is q.float_type is q.widest is None and not q.k_quant for q in quants(fmt))


def test_the_exporters_defaults_are_the_tables():
    from edgeconv.stages.export_gguf import export_gguf
    from edgeconv.stages.export_onnx import export_onnx, export_onnx_genai

    for fn, fmt, arg in [(export_gguf, "gguf", "quant"), (export_onnx, "onnx", "precision"),
                         (export_onnx_genai, "onnx-genai", "precision")]:
        assert inspect.signature(fn).parameters[arg].default == default_quant(fmt)
    assert [_export_quant(fmt, None, None) for fmt in FORMATS] == ["Q4_K_M", "fp32", "int4"]


def test_the_planner_only_tries_types_of_the_format():
    assert quants_below("gguf", "F32") == ["F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]  # BF16 = F16
    assert quants_below("onnx-genai", "fp32") == ["fp32", "fp16", "int4"]  # the builder has no int8
    assert quants_below("onnx", "fp16") == ["fp16", "int8", "int4"]


# --- bug 1: build --format onnx-genai --quant int8 passed planning, then failed after convert and distill ---------


@pytest.mark.parametrize("dry_run", [True, False])
def test_build_refuses_a_type_the_format_lacks_at_planning(tmp_path, dry_run):
    out = tmp_path / "bundle"
    args = ["build", "--target", "laptop", "--format", "onnx-genai", "--quant", "int8", "--out", out, "--no-measure",
            "--distill-tokens", "0", "--no-bench"] + (["--dry-run"] if dry_run else [])
    line = assert_error(run(*args), "unknown onnx-genai quantization 'int8'", "fp32, fp16, int4")
    assert "convert" not in line and list(tmp_path.iterdir()) == []  # nothing written, no stage started


def test_a_profile_with_a_type_its_format_lacks_is_refused(tmp_path):
    good = open(get_target("laptop").source).read()
    for field, bad, known in [("onnx_precision", 'onnx_precision = "int8"', "fp32, fp16, int4"),
                              ("quant", 'quant = "int4"', "Q4_K_M")]:
        custom = tmp_path / "board.toml"
        custom.write_text(good.replace('onnx_precision = "int4"', bad) if field == "onnx_precision"
                          else good.replace('quant = "Q4_K_M"', bad))
        with pytest.raises(EdgeconvError, match=f"{field}: .*not a") as err:
            load_profile(custom)
        assert known in err.value.line() and "\n" not in err.value.line()


# --- bug 2: the memory-fit hint printed --precision for ONNX, an option build does not have ---------------------


# Jetson profiles offer GGUF only (no aarch64 CUDA wheel of onnxruntime-genai): onnx-genai is planned for a copy of
# the laptop profile with a Jetson-sized memory.
@pytest.mark.parametrize("fmt,quant", [("gguf", None), ("onnx-genai", None), ("onnx-genai", "fp16"),
                                       ("gguf", "F16")])
def test_the_memory_fit_hint_names_only_build_options(tmp_path, fmt, quant):
    model = tmp_path / "mixtral-8x7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    out = tmp_path / "dist" / "bundle"
    target = "jetson-orin-nano"
    if fmt == "onnx-genai":
        laptop = (PROFILE_DIR / "laptop.toml").read_text()
        target = tmp_path / "small-laptop.toml"
        target.write_text(re.sub(r"(?m)^usable_memory_gb = \S+", "usable_memory_gb = 6.0",
                                 laptop.replace('name = "laptop"', 'name = "small-laptop"')))
    args = ["build", model, "--target", target, "--format", fmt, "--out", out, "--no-measure", "--dry-run"]
    line = assert_error(run(*args, *(["--quant", quant] if quant else [])), "does not fit ",
                        "the largest configuration that fits: --groups 1 --quant")
    hint = line.split("the largest configuration that fits: ")[1].split(" (")[0]
    flags = re.findall(r"(--[a-z][a-z-]*) (\S+)", hint)
    options = set(re.findall(r"--[a-z][a-z-]*", run("build", "--help").output))
    assert flags and all(flag in options for flag, _ in flags), (hint, options)
    assert dict(flags)["--quant"] in quant_names(fmt)
    ok = run(*args, *hint.split())  # the named configuration is accepted as is
    assert ok.exit_code == 0 and "fits" in ok.output, ok.output
    assert not (tmp_path / "dist").exists()


# --- export and build spell it --quant ---------------------------------------------------------------------------


def test_export_and_build_spell_quantization_quant():
    export_help, build_help = run("export", "--help").output, run("build", "--help").output
    assert "--quant" in export_help and "--quant" in build_help
    assert "--precision" not in export_help and "--precision" not in build_help  # the old spelling is hidden
    for q in TABLE:
        assert re.search(rf"{re.escape(q.format)}\s+{re.escape(q.name)}\s", export_help), q.key
    for fmt in ("gguf", "onnx-genai"):  # the formats a build can target
        assert ", ".join(quant_names(fmt)) in " ".join(build_help.split())


def test_export_quant_refusals_are_one_line_before_any_work(tmp_path):
    out = tmp_path / "o"
    assert_error(run("export", "--format", "onnx", "--quant", "int8", "--precision", "int4", "--out", out),
                 "--quant int8 and --precision int4 disagree")
    assert_error(run("export", "--format", "onnx-genai", "--quant", "int8", "--out", out),
                 "unknown onnx-genai quantization 'int8'", "fp32, fp16, int4")
    assert_error(run("export", "--format", "onnx-genai", "--precision", "int8", "--out", out),
                 "unknown onnx-genai quantization 'int8'")
    assert_error(run("export", "--format", "onnx", "--quant", "Q4_K_M", "--out", out),
                 "unknown ONNX quantization 'Q4_K_M'", "fp32, fp16, int8, int4")
    assert_error(run("export", "--format", "gguf", "--quant", "int4", "--out", tmp_path / "m.gguf"),
                 "unknown GGUF quantization 'int4'", "Q4_K_M")
    assert_error(run("export", "--format", "gguf", "--precision", "F16", "--out", tmp_path / "m.gguf"), "--quant")
    assert list(tmp_path.iterdir()) == []
    # the deprecated spelling maps to --quant (the same value given twice is fine)
    assert _export_quant("onnx", None, "int8") == _export_quant("onnx", "int8", "int8") == "int8"
