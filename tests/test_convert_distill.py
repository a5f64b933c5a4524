"""`convert --distill-tokens`: calibrate -> plan -> assemble -> distill in one resumable run."""

import json
import logging

import tiny
import torch
from click.testing import CliRunner

from edgeconv.cli import main
from edgeconv.pipelines.convert import convert


def test_convert_chains_distillation_and_reruns_as_a_no_op(tmp_path, caplog):
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="edgeconv")
    teacher = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), tmp_path / "moe"))
    corpus = tiny.write_corpus(tmp_path / "corpus.jsonl", docs=200)
    out = tmp_path / "student"
    options = {"seq_len": 32, "batch_size": 8, "lr": 3e-3}
    result = convert(teacher, out, data=corpus, tokens=2048, seq_len=64, distill_tokens=2048,
                     distill_options=options, progress=False)
    notes = [r.getMessage() for r in caplog.records]
    assembled = tmp_path / "student.work" / "assembled"
    assert result.out == out and result.assembled.out == assembled
    assert json.loads((out / "manifest.json").read_text())["stage"] == "distill"
    assert json.loads((assembled / "manifest.json").read_text())["stage"] == "assemble"
    assert [n[:5] for n in notes if n.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    # the distilled weights differ from the assembled ones
    from safetensors.torch import load_file

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, d = weights(assembled), weights(out)
    assert a.keys() == d.keys() and any(not torch.equal(a[k].float(), d[k].float()) for k in a)

    caplog.clear()
    again = convert(teacher, out, data=corpus, tokens=2048, seq_len=64, distill_tokens=2048,
                    distill_options=options, progress=False)
    notes = [r.getMessage() for r in caplog.records]
    assert again.distilled.skipped and sum("up to date" in n for n in notes) == 3


def test_convert_checks_distillation_options_before_calibrating(tmp_path):
    teacher = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), tmp_path / "moe"))
    r = CliRunner().invoke(main, ["convert", str(teacher), "--out", str(tmp_path / "s"), "--distill-tokens", "-5"])
    assert r.exit_code == 2 and "--tokens -5" in r.output
    assert not (tmp_path / "s.work").exists()
