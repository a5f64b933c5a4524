"""`edgeconv build` end to end on the shipped demo teacher, resumed, benchmarked against its teacher, reported."""

import hashlib
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeconv.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "demo-laptop"
    result = CliRunner().invoke(main, ["build", "--target", "laptop", "--out", str(out), "--distill-tokens", "0",
                                       "--calibration-tokens", "8192", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_build_writes_a_verified_bundle_and_prints_its_headline(built):
    out, output = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "laptop" and manifest["quant"] == "Q4_K_M" and manifest["format"] == "gguf"
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    for needed in ("bench.py", "Modelfile", "README.md", "parity.json", "eval/text.jsonl", manifest["model"]):
        assert needed in manifest["files"]
    assert f"FROM ./{manifest['model']}" in (out / "Modelfile").read_text()
    assert f"bundle: {out}" in output
    assert "decode" in output and "perplexity shakespeare" in output and "parity" in output
    results = json.loads((out.parent / f"{out.name}.work" / "bench" / "results.json").read_text())
    assert results["verified"] is True and results["decode_tok_s"] > 0
    # The quantized student stays close to its torch parent: parity.json's perplexity ratio within Q4_K_M's 5 %.
    assert abs(json.loads((out / "parity.json").read_text())["ppl_ratio"] - 1) < 0.05


def test_bundle_card_and_gguf_lineage(built):
    """Issue 20: the bundle's README.md is a model card the Hub reads, with the bench headline the build measured;
    its GGUF names the teacher it came from (general.base_model.*) and the teacher's license."""
    import gguf
    from huggingface_hub import ModelCard

    out, _ = built
    manifest = json.loads((out / "manifest.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "demo-moe" and card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "llama-cpp-python" and {"moe-to-dense", "gguf", "qwen3"} <= set(card.data.tags)
    assert "`do-acp`" in card.text and "| perplexity, artifact / torch |" in card.text
    assert "Measured on the build machine" in card.text and "tok/s" in card.text  # filled in by the bench stage
    fields = gguf.GGUFReader(out / manifest["model"]).fields
    assert fields["general.base_model.count"].contents() == 1
    assert fields["general.base_model.0.name"].contents() == "demo-moe"
    assert fields["general.license"].contents() == "apache-2.0"
    assert fields["general.name"].contents() == "demo-moe-dense" and fields["general.finetune"].contents() == "dense"


def test_rerun_skips_every_finished_stage(built):
    out, _ = built
    before = (out / "manifest.json").stat().st_mtime_ns
    result = CliRunner().invoke(main, ["build", "--target", "laptop", "--out", str(out), "--distill-tokens", "0",
                                       "--calibration-tokens", "8192", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date") >= 5  # calibrate, assemble, export, bundle, bench
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_a_tampered_bundle_is_refused(built, tmp_path):
    import shutil

    out, _ = built
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    model = copy / json.loads((copy / "manifest.json").read_text())["model"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    model.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, str(copy / "bench.py"), "--quick"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert model.name in proc.stderr and "sha256" in proc.stderr
    assert not (copy / "results.json").exists()


def test_bench_with_teacher_compares_both_on_one_runtime_and_reports(built, tmp_path):
    out, _ = built
    result = CliRunner().invoke(main, ["bench", str(out), "--teacher", "--quick", "--threads", "1",
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    comparison = json.loads((tmp_path / "r" / "comparison.json").read_text())
    s, t = comparison["student"], comparison["teacher"]
    assert (s["role"], t["role"]) == ("student", "teacher")
    assert t["model"]["quant"] == s["model"]["quant"] == "Q4_K_M"
    assert t["runtime"]["name"] == s["runtime"]["name"] and t["runtime"]["threads"] == s["runtime"]["threads"] == 1
    assert t["model"]["bytes"] > 3 * s["model"]["bytes"]  # 16 experts vs 2 expert widths per layer
    assert "peak RSS" in result.output and "decode" in result.output
    report = CliRunner().invoke(main, ["report", str(tmp_path / "r" / "comparison.json"), "--out",
                                       str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "teacher" in md and "student" in md
    assert any(p.suffix == ".png" for p in (tmp_path / "rep").iterdir())
