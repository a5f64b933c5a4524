"""`edgeconv report`: tables with the right numbers, teacher/student ratios, valid PNGs, one-line errors."""

import copy
import json

import pytest

from edgeconv.errors import EdgeconvError
from edgeconv.reporting import load_results, report
from edgeconv.reporting.report import comparison, teacher_student_pairs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAPTOP = {"platform": "Linux-6.1-x86_64", "machine": "x86_64", "processor": "AMD EPYC", "logical_cores": 2,
          "memory_total_mb": 24105.6, "gpu": [], "python": "3.11.7", "hostname": "vm"}
JETSON = {"platform": "Linux-5.15-tegra-aarch64", "machine": "aarch64", "processor": "ARMv8 Processor rev 1 (v8l)",
          "jetson_model": "NVIDIA Jetson Orin Nano Developer Kit", "logical_cores": 6, "memory_total_mb": 7620.0,
          "gpu": [], "python": "3.10.12", "hostname": "orin"}


def result(label, role, target, device, *, model_bytes, peak, load, speed, ppl, em, acc, threads=2):
    """A results.json as bench.py writes it. speed: [(prompt, ttft ms, prefill tok/s, decode tok/s)]."""
    rows = [{"prompt_tokens": p, "decode_tokens": 64, "ttft_ms": t, "prefill_tok_s": pf, "decode_tok_s": d}
            for p, t, pf, d in speed]
    return {
        "schema": "edgeconv-bench/1", "label": label, "role": role, "target": target,
        "model": {"path": f"/b/{label}.gguf", "format": "gguf", "bytes": model_bytes, "quant": "Q4_K_M"},
        "device": device,
        "runtime": {"name": "llama.cpp", "version": "llama-cpp-python 0.3.36", "threads": threads, "gpu_layers": 0,
                    "context": 4096},
        "load_s": load, "rss_after_load_mb": peak - 10, "peak_rss_mb": peak, "speed": rows,
        "decode_tok_s": rows[0]["decode_tok_s"],
        "accuracy": {"perplexity": ppl, "exact_match": em, "exact_match_mean": sum(em.values()) / len(em),
                     "choice_acc": acc, "choice_acc_norm": acc, "settings": {"tokens": 16384}},
        "notes": [], "started": "2026-11-23T17:00:00+00:00", "seconds": 60.0,
    }


TEACHER = result("demo-teacher", "teacher", "laptop", LAPTOP, model_bytes=13_500_000, peak=120.0, load=0.40,
                 speed=[(64, 20.0, 3200.0, 800.0), (256, 80.0, 3100.0, 700.0)],
                 ppl={"shakespeare": 130.0, "pydocs": 87.0}, em={"brackets": 0.9, "sort": 0.3}, acc=0.29)
STUDENT = result("demo-student", "student", "laptop", LAPTOP, model_bytes=3_700_000, peak=60.0, load=0.10,
                 speed=[(64, 10.0, 6400.0, 2000.0), (256, 40.0, 6000.0, 1800.0)],
                 ppl={"shakespeare": 140.0, "pydocs": 90.0}, em={"brackets": 0.8, "sort": 0.1}, acc=0.27)
ON_JETSON = result("demo-student", "student", "jetson-orin-nano", JETSON, model_bytes=3_700_000, peak=150.0,
                   load=0.9, speed=[(64, 30.0, 1500.0, 500.0)], ppl={"shakespeare": 140.0, "pydocs": 90.0},
                   em={"brackets": 0.8, "sort": 0.1}, acc=0.27, threads=6)


@pytest.fixture
def files(tmp_path):
    comparison_file = tmp_path / "bench-laptop.json"  # what `edgeconv bench --teacher` writes
    comparison_file.write_text(json.dumps({"student": STUDENT, "teacher": TEACHER}))
    listed = tmp_path / "jetson-list.json"
    listed.write_text(json.dumps([ON_JETSON]))
    return [comparison_file, listed]


def test_report_tables_hold_the_numbers(files, tmp_path):
    res = report(files, tmp_path / "out")
    assert res.results == 3 and res.pairs == 1 and res.markdown == tmp_path / "out" / "report.md"
    md = res.markdown.read_text()
    rows = {}
    for line in md.splitlines():  # the results table comes first
        if line.startswith("| demo-"):
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line)
    # labels repeated across targets get the target appended
    teacher = rows["demo-teacher"].split(" | ")
    assert teacher[1:4] == ["teacher", "laptop", "AMD EPYC"]
    # model MB, peak RSS, load s, prompt, TTFT, prefill, decode, ppl x2, exact match, choice acc
    assert teacher[6:] == ["13.5", "120.0", "0.40", "64", "20.0", "3,200", "800.0", "130.00", "87.00", "60.0 %",
                           "29.0 % |"]
    jetson = rows["demo-student [jetson-orin-nano]"].split(" | ")
    assert jetson[3] == "NVIDIA Jetson Orin Nano Developer Kit" and jetson[4] == "llama.cpp, 6 thr"
    assert jetson[7] == "150.0" and jetson[12] == "500.0"
    assert "| demo-teacher | 256 | 80.0 | 3,100 | 700.0 |" in md  # speed by prompt length
    assert "### demo-student [laptop] vs demo-teacher (AMD EPYC, target laptop)" in md


def test_teacher_student_ratios(files, tmp_path):
    md = report(files, tmp_path / "out").markdown.read_text()
    assert "| peak RSS (MB), lower is better | 120.0 | 60.0 | 0.50x |" in md
    assert "| decode @64 (tok/s), higher is better | 800.0 | 2,000 | 2.50x |" in md
    assert "| time to first token @64 (ms), lower is better | 20.0 | 10.0 | 0.50x |" in md
    assert "| perplexity shakespeare, lower is better | 130.00 | 140.00 | 1.08x |" in md
    assert "| exact match, mean (%), higher is better | 60.0 | 45.0 | 0.75x |" in md
    assert "| multiple choice acc (%), higher is better | 29.0 | 27.0 | 0.93x |" in md
    # the pairing: same device only; the Jetson student has no teacher there
    rs = load_results(files)
    pairs = teacher_student_pairs(rs)
    assert [(t.label, s.target) for t, s in pairs] == [("demo-teacher", "laptop")]
    rows = {r.name: r for r in comparison(*pairs[0])}
    assert rows["model size"].ratio == pytest.approx(3.7 / 13.5)
    assert rows["prefill @64"].ratio == pytest.approx(2.0)
    assert rows["perplexity pydocs"].ratio == pytest.approx(90 / 87)


def test_the_same_run_read_twice_counts_once(files, tmp_path):
    single = tmp_path / "results-student.json"  # what the comparison file was made from
    single.write_text(json.dumps(STUDENT))
    assert len(load_results([*files, single])) == 3
    assert report([*files, single], tmp_path / "out").pairs == 1


def test_speed_compared_at_a_prompt_length_both_measured(tmp_path):
    t = copy.deepcopy(TEACHER)
    t["speed"] = t["speed"][1:]  # the teacher measured 256 only
    f = tmp_path / "r.json"
    f.write_text(json.dumps([t, STUDENT]))
    rows = {r.name: r for r in comparison(*teacher_student_pairs(load_results([f]))[0])}
    assert rows["decode @256"].teacher == 700.0 and rows["decode @256"].student == 1800.0


def test_plots_are_pngs(files, tmp_path):
    res = report(files, tmp_path / "out")
    names = sorted(p.name for p in res.plots)
    assert names == ["accuracy_vs_memory.png", "decode_vs_memory.png", "target_jetson-orin-nano.png",
                     "target_laptop.png", "teacher_vs_student.png"]
    for p in res.plots:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        assert f"]({p.name})" in res.markdown.read_text()
    assert res.notes == []


def test_without_a_teacher_or_accuracy_it_says_what_is_missing(tmp_path):
    s = copy.deepcopy(ON_JETSON)
    s["accuracy"] = None
    f = tmp_path / "results.json"
    f.write_text(json.dumps(s))
    res = report([f], tmp_path / "out")
    assert sorted(p.name for p in res.plots) == ["decode_vs_memory.png", "target_jetson-orin-nano.png"]
    assert any("teacher_vs_student.png not drawn" in n for n in res.notes)
    assert any("accuracy_vs_memory.png not drawn" in n for n in res.notes)
    md = res.markdown.read_text()
    assert "No student has a teacher measured on the same device" in md
    assert "| demo-student | student | jetson-orin-nano |" in md and "| - | - |" in md


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON (line 1)"),
    ("[]", "holds an empty list"),
    ('{"label": "x"}', "is not an edgeconv-bench/1 result (no schema key)"),
    ('{"schema": "other/2", "label": "x"}', "is not an edgeconv-bench/1 result (schema 'other/2')"),
    ('[{"schema": "edgeconv-bench/1"}]', "[0]: field label: field required"),
    ('{"schema": "edgeconv-bench/1", "label": "x", "peak_rss_mb": "lots"}', "field peak_rss_mb: input should be"),
    ('{"student": {"schema": "edgeconv-bench/1", "label": "s", "speed": [{"ttft_ms": 1}]}}',
     "['student']: field speed.0.prompt_tokens: field required"),
    ("3", "is not a results object but int"),
])
def test_malformed_input_is_one_line(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(EdgeconvError) as exc:
        report([f], tmp_path / "out")
    line = exc.value.line()
    assert message in line and "\n" not in line and line.startswith(str(f))
    assert not (tmp_path / "out").exists()  # nothing written for bad input


def test_missing_file_and_no_files(tmp_path):
    with pytest.raises(EdgeconvError, match="does not exist"):
        report([tmp_path / "nope.json"], tmp_path / "out")
    with pytest.raises(EdgeconvError, match="no results files given"):
        report([], tmp_path / "out")
