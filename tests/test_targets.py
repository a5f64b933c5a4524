"""Target profiles, the memory estimate, and the build plan that refuses what cannot fit before any work."""

import json
import math

import pytest
import tiny
from click.testing import CliRunner

from edgeconv.cli import main
from edgeconv.device.memory_fit import (
    Config,
    estimate,
    kv_cache_bytes,
    largest_fit,
    tensor_shapes,
    weight_bytes,
)
from edgeconv.device.profiles import TARGETS, get_target, load_profile
from edgeconv.errors import EdgeconvError
from edgeconv.quant import quant_names

ISSUE_TARGETS = {"laptop": 16, "laptop-apple": 16, "jetson-orin-nano": 8, "jetson-agx-orin": 64, "android": 8,
                 "iphone": 6}

# Mixtral-8x7B's config.json (no weights needed: the plan reads the config alone).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def test_the_six_profiles_load_with_the_issue_figures():
    assert {name: TARGETS.get(name).memory_gb for name in TARGETS} == ISSUE_TARGETS
    assert get_target("jetson").name == "jetson-orin-nano" and get_target("phone").name == "android"
    nano = get_target("jetson-orin-nano")
    assert (nano.usable_memory_gb, nano.bandwidth_gb_s, nano.accelerator) == (5.0, 68.0, "cuda")
    assert get_target("jetson-agx-orin").bandwidth_gb_s == 204.8
    assert get_target("android").usable_memory_gb == 3.5 and get_target("iphone").usable_memory_gb == 3.0
    for name in TARGETS:
        p = TARGETS.get(name)
        assert p.quant in quant_names("gguf") and p.threads > 0 and p.context >= 512 and "bench.py" in p.bench.command


def test_unknown_and_invalid_profiles_say_what_to_do(tmp_path):
    with pytest.raises(EdgeconvError, match="known targets: android, iphone.*aliases: jetson = jetson-orin-nano"):
        get_target("jetsn")
    good = (get_target("laptop").source and open(get_target("laptop").source).read())
    custom = tmp_path / "my-board.toml"
    custom.write_text(good.replace('name = "laptop"', 'name = "my-board"').replace("usable_memory_gb = 10.0",
                                                                                     "usable_memory_gb = 2.0"))
    assert get_target(str(custom)).usable_memory_gb == 2.0
    for bad, field in [(good.replace("usable_memory_gb = 10.0", "usable_memory_gb = 20.0"), "exceeds memory_gb"),
                       (good.replace('quant = "Q4_K_M"', 'quant = "Q3_X"'), "Q3_X"),
                       (good + "\nspeed = 3\n", "speed"),
                       (good.replace("threads = 4", "threads = 0"), "threads"),
                       (good.replace("context = 4096", "context = "), "not valid TOML")]:
        custom.write_text(bad)
        with pytest.raises(EdgeconvError, match=field) as err:
            load_profile(custom)
        assert "\n" not in err.value.line()


def test_targets_command_lists_every_profile():
    result = CliRunner().invoke(main, ["targets"])
    assert result.exit_code == 0
    for name in ISSUE_TARGETS:
        assert name in result.output
    assert "jetson = jetson-orin-nano" in result.output
    as_json = json.loads(CliRunner().invoke(main, ["targets", "--json"]).output)
    assert {p["name"] for p in as_json} == set(ISSUE_TARGETS)


def test_weight_estimate_matches_the_tensors_llama_cpp_writes(tmp_path):
    """Per type, the estimate's weight bytes equal the bytes of the tensors in the exported GGUF."""
    import gguf

    from edgeconv.export.gguf import llamacpp
    from edgeconv.export.gguf.writer import write_gguf

    # Widths that are multiples of 256, so no tensor falls back to another type.
    model = tiny.build_model("Qwen3MoeForCausalLM", seed=3, hidden_size=256, moe_intermediate_size=256, head_dim=64,
                             num_hidden_layers=2)
    src = tiny.add_tokenizer(tiny.save(model, tmp_path / "moe"))
    config = tiny.config_of(src)
    write_gguf(src, tmp_path / "m-F32.gguf", "F32", None)
    write_gguf(src, tmp_path / "m-F16.gguf", "F16", None)
    for quant in ("Q8_0", "Q4_K_M"):  # quantized by llama.cpp itself, as `edgeconv export` does
        llamacpp.quantize(tmp_path / "m-F32.gguf", tmp_path / f"m-{quant}.gguf", quant)
    for quant in ("F32", "F16", "Q8_0", "Q4_K_M"):
        path = tmp_path / f"m-{quant}.gguf"
        stored = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
        # The MoE itself: shapes from the meta-device instantiation of its own config.
        est = weight_bytes(tensor_shapes(config), "gguf", quant)
        assert est == pytest.approx(stored, rel=0.05 if quant == "Q4_K_M" else 0.01), quant


def test_kv_cache_and_fit_on_a_known_model():
    # Mixtral-8x7B's KV cache at 4096 tokens in F16: 32 layers x 2 x 8 heads x 128 x 4096 x 2 bytes = 512 MiB.
    assert kv_cache_bytes(MIXTRAL_8X7B, 4096) == 32 * 2 * 8 * 128 * 4096 * 2
    from edgeconv.families import family_for

    family = family_for(MIXTRAL_8X7B)
    dense = family.dense_config(2 * 14336)
    shapes = tensor_shapes({**dense, "intermediate_size": 2 * 14336})
    params = sum(math.prod(s) for s in shapes.values())
    # embeddings + output 2 x 32000 x 4096, per layer: attention 2 x 4096^2 + 2 x 4096 x 1024, FFN 3 x 4096 x 28672
    want = 2 * 32000 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 28672 + 2 * 4096) + 4096
    assert params == want
    budget = int(5e9)
    est = estimate(dense, Config(2, 2 * 14336, "gguf", "Q4_K_M", 4096), budget)
    assert not est.fits and est.total_bytes > 7e9
    best = largest_fit(dense, est.config, 14336, 0, budget)
    assert best.fits and best.config.groups == 1
    # Nothing larger fits: one more notch of precision or context breaks the budget.
    assert not estimate(dense, Config(1, 14336, "gguf", "Q4_K_M", best.config.context), budget).fits or \
        best.config.quant == "Q4_K_M"
    assert not estimate(dense, Config(1, 14336, "gguf", best.config.quant, best.config.context * 2), budget).fits


def test_build_stops_before_any_work_when_the_model_cannot_fit(tmp_path):
    model = tmp_path / "mixtral-8x7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MIXTRAL_8X7B))  # no weights: nothing heavy may run
    out = tmp_path / "dist" / "bundle"
    result = CliRunner().invoke(main, ["build", str(model), "--target", "jetson-orin-nano", "--out", str(out)])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: mixtral-8x7b does not fit jetson-orin-nano: weights")
    assert "of 5.00 GB usable" in line
    assert "the largest configuration that fits: --groups 1 --quant Q4_0 --context 2048" in line
    assert not (tmp_path / "dist").exists()  # no stage started
    # The configuration it names does fit, and is accepted by the same command.
    ok = CliRunner().invoke(main, ["build", str(model), "--target", "jetson", "--groups", "1", "--quant", "Q4_0",
                                   "--context", "2048", "--out", str(out), "--dry-run"])
    assert ok.exit_code == 0, ok.output
    assert "fits" in ok.output and not (tmp_path / "dist").exists()


def test_dry_run_prints_the_whole_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["build", "--target", "laptop", "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    for stage in ("convert", "distill", "export", "parity", "bundle", "bench"):
        assert stage in result.output
    assert "5.64 M parameters" in result.output and "Q4_K_M" in result.output and "fits" in result.output
    assert not out.exists() and not (tmp_path / "b.work").exists()
    bad = CliRunner().invoke(main, ["build", "--target", "android", "--format", "onnx-genai", "--dry-run"])
    assert bad.exit_code == 2 and "runs gguf, not onnx-genai" in bad.output
    bad = CliRunner().invoke(main, ["build", "--target", "laptop", "--groups", "17", "--dry-run"])
    assert bad.exit_code == 2 and "outside 1..16" in bad.output
