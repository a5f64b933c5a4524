"""Data loss and leftovers: --out never overlaps an input, --force replaces only edgeconv's own outputs, one
run per output at a time, "up to date" means the hashes match, killed runs' temp directories are swept,
and --out is checked before the heavy work."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
from click.testing import CliRunner

from edgeconv.cli import main

FAST = ("--tokens", "512", "--seq-len", "32", "--no-progress")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, *phrases):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture()
def models(tmp_path, qwen3_dir, corpus):
    """tmp/models/ holding a MoE (moe/), a copy used as a dense stand-in (dense/), the corpus and a plan."""
    root = tmp_path / "models"
    shutil.copytree(qwen3_dir, root / "moe")
    tiny.add_tokenizer(root / "moe")
    shutil.copytree(root / "moe", root / "dense")
    shutil.copy(corpus, root / "calib.jsonl")
    assert run("plan", root / "moe", "--experts", "first:2", "--out", root / "plan.json").exit_code == 0
    return root


# Every command with --out: --out = the input's parent (it contains the input), with --force.
OVERLAPS = {
    "convert": lambda m: ("convert", m / "moe", "--out", m, "--force", "--data", m / "calib.jsonl", *FAST),
    "calibrate": lambda m: ("calibrate", m / "moe", "--data", m / "calib.jsonl", "--out", m, "--force", *FAST),
    "assemble": lambda m: ("assemble", m / "moe", "--plan", m / "plan.json", "--out", m, "--force"),
    "distill": lambda m: ("distill", "--teacher", m / "moe", "--student", m / "dense", "--data", m / "calib.jsonl",
                          "--tokens", "64", "--out", m, "--force"),
    "export": lambda m: ("export", m / "moe", "--format", "onnx", "--out", m, "--force"),
    "build": lambda m: ("build", m / "moe", "--target", "laptop", "--distill-tokens", "0", "--out", m, "--force"),
    "upcycle": lambda m: ("upcycle", m / "dense", "--out", m, "--force"),
    "prune": lambda m: ("prune", m / "dense", "--ffn-width", "8", "--out", m, "--force"),
    "sweep": lambda m: ("sweep", m / "moe", "--out", m),
}


@pytest.mark.parametrize("command", sorted(OVERLAPS))
def test_force_never_deletes_an_input(models, command):
    before = snapshot(models)
    line = assert_error(run(*OVERLAPS[command](models)), "contains the", "outside every input")
    assert snapshot(models) == before, "an input was touched"
    assert not list(models.parent.glob("models.work*")), line


def test_out_equal_to_or_inside_an_input_is_refused(models):
    m = models
    assert_error(run("convert", m / "moe", "--out", m / "moe", "--force", "--data", m / "calib.jsonl", *FAST),
                 "is the model")
    assert_error(run("convert", m / "moe", "--out", m / "moe" / "dense", "--data", m / "calib.jsonl", *FAST),
                 "is inside the model")
    assert_error(run("export", m / "moe", "--quant", "F16", "--out", m / "moe" / "x.gguf"), "is inside the model")
    (m / "texts").mkdir()
    shutil.copy(m / "calib.jsonl", m / "texts")
    assert_error(run("calibrate", m / "moe", "--data", m / "texts", "--out", m / "texts", "--force", *FAST),
                 "is the data")
    (m / "plans").mkdir()
    shutil.copy(m / "plan.json", m / "plans")
    assert_error(run("assemble", m / "moe", "--plan", m / "plans" / "plan.json", "--out", m / "plans", "--force"),
                 "contains the plan")
    # OUT.work/ counts too: data inside the work directory would be replaced by --force
    (m / "x.work").mkdir()
    shutil.copy(m / "calib.jsonl", m / "x.work" / "calib.jsonl")
    assert_error(run("convert", m / "moe", "--out", m / "x", "--data", m / "x.work" / "calib.jsonl", *FAST),
                 "(its work directory x.work) contains the data")
    assert not (m / "moe" / "dense").exists() and not (m / "moe" / "dense.work").exists()
    assert not (m / "x").exists()


def test_force_replaces_only_edgeconv_outputs(models, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for args in (("convert", models / "moe", "--data", models / "calib.jsonl", *FAST),
                 ("calibrate", models / "moe", "--data", models / "calib.jsonl", *FAST),
                 ("assemble", models / "moe", "--plan", models / "plan.json")):
        assert_error(run(*args, "--out", foreign, "--force"), "edgeconv did not write")
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "mine.work").exists(), "convert must check --out before calibrating"
    # a file is never replaced either
    (tmp_path / "file").write_text("x")
    from edgeconv.errors import EdgeconvError
    from edgeconv.stages.assemble import assemble

    with pytest.raises(EdgeconvError, match="is a file"):
        assemble(models / "moe", models / "plan.json", tmp_path / "file", force=True, progress=False)
    assert (tmp_path / "file").read_text() == "x"
    # an edgeconv output of another run and an empty directory are replaced with --force
    out = tmp_path / "dense"
    assert run("assemble", models / "moe", "--plan", models / "plan.json", "--out", out).exit_code == 0
    assert run("plan", models / "moe", "--experts", "first:1", "--out", tmp_path / "p1.json").exit_code == 0
    assert_error(run("assemble", models / "moe", "--plan", tmp_path / "p1.json", "--out", out), "--force")
    assert run("assemble", models / "moe", "--plan", tmp_path / "p1.json", "--out", out, "--force").exit_code == 0
    (tmp_path / "empty").mkdir()
    assert run("assemble", models / "moe", "--plan", models / "plan.json", "--out", tmp_path / "empty",
               "--force").exit_code == 0


def test_build_checks_out_before_stage_one(models, tmp_path):
    foreign = tmp_path / "bundle"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    started = time.perf_counter()
    result = run("build", models / "moe", "--target", "laptop", "--distill-tokens", "0", "--out", foreign,
                 "--no-progress", "--force")
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]  # after the printed plan
    assert last.startswith("error: ") and "edgeconv did not write" in last, result.stderr
    assert time.perf_counter() - started < 20
    assert not (tmp_path / "bundle.work").exists(), "nothing may run before --out is known to be writable"
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_convert_refuses_another_runs_options_before_calibrating(models, tmp_path):
    out = tmp_path / "dense"
    base = ("convert", models / "moe", "--data", models / "calib.jsonl", "--out", out, "--seq-len", "32",
            "--no-progress")
    assert run(*base, "--tokens", "512").exit_code == 0
    stats = snapshot(tmp_path / "dense.work" / "calibrate")
    line = assert_error(run(*base, "--tokens", "1024"), "other inputs or options", "--force")
    assert "tokens: 512 -> 1024" in line
    assert snapshot(tmp_path / "dense.work" / "calibrate") == stats
    assert run(*base, "--tokens", "1024", "--force").exit_code == 0


def test_a_validation_error_leaves_no_work_directory(models, tmp_path):
    out = tmp_path / "a" / "b" / "dense"
    assert_error(run("convert", models / "moe", "--data", tmp_path / "missing.jsonl", "--out", out, *FAST))
    assert not (tmp_path / "a").exists()
    assert_error(run("convert", models / "moe", "--data", models / "calib.jsonl", "--out", out, "--experts", "99",
                     *FAST), "99")
    assert not (tmp_path / "a").exists()
    assert_error(run("convert", models / "moe", "--data", models / "calib.jsonl", "--out", out,
                     "--distill-tokens", "1024", "--distill-data", tmp_path / "nope.jsonl", *FAST), "--distill-data")
    assert not (tmp_path / "a").exists()


# --- one run per output --------------------------------------------------------------------------------------

HOLD = """
import sys, time
from edgeconv.io.guard import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(out: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_into_the_same_out_waits_or_refuses(models, tmp_path):
    out = tmp_path / "dense"
    holder = hold_lock(out, 60)
    try:
        assert_error(run("assemble", models / "moe", "--plan", models / "plan.json", "--out", out,
                         "--no-wait"), f"(pid {holder.pid}) is writing", "--no-wait")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    holder = hold_lock(out, 3)
    try:
        started = time.perf_counter()
        result = run("assemble", models / "moe", "--plan", models / "plan.json", "--out", out)
        assert result.exit_code == 0, result.output
        assert time.perf_counter() - started >= 1.5, "it must have waited for the holder"
        assert f"waiting for another edgeconv run (pid {holder.pid})" in result.stderr
    finally:
        holder.wait()
    assert not list(tmp_path.glob(".dense.edgeconv-lock")), "the lock file is removed on release"


def test_two_converts_with_other_options_never_both_succeed(models, tmp_path):
    out = tmp_path / "dense"
    cmd = [sys.executable, "-m", "edgeconv.cli", "convert", str(models / "moe"), "--data", str(models / "calib.jsonl"),
           "--out", str(out), *FAST]
    procs = [subprocess.Popen([*cmd, "--scoring", s], stderr=subprocess.PIPE, text=True) for s in ("frequency", "cp")]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = ("frequency", "cp")[[code for code, _ in results].index(0)]
    loser_err = [err for code, err in results if code == 2][0]
    assert "other inputs or options" in loser_err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"]["scoring"] == winner


# --- "up to date" means the hashes match ---------------------------------------------------------------------

def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_output_damaged_in_place_is_rebuilt(models, tmp_path):
    out = tmp_path / "dense"
    args = ("convert", models / "moe", "--data", models / "calib.jsonl", "--out", out, *FAST)
    assert run(*args).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    weights = out / "model-00001-of-00001.safetensors"
    size = weights.stat().st_size
    flip_a_byte(weights)
    assert weights.stat().st_size == size
    stats = tmp_path / "dense.work" / "calibrate" / "stats.safetensors"
    flip_a_byte(stats)
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "stats.safetensors differs from its manifest (sha256); rebuilding calibrate" in result.stderr
    assert "model-00001-of-00001.safetensors differs from its manifest (sha256); rebuilding assemble" in result.stderr
    assert sha256(weights) == manifest["files"][weights.name]["sha256"]
    again = run(*args)
    assert again.exit_code == 0 and "differs" not in again.stderr


# --- leftovers of killed runs -------------------------------------------------------------------------------

def test_temp_directories_of_killed_runs_are_swept(models, tmp_path):
    out = tmp_path / "dense"
    args = ("convert", models / "moe", "--data", models / "calib.jsonl", "--out", out, *FAST)
    assert run(*args).exit_code == 0
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = [tmp_path / ".dense.edgeconv-tmp-999999999", tmp_path / ".dense.edgeconv-tmp-old-999999999",
                tmp_path / "dense.work" / ".calibrate.edgeconv-tmp-999999999"]
        for d in dead:
            d.mkdir()
            (d / "big.bin").write_bytes(b"\0" * 4096)
        alive = tmp_path / f".dense.edgeconv-tmp-{live.pid}"
        alive.mkdir()
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert not any(d.exists() for d in dead), "a killed run's temp directory survived a rerun"
        assert alive.exists(), "the temp directory of a live run must be left alone"
    finally:
        live.kill()
        live.wait()


def test_the_lock_and_temp_names_do_not_collide_with_outputs(tmp_path):
    from edgeconv.io.guard import output_lock
    from edgeconv.io.output_dir import remove_stale_temps, temp_path

    out = tmp_path / "x"
    with output_lock(out):
        assert (tmp_path / ".x.edgeconv-lock").read_text() == str(os.getpid())
        with output_lock(out):  # reentrant: convert inside build, distill inside convert
            pass
        remove_stale_temps(out)
        assert (tmp_path / ".x.edgeconv-lock").exists()
    assert temp_path(out).name == f".x.edgeconv-tmp-{os.getpid()}"


def test_export_force_replaces_only_its_own_files(models, tmp_path):
    mine = tmp_path / "llama.gguf"
    mine.write_bytes(b"GGUF from somewhere else")
    assert_error(run("export", models / "moe", "--quant", "F16", "--out", mine, "--force"), "edgeconv did not write")
    assert mine.read_bytes() == b"GGUF from somewhere else"
    ours = tmp_path / "m.gguf"
    assert run("export", models / "moe", "--quant", "F16", "--out", ours).exit_code == 0
    assert_error(run("export", models / "moe", "--quant", "F16", "--out", ours), "exists", "--force")
    assert run("export", models / "moe", "--quant", "F16", "--out", ours, "--force").exit_code == 0
