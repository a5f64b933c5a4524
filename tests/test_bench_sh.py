"""Issue 20, point 3: every GGUF bundle ships bench.sh, which checks the bundle against its manifest, runs llama.cpp's
llama-bench and llama-perplexity (from PATH or --llama-cpp DIR; -ngl 99 on GPU targets) or prints how to build them
for the bundle's target, and `edgeconv report` reads what it wrote. Stand-in llama.cpp programs (scripts that record
their arguments and print canned output) test the script's logic everywhere; the last tests run the real llama-bench
built from the vendored llama.cpp when it is there."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from device_bundle import (
    CANNED,
    CANNED_PPL,
    calls,
    llama_cpp_bin,
    make_bundle,
    record,
    stand_in_jetson_tools,
    stand_in_llama_cpp,
    tiny_gguf,
)

from edgeconv.cli import main
from edgeconv.device.bench_sh import BENCH_SH, corpus_texts
from edgeconv.reporting import load_results, report

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # sh, sed, awk, sha256sum; no llama.cpp program


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("bench-sh-model"))


@pytest.fixture(scope="module")
def bundles(student, small_eval, tmp_path_factory):
    """target -> a bundle written by BundleStage (never modified: tests copy it first)."""
    root = tmp_path_factory.mktemp("bench-sh-bundles")
    dense, gguf = student
    return {t: make_bundle(root / t, dense, gguf, small_eval, t)
            for t in ("laptop", "jetson-orin-nano", "android", "iphone", "laptop-apple")}


def copy(bundle, dst):
    shutil.copytree(bundle, dst, symlinks=True)
    return dst


def run_sh(bundle, *args, path=SYSTEM_PATH, env=None, cwd=None, shell="sh"):
    full = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([shell, str(bundle / "bench.sh"), *args], capture_output=True, text=True, env=full,
                          cwd=cwd or bundle, timeout=300, check=False)


def sidecar(where):
    return json.loads((where / "llama-bench.edgeconv.json").read_text())


def test_a_gguf_bundle_ships_bench_sh_and_its_eval_text_hashed(bundles, small_eval):
    bundle = bundles["laptop"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    texts = corpus_texts(small_eval)
    assert texts and {"bench.sh", *(f"eval/{c}.txt" for c in texts)} <= set(manifest["files"])
    assert (bundle / "bench.sh").read_bytes() == BENCH_SH.read_bytes() and os.access(bundle / "bench.sh", os.X_OK)
    for corpus, text in texts.items():
        assert (bundle / "eval" / f"{corpus}.txt").read_text() == text
        assert manifest["files"][f"eval/{corpus}.txt"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert manifest["accelerator"] == "cpu" and json.loads(
        (bundles["jetson-orin-nano"] / "manifest.json").read_text())["accelerator"] == "cuda"


def test_bench_sh_is_package_data():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "device/bench.sh" in pyproject["tool"]["setuptools"]["package-data"]["edgeconv"]


@pytest.mark.parametrize("target,expect", [
    ("laptop", ["cmake -B build", "--target llama-bench llama-perplexity"]),
    ("jetson-orin-nano", ["export CUDACXX=/usr/local/cuda/bin/nvcc",
                          "cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=87", "sudo jetson_clocks"]),
    ("android", ["pkg install git cmake clang", "-DCMAKE_TOOLCHAIN_FILE=$ANDROID_NDK/build/cmake/android.toolchain",
                 "-DANDROID_ABI=arm64-v8a", "--target llama-bench llama-perplexity",
                 "--adb --llama-bench build-android/bin"]),
    ("iphone", ["iOS has no shell", "llama.swiftui"]),
    ("laptop-apple", ["Metal is on by default", "cmake -B build"]),
])
def test_without_llama_bench_it_prints_how_to_build_it_for_the_target(bundles, target, expect):
    run = run_sh(bundles[target])
    assert run.returncode == 3, run.stderr
    assert f"llama-bench was not found on PATH. Build llama.cpp's tools for this target ({target})" in run.stdout
    for line in expect:
        assert line in run.stdout, run.stdout
    assert "git clone https://github.com/ggml-org/llama.cpp" in run.stdout
    assert not (bundles[target] / "llama-bench.json").exists()


def test_llama_cpp_dir_without_the_program_says_where_it_looked(bundles, tmp_path):
    run = run_sh(bundles["laptop"], "--llama-cpp", str(tmp_path))
    assert run.returncode == 3 and f"llama-bench was not found in {tmp_path} (nor in its bin/" in run.stdout


@pytest.mark.parametrize("shell", ["sh", pytest.param("bash", marks=pytest.mark.skipif(
    shutil.which("bash") is None, reason="no bash"))])
def test_stand_in_llama_bench_on_path(bundles, tmp_path, shell):
    bundle = copy(bundles["laptop"], tmp_path / "b")
    log = tmp_path / "calls.jsonl"
    tools = stand_in_llama_cpp(tmp_path / "tools", log)
    run = run_sh(bundle, path=f"{tools}:{SYSTEM_PATH}", shell=shell)
    assert run.returncode == 0, run.stderr
    assert "verified" in run.stderr and "pp512" in run.stdout and "tg128" in run.stdout
    bench, *ppl = calls(log)
    cores = len(os.sched_getaffinity(0))
    assert bench["prog"] == "llama-bench"
    assert bench["argv"] == ["-m", "student-F32.gguf", "-p", "512", "-n", "128", "-t", str(min(4, cores)), "-o",
                             "json"]  # the laptop's 4 threads, at most the cores here; CPU target: no -ngl
    corpora = sorted(p.stem for p in (bundle / "eval").glob("*.txt"))
    assert [c["prog"] for c in ppl] == ["llama-perplexity"] * len(corpora)
    assert [c["argv"][c["argv"].index("-f") + 1] for c in ppl] == [f"eval/{c}.txt" for c in corpora]
    assert all(c["argv"][c["argv"].index("-c") + 1] == "512" and "--chunks" in c["argv"] for c in ppl)
    assert json.loads((bundle / "llama-bench.json").read_text()) == CANNED
    side = sidecar(bundle)
    assert side["schema"] == "edgeconv-llama-bench/1" and side["verified"] is True
    assert side["label"] == "tiny-dense" and side["target"] == "laptop" and side["model"]["quant"] == "F32"
    assert side["model"]["bytes"] == (bundle / "student-F32.gguf").stat().st_size
    assert side["perplexity"] == {c: CANNED_PPL for c in corpora}
    assert side["device"]["nvpmodel"] is None and side["device"]["jetson_clocks"] is None
    text = (bundle / "perplexity.txt").read_text()
    assert all(f"# edgeconv corpus {c}: " in text for c in corpora) and f"Final estimate: PPL = {CANNED_PPL}" in text


def test_llama_cpp_dir_is_used_before_path(bundles, tmp_path):
    bundle = copy(bundles["laptop"], tmp_path / "b")
    on_path, given = tmp_path / "path.jsonl", tmp_path / "given.jsonl"
    path_tools = stand_in_llama_cpp(tmp_path / "on-path", on_path)
    build = tmp_path / "llama.cpp"
    stand_in_llama_cpp(build / "build" / "bin", given)  # --llama-cpp DIR finds DIR/build/bin/llama-bench
    out = tmp_path / "results"
    run = run_sh(bundle, "--llama-cpp", str(build), "--threads", "1", "--quick", "--out", str(out),
                 path=f"{path_tools}:{SYSTEM_PATH}")
    assert run.returncode == 0, run.stderr
    assert not calls(on_path)
    bench, *ppl = calls(given)
    assert bench["argv"][bench["argv"].index("-t") + 1] == "1" and bench["argv"][-2:] == ["-r", "2"]
    assert ppl and all(c["argv"][c["argv"].index("--chunks") + 1] == "4" for c in ppl)
    assert (out / "llama-bench.json").is_file() and sidecar(out)["threads"] == 1
    assert not (bundle / "llama-bench.json").exists()


def test_gpu_targets_offload_every_layer(bundles, tmp_path):
    log = tmp_path / "calls.jsonl"
    tools = stand_in_llama_cpp(tmp_path / "tools", log)
    for target in ("jetson-orin-nano", "laptop-apple"):
        bundle = copy(bundles[target], tmp_path / target)
        assert run_sh(bundle, "--no-perplexity", path=f"{tools}:{SYSTEM_PATH}").returncode == 0
        assert calls(log)[-1]["argv"][-2:] == ["-ngl", "99"]
        assert sidecar(bundle)["gpu_layers"] == 99
    run = run_sh(bundle, "--no-perplexity", "--gpu-layers", "0", path=f"{tools}:{SYSTEM_PATH}")
    assert run.returncode == 0 and calls(log)[-1]["argv"][-2:] == ["-ngl", "0"]
    assert len(calls(log)) == 3  # --no-perplexity: llama-bench only


@pytest.mark.parametrize("damage,message", [
    ("model", "student-F32.gguf does not match manifest.json (sha256 differs"),
    ("eval", "eval/shakespeare.txt does not match manifest.json (sha256 differs"),
    ("missing", "eval/pydocs.txt is missing"),
    ("outside", "../outside.txt in manifest.json is not a path inside the bundle"),
    ("link", "eval/choice.jsonl is a symbolic link"),
])
def test_a_bundle_that_does_not_match_its_manifest_is_refused_before_anything_runs(bundles, tmp_path, damage,
                                                                                  message):
    bundle = copy(bundles["laptop"], tmp_path / "b")
    if damage == "model":
        with open(bundle / "student-F32.gguf", "r+b") as fh:
            fh.seek(1000)
            fh.write(b"\x00\x01\x02")
    elif damage == "eval":
        (bundle / "eval" / "shakespeare.txt").write_text("something else")
    elif damage == "missing":
        (bundle / "eval" / "pydocs.txt").unlink()
    elif damage == "outside":
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "bytes": 1}
        (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    elif damage == "link":
        (tmp_path / "choice.jsonl").write_bytes((bundle / "eval" / "choice.jsonl").read_bytes())
        (bundle / "eval" / "choice.jsonl").unlink()
        (bundle / "eval" / "choice.jsonl").symlink_to(tmp_path / "choice.jsonl")
    log = tmp_path / "calls.jsonl"
    tools = stand_in_llama_cpp(tmp_path / "tools", log)
    run = run_sh(bundle, path=f"{tools}:{SYSTEM_PATH}")
    assert run.returncode == 2, run.stdout + run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("bench.sh: refusing to run: ") and message in last and last.endswith("re-copy the bundle")
    assert not calls(log) and not (bundle / "llama-bench.json").exists()


def test_no_verify_runs_an_edited_bundle_and_says_so(bundles, tmp_path):
    bundle = copy(bundles["laptop"], tmp_path / "b")
    (bundle / "eval" / "shakespeare.txt").write_text("edited " * 2000)
    tools = stand_in_llama_cpp(tmp_path / "tools", tmp_path / "calls.jsonl")
    run = run_sh(bundle, "--no-verify", "--no-perplexity", path=f"{tools}:{SYSTEM_PATH}")
    assert run.returncode == 0, run.stderr
    assert sidecar(bundle)["verified"] is False


def test_bad_options_are_refused(bundles):
    for args, message in ((["--threads", "four"], "take a whole number, not four"),
                          (["--frobnicate"], "unknown option --frobnicate"), (["--out"], "--out needs a value")):
        run = run_sh(bundles["laptop"], *args)
        assert run.returncode == 2 and message in run.stderr


def test_a_failing_llama_bench_exits_1_with_its_log(bundles, tmp_path):
    bundle = copy(bundles["laptop"], tmp_path / "b")
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "llama-bench").write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 1\n")
    (tools / "llama-bench").chmod(0o755)
    run = run_sh(bundle, path=f"{tools}:{SYSTEM_PATH}")
    assert run.returncode == 1 and "failed to load model" in run.stderr and "llama-bench failed" in run.stderr


def test_on_a_jetson_bench_sh_records_the_power_mode(bundles, tmp_path):
    bundle = copy(bundles["jetson-orin-nano"], tmp_path / "b")
    tools = stand_in_jetson_tools(stand_in_llama_cpp(tmp_path / "tools", tmp_path / "calls.jsonl"))
    run = run_sh(bundle, "--no-perplexity", path=f"{tools}:{SYSTEM_PATH}")
    assert run.returncode == 0, run.stderr
    assert "power mode: nvpmodel MAXN (0)" in run.stderr and "jetson_clocks: on" in run.stderr
    device = sidecar(bundle)["device"]
    assert device["nvpmodel"] == {"mode": "MAXN", "id": 0, "source": "nvpmodel -q"}
    assert device["jetson_clocks"] == {"on": True, "source": "jetson_clocks --show"}
    res = report([bundle / "llama-bench.json"], tmp_path / "report")
    md = res.markdown.read_text()
    assert "| power |" in md and "nvpmodel MAXN (0), jetson_clocks on" in md


def test_report_reads_what_bench_sh_wrote(bundles, tmp_path):
    bundle = copy(bundles["jetson-orin-nano"], tmp_path / "b")
    gguf = {"gpu": "Orin (nvgpu)", "model": "student-F32.gguf"}
    canned = [record(512, 0, 1500.0, **gguf), record(0, 128, 42.5, **gguf)]
    tools = stand_in_llama_cpp(tmp_path / "tools", tmp_path / "calls.jsonl", canned=canned)
    assert run_sh(bundle, path=f"{tools}:{SYSTEM_PATH}").returncode == 0
    (r,) = load_results([bundle / "llama-bench.json"])
    assert (r.label, r.role, r.target, r.decode, r.runtime.threads) == ("tiny-dense", "student", "jetson-orin-nano",
                                                                        42.5, 4)
    assert r.speed[0].prompt_tokens == 512 and r.speed[0].prefill_tok_s == 1500.0 and r.runtime.gpu_layers == 99
    assert r.metric("perplexity:shakespeare (llama-perplexity)") == CANNED_PPL
    assert r.model.quant == "F32" and r.model.bytes == (bundle / "student-F32.gguf").stat().st_size
    assert [t["test"] for t in r.llama_bench] == ["pp512", "tg128"]
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(bundle / "llama-bench.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "## llama-bench" in md and "| tiny-dense | tg128 | 42.5 |" in md and "| tiny-dense | pp512 | 1,500 |" in md
    assert "ppl shakespeare (llama-perplexity)" in md and (out / "target_jetson-orin-nano.png").is_file()


def test_report_reads_llama_bench_jsonl_of_several_configurations(tmp_path):
    """Plain llama-bench output of your own (no bench.sh beside it): -o jsonl, two thread counts."""
    f = tmp_path / "mine.jsonl"
    rows = [record(512, 0, 800.0, threads=t) for t in (2, 4)] + [record(0, 128, 20.0 * t, threads=t) for t in (2, 4)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rs = load_results([f])
    assert [(r.label, r.runtime.threads, r.decode) for r in rs] == [("m [m.gguf, 2 thr]", 2, 40.0),
                                                                    ("m [m.gguf, 4 thr]", 4, 80.0)]
    assert all(r.target is None and r.device["processor"] == "ARMv8 Processor rev 1 (v8l)" for r in rs)
    assert rs[0].model.quant == "all F32" and rs[0].accuracy is None


@pytest.mark.skipif(llama_cpp_bin() is None, reason="llama-bench and llama-perplexity are not built (set "
                    "EDGECONV_LLAMA_CPP_BIN, or build them: benchmarks/llama_cpp_tools.py build(['llama-bench', "
                    "'llama-perplexity']))")
def test_bench_sh_with_the_vendored_llama_bench_and_report_renders_it(bundles, tmp_path):
    bundle = copy(bundles["laptop"], tmp_path / "b")
    run = run_sh(bundle, "--llama-cpp", str(llama_cpp_bin()), "--quick", "--threads", "1")
    assert run.returncode == 0, run.stderr
    recs = json.loads((bundle / "llama-bench.json").read_text())
    assert [(r["n_prompt"], r["n_gen"]) for r in recs] == [(512, 0), (0, 128)]
    assert all(r["avg_ts"] > 0 and r["n_threads"] == 1 and r["model_filename"] == "student-F32.gguf" for r in recs)
    side = sidecar(bundle)
    assert side["verified"] is True and set(side["perplexity"]) == {"shakespeare", "pydocs"}
    assert all(isinstance(v, float) and v > 1 for v in side["perplexity"].values())  # a random tiny model: high
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(bundle / "llama-bench.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "| tiny-dense | tg128 |" in md and "| tiny-dense | pp512 |" in md
    (r,) = load_results([bundle / "llama-bench.json"])
    assert r.decode == recs[1]["avg_ts"] and r.metric("perplexity:pydocs (llama-perplexity)") == side["perplexity"][
        "pydocs"]
