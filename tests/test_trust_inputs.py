"""Inputs that look usable but are not: refused with one line, before the work they would spoil, leaving nothing.

Binary --data (NUL bytes, undecodable bytes), NaN/Inf in a checkpoint tensor, NaN/Inf/negative scales,
--seq-len beyond the model's context, booleans where a plan holds numbers, NaN calibration statistics.
"""

import json
import random
import shutil

import pytest
import tiny
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edgeconv.cli import main
from edgeconv.errors import EdgeconvError
from edgeconv.io import text_data as data_mod

FAST = ("--tokens", "512", "--seq-len", "32", "--no-progress")
NAN_TENSOR = "model.layers.1.mlp.experts.1.down_proj.weight"  # read by calibration and by a first:2 plan


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, *phrases, alone=True):
    """Exit 2 and one `error:` line holding every phrase: the only line on stderr when the run is refused
    before any work (`alone`), else the last, after the progress lines of the stages that ran."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert len(lines) == 1 or not alone, f"the run was not refused before any work: {result.stderr}"
    for phrase in phrases:
        assert phrase in lines[-1], (phrase, lines[-1])
    return lines[-1]


def assert_nothing_left(out):
    """No output, no OUT.work/, no temp directory, no lock: the directory holding OUT is as before."""
    assert not out.exists(), f"{out} left behind"
    assert not out.with_name(f"{out.name}.work").exists(), f"{out.name}.work left behind"
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def teacher(qwen3_dir):
    return tiny.add_tokenizer(qwen3_dir)


def _binary(kind: str) -> bytes:
    if kind == "utf16":  # text, but UTF-16: every ASCII character comes with a NUL byte
        return (tiny.CORPUS * 20).encode("utf-16")
    noise = random.Random(0).randbytes(40_000)
    if kind == "random":
        return noise
    if kind == "random-no-nul":  # caught by the share of undecodable bytes alone
        return bytes(b for b in noise if b)
    raise KeyError(kind)


@pytest.fixture(params=["utf16", "random", "random-no-nul"])
def binary_data(request, tmp_path):
    path = tmp_path / "data" / f"{request.param}.txt"
    path.parent.mkdir()
    path.write_bytes(_binary(request.param))
    return path


def _data_phrases(path):
    return (str(path), "is not", "text", "UTF-8")


# --- binary --data -----------------------------------------------------------------------------------------

def test_binary_data_is_refused_by_calibrate(teacher, binary_data, tmp_path):
    out = tmp_path / "stats"
    assert_error(run("calibrate", teacher, "--data", binary_data, "--out", out, *FAST), *_data_phrases(binary_data))
    assert_nothing_left(out)


def test_binary_data_is_refused_by_convert(teacher, binary_data, tmp_path):
    out = tmp_path / "dense"
    assert_error(run("convert", teacher, "--data", binary_data, "--out", out, *FAST), *_data_phrases(binary_data))
    assert_nothing_left(out)


def test_binary_distill_data_is_refused_by_convert_before_calibration(teacher, corpus, tmp_path):
    from edgeconv.pipelines.convert import convert

    bad = tmp_path / "noise.txt"
    bad.write_bytes(_binary("random"))
    out = tmp_path / "distilled"
    with pytest.raises(EdgeconvError) as err:
        convert(teacher, out, data=corpus, tokens=512, seq_len=32, distill_tokens=64, distill_data=bad,
                distill_options={"seq_len": 16, "batch_size": 2}, progress=False)
    for phrase in _data_phrases(bad):
        assert phrase in err.value.line()
    assert_nothing_left(out)


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("student")
    assert run("plan", teacher, "--out", root / "plan.json").exit_code == 0
    result = run("assemble", teacher, "--plan", root / "plan.json", "--out", root / "dense", "--no-progress")
    assert result.exit_code == 0, result.output
    return root / "dense"


def test_binary_data_is_refused_by_distill(teacher, student, binary_data, tmp_path):
    out = tmp_path / "distilled"
    result = run("distill", "--teacher", teacher, "--student", student, "--data", binary_data, "--tokens", "64",
                 "--seq-len", "16", "--batch-size", "2", "--out", out, "--no-progress")
    assert_error(result, *_data_phrases(binary_data))
    assert_nothing_left(out)


def test_data_that_turns_binary_after_the_checked_start_is_caught_while_read(teacher, tmp_path, monkeypatch):
    # The upfront check reads the start of each file (a prefix, a budget over files); the rest is checked by
    # the same rule as it is read for work, before its tokens are used.
    monkeypatch.setattr(data_mod, "PREFIX_BYTES", 4096)
    monkeypatch.setattr(data_mod, "UPFRONT_BYTES", 4096)
    text = (tiny.CORPUS * 40).encode()
    late = tmp_path / "late.txt"
    late.write_bytes(text + _binary("random-no-nul"))
    data_mod.check_data(late)  # its start is text
    out = tmp_path / "stats"
    assert_error(run("calibrate", teacher, "--data", late, "--out", out, "--tokens", "8192", "--seq-len", "32",
                     "--no-progress"), str(late), "not UTF-8 text", "undecodable")
    assert_nothing_left(out)
    # A directory: the first file is checked upfront, the second only when it is read.
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.txt").write_bytes(text)
    (d / "b.txt").write_bytes(_binary("random"))
    data_mod.check_data(d)
    assert_error(run("calibrate", teacher, "--data", d, "--out", out, "--tokens", "8192", "--seq-len", "32",
                     "--no-progress"), str(d / "b.txt"), "NUL bytes")
    assert_nothing_left(out)


def test_text_with_a_few_odd_bytes_and_other_scripts_is_accepted(tmp_path):
    good = tmp_path / "good.txt"
    body = "naïve café, Größe, Ελληνικά, 日本語, emoji ✓ 🙂\n" * 2000
    good.write_bytes(body.encode() + b"\xff\xfe one stray pair of bad bytes\n" + body.encode())
    data_mod.check_data(good)
    assert sum(len(t) for _, t in data_mod.iter_documents(good)) > len(body)
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps({"text": f"row {i}: h\u00e9"}).encode() + b"\n"
                                                for i in range(50)))
    data_mod.check_data(rows)
    assert len(list(data_mod.iter_documents(rows))) == 50
    latin1 = tmp_path / "latin1.txt"  # legacy 8-bit text: every accented letter would reach the model as U+FFFD
    latin1.write_bytes(("Le cœur a ses raisons que la raison ne connaît point. Élève, déjà, où.\n" * 50)
                       .encode("cp1252"))
    with pytest.raises(EdgeconvError, match="not UTF-8 text"):
        data_mod.check_data(latin1)


# --- NaN / Inf in a checkpoint -----------------------------------------------------------------------------

def _damage(src, dst, name, value=float("nan"), fused=False):
    shutil.copytree(src, dst)
    shard = dst / "model.safetensors"
    tensors = load_file(shard)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    if fused:
        fused_dir = dst.with_name(dst.name + "-fused")
        tiny.fuse_experts(dst, fused_dir)
        return fused_dir
    return dst


@pytest.fixture(scope="module")
def nan_teacher(teacher, tmp_path_factory):
    return _damage(teacher, tmp_path_factory.mktemp("nan") / "moe", NAN_TENSOR)


def test_nan_weights_are_refused_by_calibrate_naming_the_tensor(nan_teacher, corpus, tmp_path):
    out = tmp_path / "stats"
    assert_error(run("calibrate", nan_teacher, "--data", corpus, "--out", out, *FAST),
                 f"tensor {NAN_TENSOR} in model.safetensors holds NaN/Inf values", "damaged", "re-download")
    assert_nothing_left(out)


def test_nan_weights_are_refused_by_convert_naming_the_tensor(nan_teacher, corpus, tmp_path):
    # Found as calibration reads the layer (a full scan upfront would read the whole model once more), so
    # the run has started; it still leaves nothing.
    out = tmp_path / "dense"
    assert_error(run("convert", nan_teacher, "--data", corpus, "--out", out, *FAST),
                 f"tensor {NAN_TENSOR} in model.safetensors holds NaN/Inf values", "damaged", alone=False)
    assert_nothing_left(out)


@pytest.mark.parametrize("name, value, fused, shown", [
    (NAN_TENSOR, float("nan"), False, NAN_TENSOR),  # an expert merged into the dense FFN
    ("model.layers.0.self_attn.o_proj.weight", float("inf"), False, "model.layers.0.self_attn.o_proj.weight"),  # copied
    (NAN_TENSOR, float("-inf"), True, "model.layers.1.mlp.experts.down_proj (row 1)"),  # one expert of a fused tensor
])
def test_nan_weights_are_refused_by_assemble_naming_the_tensor(teacher, tmp_path, name, value, fused, shown):
    model = _damage(teacher, tmp_path / "moe", name, value, fused)
    plan = tmp_path / "plan.json"
    assert run("plan", model, "--out", plan).exit_code == 0  # headers only: nothing read yet
    out = tmp_path / "dense"
    assert_error(run("assemble", model, "--plan", plan, "--out", out, "--no-progress"),
                 f"tensor {shown} in model.safetensors holds NaN/Inf values", "damaged")
    assert_nothing_left(out)


@pytest.fixture(scope="module")
def stats_dir(teacher, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "stats"
    result = run("calibrate", teacher, "--data", corpus, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    return out


def test_nan_statistics_are_refused_by_plan_in_one_line(stats_dir, tmp_path):
    bad = tmp_path / "stats"
    shutil.copytree(stats_dir, bad)
    tensors = load_file(bad / "stats.safetensors")
    tensors["layers.1.weight_sum"][3] = float("nan")
    save_file(tensors, bad / "stats.safetensors", metadata={"format": "edgeconv-stats"})
    out = tmp_path / "plan.json"
    assert_error(run("plan", bad, "--out", out), str(bad), "NaN/Inf", "layer 1", "weight_sum", "calibrate again")
    assert not out.exists()


# --- scales ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", ["nan", "inf", "-inf", "-1", "1e999"])
def test_plan_scaling_must_be_finite_and_not_negative(teacher, tmp_path, scaling):
    out = tmp_path / "plan.json"
    assert_error(run("plan", teacher, "--scaling", scaling, "--out", out), f"--scaling {scaling}",
                 "finite number >= 0")
    assert not out.exists()


@pytest.fixture(scope="module")
def plan_file(teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert run("plan", teacher, "--out", path).exit_code == 0
    return path


def _edited(plan_file, tmp_path, edit):
    data = json.loads(plan_file.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("field, value, phrases", [
    ("scale", -1.0, ("layers.0.groups.1", "scale must be a finite number >= 0", "-1.0")),
    ("scale", float("nan"), ("layers.0.groups.1", "scale must be a finite number >= 0", "nan")),
    ("shared_scale", -0.5, ("layers.1", "shared_scale must be a finite number >= 0")),
    ("weights", [float("inf")], ("layers.0.groups.1", "merge weights must be finite")),
])
def test_plan_file_scales_and_weights_must_be_finite_and_not_negative(teacher, plan_file, tmp_path, field, value,
                                                                      phrases):
    def edit(data):
        if field == "shared_scale":
            data["layers"][1]["shared_scale"] = value
        else:
            data["layers"][0]["groups"][1][field] = value

    out = tmp_path / "dense"
    assert_error(run("assemble", teacher, "--plan", _edited(plan_file, tmp_path, edit), "--out", out, "--no-progress"),
                 *phrases)
    assert_nothing_left(out)


# --- booleans in a plan ------------------------------------------------------------------------------------

@pytest.mark.parametrize("where, value", [
    ("layers.0.groups.1.experts.0", True),  # lax pydantic read this as expert 1
    ("layers.0.groups.0.experts.0", False),  # ... and this as expert 0
    ("layers.1.layer", True),
    ("layers.0.groups.0.weights.0", True),
    ("layers.0.groups.0.scale", True),
    ("model.num_experts", 8.0),
])
def test_plan_numbers_are_strict(teacher, plan_file, tmp_path, where, value):
    def edit(data):
        *path, last = where.split(".")
        node = data
        for key in path:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value

    out = tmp_path / "dense"
    result = run("assemble", teacher, "--plan", _edited(plan_file, tmp_path, edit), "--out", out, "--no-progress")
    assert_error(result, f"is invalid at {where}: Input should be a valid", json.dumps(value), "fix the plan")
    assert_nothing_left(out)


# --- --seq-len ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["calibrate", "convert"])
def test_seq_len_beyond_the_models_context_is_refused(teacher, corpus, tmp_path, command):
    assert tiny.config_of(teacher)["max_position_embeddings"] == 64
    out = tmp_path / "out"
    assert_error(run(command, teacher, "--data", corpus, "--out", out, "--tokens", "512", "--seq-len", "128",
                     "--no-progress"), "--seq-len 128", "context (64 positions", "--seq-len 64 or less")
    assert_nothing_left(out)
