"""The memory planner predicts the GGUF llama.cpp writes (issue 21, point 2): every tensor's type as llama.cpp's
quantizer chooses it (its mix and its fallbacks for widths that are not a multiple of 256), the file's bytes, and
the parameter count of the student `edgeconv assemble` writes, for every family at a width that is a multiple of 256
and one that is not.

The files are made as `edgeconv export` makes them (the exporter's F32 GGUF, then llama.cpp's own quantizer); the
plan is made from config.json alone, with the tokenizer the student will carry (as `build` plans it)."""

import sys
from pathlib import Path

import gguf
import pytest
import tiny

from edgeconv.device.memory_fit import Config, estimate, gguf_file, tensor_shapes
from edgeconv.export.gguf import llamacpp
from edgeconv.export.gguf.type_choice import Hparams, Tensor, choose_types, fallback, use_more_bits
from edgeconv.export.gguf.writer import write_gguf
from edgeconv.families import family_for
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble

# hidden, attention width and FFN width all multiples of 256 ("k256"), or none of them ("odd": 288 and 320, which
# are multiples of 32, so Q4_K falls back to Q5_0, Q6_K to Q8_0).
WIDTHS = {"k256": {"hidden": 256, "head_dim": 64, "expert": 128}, "odd": {"hidden": 288, "head_dim": 72, "expert": 160}}
QUANTS = ["F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]
BUDGET = 10**12


def _overrides(arch: str, w: dict) -> dict:
    """The tiny teacher of `arch` at width kind `w`: the student keeps 2 experts (+ the shared ones)."""
    e = w["expert"]
    return {
        "Qwen3MoeForCausalLM": {"head_dim": w["head_dim"], "moe_intermediate_size": e},
        "Qwen2MoeForCausalLM": {"moe_intermediate_size": e, "shared_expert_intermediate_size": 2 * e},
        "MixtralForCausalLM": {"head_dim": w["head_dim"], "intermediate_size": e},
        "OlmoeForCausalLM": {"intermediate_size": e},
        "DeepseekV2ForCausalLM": {"moe_intermediate_size": e // 2, "intermediate_size": e},  # 2 routed + 2 shared
        "GptOssForCausalLM": {"head_dim": w["head_dim"], "intermediate_size": e},
    }[arch] | {"hidden_size": w["hidden"]}


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """(arch, width kind) -> (teacher dir, student dir, assembled parameter count, F32 GGUF of the student)."""
    root = tmp_path_factory.mktemp("size-plan")
    out = {}
    for arch in tiny.ARCHS:
        for kind, w in WIDTHS.items():
            d = root / f"{arch}-{kind}"
            teacher = tiny.add_tokenizer(tiny.save(tiny.build_model(arch, seed=5, weight_std=0.06,
                                                                    **_overrides(arch, w)), d / "teacher"))
            result = assemble(teacher, simple_plan(family_for(tiny.config_of(teacher)), "ids:1,4"), d / "student",
                              progress=False)
            write_gguf(d / "student", d / "student-F32.gguf", "F32")
            out[arch, kind] = (teacher, d / "student", result.manifest["summary"]["dense_params"],
                               d / "student-F32.gguf")
    return out


def _written(students, arch: str, kind: str, quant: str) -> Path:
    teacher, student, _, f32 = students[arch, kind]
    path = f32.with_name(f"student-{quant}.gguf")
    if not path.exists():
        if quant == "F32":
            return f32
        if quant in ("F16", "BF16"):
            write_gguf(student, path, quant)
        else:  # llama.cpp's quantizer on the exporter's float file, as `edgeconv export` does
            llamacpp.quantize(f32, path, quant)
    return path


@pytest.mark.parametrize("kind", list(WIDTHS))
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_the_plan_is_the_file_llama_cpp_writes(students, arch, kind):
    teacher, student, assembled_params, _ = students[arch, kind]
    family = family_for(tiny.config_of(teacher))
    width = 2 * family.expert_width + family.shared_width
    dense = family.dense_config(width)  # what `build --dry-run` plans from: the teacher's config.json alone
    for quant in QUANTS:
        path = _written(students, arch, kind, quant)
        planned = gguf_file(dense, quant, tokenizer=teacher)
        assert planned is not None and planned.vocab == "tokenizer"
        # Tensor by tensor, the type llama.cpp chose.
        written = llamacpp.tensor_types(path)
        assert planned.types.types == written, (quant, {n: (planned.types.types.get(n), t) for n, t in
                                                         written.items() if planned.types.types.get(n) != t})
        # The tensor data to the byte (alignment included), the whole file within 1 % (the acceptance is 3 %): the
        # plan knows the header but general.*'s description of the model (name, lineage), a few hundred bytes.
        size = path.stat().st_size
        assert planned.tensor_bytes == size - gguf.GGUFReader(path).data_offset, quant
        assert planned.file_bytes == pytest.approx(size, rel=0.01), quant
        est = estimate(dense, Config(2, width, "gguf", quant, 64), BUDGET, tokenizer=teacher)
        assert est.weights_bytes == planned.file_bytes
        # Without a tokenizer the tokenizer's metadata is estimated from the vocabulary size.
        assert estimate(dense, Config(2, width, "gguf", quant, 64), BUDGET).weights_bytes == pytest.approx(
            size, rel=0.03), quant
    # The dry run's parameter count is the assembled student's.
    assert est.params == assembled_params
    q4 = gguf_file(dense, "Q4_K_M", tokenizer=teacher)
    if kind == "k256":  # the FFN, embeddings and head take their k-quants (DeepSeek's tiny MLA widths need not)
        assert all(q4.types.types[n] in ("Q4_K", "Q6_K") for n in q4.types.quantized
                   if "ffn_" in n or n in ("output.weight", "token_embd.weight")), q4.types.types
    else:  # the input widths 288 and 320 refuse Q4_K, Q5_K and Q6_K: Q5_0, Q5_1, Q8_0 instead, and the estimate says so
        assert q4.types.fallbacks and {q4.types.types[n] for n in q4.types.fallbacks} <= {"Q5_0", "Q5_1", "Q8_0", "F16"}
        est = estimate(dense, Config(2, width, "gguf", "Q4_K_M", 64), BUDGET, tokenizer=teacher)
        assert est.fallbacks == len(q4.types.fallbacks) and "not a multiple of 256" in est.breakdown()


def test_deeper_models_follow_the_layer_rules(tmp_path):
    """use_more_bits at 10 layers: ffn_down (and attn_v) in Q6_K in the layers llama.cpp picks, counted per tensor
    for a dense student, by the layer in the name for the 8-expert teacher (whose attn_v / attn_k go to Q8_0)."""
    teacher = tiny.add_tokenizer(tiny.save(tiny.build_model(
        "Qwen3MoeForCausalLM", seed=6, weight_std=0.06, hidden_size=256, head_dim=64, moe_intermediate_size=256,
        num_hidden_layers=10), tmp_path / "teacher"))
    assemble(teacher, simple_plan(family_for(tiny.config_of(teacher)), "ids:1,4"), tmp_path / "student",
             progress=False)
    for name, model in (("teacher", teacher), ("student", tmp_path / "student")):
        config = tiny.config_of(model)
        write_gguf(model, tmp_path / f"{name}-F32.gguf", "F32")
        for quant in ("Q4_K_M", "Q5_K_M"):
            path = tmp_path / f"{name}-{quant}.gguf"
            llamacpp.quantize(tmp_path / f"{name}-F32.gguf", path, quant)
            planned = gguf_file(config, quant, tokenizer=model)
            assert planned.types.types == llamacpp.tensor_types(path), (name, quant)
            assert planned.tensor_bytes == path.stat().st_size - gguf.GGUFReader(path).data_offset
            down = [planned.types.types[f"blk.{i}.ffn_down{'_exps' if name == 'teacher' else ''}.weight"]
                    for i in range(10)]
            assert down == ["Q6_K" if use_more_bits(i, 10) else quant[:4] for i in range(10)]
            if name == "teacher":
                assert planned.types.types["blk.3.attn_v.weight"] == "Q8_0"


def test_the_rules_as_llama_cpp_states_them():
    # use_more_bits(i, n): i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2 (integer division).
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    # tensor_type_fallback: by the type's block, then F16 when even 32 does not divide the width.
    assert [fallback(t, 2880) for t in ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0")] == [
        "Q5_0", "Q5_1", "Q8_0", "Q8_0", "Q4_0"]
    assert fallback("Q4_K", 2304) == "Q4_K" and fallback("Q4_K", 100) == "F16"
    hp = Hparams("llama", 4, 0, 8, 8)
    tensors = [Tensor("token_embd.weight", (1000, 2880)), Tensor("output_norm.weight", (2880,), True)] + [
        Tensor(f"blk.{i}.{n}", s) for i in range(4) for n, s in
        (("attn_v.weight", (512, 2304)), ("attn_output.weight", (2304, 2304)), ("ffn_down.weight", (2880, 11520)),
         ("ffn_gate_inp.weight", (1, 2880)))]
    types = choose_types(tensors, "MOSTLY_Q4_K_M", hp).types
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output's rule, Q6_K, whose block 2880 refuses
    assert types["output_norm.weight"] == "F32" and types["blk.0.ffn_gate_inp.weight"] == "F32"  # not quantized
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert types["blk.1.attn_output.weight"] == "Q4_K"
    # Exactly 8 experts: attn_v in Q8_0, attn_output Q5_K (for Q4_K_M); an 80-layer llama with GQA: attn_v Q5_K.
    eight = choose_types(tensors, "MOSTLY_Q4_K_M", Hparams("llama", 4, 8, 8, 8)).types
    assert eight["blk.1.attn_v.weight"] == "Q8_0" and eight["blk.1.attn_output.weight"] == "Q5_K"
    deep = [Tensor(f"blk.{i}.attn_v.weight", (512, 2304)) for i in range(80)]
    seventy = choose_types(deep, "MOSTLY_Q4_K_M", Hparams("llama", 80, 0, 64, 8)).types
    assert seventy["blk.11.attn_v.weight"] == "Q5_K" and seventy["blk.0.attn_v.weight"] == "Q6_K"
    with pytest.raises(ValueError, match="not implemented"):
        choose_types(tensors, "MOSTLY_IQ2_XS", hp)


@pytest.fixture(scope="module")
def rs():
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import real_shape_models
    finally:
        sys.path.remove(str(bench))
    return real_shape_models


def test_the_gpt_oss_student_of_the_issue(rs):
    """GPT-OSS-20B cut to 2 layers, 4 of 32 experts (FFN 11,520): the dry run counted 234.3 M parameters, the
    assembled student has 275.8 M (the fused gate_up_proj is 2 x the width wide); its hidden 2880 is no multiple of
    256, so Q4_K_M's file is 0.19 GB, not the 0.14 GB the bits per weight gave."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgeconv.device.memory_fit import weight_bytes

    config = rs.make_config("gpt-oss-20b", 2)
    family = family_for(config)
    width = 4 * family.expert_width
    dense = family.dense_config(width)
    est = estimate(dense, Config(4, width, "gguf", "Q4_K_M", 4096), BUDGET, tokenizer=rs.DEMO)
    skip = ("architectures", "model_type", "quantization_config", "transformers_version")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "gpt_oss", **{k: v for k, v in dense.items() if k not in skip}))
    assert est.params == sum(p.numel() for p in model.parameters()) == pytest.approx(275.8e6, abs=0.05e6)
    assert est.weights_bytes == pytest.approx(0.19e9, abs=0.005e9)
    assert weight_bytes(tensor_shapes(dense), "gguf", "Q4_K_M") < 0.9 * est.weights_bytes  # bits per weight alone
    assert est.fallbacks > 0 and "not a multiple of 256" in est.breakdown()
