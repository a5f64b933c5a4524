"""GPT-OSS reaches GGUF: released configs say YaRN truncate=false, which llama.cpp does not implement."""

import json

import pytest
import tiny
from click.testing import CliRunner
from test_bad_inputs import assert_error

from edgeconv.cli import main
from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble
from edgeconv.stages.export_gguf import export_gguf


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny GPT-OSS with transformers' (and the released models') rope scaling: YaRN, truncate=false."""
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("GptOssForCausalLM", seed=3),
                                       tmp_path_factory.mktemp("gpt-oss") / "teacher"))
    assert tiny.config_of(src)["rope_scaling"]["truncate"] is False
    return src


def test_the_student_gguf_equals_torch_at_the_f32_tolerance(teacher, tmp_path):
    """The student is assembled with truncate=true, so its GGUF and its torch model run the same rope."""
    student = tmp_path / "student"
    assemble(teacher, simple_plan(family_for(tiny.config_of(teacher)), "ids:1,4"), student, progress=False)
    result = export_gguf(student, tmp_path / "student.gguf", "F32")
    assert result.parity.passed and result.parity.top1_agreement == 1.0
    assert "yarn_drift" not in json.loads((tmp_path / "student.parity.json").read_text())


def test_the_teacher_needs_the_option_that_names_the_drift(teacher, tmp_path):
    result = CliRunner().invoke(main, ["export", str(teacher), "--quant", "F32", "--out", str(tmp_path / "t.gguf")])
    assert_error(result, "truncate=false", "--allow-yarn-drift")
    assert not (tmp_path / "t.gguf").exists()


def test_the_teacher_gguf_with_its_drift_measured_per_position(teacher, tmp_path):
    result = export_gguf(teacher, tmp_path / "t.gguf", "F32", allow_yarn_drift=True)
    assert result.parity.passed  # against torch running llama.cpp's (truncated) YaRN: the normal F32 gate
    report = json.loads((tmp_path / "t.parity.json").read_text())
    drift = report["yarn_drift"]
    rel = drift["rel_diff_by_position"]
    assert len(rel) >= 16  # one entry per position of the longest prompt
    # Position 0 has no rotation (what remains is F32 rounding); the truncation moves the later positions more.
    assert max(rel[len(rel) // 2:]) > 3 * rel[0]
    assert drift["max_rel_diff"] == max(rel) and 0 < drift["top1_agreement"] <= 1
    assert "YaRN drift" in (tmp_path / "t.md").read_text()


def test_the_option_changes_nothing_for_other_models(tmp_path):
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), tmp_path / "q"))
    result = export_gguf(src, tmp_path / "q.gguf", "F32", allow_yarn_drift=True)
    assert result.parity.passed and "yarn_drift" not in json.loads((tmp_path / "q.parity.json").read_text())
    with pytest.raises(EdgeconvError, match="truncate=false"):
        export_gguf(tiny.add_tokenizer(tiny.save(tiny.build_model("GptOssForCausalLM"), tmp_path / "g")),
                    tmp_path / "g.gguf", "F32")
