"""Every bad input: one line naming the problem and what to do, exit status 2, no output left behind."""

import errno
import json
import shutil

import pytest
import tiny
from click.testing import CliRunner
from transformers import Qwen3Config, Qwen3ForCausalLM

from edgeconv.cli import main
from edgeconv.io import safetensors_writer


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_error(result, *phrases):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def plan_file(qwen3_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert run("plan", qwen3_dir, "--out", path).exit_code == 0
    return path


def assemble_fails(model, plan, out, *phrases, extra=()):
    result = run("assemble", model, "--plan", plan, "--out", out, "--no-progress", *extra)
    line = assert_error(result, *phrases)
    assert not out.exists(), "a failed run must not leave an output directory"
    assert not list(out.parent.glob(f".{out.name}.edgeconv-tmp-*")), "temp directory left behind"
    return line


def test_missing_path(tmp_path, plan_file):
    assemble_fails(tmp_path / "nope", plan_file, tmp_path / "out", "does not exist", "local checkpoint directory")
    assert_error(run("inspect", tmp_path / "nope"), "does not exist")


def test_not_a_transformers_checkpoint(tmp_path, plan_file):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    assemble_fails(tmp_path / "junk", plan_file, tmp_path / "out", "not a transformers checkpoint", "config.json")


def test_no_safetensors(tmp_path, qwen3_dir, plan_file):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(qwen3_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"x")
    assemble_fails(d, plan_file, tmp_path / "out", "no .safetensors", "safe_serialization")


def test_dense_model_as_teacher(tmp_path, plan_file):
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    line = assemble_fails(tmp_path / "dense", plan_file, tmp_path / "out", "is a dense model", "Qwen3ForCausalLM")
    assert "MoE" in line
    assert_error(run("inspect", tmp_path / "dense"), "is a dense model")


def test_unsupported_architecture(tmp_path, qwen3_dir, plan_file):
    d = tmp_path / "foo"
    shutil.copytree(qwen3_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["FooMoeForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))
    line = assemble_fails(d, plan_file, tmp_path / "out", "FooMoeForCausalLM", "not supported")
    for arch in tiny.ARCHS:  # the message lists what is supported
        assert arch in line


def test_plan_for_another_model(tmp_path, random_checkpoints, plan_file):
    other_arch = random_checkpoints["MixtralForCausalLM"][1]
    assemble_fails(other_arch, plan_file, tmp_path / "out", "MixtralForCausalLM", "Qwen3MoeForCausalLM")
    deeper = tiny.save(tiny.build_model("Qwen3MoeForCausalLM", num_hidden_layers=3), tmp_path / "deeper")
    assemble_fails(deeper, plan_file, tmp_path / "out", "another model")
    fewer = tiny.save(tiny.build_model("Qwen3MoeForCausalLM", num_experts=4), tmp_path / "fewer")
    assemble_fails(fewer, plan_file, tmp_path / "out", "8 experts", "has 4")


@pytest.mark.parametrize(
    "spec, phrases",
    [
        ("ids:0,99", ("expert id 99 is out of range", "0 to 7")),
        ("ids:1,3,1", ("expert 1 is used more than once",)),
        ("first:9", ("9 experts requested", "only 8", "K <= 8")),
        ("random:12:3", ("12 experts requested", "only 8")),
        ("first:x", ("not an integer",)),
        ("best:2", ("not understood", "first:K")),
    ],
)
def test_bad_expert_choice(qwen3_dir, tmp_path, spec, phrases):
    out = tmp_path / "plan.json"
    assert_error(run("plan", qwen3_dir, "--experts", spec, "--out", out), *phrases)
    assert not out.exists()


def test_hand_edited_plan_with_bad_ids(qwen3_dir, plan_file, tmp_path):
    data = json.loads(plan_file.read_text())
    data["layers"][0]["groups"][1]["experts"] = [42]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assemble_fails(qwen3_dir, bad, tmp_path / "out", "layer 0", "expert id 42 is out of range")
    data["layers"][0]["groups"][1]["experts"] = [0]
    bad.write_text(json.dumps(data))
    assemble_fails(qwen3_dir, bad, tmp_path / "out", "expert 0 is used more than once")
    data["layers"][0]["groups"][1].update(experts=[1], weights=[0.3])
    bad.write_text(json.dumps(data))
    assemble_fails(qwen3_dir, bad, tmp_path / "out", "weights", "sum to 1")
    bad.write_text("{not json")
    assemble_fails(qwen3_dir, bad, tmp_path / "out", "not valid JSON")


def _shard(d):
    return sorted(d.glob("*.safetensors"))[0]


def test_corrupt_shard_is_named(qwen3_dir, plan_file, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(qwen3_dir, d)
    shard = _shard(d)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00garbage-garbage-garbage-garbage"
    shard.write_bytes(bytes(data))
    assemble_fails(d, plan_file, tmp_path / "out", shard.name, "corrupt")


def test_truncated_shard_is_named(qwen3_dir, plan_file, tmp_path):
    d = tmp_path / "truncated"
    shutil.copytree(qwen3_dir, d)
    shard = _shard(d)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    assemble_fails(d, plan_file, tmp_path / "out", shard.name, "cut short", "re-download")


def test_missing_shard_from_index(qwen3_dir, plan_file, tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(qwen3_dir / "config.json", d)
    shutil.copy(_shard(qwen3_dir), d / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assemble_fails(d, plan_file, tmp_path / "out", "model-00002-of-00002.safetensors", "missing")


def test_existing_foreign_output_is_refused_even_when_forced(qwen3_dir, plan_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for force in ((), ("--force",)):  # --force replaces only edgeconv outputs and empty directories
        result = run("assemble", qwen3_dir, "--plan", plan_file, "--out", out, "--no-progress", *force)
        assert_error(result, "edgeconv did not write", "choose another --out")
        assert (out / "precious.txt").read_text() == "keep me"


def test_disk_full_during_write(qwen3_dir, plan_file, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = safetensors_writer._write_bytes

    def filling_disk(fh, data):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(safetensors_writer, "_write_bytes", filling_disk)
    assemble_fails(qwen3_dir, plan_file, tmp_path / "out", "disk filled up", "nothing was kept", "free some space")
    assert calls["n"] > 5


def test_interrupted_run_leaves_nothing_that_looks_complete(qwen3_dir, plan_file, tmp_path, monkeypatch):
    def interrupted(fh, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_writer, "_write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        from edgeconv.stages.assemble import assemble

        assemble(qwen3_dir, plan_file, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 40 KB filesystem (tmpfs), where mounting is allowed (root, as in CI here)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_really_full_disk(qwen3_dir, plan_file, tiny_disk):
    # The tiny Qwen3 output is about 77 KB: the disk fills during the write.
    assemble_fails(qwen3_dir, plan_file, tiny_disk / "out", "disk filled up", "nothing was kept")
    assert list(tiny_disk.iterdir()) == []
