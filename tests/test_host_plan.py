"""Issue 18, point 5: `build --dry-run` plans the host too (memory per stage, disk at the peak, rough time), and
refuses before any work what this machine cannot hold, naming the option that fixes it."""

import json
import math
import subprocess

import pytest
import tiny
from click.testing import CliRunner

from edgeconv.cli import main
from edgeconv.device.host_plan import (
    ADAMW_BYTES_PER_PARAM,
    PROCESS_BYTES,
    Host,
    cache_bytes_per_token,
    measure,
    teacher_shape,
)
from edgeconv.device.memory_fit import gguf_file, tensor_shapes
from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.pipelines.build import plan_build

BIG_HOST = Host("test cpu", 2, 10**13, 10**13)  # nothing is refused for memory

# A small Qwen3-MoE, every number below computed by hand from it.
SMALL = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 384, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "moe_intermediate_size": 16, "intermediate_size": 40, "num_experts": 8, "num_experts_per_tok": 2,
    "norm_topk_prob": True, "max_position_embeddings": 1024, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# Per layer: q 32x32 + k 32x16 + v 32x16 + o 32x32 = 3,072; q/k norms 8 + 8; two layer norms 32 + 32;
# router 8 x 32 = 256; experts 8 x 3 x 32 x 16 = 12,288. Embeddings and head 384 x 32 each, final norm 32.
SMALL_LAYER = 3072 + 16 + 64 + 256 + 12288  # 15,696
SMALL_PARAMS = 2 * SMALL_LAYER + 2 * 384 * 32 + 32  # 56,000
PER_EXPERT = 2 * (3 * 32 * 16 + 32)  # one expert over both layers, with its router row: 3,136
# The dense student at 2 groups (FFN 32): per layer attention 3,072 + norms 80 + MLP 3 x 32 x 32 = 6,224.
STUDENT_PARAMS = 2 * 6224 + 2 * 384 * 32 + 32  # 37,056

# Qwen3-30B-A3B's config.json (no weights: a config is enough to plan).
QWEN3_30B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "decoder_sparse_step": 1, "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 151936,
}


def config_dir(tmp_path, name, config):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_cache_bytes_per_token_match_the_cache_format():
    # k x (2 bytes of fp16 log-prob + index bytes) + 4 bytes of fp32 tail
    assert cache_bytes_per_token(64, 151_936) == 64 * (2 + 4) + 4 == 388  # int32 ids
    assert cache_bytes_per_token(64, 4096) == 64 * (2 + 2) + 4 == 260  # uint16 ids
    assert cache_bytes_per_token(64, 65_536) == 260 and cache_bytes_per_token(64, 65_537) == 388
    assert cache_bytes_per_token(64, 151_936) * 10**9 == 388 * 10**9  # 1 B tokens = 388 GB


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_teacher_counts_from_two_small_instantiations_equal_the_full_model(arch):
    config = {**tiny.tiny_config(arch).to_dict(), "architectures": [arch]}
    family = family_for(config)
    shapes = tensor_shapes(config)  # every expert instantiated on the meta device
    t = teacher_shape(config, family)
    assert t.params == sum(math.prod(s) for s in shapes.values())
    per_layer = {}
    for name, shape in shapes.items():
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            per_layer[i] = per_layer.get(i, 0) + math.prod(shape)
    assert t.largest_layer == max(per_layer.values())
    assert t.active_params == t.params - (family.num_experts - family.top_k) * t.expert_params


def test_small_config_stage_arithmetic(tmp_path):
    model = config_dir(tmp_path, "small", SMALL)
    t = teacher_shape(SMALL, family_for(SMALL))
    assert (t.params, t.largest_layer, t.expert_params) == (SMALL_PARAMS, SMALL_LAYER, PER_EXPERT)
    assert t.active_params == SMALL_PARAMS - 6 * PER_EXPERT  # 2 of 8 experts run per token
    plan = plan_build(model, "laptop", out=tmp_path / "b", calibration_tokens=4096, distill_tokens=65536,
                      distill_options={"checkpoint_every": 4}, measure=False, host=BIG_HOST)
    h = plan.host
    assert plan.estimate.params == h.student_params == STUDENT_PARAMS
    assert h.config_only and not h.problems and h.teacher.bytes == SMALL_PARAMS * 2  # bf16, from the config

    # calibrate, on the CPU: fp32 embeddings, the largest layer in fp32 (none read ahead on a CPU), the
    # activations of 4,096 tokens, one 4 x 512 batch
    acts = 4096 * 32 * 4
    batch = 4 * 2048 * (8 * 32 + 3 * 2 * 16 + 8) + 2 * 4 * 4 * 4 * 512**2  # + eager attention scores
    assert h.stage("calibrate").device == "cpu"
    assert h.stage("calibrate").memory == PROCESS_BYTES + 384 * 32 * 4 + SMALL_LAYER * 4 + acts + batch
    assert h.stage("calibrate").writes[0].bytes == 0  # 0.5 MB of activations stay in memory

    # distill online on the CPU: the teacher in fp32, the student with grads and AdamW (16 B), activations of
    # one micro-batch of 16 x 256 tokens (6 x 32 + 6 x 32 query + 4 x 16 kv + 4 x 32 FFN per token and layer)
    # and 9 fp32 copies of its logits
    tokens = 4096
    activations = tokens * 2 * (6 * 32 + 6 * 32 + 4 * 16 + 4 * 32) * 4 + 9 * tokens * 384 * 4
    assert h.stage("distill").memory == PROCESS_BYTES + SMALL_PARAMS * 4 + 16 * STUDENT_PARAMS + activations
    # 16 steps, a checkpoint every 4 (not after the last): 3 saves, keep 2 + the one being written
    writes = {i.name: i.bytes for i in h.stage("distill").writes}
    assert writes == {"checkpoints": 3 * 12 * STUDENT_PARAMS, "distilled student": 2 * STUDENT_PARAMS}
    assert {i.name: i.bytes for i in h.stage("assemble").writes} == {"assembled student": 2 * STUDENT_PARAMS}
    # export: a BF16 GGUF (1-D tensors in F32: 2 x (32 + 32 + 8 + 8) + 32 norms) then the quantized file, each the
    # whole file: every tensor's data padded to 32 bytes, and the header with the tokenizer's metadata
    norms = 2 * 80 + 32
    export = {i.name: i.bytes for i in h.stage("export").writes}
    bf16 = gguf_file(family_for(SMALL).dense_config(32), "BF16")
    assert export["BF16 GGUF"] == bf16.file_bytes
    tensors = (STUDENT_PARAMS - norms) * 2 + norms * 4
    assert tensors <= bf16.tensor_bytes < tensors + 32 * len(bf16.types.types) and bf16.metadata_bytes > 384 * 8
    assert export["Q4_K_M gguf"] == plan.estimate.weights_bytes
    # the disk's peak is distillation: the assembled student, the checkpoints and the distilled student
    (disk,) = h.disks
    assert disk.peak_stage == "distill" and disk.peak == 2 * 2 * STUDENT_PARAMS + 3 * 12 * STUDENT_PARAMS

    # offline: the cache pass first (260 B/token at a 384-token vocabulary), then the student alone
    off = plan_build(model, "laptop", out=tmp_path / "b", calibration_tokens=4096, distill_tokens=65536,
                     distill_options={"checkpoint_every": 4, "mode": "offline"}, measure=False, host=BIG_HOST).host
    assert [s.name for s in off.stages][:4] == ["calibrate", "assemble", "cache", "distill"]
    assert off.stage("cache").writes[0].bytes == 260 * 65536
    assert off.stage("distill").memory == (PROCESS_BYTES + 16 * STUDENT_PARAMS + activations
                                           - 2 * tokens * 384 * 4)  # 7 logits copies, no teacher
    assert off.disks[0].peak == 260 * 65536 + 2 * 2 * STUDENT_PARAMS + 3 * 12 * STUDENT_PARAMS


def test_memory_estimates_are_near_the_peaks_measured_here(tmp_path):
    """benchmarks/results: peak RSS of the demo's distillation (online, offline, cache pass) and of calibrating a
    random 8-layer Qwen3-MoE on 32,768 tokens, on this 2-core machine. The plan is within a quarter of each."""
    from pathlib import Path

    results = Path(__file__).parent.parent / "benchmarks" / "results"
    distill = json.loads((results / "distill_throughput.json").read_text())["summary"]
    for mode, stage, measured in [("online", "distill", distill["online_peak_rss_mb"]),
                                  ("offline", "distill", distill["offline_train_peak_rss_mb"]),
                                  ("offline", "cache", distill["cache_pass_peak_rss_mb"])]:
        plan = plan_build("demo-moe", "laptop", out=tmp_path / "b", measure=False, host=BIG_HOST,
                          distill_options={"mode": mode}).host
        assert plan.stage(stage).memory / (measured * 1e6) == pytest.approx(1, abs=0.25), (mode, stage)
    cal = json.loads((results / "calibrate_overhead.json").read_text())
    shape = {k: v for k, v in cal["model"].items() if type(v) is int and k != "checkpoint_bytes"}
    config = {**SMALL, **shape, "max_position_embeddings": 4096}
    plan = plan_build(config_dir(tmp_path, "cal", config), "laptop", out=tmp_path / "b", measure=False,
                      host=BIG_HOST, calibration_tokens=cal["data"]["tokens"], distill_tokens=0).host
    measured = cal["calibrate"]["peak_rss_mb"] * 1e6
    assert plan.stage("calibrate").memory / measured == pytest.approx(1, abs=0.25)


def test_memory_refusals_name_the_numbers_and_the_option(tmp_path):
    """The demo teacher has weights: what the host cannot hold is refused in plan_build (so --dry-run too)."""
    planned = plan_build("demo-moe", "laptop", out=tmp_path / "b", measure=False, host=BIG_HOST).host
    online = planned.stage("distill").memory
    offline = plan_build("demo-moe", "laptop", out=tmp_path / "b", measure=False, host=BIG_HOST,
                         distill_options={"mode": "offline"}).host.stage("distill").memory
    assert offline < online
    small = Host("test cpu", 2, (online + offline) // 2, (online + offline) // 2)
    with pytest.raises(EdgeconvError) as err:
        plan_build("demo-moe", "laptop", out=tmp_path / "b", measure=False, host=small)
    line = err.value.line()
    assert line.startswith("distill needs about") and "teacher 88.7 MB (fp32)" in line
    assert "pass --distill-mode offline" in line and "\n" not in line
    plan_build("demo-moe", "laptop", out=tmp_path / "b", measure=False, host=small,
               distill_options={"mode": "offline"})  # the option named fits
    tiny_host = Host("test cpu", 2, offline - 1, offline - 1)
    with pytest.raises(EdgeconvError, match="student's weights, gradients and AdamW states alone are"):
        plan_build("demo-moe", "laptop", out=tmp_path / "b", measure=False, host=tiny_host,
                   distill_options={"mode": "offline"})
    plan_build("demo-moe", "laptop", out=tmp_path / "b", measure=False, host=tiny_host, distill_tokens=0)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.work").exists()


def test_qwen3_30b_config_plans_every_stage_and_says_what_would_stop_it(tmp_path):
    model = config_dir(tmp_path, "Qwen3-30B-A3B", QWEN3_30B)
    host = Host("test cpu", 2, 25 * 10**9, 24 * 10**9)
    plan = plan_build(model, "jetson", out=tmp_path / "b", measure=False, host=host)  # config only: no refusal
    h = plan.host
    assert round(h.teacher.params / 1e9, 2) == 30.53 and round(h.teacher.active_params / 1e9, 2) == 3.34
    assert round(h.teacher.bytes / 1e9) == 61 and h.config_only
    assert round(plan.estimate.params / 1e9, 2) == 3.34
    text = plan.render()
    assert "30.53 B parameters (3.34 B active per token), 61.06 GB in bfloat16 (config.json only" in text
    assert "the whole teacher 122.13 GB (fp32)" in text and "AdamW 53.45 GB (16 B x 3.34 B params)" in text
    assert "a build with the weights would stop: distill needs about" in text
    assert h.stage("calibrate").memory < host.ram_total  # one layer at a time: 2.49 GB in fp32, none read ahead
    assert "the largest layer 2.49 GB" in text and "DOES NOT FIT" in text
    # Offline: 388 B/token of cache, and the student's AdamW states still do not fit 25 GB.
    off = plan_build(model, "jetson", out=tmp_path / "b", measure=False, host=host,
                     distill_options={"mode": "offline"}).host
    assert off.distill["bytes_per_token"] == 388
    assert off.stage("cache").writes[0].bytes == 388 * 262_144
    assert off.stage("cache").memory < host.ram_total < off.stage("distill").memory  # the cache: layer by layer
    assert "layer by layer in fp32, 1 pass" in off.stage("cache").memory_how
    assert off.problems[0].line().startswith("distill needs about")
    assert "pass --distill-lora-rank 16 (the student frozen, 13.36 GB" in off.problems[0].line()
    assert ADAMW_BYTES_PER_PARAM * plan.estimate.params > host.ram_total
    # LoRA: the student frozen in fp32 (4 B per parameter) and the adapters' AdamW state, 40 GB less.
    lora = plan_build(model, "jetson", out=tmp_path / "b", measure=False, host=host,
                      distill_options={"mode": "offline", "lora_rank": 16}).host
    assert off.stage("distill").memory - lora.stage("distill").memory > 39e9
    assert "the student frozen in fp32 13.36 GB + rank-16 LoRA adapters" in lora.stage("distill").memory_how


def test_calibration_reads_ahead_on_a_gpu_only(tmp_path):
    model = config_dir(tmp_path, "Qwen3-30B-A3B", QWEN3_30B)
    cpu = Host("test cpu", 2, 25 * 10**9, 24 * 10**9)
    gpu = Host("test cpu", 2, 25 * 10**9, 24 * 10**9, gpu="test gpu", gpu_memory=80 * 10**9)
    on_cpu = plan_build(model, "jetson", out=tmp_path / "b", measure=False, host=cpu).host.stage("calibrate")
    on_gpu = plan_build(model, "jetson", out=tmp_path / "b", measure=False, host=gpu).host.stage("calibrate")
    assert on_cpu.device == "cpu" and on_gpu.device == "cuda"
    assert "read ahead" in on_gpu.memory_how and "read ahead" not in on_cpu.memory_how


def test_throughput_is_measured_once_per_shape(tmp_path):
    dense = family_for(SMALL).dense_config(32)
    first = measure(dense, "cpu", seconds=0.2)
    assert first.tokens_per_s > 0 and first.layer_params == 3072 + 3 * 32 * 32
    assert measure(dense, "cpu", seconds=0.2) is first  # cached in this process
    plan = plan_build(config_dir(tmp_path, "small", SMALL), "laptop", out=tmp_path / "b", host=BIG_HOST)
    assert all(s.seconds is not None and s.seconds >= 0 for s in plan.host.stages)
    assert "tokens/s through one" in plan.render() and "(rough:" in plan.render()


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_one_student_layer_of_every_family_is_timed(arch):
    config = {**tiny.tiny_config(arch).to_dict(), "architectures": [arch]}
    family = family_for(config)
    dense = family.dense_config(family.top_k * family.expert_width + family.shared_width)
    rate = measure(dense, "cpu", seconds=0.1)
    assert rate.tokens_per_s > 0 and rate.layer_params > 0 and rate.device == "cpu" and rate.dtype == "float32"


def test_dry_run_prints_the_host_block(tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["build", "--target", "laptop", "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "5.64 M parameters" in text and "fits" in text  # the target lines stay
    assert "  host\n" in text and "machine" in text and "RAM" in text
    assert "teacher     22.2 M parameters (5.6 M active per token), 44.4 MB in 1 weight file" in text
    assert "tokens/s through one 0.6 M-parameter layer on cpu" in text
    for stage in ("calibrate", "assemble", "distill", "export", "bundle", "bench"):
        assert f"    {stage} " in text
    assert f"free at {tmp_path}: fits" in text and "total       ~" in text
    assert not out.exists() and not (tmp_path / "b.work").exists()


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300000000", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_dry_run_refuses_a_disk_that_cannot_hold_the_teacher_cache(small_disk):
    """300 MB: the online build (0.23 GB at its peak) fits; 2 M tokens of offline cache (0.52 GB) do not."""
    out = small_disk / "b"
    args = ["build", "--target", "laptop", "--out", str(out), "--dry-run", "--no-measure",
            "--distill-tokens", "2000000"]
    result = CliRunner().invoke(main, args + ["--distill-mode", "offline"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: the build needs 746,373,120 bytes (0.75 GB) on the disk of "
                                                f"{small_disk} at its peak (during distill: teacher cache 0.52 GB")
    assert "bytes (0.30 GB) are free" in line
    assert "the teacher cache (260 B/token x 2,002,944 tokens) is the largest" in line
    assert "--distill-mode online (no cache)" in line and "--out on a disk with 0.75 GB free" in line
    fewer = int(line.split("--distill-tokens ")[1].split(" or fewer")[0].replace(",", ""))
    assert list(small_disk.iterdir()) == []  # nothing written
    # Both options it names are accepted on the same disk.
    ok = CliRunner().invoke(main, args[:-1] + [str(fewer), "--distill-mode", "offline"])
    assert ok.exit_code == 0, ok.output
    assert "teacher cache" in ok.output and f"free at {small_disk}: fits" in ok.output
    more = CliRunner().invoke(main, args[:-1] + [str(fewer + 4096), "--distill-mode", "offline"])
    assert more.exit_code == 2  # the largest budget that fits, to the step
    online = CliRunner().invoke(main, args + ["--distill-mode", "online"])
    assert online.exit_code == 0, online.output
    assert list(small_disk.iterdir()) == []
