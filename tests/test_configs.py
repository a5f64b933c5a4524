"""The configs hold the defaults (edgeconv.config): every CLI option of convert, build, distill, export and sweep is
a config field with the same default, or is listed here as not one; a run written with --write-config replays
with --config; a refused option names the field in the library and the flag in the CLI."""

import inspect
import json
import re
import tomllib
from pathlib import Path

import click
import pytest
import tiny
from click.testing import CliRunner
from pydantic_core import PydanticUndefined
from test_bad_inputs import assert_error

import edgeconv
from edgeconv import api
from edgeconv.cli import config_toml, error_line, main, option_field
from edgeconv.config import (
    CALIBRATION_TOKENS,
    BuildConfig,
    ConfigError,
    ConvertConfig,
    DistillConfig,
    ExportConfig,
    SweepConfig,
    flag,
)

CONFIGS = {"convert": ConvertConfig, "build": BuildConfig, "distill": DistillConfig, "export": ExportConfig,
           "sweep": SweepConfig}

# Options that are no config field, by command. "cli": switches of the command line only (they do not change
# what is computed, or are the deprecated spelling of a field); a function: a keyword argument of that edgeconv.api
# function, whose default the option must have.
NOT_FIELDS = {
    "convert": {"model": "input", "out": "input", "force": "cli", "no_progress": "cli", "no_wait": "cli",
                "config": "cli", "write_config": "cli"},
    "build": {"model": "input", "out": "input", "dry_run": "cli", "force": "cli", "no_progress": "cli",
              "no_wait": "cli", "config": "cli", "write_config": "cli"},
    "sweep": {"model": "input", "out": "input", "no_progress": "cli", "no_wait": "cli", "config": "cli",
              "write_config": "cli"},
    "export": {"model": "input", "out": "input", "force": "cli", "no_wait": "cli",
               "precision": "cli"},  # the deprecated spelling of --quant
    # Not DistillConfig fields, which make the run key: the inputs, and how the teacher cache is filled.
    "distill": {"out": "input", "student": "input", "data": api.distill, "teacher": api.distill,
                "teacher_cache": api.distill, "cache_only": api.distill, "cache_device": api.distill,
                "cache_dtype": api.distill, "layer_by_layer": api.distill, "cache_chunk": api.distill,
                "force": "cli", "no_progress": "cli", "no_wait": "cli"},
}
# Fields with no option: set from the library only.
LIBRARY_ONLY = {"distill": {"min_lr_ratio", "weight_decay", "beta1", "beta2", "max_grad_norm", "keep_checkpoints"}}
# The commands with no config: their options' defaults are the edgeconv.api function's keyword defaults.
API_COMMANDS = {"eval": api.evaluate, "upcycle": api.upcycle, "prune": api.prune}


def _command(name: str) -> click.Command:
    return main.commands[name]


def _default(command: click.Command, param: click.Parameter):
    """What the option is when not given (a flag: False); inspect's `empty` for an argument with no default."""
    try:
        from click._utils import UNSET
    except ImportError:  # click < 8.2 has None for no default
        UNSET = None
    value = param.get_default(click.Context(command))
    return inspect.Parameter.empty if value is UNSET and param.required else value


def _api_param(fn, field: str) -> inspect.Parameter:
    return inspect.signature(fn).parameters[field]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_option_default_is_the_config_fields(name):
    cls, command = CONFIGS[name], _command(name)
    seen = set()
    for param in command.params:
        field = option_field(param)
        if field in cls.model_fields:
            seen.add(field)
            want = cls.default(field)
            got = _default(command, param)
            if want is PydanticUndefined:  # required: the command checks it after reading --config
                assert got is None, (name, field)
                continue
            assert got == want and type(got) is type(want), (name, field, got, want)
            if isinstance(param.type, click.Choice):
                assert tuple(param.type.choices) == cls.choices(field), (name, field)
            assert flag(field) in param.opts, (name, field, param.opts)  # the one mapping, both ways
            continue
        kind = NOT_FIELDS[name].get(field)
        assert kind is not None, f"`edgeconv {name}` option {field} is no {cls.__name__} field and not listed"
        if callable(kind):
            assert _default(command, param) == _api_param(kind, field).default, (name, field)
    missing = set(cls.model_fields) - seen - LIBRARY_ONLY.get(name, set())
    assert not missing, f"{cls.__name__} fields with no `edgeconv {name}` option: {sorted(missing)}"
    assert not set(NOT_FIELDS[name]) & set(cls.model_fields)


@pytest.mark.parametrize("name", sorted(API_COMMANDS))
def test_commands_without_a_config_take_the_api_defaults(name):
    fn = API_COMMANDS[name]
    library = {"eval": "edgeconv.evaluation.suite:evaluate", "upcycle": "edgeconv.stages.upcycle:upcycle",
               "prune": "edgeconv.stages.prune:prune"}[name]
    module, attr = library.split(":")
    lib = inspect.signature(getattr(__import__(module, fromlist=[attr]), attr)).parameters
    api_params = inspect.signature(fn).parameters
    for param in _command(name).params:
        field = option_field(param)
        if field in api_params:
            assert _default(_command(name), param) == api_params[field].default, (name, field)
    # ... and the library function's, where it has the same keyword with a default (runtime None there is "auto")
    for key, p in api_params.items():
        if key in lib and lib[key].default is not inspect.Parameter.empty and key != "runtime":
            assert lib[key].default == p.default, (name, key, lib[key].default, p.default)


def test_one_default_for_the_calibration_tokens():
    assert ConvertConfig.default("tokens") == BuildConfig.default("calibration_tokens") == \
           SweepConfig.default("tokens") == CALIBRATION_TOKENS
    assert _command("calibrate").params[[p.name for p in _command("calibrate").params].index("tokens")].default \
           == CALIBRATION_TOKENS
    from edgeconv.pipelines.build import plan_build
    from edgeconv.pipelines.convert import convert
    from edgeconv.pipelines.sweep import sweep

    assert inspect.signature(convert).parameters["tokens"].default == CALIBRATION_TOKENS
    assert inspect.signature(plan_build).parameters["calibration_tokens"].default == CALIBRATION_TOKENS
    assert inspect.signature(sweep).parameters["calibration_tokens"].default == CALIBRATION_TOKENS


def test_distillation_lr_defaults_differ_on_purpose():
    """convert follows `edgeconv distill` (DistillConfig's lr); build and sweep were tuned at 1e-3."""
    assert ConvertConfig.default("distill_lr") == DistillConfig.default("lr") == 5e-4
    assert BuildConfig.default("distill_lr") == SweepConfig.default("distill_lr") == 1e-3


def test_configs_refuse_unknown_fields_and_name_the_field():
    with pytest.raises(ConfigError) as exc:
        ConvertConfig.validated(tokenz=5)
    assert str(exc.value).startswith("tokenz 5: extra inputs are not permitted") and exc.value.fields == ["tokenz"]
    with pytest.raises(ConfigError) as exc:
        BuildConfig.validated(target="laptop", distill_lr=0)
    assert "distill_lr 0: input should be greater than 0" in str(exc.value) and "--" not in str(exc.value)
    with pytest.raises(ConfigError, match="target is required"):
        BuildConfig.validated()
    # the configs are frozen; options replace a config's fields and are validated again
    cfg = ConvertConfig(tokens=1024)
    assert ConvertConfig.of(cfg, {"seq_len": 64}) == ConvertConfig(tokens=1024, seq_len=64)
    with pytest.raises(ConfigError, match="seq_len 0"):
        ConvertConfig.of(cfg, {"seq_len": 0})


def test_the_api_names_the_field_and_the_cli_the_flag(tmp_path):
    with pytest.raises(ConfigError) as exc:  # refused before any model is read
        edgeconv.convert("demo-moe", tmp_path / "d", distill_lr=0)
    assert exc.value.line() == "distill_lr 0: input should be greater than 0; see the fields of ConvertConfig"
    assert error_line(exc.value, _command("convert")) == \
        "--distill-lr 0: input should be greater than 0; see `edgeconv convert --help`"
    result = CliRunner().invoke(main, ["convert", "--out", str(tmp_path / "d"), "--distill-lr", "0"])
    assert_error(result, "--distill-lr 0.0: input should be greater than 0", "see `edgeconv convert --help`")
    result = CliRunner().invoke(main, ["distill", "--student", str(tmp_path), "--out", str(tmp_path / "x"),
                                       "--temperature", "0"])
    assert_error(result, "--temperature 0.0: input should be greater than 0; see `edgeconv distill --help`")
    # a field named in a library error's text: `execution_provider` in the library, --execution-provider here
    with pytest.raises(ConfigError, match="^execution_provider is for format onnx-genai"):
        edgeconv.export("demo-moe", tmp_path / "o", format="onnx", execution_provider="cuda")
    result = CliRunner().invoke(main, ["export", "--format", "onnx", "--execution-provider", "cuda", "--out",
                                       str(tmp_path / "o")])
    assert_error(result, "--execution-provider is for --format onnx-genai")
    assert list(tmp_path.iterdir()) == []


def _dry_run(*args):
    result = CliRunner().invoke(main, ["build", *map(str, args), "--dry-run"])
    assert result.exit_code == 0, result.output
    # the host's free memory and disk move between two runs
    return re.sub(r"\(\d[\d.]* GB available\)|[\d.]+ GB free at", "#", result.stderr)


def test_write_config_then_config_replays_the_build_plan(tmp_path):
    first = tmp_path / "build.toml"
    plan = _dry_run("--target", "jetson", "--out", tmp_path / "b", "--no-measure", "--calibration-tokens", 4096,
                    "--distill-lr", 2e-3, "--distill-mode", "offline", "--write-config", first)
    data = tomllib.loads(first.read_text())
    assert data["target"] == "jetson" and data["out"] == str(tmp_path / "b") and data["model"] == "demo-moe"
    assert data["calibration_tokens"] == 4096 and data["distill_lr"] == 2e-3 and data["measure"] is False
    assert "quant" not in data  # unset: the target's
    again = tmp_path / "again.toml"
    assert _dry_run("--config", first, "--write-config", again).replace(str(again), str(first)) == plan
    assert again.read_text() == first.read_text()
    # options given on the command line override the file; the rest stays
    other = tmp_path / "other.toml"
    changed = _dry_run("--config", first, "--calibration-tokens", 8192, "--write-config", other)
    assert "8,192 tokens through the teacher" in changed
    assert tomllib.loads(other.read_text()) == {**data, "calibration_tokens": 8192}
    assert not (tmp_path / "b").exists()


def test_config_file_refusals(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('target = "laptop"\ntokenz = 5\n')
    assert_error(CliRunner().invoke(main, ["build", "--config", str(bad), "--dry-run"]),
                 f"--config {bad}: tokenz 5: extra inputs are not permitted", "see `edgeconv build --help`")
    bad.write_text('target = "laptop"\ndistill_lr = -1.0\n')
    assert_error(CliRunner().invoke(main, ["build", "--config", str(bad), "--dry-run"]),
                 f"--config {bad}: distill_lr -1.0: input should be greater than 0")
    # the same value on the command line is named by its flag
    assert_error(CliRunner().invoke(main, ["build", "--config", str(bad), "--distill-lr", "0", "--dry-run"]),
                 "--distill-lr 0.0: input should be greater than 0")
    bad.write_text('target = "laptop\n')
    assert_error(CliRunner().invoke(main, ["build", "--config", str(bad)]), f"cannot read --config {bad}")
    bad.write_text('distill_lr = 1e-3\n')  # still no target: click's own error
    result = CliRunner().invoke(main, ["build", "--config", str(bad), "--dry-run"])
    assert result.exit_code == 2 and "Missing option '--target'" in result.output


def test_write_config_then_config_replays_convert(corpus, tmp_path):
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), tmp_path / "moe"))
    written = tmp_path / "convert.toml"
    args = ["convert", str(src), "--data", str(corpus), "--tokens", "512", "--seq-len", "32", "--scaling", "uniform",
            "--out", str(tmp_path / "d1"), "--no-progress"]
    first = CliRunner().invoke(main, [*args, "--write-config", str(written)])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["convert", "--config", str(written), "--out", str(tmp_path / "d2"),
                                      "--no-progress"])
    assert again.exit_code == 0, again.output
    methods = [json.loads((tmp_path / f"d{i}.work" / "plan.json").read_text())["method"] for i in (1, 2)]
    assert {**methods[0], "stats": ""} == {**methods[1], "stats": ""} and methods[0]["scaling"] == "uniform"
    weights = [sorted((p.name, p.read_bytes()) for p in (tmp_path / f"d{i}").glob("*.safetensors")) for i in (1, 2)]
    assert weights[0] == weights[1]


@pytest.mark.parametrize("config", [
    ConvertConfig(data=Path("/data/it's \"quoted\".jsonl"), tokens=1024, experts=4, distill_lr=1e-05,
                  distill_mode="offline"),
    BuildConfig(target="phone", format="onnx-genai", quant="int4", bench=False, distill_tokens=0),
    ExportConfig(format="onnx", quant="int8", layer_by_layer=True, dtype="bfloat16"),
    SweepConfig(k="2,4", dense="demo-dense", keep=True, distill_lr=3e-3, results=Path("a b/c")),
    DistillConfig(lr=1.5e-4, mode="offline", seed=7, min_lr_ratio=0.0),
])
def test_config_toml_round_trip(config):
    text = config_toml("x", config, model="m", out=None)
    data = tomllib.loads(text)
    assert data.pop("model") == "m" and "out" not in data
    assert type(config).validated(**data) == config
