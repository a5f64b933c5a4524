"""Distillation checkpoints hold no pickle and resuming unpickles nothing (issue 17, point 3): a pickle planted in
the checkpoint of an interrupted run is refused, in one line, without being opened; a run's checkpoint is
safetensors and JSON only; the pickle-free state continues training bit for bit."""

import json
import os
import pickle
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from test_distill import RUN, SUBPROCESS_ENV, cli_process, losses

from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble
from edgeconv.stages.distill import distill_work
from edgeconv.training import train_state
from edgeconv.training.trainer import KILL_AFTER_STEP


class Planted:
    """Unpickling it creates `marker` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Planted(marker)))
    assert not marker.exists()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(teacher, student, corpus), as in test_distill."""
    root = tmp_path_factory.mktemp("trust-distill")
    teacher = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), root / "moe"))
    student = root / "dense"
    assemble(teacher, simple_plan(family_for(tiny.config_of(teacher)), "ids:1,4"), student, progress=False)
    return teacher, student, tiny.write_corpus(root / "corpus.jsonl", docs=200)


@pytest.fixture(scope="module")
def interrupted(pair, tmp_path_factory):
    """A run of RUN killed after step 3, its first checkpoint: (root, args without --out). Tests copy it."""
    teacher, student, corpus = pair
    root = tmp_path_factory.mktemp("interrupted")
    args = ["--teacher", teacher, "--student", student, "--data", corpus, *RUN]
    killed = cli_process(*args, "--out", root / "out", env={**SUBPROCESS_ENV, KILL_AFTER_STEP: "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return root, args


def copy_of(interrupted, tmp_path: Path) -> tuple[Path, list]:
    root, args = interrupted
    shutil.copytree(root, tmp_path / "run")
    return tmp_path / "run" / "out", args


def test_checkpoint_is_safetensors_and_json_only(interrupted):
    root, _ = interrupted
    ckpt = distill_work(root / "out") / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "edgeconv_state.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
        "rng-0.json", "rng-0.safetensors", "scheduler.json"]
    state = json.loads((ckpt / "edgeconv_state.json").read_text())
    assert state["step"] == 3 and state["format"] == train_state.FORMAT and state["processes"] == 1
    assert not list(distill_work(root / "out").rglob("*.pkl")) and not list(distill_work(root / "out").rglob("*.bin"))


def test_resume_refuses_a_planted_pickle_without_opening_it(interrupted, tmp_path):
    out, args = copy_of(interrupted, tmp_path)
    ckpt = distill_work(out) / "checkpoints" / "step-00000003"
    # The names accelerate's load_state read: custom_checkpoint_0.pkl (the registered LR scheduler) with
    # weights_only=False, random_states_0.pkl with torch's weights_only unpickler (accelerate 1.16).
    markers = [tmp_path / "MARKER-scheduler", tmp_path / "MARKER-rng"]
    plant(ckpt / "custom_checkpoint_0.pkl", markers[0])
    plant(ckpt / "random_states_0.pkl", markers[1])

    resumed = cli_process(*args, "--out", out)
    assert not any(m.exists() for m in markers), "resuming ran a planted pickle"
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds custom_checkpoint_0.pkl, a pickle file" in errors[0], resumed.stderr
    assert f"delete {ckpt.parent} or pass --force" in errors[0]
    assert not out.exists() and (ckpt / "custom_checkpoint_0.pkl").is_file()  # refused: nothing touched

    forced = cli_process(*args, "--out", out, "--force")  # the hint works: starts over, opens nothing
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert not any(m.exists() for m in markers)
    assert json.loads((out / "manifest.json").read_text())["summary"]["resumed_from_step"] == 0


def test_two_processes_resume_from_their_own_rng_files(pair, tmp_path):
    """Each process writes and reads its own RNG files; the main process the weights, AdamW and scheduler."""
    teacher, student, corpus = pair
    out = tmp_path / "ddp"
    args = ["--teacher", teacher, "--student", student, "--data", corpus, *RUN, "--out", out]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    killed = cli_process(*args, env={**SUBPROCESS_ENV, KILL_AFTER_STEP: "5"}, launcher=torchrun)
    assert killed.returncode != 0
    ckpt = distill_work(out) / "checkpoints" / "step-00000003"
    assert {p.name for p in ckpt.iterdir()} >= {"rng-0.json", "rng-1.json", "rng-0.safetensors", "rng-1.safetensors"}
    assert {p.suffix for p in ckpt.iterdir()} == {".json", ".safetensors"}
    before = losses(distill_work(out))
    assert len(before) == 5  # steps 4 and 5 were logged after the checkpoint, and are redone

    resumed = cli_process(*args, launcher=torchrun)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["summary"]["resumed_from_step"] == 3
    assert losses(out)[:5] == before  # the same 2 processes from the same state: the same sums


@pytest.mark.parametrize("planted", ["optimizer.bin", "scheduler.pt", "sub/model.pth", "x.PICKLE"])
def test_any_pickle_like_file_is_refused_before_anything_is_read(tmp_path, planted):
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    (ckpt / Path(planted).parent).mkdir(parents=True)
    marker = tmp_path / "MARKER"
    plant(ckpt / planted, marker)
    (ckpt / train_state.STATE).write_text("not json")  # read only after the check
    with pytest.raises(EdgeconvError,
                       match=rf"holds {re.escape(planted)}, a pickle file.*delete .*checkpoints or pass --force"):
        train_state.load(None, ckpt, "key", model=None, optimizer=None, scheduler=None)
    assert not marker.exists()


class OneProcess:
    """What train_state.save/load use of accelerate's Accelerator, for one process on the CPU."""

    is_main_process, process_index, num_processes, device = True, 0, 1, torch.device("cpu")

    def __init__(self, distributed_type: str = "NO"):
        self.distributed_type = distributed_type

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.mix = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most small LMs

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.embed(x))))


def trainer(seed: int):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    return model, opt, sched


def train_steps(model, opt, sched, n: int) -> list:
    draws = []
    for _ in range(n):
        x = torch.randint(0, 11, (4, 5))  # the torch RNG decides the batch: a restored RNG is checked too
        draws.append((random.random(), float(np.random.rand()), x.tolist()))
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return draws


def test_saved_state_continues_bit_for_bit(tmp_path):
    model, opt, sched = trainer(0)
    train_steps(model, opt, sched, 3)
    ckpt = train_state.save(OneProcess(), tmp_path, 3, "key", 2, model=model, optimizer=opt, scheduler=sched)
    assert {p.suffix for p in ckpt.iterdir()} == {".json", ".safetensors"}
    draws = train_steps(model, opt, sched, 3)

    again, opt2, sched2 = trainer(1)  # other weights, an empty AdamW state, the scheduler at step 0
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    assert train_state.load(OneProcess(), ckpt, "key", model=again, optimizer=opt2, scheduler=sched2) == 3
    assert again.head.weight is again.embed.weight  # still tied
    assert train_steps(again, opt2, sched2, 3) == draws
    assert sched2.state_dict() == sched.state_dict() and opt2.param_groups[0]["betas"] == (0.8, 0.95)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(EdgeconvError, match="belongs to another run"):
        train_state.load(OneProcess(), ckpt, "other", model=again, optimizer=opt2, scheduler=sched2)
    (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(EdgeconvError, match=r"step-00000003 is unreadable .*delete .* or pass --force"):
        train_state.load(OneProcess(), ckpt, "key", model=again, optimizer=opt2, scheduler=sched2)


def test_fsdp_checkpoints_are_refused_before_training():
    with pytest.raises(EdgeconvError, match=r"checkpoints under FSDP are not supported.*--checkpoint-every 40"):
        train_state.check_supported(OneProcess("FSDP"), 40)
    train_state.check_supported(OneProcess("MULTI_CPU"), 40)
