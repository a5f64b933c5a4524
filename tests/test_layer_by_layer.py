"""The layer-by-layer forward (edgeconv.forward): the same logits, cache, evaluation and greedy text as the whole
model, for every family's MoE teacher and dense student; the automatic choice; devices; the prefetch overlap."""

import logging
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import tiny
import torch
from click.testing import CliRunner
from test_bad_inputs import assert_error
from transformers import AutoModelForCausalLM

from edgeconv.cli import main
from edgeconv.config import DistillConfig
from edgeconv.evaluation.runtimes import TorchRuntime
from edgeconv.evaluation.suite import evaluate
from edgeconv.export.parity import ReferenceOptions, reference_options, torch_logits
from edgeconv.families import family_for
from edgeconv.forward import layer_runner as runner_mod
from edgeconv.forward.layer_by_layer import ForwardOptions, LayerByLayerModel, use_layer_by_layer, weight_bytes
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble
from edgeconv.stages.distill import distill
from edgeconv.training import teacher_cache as cache_mod
from edgeconv.training.losses import teacher_topk
from edgeconv.training.packing import pack_tokens

# Lengths 1 to 40: a one-token prompt, lengths shared by several prompts and unique ones, and prompts longer than
# GPT-OSS's sliding window (8), so padded batches, several chunks and both mask kinds are exercised.
LENGTHS = (12, 5, 12, 9, 1, 30, 40, 7)


def prompts(seed: int = 0, lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 384, (n,), generator=g).tolist() for n in lengths]


def whole(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def students(random_checkpoints, tmp_path_factory):
    """arch -> the dense student assembled from two experts of the random MoE teacher."""
    root = tmp_path_factory.mktemp("lbl-students")
    out = {}
    for arch, (_, src) in random_checkpoints.items():
        out[arch] = root / arch
        assemble(src, simple_plan(family_for(tiny.config_of(src)), "ids:1,4"), out[arch], progress=False)
    return out


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_layer_by_layer_logits_equal_the_whole_models(arch, role, random_checkpoints, students):
    path = random_checkpoints[arch][1] if role == "teacher" else students[arch]
    seqs = prompts()
    model = whole(path)
    with torch.no_grad():
        want = [model(torch.tensor([s])).logits[0].numpy() for s in seqs]
    lbl = LayerByLayerModel(path, device="cpu", dtype="float32", batch_size=3, chunk_sequences=5)
    assert (lbl.family is not None) == (role == "teacher")  # MoE blocks from the adapter, dense layers straight
    got = lbl.full_logits(seqs)
    assert lbl.passes == 2  # 8 sequences in chunks of 5: two passes over the model
    assert [g.shape for g in got] == [w.shape for w in want]
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) <= 1e-5


def test_fused_expert_layout_gives_the_same_logits(random_checkpoints, tmp_path):
    """The adapter reads transformers 5.x's fused experts, which transformers 4.57 itself cannot load."""
    _, src = random_checkpoints["Qwen3MoeForCausalLM"]
    fused = tiny.fuse_experts(src, tmp_path / "fused")
    seqs = prompts(1)
    want = LayerByLayerModel(src, device="cpu", dtype="float32").full_logits(seqs)
    got = LayerByLayerModel(fused, device="cpu", dtype="float32").full_logits(seqs)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) <= 1e-6


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "GptOssForCausalLM", "DeepseekV2ForCausalLM"])
def test_batched_greedy_with_kv_cache_equals_generate(arch, random_checkpoints, students):
    for path in (random_checkpoints[arch][1], students[arch]):
        seqs = prompts(2, (6, 3, 6, 11, 6))
        model = whole(path)
        lbl = LayerByLayerModel(path, device="cpu", dtype="float32", batch_size=2)
        got = lbl.greedy(seqs, 10)
        assert lbl.passes == 10  # one pass per generated token (the first one is the prompts' prefill)
        for s, new in zip(seqs, got):
            out = model.generate(torch.tensor([s]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                                 pad_token_id=0, eos_token_id=None)
            assert new == out[0, len(s):].tolist(), (path.name, s)
        # Stopping early: a prompt leaves the pass once `finished` says so; the others go on.
        stopped = lbl.greedy(seqs, 10, finished=lambda i, new: i == 1 and len(new) == 3)
        assert stopped[1] == got[1][:3] and stopped[0] == got[0]


def test_parity_reference_is_chosen_by_memory_and_logged(random_checkpoints, monkeypatch, caplog):
    import psutil

    _, src = random_checkpoints["MixtralForCausalLM"]
    seqs = prompts(3, (9, 4))
    caplog.set_level(logging.INFO, logger="edgeconv")
    full = torch_logits(src, seqs)  # this machine holds a tiny model easily
    assert "parity reference: whole model (model " in caplog.text and "fits in" in caplog.text
    caplog.clear()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=50_000))
    small = torch_logits(src, seqs)
    line = next(r.getMessage() for r in caplog.records if "parity reference" in r.getMessage())
    assert line.startswith("parity reference: layer by layer (model ") and "in float32 + 1.1 GB for " in line, line
    assert "of 50.0 KB available" in line, line
    assert max(float(np.abs(a - b).max()) for a, b in zip(full, small)) <= 1e-5
    caplog.clear()
    with reference_options(ReferenceOptions(layer_by_layer=False)):  # --whole-model overrides the choice
        torch_logits(src, seqs)
    assert "parity reference: whole model (as asked: --whole-model" in caplog.text


def test_weight_bytes_are_counted_in_the_compute_dtype(tmp_path):
    path = tiny.save(tiny.build_model("Qwen3MoeForCausalLM").to(torch.bfloat16), tmp_path / "bf16")
    ckpt = Checkpoint(path)
    stored = sum(ckpt.info(n).nbytes for n in ckpt.names())
    assert weight_bytes(ckpt, torch.bfloat16) == stored and weight_bytes(ckpt, torch.float32) == 2 * stored
    # On a GPU the free device memory decides; on the CPU the host's, shared by the processes of a run.
    assert use_layer_by_layer(ckpt, "x", torch.float32, torch.device("cpu"), processes=10**9)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny Qwen3-MoE teacher with a tokenizer, its dense student, and a corpus."""
    root = tmp_path_factory.mktemp("lbl-distill")
    teacher = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), root / "moe"))
    student = root / "dense"
    assemble(teacher, simple_plan(family_for(tiny.config_of(teacher)), "ids:1,4"), student, progress=False)
    return teacher, student, tiny.write_corpus(root / "corpus.jsonl", docs=60)


def test_layer_by_layer_cache_equals_the_whole_model_cache(pair, tmp_path, monkeypatch, caplog):
    import psutil

    teacher, student, corpus = pair
    cfg = DistillConfig(tokens=2048, seq_len=32, batch_size=8, mode="offline", top_k=16)
    caplog.set_level(logging.INFO, logger="edgeconv")
    whole_run = distill(teacher, student, corpus, tmp_path / "w", cfg, teacher_cache=tmp_path / "whole",
                        cache_only=True, progress=False, cache_forward=ForwardOptions(layer_by_layer=False))
    assert "teacher cache: whole model (as asked" in caplog.text
    # Memory "small": the automatic choice goes layer by layer; 3 sequences per pass -> 22 passes for 64 rows.
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1_000_000))
    lbl_run = distill(teacher, student, corpus, tmp_path / "l", cfg, teacher_cache=tmp_path / "lbl",
                      cache_only=True, progress=False, cache_forward=ForwardOptions(chunk_sequences=3))
    messages = [r.getMessage() for r in caplog.records]
    assert "teacher cache: layer by layer (model " in caplog.text
    assert any("in 22 layer-by-layer pass(es)" in m for m in messages), messages
    assert lbl_run.cache["key"] == whole_run.cache["key"]
    spec = cache_mod.CacheSpec(**whole_run.cache["spec"])
    rows = torch.arange(spec.sequences)
    a = cache_mod.TeacherCache(tmp_path / "whole", spec).targets(rows)
    b = cache_mod.TeacherCache(tmp_path / "lbl", spec).targets(rows)
    assert torch.equal(a.ids, b.ids)
    assert torch.allclose(a.tail_logp, b.tail_logp, atol=1e-5, rtol=0)
    # Values are stored in fp16: a difference of 1e-6 may round to the neighbouring fp16 value, no further.
    ulp = torch.from_numpy(np.spacing(np.abs(a.logp.numpy()).astype(np.float16)).astype(np.float32))
    assert ((a.logp - b.logp).abs() <= torch.maximum(ulp, torch.tensor(1e-5))).all()
    # Before rounding: the top-k log-probs of both forwards agree within 1e-5.
    from transformers import AutoTokenizer

    ids, _ = pack_tokens(AutoTokenizer.from_pretrained(teacher), corpus, spec.sequences, spec.seq_len)
    pick = [0, 17, 63]
    with torch.no_grad():
        want = teacher_topk(whole(teacher)(ids[pick].long()).logits, 16)
    got = {}

    def reduce(indices, logits):
        target = teacher_topk(logits, 16)
        got.update({i: (target.ids[r], target.logp[r], target.tail_logp[r]) for r, i in enumerate(indices)})

    LayerByLayerModel(teacher, device="cpu", dtype="float32").logits(ids[pick].long(), reduce)
    for r in range(len(pick)):
        assert torch.equal(got[r][0], want.ids[r])
        assert torch.allclose(got[r][1], want.logp[r], atol=1e-5, rtol=0)
        assert torch.allclose(got[r][2], want.tail_logp[r], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def eval_student(pair):
    """The dense student with the teacher's tokenizer files beside it."""
    import shutil

    teacher, student, _ = pair
    for path in Checkpoint(teacher).sidecar_files():
        shutil.copy(path, student / path.name)
    return student


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_eval_report_is_the_same_layer_by_layer(which, pair, eval_student, small_eval):
    path = eval_student if which == "student" else pair[0]
    kw = dict(tokens=512, window=64, examples=2, choices=8, show_progress=False)
    a = evaluate(path, small_eval, forward=ForwardOptions("cpu", "float32", layer_by_layer=False), **kw)
    b = evaluate(path, small_eval, forward=ForwardOptions("cpu", "float32", layer_by_layer=True), **kw)
    assert a.perplexity_tokens == b.perplexity_tokens
    for corpus in a.perplexity:
        assert b.perplexity[corpus] == pytest.approx(a.perplexity[corpus], rel=1e-5)
    assert a.exact_match == b.exact_match
    assert (a.choice_acc, a.choice_acc_norm) == (b.choice_acc, b.choice_acc_norm)


def test_torch_runtime_layer_by_layer_greedy_text(pair, eval_student):
    whole_rt = TorchRuntime(eval_student, forward=ForwardOptions("cpu", "float32", layer_by_layer=False))
    lbl_rt = TorchRuntime(eval_student, forward=ForwardOptions("cpu", "float32", layer_by_layer=True))
    assert lbl_rt.prefers_batches and not whole_rt.prefers_batches
    texts = ["add 40+2=", "copy the king=", "sort 5 2 9=", "To be, or not", "def add(a, b):"]
    ids = [lbl_rt.encode(t) for t in texts]
    for stop in ("\n", " "):  # " ": most continuations stop early, at different steps
        want = [whole_rt.greedy(i, 12, stop) for i in ids]
        assert lbl_rt.greedy_batch(ids, 12, stop) == want
    assert lbl_rt.greedy(ids[0], 12) == whole_rt.greedy(ids[0], 12)
    lp_w, lp_l = whole_rt.token_logprobs(ids), lbl_rt.token_logprobs(ids)
    assert all(np.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(lp_w, lp_l))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("args", [
    ["eval", "{dense}", "--device", "cuda", "--no-progress"],
    ["eval", "{dense}", "--device", "cuda:1", "--layer-by-layer", "--no-progress"],
    ["calibrate", "{moe}", "--device", "cuda", "--out", "{tmp}/stats"],
    ["export", "{dense}", "--quant", "F32", "--device", "cuda", "--out", "{tmp}/m.gguf"],
    ["distill", "--teacher", "{moe}", "--student", "{dense}", "--mode", "offline", "--cache-device", "cuda",
     "--out", "{tmp}/d"],
])
def test_cuda_asked_without_cuda_is_one_line(args, pair, eval_student, tmp_path):
    teacher, _, _ = pair
    names = {"dense": eval_student, "moe": teacher, "tmp": tmp_path}
    result = CliRunner().invoke(main, [a.format(**names) for a in args])
    option = "--cache-device" if "--cache-device" in args else "--device"
    line = assert_error(result, f"{option} cuda", "was asked, but CUDA is not available here", "only the CPU is",
                        f"use {option} cpu")
    assert "Traceback" not in result.output
    assert not list(tmp_path.iterdir()), "nothing may be written"
    assert line.count("error:") == 1


def test_teacher_forward_options_need_the_offline_cache(pair, tmp_path):
    teacher, student, corpus = pair
    result = CliRunner().invoke(main, ["distill", "--teacher", teacher, "--student", student, "--data", corpus,
                                       "--layer-by-layer", "--out", tmp_path / "d"])
    assert_error(result, "are for the offline teacher cache", "pass --mode offline")


def test_prefetch_reads_the_next_layer_while_this_one_computes(random_checkpoints, tmp_path, monkeypatch):
    """Layer 1 must start loading while layer 0 still computes (its first batch waits for that), and layer 2
    must not: one layer ahead at most. No timing: events, with a generous timeout only to fail, not to pass."""
    model = tiny.build_model("Qwen3MoeForCausalLM", seed=5, num_hidden_layers=3)
    path = tiny.save(model, tmp_path / "three")
    started = {i: threading.Event() for i in range(3)}
    real = runner_mod._layer_weights

    def reading(ckpt, prefix, skip):
        if prefix.startswith("model.layers."):
            started[int(prefix.split(".")[2])].set()
        return real(ckpt, prefix, skip)

    monkeypatch.setattr(runner_mod, "_layer_weights", reading)
    seen = []

    def on_batch(layer: int, tokens: int) -> None:
        if layer == 0 and not seen:
            seen.append((started[1].wait(60), started[2].is_set()))

    ckpt = Checkpoint(path)
    family = family_for(ckpt.config)
    from edgeconv.calibration.moe_block import RoutedMoeBlock

    runner = runner_mod.LayerRunner(ckpt, family, lambda layer: RoutedMoeBlock(family, ckpt, layer),
                                    on_batch=on_batch)
    x = torch.tensor([prompts()[0]])
    hidden = runner.run([x])
    assert seen == [(True, False)]
    assert all(e.is_set() for e in started.values())
    # And it computed the model: the last layer's output (the final norm's input) of the whole model.
    reference = whole(path)
    captured = []
    reference.model.norm.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        reference(x)
    assert torch.allclose(hidden, captured[0], atol=1e-5, rtol=0)


def test_activations_stay_bounded_by_chunks(random_checkpoints, monkeypatch):
    """The automatic chunk holds at most max_activation_bytes of hidden states: never a spill, several passes."""
    _, src = random_checkpoints["Qwen3MoeForCausalLM"]
    stores = []

    class Recorded(runner_mod.ActivationStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append((self.data.shape, self.spilled))

    monkeypatch.setattr(runner_mod, "ActivationStore", Recorded)
    seqs = prompts(4, (32,) * 6)
    per_sequence = 32 * 32 * 4  # seq x hidden x fp32
    lbl = LayerByLayerModel(src, device="cpu", dtype="float32", max_activation_bytes=2 * per_sequence)
    got = lbl.full_logits(seqs)
    assert lbl.passes == 3 and stores == [((2, 32, 32), False)] * 3
    want = LayerByLayerModel(src, device="cpu", dtype="float32").full_logits(seqs)
    assert all(np.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(got, want))


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_casting_experts_on_use_gives_the_same_logits(arch, random_checkpoints):
    """The parity reference casts each routed expert when tokens reach it (one layer as stored in memory, not fp32
    copies of every expert); the logits are bitwise those of casting the whole layer first."""
    ckpt = random_checkpoints[arch][1]
    ids = prompts()
    whole = LayerByLayerModel(ckpt, device="cpu", dtype="float32").full_logits(ids)
    on_use = LayerByLayerModel(ckpt, device="cpu", dtype="float32", prefetch=False, cast_on_use=True).full_logits(ids)
    for a, b in zip(whole, on_use, strict=True):
        assert np.array_equal(a, b)
