"""Issue 17, points 7-9: a killed or starved run leaves nothing that fills the disk, and a full disk is one line.

7. A killed export's `.NAME.edgeconv-tmp-PID/` (with its whole-size float GGUF) is removed by the next export.
8. Calibration's activation spill is allocated up front (a small disk refuses in one line, never a SIGBUS),
   removed on every way out (SIGTERM included), and a killed run's spill is swept by the next calibration.
9. A full disk during a GGUF export is refused before writing, in one line naming the directory, the bytes
   needed and the bytes free; llama.cpp's quantize failures quote its last log lines.

The full disks are real tmpfs mounts (root only, as in CI here); those tests skip where mounting is refused.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
from click.testing import CliRunner
from test_bad_inputs import assert_error

from edgeconv.cli import main
from edgeconv.errors import EdgeconvError

SPACE_LINE = re.compile(r"not enough disk space in (\S+) for .*needs ([\d,]+) bytes .*, ([\d,]+) bytes .* are free")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny Qwen3-MoE with its tokenizer."""
    root = tmp_path_factory.mktemp("trust-disk")
    return tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), root / "moe"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny.write_corpus(tmp_path_factory.mktemp("trust-disk-data") / "calib.jsonl")


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(bytes) -> a fresh directory on a tmpfs of that size (unmounted after the test)."""
    mounted = []

    def mount(size: int) -> Path:
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def live_pid():
    """The PID of a process that is alive for the whole test."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc.pid
    proc.kill()
    proc.wait()


DEAD_PID = 999_999_999  # above any pid_max: never alive


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "edgeconv-tmp" in p.name or "edgeconv-acts" in p.name)


# 7. Killed exports --------------------------------------------------------------------------------------------


def test_next_export_removes_a_killed_exports_temp_directory(moe, tmp_path, live_pid):
    out = tmp_path / "m.gguf"
    dead = tmp_path / f".m.gguf.edgeconv-tmp-{DEAD_PID}"  # what a kill -9 during the export leaves
    dead.mkdir()
    (dead / "base-F32.gguf").write_bytes(os.urandom(1 << 20))
    alive = tmp_path / f".m.gguf.edgeconv-tmp-{live_pid}"  # another run, still writing
    alive.mkdir()
    (alive / "base-F32.gguf").write_bytes(b"in progress")
    result = run_cli("export", moe, "--quant", "F32", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert out.is_file()
    assert not dead.exists(), "a dead run's temp directory must be removed by the next run"
    assert (alive / "base-F32.gguf").read_bytes() == b"in progress", "a live run's temp directory must be kept"
    assert leftovers(tmp_path) == [alive.name]


def test_export_builds_in_a_pid_named_temp_directory(moe, tmp_path, monkeypatch):
    """The temp directory is `.NAME.edgeconv-tmp-PID`, so the sweep above can tell whose it is."""
    from edgeconv.stages import export_gguf as stage

    seen = []
    real = stage.llamacpp.tensor_types

    def spy(path):
        seen.append(Path(path).parent.name)
        return real(path)

    monkeypatch.setattr(stage.llamacpp, "tensor_types", spy)
    stage.export_gguf(moe, tmp_path / "m.gguf", "F32")
    assert seen == [f".m.gguf.edgeconv-tmp-{os.getpid()}"]
    assert leftovers(tmp_path) == []


# 8. Calibration's activation spill ----------------------------------------------------------------------------

CALIBRATE = ("--tokens", 512, "--seq-len", 32, "--batch-size", 4, "--gram-tokens", 64, "--no-progress")
SPILL_BYTES = 512 * 32 * 4  # tokens x hidden x float32


def cli_subprocess(*args, patch: str = "") -> subprocess.Popen:
    """`edgeconv ARGS` in its own process (a SIGBUS or a signal must not take pytest down)."""
    code = f"import sys\n{patch}\nfrom edgeconv.cli import main\nmain(sys.argv[1:])\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_spill_that_does_not_fit_is_refused_in_one_line(moe, corpus, mount_tmpfs):
    disk = mount_tmpfs(40 * 1024)  # the spill needs 64 KiB
    proc = cli_subprocess("calibrate", moe, "--data", corpus, *CALIBRATE, "--max-activation-memory", "1KB",
                          "--out", disk / "stats")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, (proc.returncode, stderr[-2000:])  # not -7 (SIGBUS)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    line = lines[0]
    assert f"not enough disk space in {disk}" in line and "--max-activation-memory" in line, line
    assert f"{SPILL_BYTES:,} bytes" in line, line
    free = int(re.search(r", ([\d,]+) bytes \([^)]*\) are free", line).group(1).replace(",", ""))
    assert 0 < free < SPILL_BYTES
    assert list(disk.iterdir()) == [], "nothing may be left on the disk"


def test_next_calibration_sweeps_a_killed_runs_spill(moe, corpus, tmp_path, live_pid):
    from edgeconv.stages.calibrate import calibrate

    dead = tmp_path / f"edgeconv-acts-{DEAD_PID}-k1ll3d"
    dead.mkdir()
    (dead / "activations.bin").write_bytes(os.urandom(1 << 20))
    alive = tmp_path / f"edgeconv-acts-{live_pid}-runn1n"
    alive.mkdir()
    (alive / "activations.bin").write_bytes(b"in use")
    calibrate(moe, corpus, tmp_path / "stats", tokens=512, seq_len=32, batch_size=4, gram_tokens=64,
              max_activation_bytes=1024, progress=False)
    assert not dead.exists(), "a dead run's spill must be removed by the next calibration"
    assert (alive / "activations.bin").read_bytes() == b"in use", "a live run's spill must be kept"
    assert leftovers(tmp_path) == [alive.name]


def test_sigterm_during_calibration_leaves_no_spill(moe, corpus, tmp_path):
    # Each layer's weights take a minute to "load": the run is inside the layer loop, spill mapped, when killed.
    patch = ("import time\nimport edgeconv.forward.layer_runner as r\n_real = r._layer_weights\n"
             "def _slow(*a, **k):\n    time.sleep(120)\n    return _real(*a, **k)\nr._layer_weights = _slow\n")
    proc = cli_subprocess("calibrate", moe, "--data", corpus, *CALIBRATE, "--max-activation-memory", "1KB",
                          "--out", tmp_path / "stats", patch=patch)
    try:
        deadline = time.time() + 240
        while not list(tmp_path.glob("edgeconv-acts-*/activations.bin")):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "the spill file never appeared"
            time.sleep(0.1)
        time.sleep(0.5)  # into the (patched, slow) layer loop
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert leftovers(tmp_path) == [], "SIGTERM must not leave the activation spill behind"
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr[-2000:])
    assert not (tmp_path / "stats").exists()


# 9. Full disk during export ----------------------------------------------------------------------------------


def space_numbers(line: str, disk: Path) -> tuple[int, int]:
    m = SPACE_LINE.search(line)
    assert m, line
    assert m.group(1) == str(disk), line
    return int(m.group(2).replace(",", "")), int(m.group(3).replace(",", ""))


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_export_to_a_full_disk_is_refused_before_writing(moe, mount_tmpfs, quant):
    disk = mount_tmpfs(40 * 1024)
    line = assert_error(run_cli("export", moe, "--quant", quant, "--out", disk / "m.gguf"), "free some space")
    needed, free = space_numbers(line, disk)
    assert needed > free > 0
    assert list(disk.iterdir()) == [], "no temp files may be left"


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_K_M"])
def test_disk_that_fills_during_the_export_is_one_line(moe, mount_tmpfs, monkeypatch, quant):
    """Past the check (another process took the space meanwhile): numpy's short write (no errno) while writing
    the file edgeconv writes itself, or llama.cpp's failed write while quantizing, end in the same one line."""
    from edgeconv.export.gguf.writer import plan_gguf

    monkeypatch.setattr("edgeconv.stages.export_gguf.check_free_space", lambda *a: None)
    plan = plan_gguf(moe, "F32")
    plan.close()
    # F16, Q8_0 (written by edgeconv): 40 KiB, nothing fits. Q4_K_M: the F32 intermediate fits, the quantized file
    # (65 KiB) does not.
    size = 40 * 1024 if quant != "Q4_K_M" else (plan.nbytes // 4096 + 1) * 4096 + 32 * 1024
    disk = mount_tmpfs(size)
    line = assert_error(run_cli("export", moe, "--quant", quant, "--out", disk / "m.gguf"), "free some space")
    needed, free = space_numbers(line, disk)
    assert needed > free > 0
    assert list(disk.iterdir()) == [], "no temp files may be left"


def test_write_gguf_on_a_full_disk_leaves_no_partial_file(moe, mount_tmpfs):
    from edgeconv.export.gguf.writer import write_gguf

    disk = mount_tmpfs(40 * 1024)
    with pytest.raises(EdgeconvError, match="not enough disk space") as err:
        write_gguf(moe, disk / "m.gguf", "F16")
    assert "bytes" in str(err.value) and "are free" in str(err.value)
    assert list(disk.iterdir()) == []


def test_sizes_are_known_before_writing(moe, tmp_path):
    """The float file's size is exact; the quantized file's bound is an upper bound."""
    from edgeconv.export.gguf import llamacpp
    from edgeconv.export.gguf.writer import plan_gguf, write_gguf

    for ftype in ("F32", "F16"):
        plan = plan_gguf(moe, ftype)
        plan.close()
        write_gguf(moe, tmp_path / f"m-{ftype}.gguf", ftype)
        assert (tmp_path / f"m-{ftype}.gguf").stat().st_size == plan.nbytes, ftype
    plan = plan_gguf(moe, "F32")
    plan.close()
    for quant in ("Q8_0", "Q4_K_M"):
        llamacpp.quantize(tmp_path / "m-F32.gguf", tmp_path / f"m-{quant}.gguf", quant)
        real = (tmp_path / f"m-{quant}.gguf").stat().st_size
        assert real <= llamacpp.quantized_bytes_bound(plan.tensors(), quant, plan.metadata_bytes), quant


def test_quantize_failure_quotes_llama_cpps_log(moe, tmp_path):
    from edgeconv.export.gguf import llamacpp
    from edgeconv.export.gguf.writer import write_gguf

    write_gguf(moe, tmp_path / "m.gguf", "F32")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])  # a base file cut short
    (tmp_path / "junk.gguf").write_bytes(b"NOT A GGUF" * 100)
    for name in ("cut.gguf", "junk.gguf"):
        with pytest.raises(EdgeconvError) as err:
            llamacpp.quantize(tmp_path / name, tmp_path / "q.gguf", "Q8_0")
        line = err.value.line()
        assert "see llama.cpp's log above" not in line
        assert "llama_model_quantize: failed to quantize" in line, line  # llama.cpp's own last words
        assert "\n" not in str(err.value) and len(line) < 1000
    with pytest.raises(EdgeconvError, match="invalid magic"):
        llamacpp.quantize(tmp_path / "junk.gguf", tmp_path / "q.gguf", "Q8_0")
