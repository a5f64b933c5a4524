"""The standalone on-device runner (edgeconv/device/runner.py): the same accuracy numbers as edgeconv's own
evaluation, hash verification before loading, and a run in an environment where only llama-cpp-python (and its
own dependencies) can be imported."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

from edgeconv.evaluation.suite import evaluate

RUNNER = Path(__file__).parents[1] / "edgeconv" / "device" / "runner.py"
SCHEMA_KEYS = {"schema", "label", "role", "target", "model", "device", "runtime", "load_s", "rss_after_load_mb",
               "peak_rss_mb", "speed", "decode_tok_s", "accuracy", "started", "seconds", "notes"}
# Small enough for seconds per run: tiny model, two prompt lengths, few evaluation items.
FAST = ["--threads", "1", "--prompt-lengths", "8,32,1024", "--decode-tokens", "8", "--repeats", "1",
        "--ppl-tokens", "1024", "--window", "128", "--examples", "2", "--choices", "8"]
SUITE = {"tokens": 1024, "window": 128, "examples": 2, "choices": 8, "threads": 1, "show_progress": False}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny dense Qwen3 student and its F32 GGUF (head_dim 16, so onnxruntime-genai's CPU attention takes it;
    a 512-token context, so that multiple-choice items fit in onnxruntime-genai, which stops at the model's)."""
    from edgeconv.families import family_for
    from edgeconv.planning.calibration_free import simple_plan
    from edgeconv.stages.assemble import assemble
    from edgeconv.stages.export_gguf import export_gguf

    root = tmp_path_factory.mktemp("bench-models")
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=5, hidden_size=64, head_dim=16,
                                                       max_position_embeddings=512),
                                       root / "moe"))
    dense = root / "dense"
    assemble(src, simple_plan(family_for(tiny.config_of(src)), "ids:1,4"), dense, progress=False)
    return {"dense": dense, "gguf": export_gguf(dense, root / "student-F32.gguf", "F32").path}


def make_bundle(out: Path, model: Path, eval_dir: Path) -> Path:
    """A bundle as the bundle writer lays it out: model, bench.py, eval/, manifest.json with every file's sha256."""
    out.mkdir(parents=True)
    if model.is_dir():
        shutil.copytree(model, out / "model")
        rel, fmt = "model", "onnx-genai"
    else:
        shutil.copy2(model, out / model.name)
        rel, fmt = model.name, "gguf"
    shutil.copy2(RUNNER, out / "bench.py")
    shutil.copytree(eval_dir, out / "eval")
    files = {str(p.relative_to(out)): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
             for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {"name": "tiny-laptop", "model": rel, "format": fmt, "quant": "F32", "target": "laptop",
                "context": 256, "threads": 1, "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def bench(bundle: Path, *args, python: str = sys.executable, env=None) -> subprocess.CompletedProcess:
    # from inside the bundle, as on the device (and away from this checkout, which `python -c` would import from)
    return subprocess.run([python, "bench.py", *args], check=False, capture_output=True, text=True, env=env, cwd=bundle,
                          timeout=300)


@pytest.fixture(scope="module")
def gguf_bundle(models, small_eval, tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundles") / "gguf", models["gguf"], small_eval)


@pytest.fixture(scope="module")
def gguf_results(gguf_bundle):
    run = bench(gguf_bundle, *FAST)
    assert run.returncode == 0, run.stderr
    return json.loads((gguf_bundle / "results.json").read_text()), run


def assert_same_accuracy(got: dict, want) -> None:
    assert set(got["perplexity"]) == set(want.perplexity)
    for corpus, ppl in want.perplexity.items():
        assert got["perplexity"][corpus] == pytest.approx(ppl, rel=1e-3)
    assert got["settings"]["perplexity_tokens"] == want.perplexity_tokens
    assert got["exact_match"] == want.exact_match
    assert got["choice_acc"] == want.choice_acc and got["choice_acc_norm"] == want.choice_acc_norm
    assert got["settings"]["choice_items"] == want.choice_items == 8


def test_results_have_the_schema_and_the_suites_numbers(gguf_results, models, small_eval):
    r, run = gguf_results
    assert SCHEMA_KEYS <= set(r) and r["schema"] == "edgeconv-bench/1"
    assert (r["label"], r["role"], r["target"], r["verified"]) == ("tiny-laptop", "student", "laptop", True)
    assert r["model"]["format"] == "gguf" and r["model"]["quant"] == "F32"
    assert r["model"]["bytes"] == models["gguf"].stat().st_size
    assert r["runtime"]["name"] == "llama.cpp" and r["runtime"]["threads"] == 1 and r["runtime"]["context"] == 256
    assert {"platform", "machine", "processor", "logical_cores", "memory_total_mb", "python"} <= set(r["device"])
    # 1024 does not fit in the bundle's 256-token context: skipped, and says why.
    assert [s["prompt_tokens"] for s in r["speed"]] == [8, 32]
    assert "prompt lengths 1024 skipped: longer than the context (256) minus 8 decoded tokens" in r["notes"]
    for s in r["speed"]:
        assert s["ttft_ms"] > 0 and s["prefill_tok_s"] > 0 and s["decode_tok_s"] > 0
    assert r["decode_tok_s"] == r["speed"][0]["decode_tok_s"]
    assert 0 < r["rss_after_load_mb"] <= r["peak_rss_mb"] <= r["peak_rss_with_scoring_mb"] and r["load_s"] > 0
    want = evaluate(models["gguf"], small_eval, runtime="gguf", **SUITE)
    assert_same_accuracy(r["accuracy"], want)
    assert r["accuracy"]["exact_match_mean"] == pytest.approx(sum(want.exact_match.values()) / 6)
    assert "decode" in run.stdout and "perplexity" in run.stdout  # the human summary


def tampered_copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    (dst / "results.json").unlink(missing_ok=True)
    return dst


def test_a_modified_file_is_refused_before_loading(gguf_bundle, tmp_path):
    bundle = tampered_copy(gguf_bundle, tmp_path / "b")
    model = bundle / "student-F32.gguf"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight, same size
    model.write_bytes(bytes(data))
    run = bench(bundle, *FAST)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "bench.py: refusing to run: student-F32.gguf does not match manifest.json (sha256 differs: the file was "
        "modified or damaged); re-copy the bundle")
    assert "loading" not in run.stderr and not (bundle / "results.json").exists()


def test_a_missing_or_truncated_file_is_refused(gguf_bundle, tmp_path):
    bundle = tampered_copy(gguf_bundle, tmp_path / "b")
    (bundle / "eval" / "skills.jsonl").unlink()
    run = bench(bundle, *FAST)
    assert run.returncode == 2 and "refusing to run: eval/skills.jsonl is missing; re-copy the bundle" in run.stderr
    assert "loading" not in run.stderr and not (bundle / "results.json").exists()
    shutil.copy2(gguf_bundle / "eval" / "skills.jsonl", bundle / "eval" / "skills.jsonl")
    with open(bundle / "eval" / "text.jsonl", "ab") as fh:
        fh.write(b"\n")
    (bundle / "bench.py").write_text((bundle / "bench.py").read_text() + "# edited\n")
    run = bench(bundle, *FAST)
    assert run.returncode == 2 and "loading" not in run.stderr
    # one line, naming the first problem and how many more there are
    assert run.stderr.strip().splitlines()[-1].startswith(
        "bench.py: refusing to run: bench.py does not match manifest.json (size ")
    assert "(and 1 more problem); re-copy the bundle" in run.stderr


def test_verify_bundle_and_run_are_importable(gguf_bundle, tmp_path):
    from edgeconv.device import runner

    assert runner.verify_bundle(gguf_bundle) == []
    bundle = tampered_copy(gguf_bundle, tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["../outside"] = {"sha256": "0", "bytes": 1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert runner.verify_bundle(bundle) == ["../outside in manifest.json is not a path inside the bundle"]
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(runner.RefusedError, match="manifest.json is not valid JSON"):
        runner.run(["--bundle", str(bundle)])
    # --no-verify and a model outside any bundle: runs, and says nothing was checked
    r = runner.run(["--bundle", str(tmp_path), "--model", str(gguf_bundle / "student-F32.gguf"), "--no-accuracy",
                    "--threads", "1", "--prompt-lengths", "4", "--decode-tokens", "4", "--repeats", "1",
                    "--out", str(tmp_path / "r.json")])
    assert r["verified"] is None and r["accuracy"] is None and r["speed"][0]["prompt_tokens"] == 4
    assert any("nothing to verify" in n for n in r["notes"]) and any("no evaluation data" in n for n in r["notes"])


# Packages llama-cpp-python needs at run time: itself and its declared dependencies (numpy, typing-extensions,
# diskcache, jinja2 and jinja2's markupsafe). Nothing else of the system's site-packages is visible.
BARE_PACKAGES = ["llama_cpp", "numpy", "numpy.libs", "typing_extensions.py", "diskcache", "jinja2", "markupsafe"]


def test_runs_where_only_llama_cpp_python_is_installed(gguf_bundle, gguf_results, tmp_path):
    import llama_cpp

    site = Path(llama_cpp.__file__).parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    only = tmp_path / "only-llama-cpp"
    only.mkdir()
    for name in BARE_PACKAGES:
        if (site / name).exists():
            (only / name).symlink_to(site / name)
    venv_site = next((venv / "lib").glob("python3*/site-packages"))
    (venv_site / "only-llama-cpp.pth").write_text(str(only) + "\n")
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for module in ("torch", "transformers", "edgeconv", "pydantic"):
        probe = subprocess.run([python, "-c", f"import {module}"], check=False, capture_output=True, text=True, env=env,
                               cwd=tmp_path)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module
    bundle = tampered_copy(gguf_bundle, tmp_path / "b")
    run = bench(bundle, *FAST, python=python, env=env)
    assert run.returncode == 0, run.stderr
    r = json.loads((bundle / "results.json").read_text())
    assert r["accuracy"]["perplexity"] == gguf_results[0]["accuracy"]["perplexity"]
    assert r["accuracy"]["exact_match"] == gguf_results[0]["accuracy"]["exact_match"]


def test_onnx_genai_bundle_matches_the_suite(models, small_eval, tmp_path):
    from edgeconv.stages.export_onnx import export_onnx_genai

    genai = export_onnx_genai(models["dense"], tmp_path / "genai", "fp32").path
    bundle = make_bundle(tmp_path / "bundle", genai, small_eval)
    run = bench(bundle, *FAST)
    assert run.returncode == 0, run.stderr
    r = json.loads((bundle / "results.json").read_text())
    assert r["runtime"]["name"] == "onnxruntime-genai" and r["model"]["format"] == "onnx-genai"
    assert r["runtime"]["gpu_layers"] is None and [s["prompt_tokens"] for s in r["speed"]] == [8, 32]
    assert all(s["decode_tok_s"] > 0 for s in r["speed"])
    assert_same_accuracy(r["accuracy"], evaluate(genai, small_eval, runtime="onnx-genai", **SUITE))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_peak_rss_is_the_runners_own_not_its_parents():
    """ru_maxrss survives exec: a runner started by a 300 MB parent would report >= 300 MB. VmHWM does not."""
    ballast = bytearray(300 * 1024 * 1024)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page
    code = "from edgeconv.device.runner import peak_rss_mb; import resource; " \
           "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split())
    assert inherited >= 300 and own < 150, (own, inherited)
    del ballast


def test_default_threads_never_exceed_the_usable_cores(monkeypatch):
    """The bundle's thread count is a ceiling: on a machine with fewer cores, oversubscribed llama.cpp threads
    wait on each other (a laptop bundle's 4 threads decoded 10x slower than 2 on a 2-core machine)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bundle_bench", RUNNER)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "usable_cores", lambda: 2)
    assert bench.default_threads({"threads": 4}) == (2, 4)
    assert bench.default_threads({"threads": 1}) == (1, 1)
    assert bench.default_threads({}) == (2, 2)
