"""Plans from statistics: every method combination assembles and loads for every family; bad inputs."""

import json

import pytest
import tiny
import torch
from click.testing import CliRunner
from test_bad_inputs import assert_error
from transformers import AutoModelForCausalLM

from edgeconv.calibration.stats import CalibrationStats
from edgeconv.cli import main
from edgeconv.errors import EdgeconvError
from edgeconv.families.ffn import Ffn, align_to, permuted, weighted_average
from edgeconv.planning.from_stats import stats_plan
from edgeconv.planning.methods import GROUPINGS, SCALINGS, SCORERS
from edgeconv.stages.assemble import assemble


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_every_method_combination_assembles_and_loads(arch, calibrated, tmp_path):
    src, stats_dir = calibrated[arch]
    stats = CalibrationStats.load(stats_dir)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    n = 0
    for scoring in SCORERS.names():
        for grouping in GROUPINGS.names():
            k = 2 if grouping == "none" else 4  # clustering groups merge 4 experts into the 2 groups
            for scaling in SCALINGS.names():
                plan = stats_plan(stats, experts=k, groups=2, scoring=scoring, grouping=grouping, scaling=scaling,
                                  model=src)
                out = tmp_path / f"{scoring}-{grouping}-{scaling}"
                assemble(src, plan, out, progress=False)
                dense = AutoModelForCausalLM.from_pretrained(out)
                with torch.no_grad():
                    assert torch.isfinite(dense(ids).logits).all()
                assert all(len(lp.experts) == k and len(lp.groups) == 2 for lp in plan.layers)
                n += 1
    assert n == len(SCORERS.names()) * len(GROUPINGS.names()) * len(SCALINGS.names()) == 70


def test_default_plan_is_the_papers(calibrated):
    src, stats_dir = calibrated["Qwen2MoeForCausalLM"]
    stats = CalibrationStats.load(stats_dir)
    plan = stats_plan(stats)
    assert plan.method | {} == plan.method and plan.method["scoring"] == "do-acp"
    assert (plan.method["grouping"], plan.method["scaling"], plan.method["experts"]) == ("none", "cp", 2)
    for lp in plan.layers:
        st = stats.layers[lp.layer]
        assert lp.shared_scale == pytest.approx(st.shared_gate_mean)  # the shared gate constant from calibration
        assert [g.scale for g in lp.groups] == pytest.approx([float(st.cp[g.experts[0]]) for g in lp.groups])
        assert set(lp.scores) >= {"acp", "do_acp_gain"} and len(lp.scores["acp"]) == 8


def test_cli_plan_and_inspect_from_stats(calibrated, tmp_path):
    src, stats_dir = calibrated["OlmoeForCausalLM"]
    result = run("plan", stats_dir, "--experts", "4", "--groups", "2", "--grouping", "output-cluster", "--out",
                 tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["method"]["grouping"] == "output-cluster" and len(data["layers"][0]["groups"]) == 2
    result = run("inspect", stats_dir)
    assert result.exit_code == 0 and "usage entropy" in result.output


@pytest.mark.parametrize(
    "args, phrases",
    [
        (("--experts", "1", "--groups", "2", "--grouping", "dominant"),
         ("K=1 experts cannot form 2 groups", "--experts >= --groups")),
        (("--experts", "4", "--groups", "2"), ("grouping 'none'", "K=4 must equal the group count 2")),
        (("--experts", "9"), ("K=9", "only 8")),
        (("--scoring", "do_acp"), ("unknown scoring method 'do_acp'", "did you mean 'do-acp'", "acp, cp, do-acp, ean")),
        (("--grouping", "kmeans"), ("unknown grouping method", "weight-cluster")),
        (("--scaling", "median"), ("unknown scaling method", "cp, uniform")),
    ],
)
def test_bad_plan_arguments(calibrated, tmp_path, args, phrases):
    stats_dir = calibrated["Qwen3MoeForCausalLM"][1]
    assert_error(run("plan", stats_dir, *args, "--out", tmp_path / "p.json"), *phrases)
    assert not (tmp_path / "p.json").exists()


def test_stats_from_another_model(calibrated, tmp_path):
    stats_dir = calibrated["Qwen3MoeForCausalLM"][1]
    other = tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=9), tmp_path / "other")  # same shape
    assert run("plan", stats_dir, "--out", tmp_path / "p.json").exit_code == 0
    result = run("assemble", other, "--plan", tmp_path / "p.json", "--out", tmp_path / "d", "--no-progress")
    assert_error(result, "different one", "own statistics")
    assert not (tmp_path / "d").exists()
    mixtral = calibrated["MixtralForCausalLM"][0]
    assert_error(run("assemble", mixtral, "--plan", tmp_path / "p.json", "--out", tmp_path / "d"), "MixtralForCausalLM")


def test_bad_calibration_data(calibrated, tmp_path):
    src = calibrated["Qwen3MoeForCausalLM"][0]

    def cal(data, *extra):
        return run("calibrate", src, "--data", data, "--seq-len", "32", "--out", tmp_path / "s", "--no-progress",
                   *extra)

    (tmp_path / "empty.txt").write_text("")
    assert_error(cal(tmp_path / "empty.txt", "--tokens", "256"), "gives only 0 tokens", "add text")
    (tmp_path / "short.txt").write_text("to be or not to be")
    assert_error(cal(tmp_path / "short.txt", "--tokens", "256"), "gives only", "256 are needed")
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    assert_error(cal(tmp_path / "bad.jsonl", "--tokens", "256"), "bad.jsonl:1", "'text' field")
    assert_error(cal(tmp_path / "missing", "--tokens", "256"), "does not exist")
    (tmp_path / "emptydir").mkdir()
    assert_error(cal(tmp_path / "emptydir", "--tokens", "256"), "holds no")
    assert_error(cal(tmp_path / "short.txt", "--tokens", "5"), "fewer than the 8 experts")
    assert not (tmp_path / "s").exists()


def test_convert_runs_resumes_and_validates_first(calibrated, corpus, tmp_path):
    src = calibrated["Qwen3MoeForCausalLM"][0]
    args = ("convert", src, "--data", corpus, "--tokens", "512", "--seq-len", "32", "--out", tmp_path / "d",
            "--no-progress")
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "Qwen3ForCausalLM" in result.stderr
    plan = json.loads((tmp_path / "d.work" / "plan.json").read_text())
    assert plan["method"]["scoring"] == "do-acp" and plan["method"]["scaling"] == "cp"
    again = run(*args)
    assert again.exit_code == 0 and again.stderr.count("up to date") == 2
    # Bad method names fail before any calibration starts.
    assert_error(run("convert", src, "--data", corpus, "--scoring", "nope", "--out", tmp_path / "e"), "unknown scoring")
    assert not (tmp_path / "e.work").exists() and not (tmp_path / "e").exists()
    # without --data, calibration uses the shipped demo text and says so
    r = run("convert", src, "--tokens", "512", "--seq-len", "32", "--out", tmp_path / "e", "--no-progress")
    assert r.exit_code == 0 and "calibrating on the shipped demo text" in r.output


def _random_ffn(width=16, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Ffn(torch.randn(width, hidden, generator=g), torch.randn(width, hidden, generator=g),
               torch.randn(hidden, width, generator=g))


def test_alignment_recovers_a_permutation():
    a = _random_ffn()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    b = permuted(a, perm)
    aligned = align_to(a, b)
    assert torch.equal(aligned.gate, a.gate) and torch.equal(aligned.down, a.down)
    # Merging an expert with a neuron-shuffled copy of itself is the expert again, only when aligned.
    merged = weighted_average([a, b], [0.5, 0.5], align=True)
    assert torch.allclose(merged.gate, a.gate) and torch.allclose(merged.down, a.down)
    assert not torch.allclose(weighted_average([a, b], [0.5, 0.5]).gate, a.gate)


def test_unknown_stats_dir(tmp_path):
    with pytest.raises(EdgeconvError, match="no calibration statistics"):
        CalibrationStats.load(tmp_path)
