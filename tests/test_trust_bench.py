"""Issue 17: `edgeconv bench BUNDLE` verifies the bundle in edgeconv's own process before any of it runs, and
bench.py neither loads a model its manifest did not hash nor says "verified" about files it did not check."""

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_bad_inputs import assert_error, run
from test_bench_runner import FAST, bench, make_bundle, models  # noqa: F401  (models: the fixture, reused)

from edgeconv.device import runner
from edgeconv.errors import EdgeconvError

QUICK_RUN = ["--threads", "1", "--prompt-lengths", "4", "--decode-tokens", "4", "--repeats", "1", "--no-accuracy"]


@pytest.fixture(scope="module")
def bundle(models, small_eval, tmp_path_factory):  # noqa: F811
    return make_bundle(tmp_path_factory.mktemp("trust") / "tiny-laptop", models["gguf"], small_eval)


def copy_of(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    (dst / "results.json").unlink(missing_ok=True)
    return dst


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def rehash(bundle: Path, rel: str) -> None:
    """What someone who can write the manifest too does: make it vouch for the modified file."""
    m = manifest_of(bundle)
    data = (bundle / rel).read_bytes()
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_manifest(bundle, m)


def plant_marker(bench_py: Path, marker: Path) -> None:
    """Code that runs as soon as bench.py is started: writes MARKER."""
    text = bench_py.read_text()
    head = "from __future__ import annotations\n"
    code = f"\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n"
    bench_py.write_text(text.replace(head, head + code, 1))


@pytest.fixture
def no_process(monkeypatch):
    """The processes started (subprocess.run), recorded and let through: each test asserts there were none."""
    started = []
    real = subprocess.run

    def spy(*args, **kwargs):
        started.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    return started


# ---------------------------------------------------------------------------------------------------------
# 1. edgeconv bench verifies before it starts anything
# ---------------------------------------------------------------------------------------------------------

def test_a_modified_bench_py_never_runs(bundle, tmp_path, no_process):
    copy = copy_of(bundle, tmp_path / "b")
    marker = tmp_path / "MARKER"
    plant_marker(copy / "bench.py", marker)
    result = run("bench", copy, "--quick", "--out", tmp_path / "r")
    assert not marker.exists(), "the bundle's bench.py ran before it was checked"
    assert not no_process and not (tmp_path / "r" / "results-student.json").exists()
    line = assert_error(result, f"{copy} does not match its manifest: bench.py does not match manifest.json (size ",
                        "nothing was run", "re-copy the bundle")
    assert "run it by hand" not in line


def test_a_link_out_of_the_bundle_or_a_bad_model_field_is_refused_here(bundle, tmp_path, no_process):
    copy = copy_of(bundle, tmp_path / "b")
    outside = tmp_path / "outside.jsonl"
    shutil.copy2(copy / "eval" / "text.jsonl", outside)  # same bytes, same hash: only the link gives it away
    (copy / "eval" / "text.jsonl").unlink()
    (copy / "eval" / "text.jsonl").symlink_to(outside)
    assert_error(run("bench", copy, "--out", tmp_path / "r"),
                 "eval/text.jsonl leads outside the bundle (a symbolic link)")
    (copy / "eval" / "text.jsonl").unlink()
    shutil.copy2(outside, copy / "eval" / "text.jsonl")
    m = manifest_of(copy)
    m["model"] = "../outside.gguf"
    write_manifest(copy, m)
    assert_error(run("bench", copy, "--out", tmp_path / "r"),
                 "model ../outside.gguf in manifest.json is not a path inside the bundle")
    assert not no_process


# ---------------------------------------------------------------------------------------------------------
# 1. --expect-sha256: the manifest itself against the hash printed at build time
# ---------------------------------------------------------------------------------------------------------

def test_a_wrong_manifest_hash_is_refused_before_any_process(bundle, tmp_path, no_process):
    right = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    wrong = "0" * 64
    assert_error(run("bench", bundle, "--expect-sha256", wrong, "--out", tmp_path / "r"),
                 "manifest.json differs from the one printed at build time", f"expected {wrong}", right,
                 "nothing was run")
    assert_error(run("bench", bundle, "--expect-sha256", "abc", "--out", tmp_path / "r"),
                 "is not a sha256", "64 hex digits")
    # Someone who rewrites bench.py and the manifest with it gets past the hashes, not past --expect-sha256.
    copy = copy_of(bundle, tmp_path / "b")
    marker = tmp_path / "MARKER"
    plant_marker(copy / "bench.py", marker)
    rehash(copy, "bench.py")
    assert runner.verify_bundle(copy) == []
    assert_error(run("bench", copy, "--quick", "--expect-sha256", right, "--out", tmp_path / "r"),
                 "differs from the one printed at build time")
    assert not marker.exists() and not no_process
    # A bare artifact has no manifest to compare.
    assert_error(run("bench", bundle / "student-F32.gguf", "--expect-sha256", right, "--out", tmp_path / "r"),
                 "is not a bundle")


def test_the_printed_hash_runs_only_the_verified_bench_py(bundle, tmp_path):
    """One real run: build's headline names the hash; with it the bundle verifies and runs from the bytes that
    were hashed, in a private directory (a json.py left next to bench.py is not imported in place of json)."""
    from edgeconv.pipelines.build import headline

    copy = copy_of(bundle, tmp_path / "b")
    marker = tmp_path / "MARKER"
    (copy / "json.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n")
    m = manifest_of(copy)
    result = SimpleNamespace(
        bundle=copy, manifest=m, parity={}, results=None, seconds=1.0,
        plan=SimpleNamespace(estimate=SimpleNamespace(params=1e6, total_bytes=1e6),
                             target=SimpleNamespace(name="laptop", usable_memory_gb=8,
                                                    bench=SimpleNamespace(command="python bench.py", setup="pip"))))
    printed = re.search(r"edgeconv bench (\S+) --expect-sha256 ([0-9a-f]{64})", headline(result))
    assert printed and printed.group(1) == str(copy)
    assert printed.group(2) == hashlib.sha256((copy / "manifest.json").read_bytes()).hexdigest()
    out = tmp_path / "r"
    res = run("bench", copy, "--quick", "--threads", "1", "--expect-sha256", printed.group(2), "--out", out)
    assert res.exit_code == 0, res.output
    assert f"(sha256 {printed.group(2)}, as expected)" in res.stderr
    r = json.loads((out / "results-student.json").read_text())
    assert r["verified"] is True and r["decode_tok_s"] > 0 and r["bundle"] == str(copy)
    assert not marker.exists(), "a module planted in the bundle was imported by the runner"
    # and on the device, `python bench.py` in the bundle does not import it either
    proc = bench(copy, *FAST, "--no-accuracy", "--out", str(tmp_path / "d.json"))
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "`python bench.py` imported a module planted next to it"


# ---------------------------------------------------------------------------------------------------------
# 2. bench.py: the manifest's model must be a hashed file inside the bundle
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["not listed", "absolute", "dot-dot"])
def test_bench_py_refuses_a_model_the_manifest_did_not_hash(bundle, tmp_path, where):
    copy = copy_of(bundle, tmp_path / "b")
    gguf = copy / "student-F32.gguf"
    if where == "not listed":
        shutil.copy2(gguf, copy / "other.gguf")
        model, why = "other.gguf", "is not among its hashed files"
    elif where == "absolute":
        shutil.copy2(gguf, tmp_path / "outside.gguf")
        model, why = str(tmp_path / "outside.gguf"), "is not a path inside the bundle"
    else:
        shutil.copy2(gguf, tmp_path / "outside.gguf")
        model, why = "../outside.gguf", "is not a path inside the bundle"
    m = manifest_of(copy)
    m["model"] = model
    write_manifest(copy, m)
    proc = bench(copy, *FAST, "--no-accuracy")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"bench.py: refusing to run: model {model} in manifest.json {why}; re-copy the bundle")
    assert "loading" not in proc.stderr and not (copy / "results.json").exists()
    # and edgeconv refuses it too, before it starts anything
    assert_error(run("bench", copy, "--out", tmp_path / "r"), f"model {model} in manifest.json {why}")
    if where != "not listed":  # outside the bundle is refused even when hashes are not checked
        proc = bench(copy, *FAST, "--no-accuracy", "--no-verify")
        assert proc.returncode == 2 and "loading" not in proc.stderr
        assert f"refusing to run: model {model} in manifest.json is not a path inside the bundle" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# 2. "verified": true only when every file read was hashed
# ---------------------------------------------------------------------------------------------------------

def run_here(bundle: Path, tmp_path: Path, *extra) -> dict:
    return runner.run(["--bundle", str(bundle), *QUICK_RUN, "--out", str(tmp_path / "r.json"), *extra])


def test_verified_means_every_file_read_was_hashed(bundle, tmp_path, small_eval):
    r = run_here(bundle, tmp_path)
    assert r["verified"] is True and not any("not verified" in n for n in r["notes"])
    # the model given by hand, from outside the bundle
    outside = tmp_path / "outside.gguf"
    shutil.copy2(bundle / "student-F32.gguf", outside)
    r = run_here(bundle, tmp_path, "--model", str(outside))
    assert r["verified"] is False
    assert any(n.startswith("not verified: 1 file read here is not among manifest.json's hashed files")
               and str(outside) in n for n in r["notes"]), r["notes"]
    # ... but the bundle's own model given by hand is still verified
    assert run_here(bundle, tmp_path, "--model", str(bundle / "student-F32.gguf"))["verified"] is True
    # evaluation data from outside the bundle
    r = run_here(bundle, tmp_path, "--data", str(small_eval))
    assert r["verified"] is False and any("3 files read here are not among" in n for n in r["notes"]), r["notes"]
    # an evaluation file in the bundle that the manifest does not list
    copy = copy_of(bundle, tmp_path / "b")
    m = manifest_of(copy)
    del m["files"]["eval/choice.jsonl"]
    write_manifest(copy, m)
    r = run_here(copy, tmp_path)
    assert r["verified"] is False and any("choice.jsonl" in n for n in r["notes"] if "not verified" in n)


# ---------------------------------------------------------------------------------------------------------
# edgeconv's check and bench.py's own copy of it agree, problem for problem
# ---------------------------------------------------------------------------------------------------------

def fake_bundle(root: Path, model_dir: bool = False) -> Path:
    root.mkdir(parents=True)
    if model_dir:
        (root / "model").mkdir()
        (root / "model" / "genai_config.json").write_text("{}")
        (root / "model" / "model.onnx").write_bytes(b"onnx")
    else:
        (root / "m.gguf").write_bytes(b"GGUF model bytes")
    shutil.copy2(runner.__file__, root / "bench.py")
    (root / "eval").mkdir()
    (root / "eval" / "text.jsonl").write_text('{"corpus": "a", "text": "b"}\n')
    files = {str(p.relative_to(root)): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                        "bytes": p.stat().st_size} for p in sorted(root.rglob("*")) if p.is_file()}
    write_manifest(root, {"model": "model" if model_dir else "m.gguf", "files": files})
    return root


def _edit(key, value):
    def edit(b):
        m = manifest_of(b)
        m[key] = value
        write_manifest(b, m)
    return edit


def _edit_files(fn):
    def edit(b):
        m = manifest_of(b)
        fn(m["files"])
        write_manifest(b, m)
    return edit


def _link_out(b):
    outside = b.parent / "outside.gguf"
    shutil.copy2(b / "m.gguf", outside)
    (b / "m.gguf").unlink()
    (b / "m.gguf").symlink_to(outside)


def _dir_link_out(b):
    shutil.copytree(b / "eval", b.parent / "eval-outside")
    shutil.rmtree(b / "eval")
    (b / "eval").symlink_to(b.parent / "eval-outside")


def _link_in(b):
    shutil.copy2(b / "m.gguf", b / "real.gguf")
    (b / "m.gguf").unlink()
    (b / "m.gguf").symlink_to("real.gguf")


TAMPERED = {
    "untouched": (lambda b: None, False),
    "model dir": (None, False),
    "link inside": (_link_in, False),
    "flipped byte": (lambda b: (b / "m.gguf").write_bytes(b"GGUF model bytez"), True),
    "truncated": (lambda b: (b / "m.gguf").write_bytes(b"GGUF"), True),
    "missing": (lambda b: (b / "eval" / "text.jsonl").unlink(), True),
    "bench.py edited": (lambda b: (b / "bench.py").write_text((b / "bench.py").read_text() + "#\n"), True),
    "two problems": (lambda b: ((b / "m.gguf").unlink(), (b / "bench.py").write_text("x")), True),
    "link out": (_link_out, True),
    "dir link out": (_dir_link_out, True),
    "dot-dot file": (_edit_files(lambda f: f.update({"../outside": {"sha256": "0", "bytes": 1}})), True),
    "absolute file": (_edit_files(lambda f: f.update({"/etc/hostname": {"sha256": "0", "bytes": 1}})), True),
    "bench.py unlisted": (_edit_files(lambda f: f.pop("bench.py")), True),
    "model unlisted": (_edit("model", "other.gguf"), True),
    "model absolute": (_edit("model", "/tmp/x.gguf"), True),
    "model dot-dot": (_edit("model", "../x.gguf"), True),
    "model dot": (_edit("model", "."), True),
    "model prefix only": (_edit("model", "m.gg"), True),
    "model not a string": (_edit("model", ["m.gguf"]), True),
    "no files": (_edit("files", {}), True),
    "not json": (lambda b: (b / "manifest.json").write_text("{not json"), True),
    "not an object": (lambda b: (b / "manifest.json").write_text("[1]"), True),
    "no manifest": (lambda b: (b / "manifest.json").unlink(), True),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_edgeconv_and_bench_py_find_the_same_problems(tmp_path, case):
    from edgeconv.device import verify

    tamper, refused = TAMPERED[case]
    b = fake_bundle(tmp_path / "bundle", model_dir=case == "model dir")
    if tamper:
        tamper(b)
    ours = verify.bundle_problems(b)
    assert ours == runner.verify_bundle(b)
    assert bool(ours) == refused, ours
    if refused and case != "no manifest":
        with pytest.raises(EdgeconvError, match="nothing was run"):
            verify.verify_bundle(b)


def test_the_runner_that_starts_is_the_bytes_that_were_hashed(tmp_path, monkeypatch):
    """bench.py replaced between the check and the start: the verified bytes run, from a private copy."""
    from edgeconv.device import local_bench

    b = fake_bundle(tmp_path / "bundle")
    target = local_bench.resolve(b)
    (b / "bench.py").write_text("raise SystemExit('swapped')\n")
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["runner"] = Path(cmd[1])
        seen["bytes"] = Path(cmd[1]).read_bytes()
        seen["mode"] = Path(cmd[1]).parent.stat().st_mode & 0o777
        Path(cmd[cmd.index("--out") + 1]).write_text("{}")
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(local_bench.subprocess, "run", fake_run)
    local_bench.run_runner(target, tmp_path / "r.json", role="student", label="x", threads=1, quick=True,
                           eval_data=None)
    assert seen["bytes"] == Path(runner.__file__).read_bytes() and seen["runner"].parent != b
    assert seen["mode"] == 0o700 and not seen["runner"].exists()  # private, and removed after
    # a bundle target made by hand (not through resolve) is verified before it runs
    with pytest.raises(EdgeconvError, match="bench.py does not match manifest.json"):
        local_bench.run_runner(local_bench.BenchTarget(b, True, "gguf", None, None), tmp_path / "r.json",
                               role="student", label="x", threads=1, quick=True, eval_data=None)
