"""Distillation: the losses by hand, the data order, a student that really gets closer to its teacher (online and
from the offline top-k cache), exact resume after SIGKILL, two DDP processes matching one, and every bad input."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_bad_inputs import assert_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeconv.cli import main
from edgeconv.config import DistillConfig
from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble
from edgeconv.stages.distill import distill, distill_work
from edgeconv.training import teacher_cache as cache_mod
from edgeconv.training.losses import forward_kl, teacher_topk, topk_kl
from edgeconv.training.packing import pack_tokens, sequence_order, step_rows
from edgeconv.training.trainer import KILL_AFTER_STEP

# One small run shared by the CLI tests: 8 steps of 8 sequences of 32 tokens, two micro-batches per step, KL at
# T = 2 mixed with a quarter of cross-entropy.
RUN = ["--tokens", "2048", "--seq-len", "32", "--batch-size", "8", "--grad-accum", "2", "--lr", "3e-3",
       "--temperature", "2", "--ce-weight", "0.25", "--checkpoint-every", "3", "--no-progress"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process (below)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocesses: the resume test compares runs bit for bit, and CPU
    kernels may sum in another order with another thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(teacher, student, corpus): a tiny Qwen3-MoE with a tokenizer, the dense Qwen3 assembled from two of its
    experts, and about 18k tokens of text."""
    root = tmp_path_factory.mktemp("distill")
    teacher = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), root / "moe"))
    student = root / "dense"
    assemble(teacher, simple_plan(family_for(tiny.config_of(teacher)), "ids:1,4"), student, progress=False)
    return teacher, student, tiny.write_corpus(root / "corpus.jsonl", docs=200)


def cli(*args):
    return CliRunner().invoke(main, ["distill", *[str(a) for a in args]])


def cli_process(*args, env=None, launcher=()):
    cmd = [*launcher, "-m", "edgeconv.cli", "distill", *[str(a) for a in args]]
    return subprocess.run([sys.executable, *cmd], env=env or SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=240)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def held_out_kl(teacher: Path, student: Path, ids: torch.Tensor) -> float:
    t = AutoModelForCausalLM.from_pretrained(teacher).eval()
    s = AutoModelForCausalLM.from_pretrained(student).eval()
    with torch.no_grad():
        return forward_kl(s(ids).logits, t(ids).logits).item()


# --- losses, by hand ------------------------------------------------------------------------------------------

def test_forward_kl_by_hand():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    # KL(p || q) = 0.5 ln 2 + 0.25 ln 1 + 2 * 0.125 ln 0.5 = 0.25 ln 2
    assert forward_kl(q.log()[None], p.log()[None]).item() == pytest.approx(0.25 * math.log(2), abs=1e-7)
    assert forward_kl(p.log()[None], p.log()[None]).item() == pytest.approx(0.0, abs=1e-7)
    # At T = 2 the logits are halved (p^(1/2), renormalised) and the KL scaled by T^2 = 4.
    z, s = p.log()[None], q.log()[None]
    soft = torch.softmax(z / 2, -1)
    expected = 4 * (soft * (soft.log() - torch.log_softmax(s / 2, -1))).sum()
    assert forward_kl(s, z, temperature=2.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_topk_kl_keeps_the_tail_mass_as_one_bucket():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    target = teacher_topk(p.log()[None], k=2)
    assert target.ids.tolist() == [[0, 1]]
    assert target.tail_logp.exp().item() == pytest.approx(0.25, abs=1e-7)
    # Buckets {0}, {1}, tail {2, 3}: teacher (0.5, 0.25, 0.25), student (0.25, 0.25, 0.5) -> KL = 0.5 ln 2 + 0.25 ln 0.5
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    assert topk_kl(q.log()[None], target).item() == pytest.approx(0.25 * math.log(2), abs=1e-6)
    # Moving student mass inside the tail changes nothing; moving it from the tail into the top-k does.
    inside = torch.tensor([0.25, 0.25, 0.4, 0.1])
    into_top = torch.tensor([0.45, 0.25, 0.2, 0.1])
    assert topk_kl(inside.log()[None], target).item() == pytest.approx(topk_kl(q.log()[None], target).item(), abs=1e-6)
    assert topk_kl(into_top.log()[None], target).item() < topk_kl(q.log()[None], target).item() - 0.05


def test_topk_kl_is_a_lower_bound_reaching_the_full_kl():
    torch.manual_seed(0)
    z, s = torch.randn(6, 50) * 3, torch.randn(6, 50) * 3
    full = forward_kl(s, z, 1.5).item()
    bounds = [topk_kl(s, teacher_topk(z, k, 1.5), 1.5).item() for k in (1, 8, 32, 49)]
    assert all(0 <= b <= full + 1e-6 for b in bounds)
    assert bounds == sorted(bounds)  # a finer partition never loses KL
    assert bounds[-1] == pytest.approx(full, rel=1e-5)  # k = V - 1: every bucket is a single token


# --- options and data order -----------------------------------------------------------------------------------

def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = DistillConfig(tokens=100 * 16 * 256, warmup=0.1, min_lr_ratio=0.1)
    assert cfg.steps == 100 and cfg.warmup_steps == 10
    assert [cfg.lr_factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cfg.lr_factor(10) == pytest.approx(1.0)
    assert cfg.lr_factor(55) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # half way through the cosine
    assert cfg.lr_factor(99) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(EdgeconvError, match="--temperature 0: input should be greater than 0"):
        DistillConfig.make(temperature=0)


def test_batch_of_a_step_depends_only_on_seed_and_step():
    order = sequence_order(24, seed=5)
    assert torch.equal(order, sequence_order(24, seed=5)) and not torch.equal(order, sequence_order(24, seed=6))
    for step in range(3):
        whole = step_rows(order, step, 8)
        halves = torch.cat([step_rows(order, step, 8, rank=r, world=2) for r in range(2)])
        assert torch.equal(whole, halves)
    assert sorted(torch.cat([step_rows(order, s, 8) for s in range(3)]).tolist()) == list(range(24))


# --- the stage, in process ------------------------------------------------------------------------------------

def test_online_distillation_brings_the_student_closer_to_the_teacher(pair, tmp_path):
    teacher, student, corpus = pair
    cfg = DistillConfig(tokens=10240, seq_len=32, batch_size=8, lr=3e-3, checkpoint_every=1000)
    out = tmp_path / "online"
    result = distill(teacher, student, corpus, out, cfg, progress=False)
    ids, _ = pack_tokens(AutoTokenizer.from_pretrained(teacher), corpus, cfg.sequences + 16, 32)
    held_out = ids[cfg.sequences:].long()  # never trained on
    before, after = held_out_kl(teacher, student, held_out), held_out_kl(teacher, out, held_out)
    assert after < 0.7 * before, (before, after)  # measured: 0.318 -> 0.188

    s = result.manifest["summary"]
    assert s["steps"] == 40 and s["tokens"] == 10240 and s["processes"] == 1 and s["precision"] == "fp32"
    assert len(losses(out)) == 40 and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert {"tokenizer.json", "config.json", "model.safetensors", "manifest.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["dtype"] == "float32"
    assert not distill_work(out).parent.exists()  # checkpoints and work directory gone after success
    again = distill(teacher, student, corpus, out, cfg, progress=False)
    assert again.skipped and again.manifest == result.manifest


def test_offline_cache_holds_the_teachers_topk_and_trains_the_student(pair, tmp_path):
    teacher, student, corpus = pair
    cfg = DistillConfig(tokens=10240, seq_len=32, batch_size=8, lr=3e-3, mode="offline", top_k=16,
                        checkpoint_every=1000)
    cache_dir, out = tmp_path / "cache", tmp_path / "offline"
    built = distill(teacher, student, corpus, out, cfg, teacher_cache=cache_dir, cache_only=True, progress=False)
    assert built.cache["bytes_per_token"] == 16 * (2 + 2) + 4 and not out.exists()
    spec = cache_mod.CacheSpec(**built.cache["spec"])
    ids, _ = pack_tokens(AutoTokenizer.from_pretrained(teacher), corpus, cfg.sequences + 16, 32)
    rows = torch.tensor([5, 0, 63])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(teacher).eval()(ids[rows].long()).logits
    direct = teacher_topk(logits, 16)
    cached = cache_mod.TeacherCache(cache_dir, spec).targets(rows)
    assert torch.allclose(cached.logp, direct.logp, atol=2e-3)  # fp16: 2^-11 relative, log-probs > -8 here
    assert (cached.ids == direct.ids).float().mean() > 0.99  # near-ties may swap places in fp16 vs fp32
    assert torch.allclose(cached.tail_logp, direct.tail_logp, atol=1e-5)

    # An interrupted caching pass (rows not marked done, no manifest) is completed, not restarted.
    arrays = np.load(cache_dir / "values.npy", mmap_mode="r+")
    saved = np.array(arrays[:4])
    arrays[:4] = 0
    arrays.flush()
    done = np.load(cache_dir / "done.npy", mmap_mode="r+")
    done[:4] = 0
    done.flush()
    del arrays, done
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    (cache_dir / "manifest.json").unlink()
    (cache_dir / "building.json").write_text(json.dumps({"key": spec.key, "spec": manifest["spec"]}))
    distill(teacher, student, corpus, out, cfg, teacher_cache=cache_dir, cache_only=True, progress=False)
    assert np.array_equal(np.load(cache_dir / "values.npy")[:4], saved)

    result = distill(teacher, student, corpus, out, cfg, teacher_cache=cache_dir, progress=False)
    before, after = (held_out_kl(teacher, student, ids[cfg.sequences:].long()),
                     held_out_kl(teacher, out, ids[cfg.sequences:].long()))
    assert after < 0.8 * before, (before, after)  # measured: 0.318 -> 0.231 (top-16 of 384 tokens)
    assert result.manifest["summary"]["cache_bytes_per_token"] == 68 and cache_dir.is_dir()  # a given cache is kept

    hotter = cfg.model_copy(update={"temperature": 2.0})
    with pytest.raises(EdgeconvError, match=r"made for another run: temperature 1\.0 \(this run: 2\.0\)"):
        distill(teacher, student, corpus, tmp_path / "hot", hotter, teacher_cache=cache_dir, progress=False)


# --- resume and scale-out, through the CLI ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(pair, tmp_path_factory):
    """The reference run of RUN, in this process."""
    teacher, student, corpus = pair
    out = tmp_path_factory.mktemp("reference") / "out"
    result = cli("--teacher", teacher, "--student", student, "--data", corpus, *RUN, "--out", out)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([0.75 * r["kl"] + 0.25 * r["ce"] for r in rows], rel=1e-6)
    return out


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(pair, uninterrupted, tmp_path):
    teacher, student, corpus = pair
    out = tmp_path / "out"
    args = ["--teacher", teacher, "--student", student, "--data", corpus, *RUN, "--out", out]
    killed = cli_process(*args, env={**SUBPROCESS_ENV, KILL_AFTER_STEP: "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    work = distill_work(out)
    assert not out.exists() and [p.name for p in (work / "checkpoints").iterdir()] == ["step-00000003"]
    assert len(losses(work)) == 5  # steps 4 and 5 were logged after the checkpoint, and are redone

    other = cli("--teacher", teacher, "--student", student, "--data", corpus, *RUN, "--lr", "1e-3", "--out", out)
    assert_error(other, "holds checkpoints of another distillation run (different lr)", "--force")

    resumed = cli_process(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert losses(out) == losses(uninterrupted)  # exact: same batches, same state, same kernels
    mine, reference = load_file(out / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert all(torch.equal(mine[k], reference[k]) for k in reference)
    assert json.loads((out / "manifest.json").read_text())["summary"]["resumed_from_step"] == 3


def test_two_ddp_processes_match_one(pair, uninterrupted, tmp_path):
    teacher, student, corpus = pair
    out = tmp_path / "ddp"
    run = cli_process("--teacher", teacher, "--student", student, "--data", corpus, *RUN, "--out", out,
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["summary"]["processes"] == 2
    two, one = losses(out), losses(uninterrupted)
    assert len(two) == len(one) == 8
    # Each process takes 4 of the step's 8 sequences (2 micro-batches of 2); gloo averages the gradients. In
    # fp32 only the order of the sums differs (measured: <= 2e-7 relative over the 8 steps); a process training
    # on the wrong rows or a wrong average moves the first loss by more than 1e-3.
    assert two == pytest.approx(one, rel=1e-5, abs=0)


def test_force_discards_another_runs_checkpoints(pair, tmp_path):
    teacher, student, corpus = pair
    out = tmp_path / "out"
    stale = distill_work(out) / "checkpoints" / "step-00000003"
    stale.mkdir(parents=True)
    (stale / "edgeconv_state.json").write_text(json.dumps({"step": 3, "run_key": "someone-else"}))
    cfg = DistillConfig(tokens=512, seq_len=32, batch_size=8)
    with pytest.raises(EdgeconvError, match="holds checkpoints of another distillation run.*--force"):
        distill(teacher, student, corpus, out, cfg, progress=False)
    assert stale.is_dir()  # refused: nothing removed
    result = distill(teacher, student, corpus, out, cfg, force=True, progress=False)
    assert result.manifest["summary"]["resumed_from_step"] == 0 and len(losses(out)) == 2


def test_bf16_autocast_on_request_on_cpu(pair, tmp_path):
    teacher, student, corpus = pair
    cfg = DistillConfig(tokens=512, seq_len=32, batch_size=8)
    fp32 = distill(teacher, student, corpus, tmp_path / "fp32", cfg, progress=False).manifest["summary"]
    bf16 = distill(teacher, student, corpus, tmp_path / "bf16", cfg.model_copy(update={"precision": "bf16"}),
                   progress=False).manifest["summary"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")  # auto is fp32 on CPU
    # Autocast really ran (bf16 matmuls round to 8 bits of mantissa), and stayed close.
    assert (bf16["final_loss"] != fp32["final_loss"]
            and bf16["final_loss"] == pytest.approx(fp32["final_loss"], rel=2e-2))


# --- bad inputs -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_students(pair, tmp_path_factory):
    """A student with another vocabulary size, and one with the same size but a shuffled tokenizer."""
    import shutil

    _, student, _ = pair
    root = tmp_path_factory.mktemp("bad-students")
    wide = Path(shutil.copytree(student, root / "wide"))
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "vocab_size": 400}))
    other = Path(shutil.copytree(student, root / "other-tokenizer"))
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    return {"wide": wide, "other-tokenizer": other}


@pytest.mark.parametrize("case, extra, phrases", [
    ("wide", [], ["the teacher's vocabulary has 384 tokens, the student's 400", "same tokenizer"]),
    ("other-tokenizer", [], ["tokenizers differ: 2 of 384 tokens map to other ids"]),
    ("moe", [], ["is a Mixture-of-Experts (Qwen3MoeForCausalLM, 8 experts), not dense", "edgeconv convert"]),
    ("dense", ["--tokens", "1000000"], ["has 18,177 tokens (200 documents), the token budget needs 1,000,192",
                                        "lower --tokens to at most 18,176"]),
    ("dense", ["--mode", "offline", "--top-k", "384"], ["--top-k 384 leaves no tail"]),
    ("dense", ["--seq-len", "128"], ["--seq-len 128 is longer than the teacher's context (64 positions)"]),
    ("dense", ["--batch-size", "6", "--grad-accum", "4"], ["--batch-size 6 does not split", "multiple of 4"]),
    ("dense", ["--ce-weight", "2"], ["--ce-weight 2.0: input should be less than or equal to 1"]),
])
def test_bad_inputs_fail_before_any_work(pair, bad_students, tmp_path, case, extra, phrases):
    teacher, student, corpus = pair
    chosen = {"moe": teacher, "dense": student, **bad_students}[case]
    out = tmp_path / "out"
    result = cli("--teacher", teacher, "--student", chosen, "--data", corpus, "--tokens", "1024", "--seq-len", "32",
                 "--batch-size", "8", *extra, "--no-progress", "--out", out)
    assert_error(result, *phrases)
    assert not out.exists() and not distill_work(out).parent.exists()
