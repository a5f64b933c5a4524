"""distill --lora-rank: the student's weights stay frozen, adapters on its linear layers are trained and merged, the
output is a plain checkpoint; checkpoints hold the adapters only and a killed run resumes to the same weights."""

import json
import signal

import pytest
import test_distill
import torch
from safetensors.torch import load_file
from test_distill import SUBPROCESS_ENV, cli_process, held_out_kl, losses
from transformers import AutoModelForCausalLM, AutoTokenizer, modeling_utils

from edgeconv.config import DistillConfig
from edgeconv.stages.distill import distill, distill_work
from edgeconv.training.lora import merged, trainable_counts, with_adapters
from edgeconv.training.packing import pack_tokens
from edgeconv.training.trainer import KILL_AFTER_STEP

pair, one_thread = test_distill.pair, test_distill.one_thread  # the same fixtures: a tiny teacher, its student

RUN = ["--tokens", "2048", "--seq-len", "32", "--batch-size", "8", "--lr", "3e-3", "--lora-rank", "4",
       "--checkpoint-every", "3", "--no-progress"]


def weights(directory) -> dict:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_merged_adapters_compute_what_the_adapted_model_computes(pair):
    _, student, _ = pair
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    adapted = with_adapters(model, DistillConfig(lora_rank=4))
    trained, total = trainable_counts(adapted)
    assert 0 < trained < total / 10
    with torch.no_grad():  # peft starts B at zero: move the adapters away from the identity first
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        plain = merged(adapted)
        got = plain(input_ids=ids).logits
    assert type(plain).__name__ == "Qwen3ForCausalLM" and not any("lora" in n for n, _ in plain.named_parameters())
    assert torch.allclose(got, expected, atol=1e-5)


def test_lora_distillation_trains_only_the_linear_layers(pair, tmp_path):
    teacher, student, corpus = pair
    cfg = DistillConfig(tokens=10240, seq_len=32, batch_size=8, lr=3e-3, lora_rank=8, checkpoint_every=1000)
    out = tmp_path / "lora"
    result = distill(teacher, student, corpus, out, cfg, progress=False)
    before, after = weights(student), weights(out)
    assert set(after) == set(before)  # a plain checkpoint: no adapter tensors left
    linear = [k for k in before if k.endswith(("proj.weight",))]
    frozen = [k for k in before if k not in linear]
    assert linear and frozen
    assert all(torch.equal(after[k], before[k]) for k in frozen)  # embeddings, norms, head: untouched
    assert sum(not torch.equal(after[k], before[k]) for k in linear) == len(linear)
    ids, _ = pack_tokens(AutoTokenizer.from_pretrained(teacher), corpus, cfg.sequences + 16, 32)
    held_out = ids[cfg.sequences:].long()
    kl_before, kl_after = held_out_kl(teacher, student, held_out), held_out_kl(teacher, out, held_out)
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)
    assert result.manifest["options"]["lora_rank"] == 8 and result.manifest["options"]["lora_alpha"] is None


def test_full_training_keys_do_not_name_lora():
    assert "lora_rank" not in DistillConfig().key_options()
    assert DistillConfig(lora_rank=4).key_options()["lora_rank"] == 4


def test_lora_resume_after_sigkill_reproduces_the_uninterrupted_run(pair, tmp_path):
    teacher, student, corpus = pair
    args = ["--teacher", teacher, "--student", student, "--data", corpus, *RUN]
    reference = tmp_path / "reference"
    assert cli_process(*args, "--out", reference).returncode == 0
    out = tmp_path / "out"
    killed = cli_process(*args, "--out", out, env={**SUBPROCESS_ENV, KILL_AFTER_STEP: "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    step = distill_work(out) / "checkpoints" / "step-00000003"
    saved = load_file(step / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the adapters only: the frozen weights are the student's
    resumed = cli_process(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out) == losses(reference)
    mine, theirs = weights(out), weights(reference)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert json.loads((out / "manifest.json").read_text())["summary"]["resumed_from_step"] == 3


def test_lora_rank_is_validated(pair, tmp_path):
    from click.testing import CliRunner

    from edgeconv.cli import main

    teacher, student, corpus = pair
    result = CliRunner().invoke(main, ["distill", "--teacher", str(teacher), "--student", str(student), "--data",
                                       str(corpus), "--lora-rank", "-1", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--lora-rank" in result.output
    with pytest.raises(Exception, match="lora_alpha"):
        DistillConfig(lora_rank=4, lora_alpha=0)


@pytest.mark.parametrize("rank", [0, 4])
def test_gradient_checkpointing_trains_the_same_weights(pair, tmp_path, rank, monkeypatch):
    """Recomputing each layer's activations in the backward pass changes memory, not the result."""
    teacher, student, corpus = pair
    cfg = DistillConfig(tokens=1024, seq_len=32, batch_size=8, lr=3e-3, lora_rank=rank, checkpoint_every=1000)
    plain = distill(teacher, student, corpus, tmp_path / "plain", cfg, progress=False)
    calls = []
    original = modeling_utils.checkpoint  # what gradient_checkpointing_enable binds
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = distill(teacher, student, corpus, tmp_path / "recomputed",
                    cfg.model_copy(update={"gradient_checkpointing": True}), progress=False)
    assert calls  # the decoder layers did run under torch.utils.checkpoint
    assert plain.manifest["key"] == again.manifest["key"]  # a run may resume with or without it
    assert losses(tmp_path / "recomputed") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    mine, theirs = weights(tmp_path / "recomputed"), weights(tmp_path / "plain")
    assert all(torch.allclose(mine[k], theirs[k], rtol=0, atol=1e-6) for k in theirs)
    assert sum(not torch.equal(mine[k], weights(student)[k]) for k in mine) > 0  # it trained
