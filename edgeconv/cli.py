"""The `edgeconv` command: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import tomllib
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from edgeconv import __version__, api
from edgeconv.config import (
    CALIBRATION_SEQ_LEN,
    CALIBRATION_TOKENS,
    BuildConfig,
    ConfigError,
    ConvertConfig,
    DistillConfig,
    ExportConfig,
    Options,
    SweepConfig,
    flag,
)
from edgeconv.demo import DEFAULT_MODEL
from edgeconv.errors import EdgeconvError
from edgeconv.quant import describe, listing

BUILD_FORMATS = BuildConfig.choices("format")  # what a target profile can run (edgeconv.device.profiles)

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


LORA_HELP = ("0: distillation trains every weight. R: it trains rank-R LoRA adapters on the frozen student and "
             "merges them (`edgeconv distill --lora-rank`): for a student whose AdamW state does not fit.")


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise EdgeconvError(f"size {text!r} is not understood", "use a byte count or e.g. 500MB, 2GB") from None


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:,.2f} TB"


def no_wait_option(fn):
    """`--no-wait`: when another edgeconv run is writing the same --out, stop at once instead of waiting."""

    @click.option("--no-wait", is_flag=True,
                  help="If another edgeconv run is writing --out, stop with an error instead of waiting for it.")
    @functools.wraps(fn)
    def wrapper(*args, no_wait: bool, **kwargs):
        from edgeconv.io.guard import WAIT_FOR_LOCK

        token = WAIT_FOR_LOCK.set(not no_wait)
        try:
            return fn(*args, **kwargs)
        finally:
            WAIT_FOR_LOCK.reset(token)

    return wrapper


DEVICE_HELP = "auto (a GPU if there is one), cpu, cuda or cuda:N."


def layer_by_layer_option(what: str, note: str = "", default: bool | None = None):
    """`--layer-by-layer/--whole-model` (default None: chosen from the model's size and the memory available)."""
    return click.option("--layer-by-layer/--whole-model", "layer_by_layer", default=default,
                        help=f"Run {what} one decoder layer at a time (bounded memory: one layer plus the "
                             "activations) or whole [default: whole when it fits in memory; the choice is printed]."
                             + (f" {note}" if note else ""))


class _ConsoleLog(logging.Handler):
    """The library's progress and notices (logging.getLogger("edgeconv...")), printed as plain lines on stderr.

    Plain rather than rich's RichHandler: that one lays each record out in a table as wide as the terminal and
    wraps long lines, and edgeconv's lines (paths, one-line errors) are meant to be read and grepped whole.
    Under torchrun / accelerate every process runs the same code: progress (INFO) is printed by the main one only,
    warnings by all."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno <= logging.INFO and not _is_main_process():
            return
        console.print(self.format(record), markup=False, highlight=False)


def _log_to_console() -> None:
    logger = logging.getLogger("edgeconv")
    if not any(isinstance(h, _ConsoleLog) for h in logger.handlers):
        logger.addHandler(_ConsoleLog())
    logger.setLevel(logging.INFO)


class EdgeconvGroup(click.Group):
    """Turns EdgeconvError into one line on stderr and exit status 2, wherever it is raised."""

    def invoke(self, ctx):
        _log_to_console()
        try:
            return super().invoke(ctx)
        except EdgeconvError as exc:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            click.echo(f"error: {error_line(exc, command)}", err=True)
            sys.exit(2)


def option_field(param: click.Parameter) -> str:
    """The config field an option sets: its long name (--distill-lr: distill_lr), the inverse of config.flag."""
    if not isinstance(param, click.Option):
        return param.name
    long = [o for o in param.opts if o.startswith("--")]
    return long[0][2:].replace("-", "_") if long else param.name


def error_line(exc: EdgeconvError, command: click.Command | None) -> str:
    """The one line the CLI prints: a ConfigError names the command's option (flag) where the library named the
    config field."""
    if not isinstance(exc, ConfigError):
        return exc.line()
    options = {option_field(p) for p in command.params if isinstance(p, click.Option)} if command else set()
    problem, hint = exc.render(lambda field: flag(field) if field in options else field)
    if exc.help and command is not None:
        hint = f"see `edgeconv {command.name} --help`"
    return EdgeconvError(problem, hint).line()


def api_default(fn, name: str):
    """The default of `fn`'s keyword `name` (edgeconv.api): the option default of the commands with no config."""
    import inspect

    return inspect.signature(fn).parameters[name].default


# --- configs: the options of convert, build, distill, export and sweep are edgeconv.config's fields ---------------

RUN_INPUTS = ("model", "out")  # --config keys besides the config's fields: MODEL and --out


def config_file_options(fn):
    """`--config FILE` (options from TOML; the command line wins) and `--write-config FILE`."""
    fn = click.option("--write-config", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                      default=None, help="Write the resolved options (MODEL, --out and the rest) to this TOML "
                                         "file ('-': print them), then go on; --config replays them.")(fn)
    return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        default=None, help="Read options from a TOML file (keys: the option names with "
                                           "underscores, as --write-config writes them); options given on the "
                                           "command line override it.")(fn)


def resolve_config(cls: type[Options], params: dict, required: tuple[str, ...] = ()) -> Options:
    """The command's config from its options and its --config file, validated; `params` (the command's keyword
    arguments) get the file's MODEL and --out too. The file's values replace only options left at their default.
    `required`: options required once the file is read (click's own error when still missing)."""
    ctx = click.get_current_context()
    params_by_key = {option_field(p): p for p in ctx.command.params}
    config_file, write_config = params.pop("config_file", None), params.pop("write_config", None)
    from_file, unknown = set(), {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise EdgeconvError(f"cannot read --config {config_file} ({exc})", "pass a TOML file of options, as "
                                "--write-config writes") from None
        for key, value in data.items():
            param = params_by_key.get(key)
            if param is None or not (key in cls.model_fields or key in RUN_INPUTS):
                unknown[key] = value
                continue
            if ctx.get_parameter_source(param.name) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
                params[param.name] = Path(value) if key == "out" and isinstance(value, str) else value
                from_file.add(key)
    for key in required:
        if params[params_by_key[key].name] is None:
            raise click.MissingParameter(ctx=ctx, param=params_by_key[key])
    fields = {f: params[params_by_key[f].name] for f in cls.model_fields if f in params_by_key}
    try:
        config = cls.validated(**fields, **unknown)
    except ConfigError as exc:
        if not any(f in from_file or f in unknown for f in exc.fields):
            raise
        problem, _ = exc.render(str)
        raise EdgeconvError(f"--config {config_file}: {problem}", f"see `edgeconv {ctx.command.name} --help`") from None
    if write_config is not None:
        text = config_toml(ctx.command.name, config, model=params.get("model"), out=params.get("out_dir"))
        if str(write_config) == "-":
            click.echo(text, nl=False)
        else:
            write_config.write_text(text)
            console.print(f"options written to {write_config} (replay: edgeconv {ctx.command.name} --config "
                          f"{write_config})", markup=False, highlight=False)
    return config


def config_toml(command: str, config: Options, **inputs) -> str:
    """`config` (and MODEL, --out) as TOML: flat scalars, an unset (None) option as a comment."""
    lines = [f"# edgeconv {command} options ({type(config).__name__}): `edgeconv {command} --config FILE` runs "
             "them again;", "# options given on the command line override the file."]
    values = {**{k: v for k, v in inputs.items() if v is not None}, **config.model_dump()}
    for key, value in values.items():
        info = type(config).model_fields.get(key)
        note = f"  # {info.description}" if info is not None and info.description else ""
        lines.append(f"# {key} = (unset){note}" if value is None else f"{key} = {_toml_value(value)}{note}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


@click.group(cls=EdgeconvGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgeconv")
def main():
    """Turn a Mixture-of-Experts LLM into a small dense model for the edge.

    \b
    Typical flow:
      edgeconv inspect MODEL                                what the MoE is, what the default plan makes
      edgeconv convert MODEL --out dense/                   calibrate + plan (DO-ACP) + assemble
      edgeconv export dense/ --quant Q4_K_M --out m.gguf    GGUF for llama.cpp, checked against torch
      edgeconv eval dense/                                  perplexity, skills, multiple choice
      edgeconv build --target jetson                        all of it for one device: a bundle in dist/
    Stage by stage: calibrate, plan, assemble. MODEL is a local checkpoint directory
    (config.json + *.safetensors), a hub id, or a shipped demo model: demo-moe (the default MODEL
    of every command, a 16-expert Qwen3-MoE trained for this project) or demo-dense.
    """


@main.command()
@click.argument("model", metavar="[MODEL|STATS]", required=False, default=DEFAULT_MODEL)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def inspect(model, as_json):
    """Describe a MoE checkpoint, or the expert usage recorded in calibration statistics.

    For a MODEL: family, layers, experts, top-k, total vs active parameters and the default dense width,
    read from config.json and the safetensors headers only (instant even on huge models). For STATS
    (from `edgeconv calibrate`): per layer, how evenly experts are used and the most used ones.
    """
    if _is_stats_dir(model):
        return _inspect_stats(Path(model), as_json)
    from edgeconv.planning.model_info import inspect_model

    info = inspect_model(model)
    if as_json:
        out.print_json(json.dumps(info.as_dict()))
        return
    table = Table(title=f"{info.path}", show_header=False)
    rows = [
        ("family", f"{info.architecture} -> {info.dense_architecture}"),
        ("layers", f"{info.num_layers} ({info.moe_layers} MoE)"),
        ("experts / layer", f"{info.num_experts} of width {info.expert_width}, top-{info.top_k}"),
        ("shared expert width", str(info.shared_width)),
        ("expert layout on disk", info.expert_layout),
        ("total params", f"{info.total_params / 1e6:,.2f} M"),
        ("active params / token", f"{info.active_params / 1e6:,.2f} M"),
        ("default dense FFN width", f"{info.default_dense_width} (top-{info.top_k} experts kept per layer)"),
        ("default dense params", f"{info.default_dense_params / 1e6:,.2f} M"),
        ("checkpoint size", human_bytes(info.checkpoint_bytes)),
    ]
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


def _is_stats_dir(path: str) -> bool:
    return (Path(path) / "summary.json").is_file() and (Path(path) / "stats.safetensors").is_file()


@main.command()
@click.argument("source", metavar="STATS|MODEL")
@click.option("--experts", default=None, metavar="K|SPEC",
              help="With STATS: K, the number of experts kept per layer (default: the group count). "
                   "With MODEL (no calibration): first:K | random:K[:SEED] | ids:A,B,.. (or ids:A,B|C,D per layer).")
@click.option("--groups", type=int, default=None,
              help="Groups per layer = dense width / expert width (default: the router's top-k).")
@click.option("--scoring", default="do-acp", show_default=True,
              help="Scoring method (STATS only): " + "see `edgeconv methods`.")
@click.option("--grouping", default="none", show_default=True, help="Grouping method (STATS only).")
@click.option("--scaling", default=None, metavar="NAME|NUMBER",
              help="Group output scale: cp or uniform with STATS (default cp); uniform or a number with MODEL "
                   "(default uniform).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random scoring/grouping.")
@click.option("--model", "model_path", default=None,
              help="The calibrated model, if it moved (weight-cluster reads its weights).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the plan JSON.")
def plan(source, experts, groups, scoring, grouping, scaling, seed, model_path, out_path):
    """Decide which experts go into the dense FFN, how they are grouped and scaled.

    With calibration statistics (STATS, from `edgeconv calibrate`) any scoring x grouping x scaling
    combination; the defaults are the paper's: DO-ACP, pure pruning with K = groups = top-k, CP scaling.
    With a MODEL directory instead, a plan without calibration (pure pruning by position, at random or
    by id). The plan records every expert's scores.
    """
    if _is_stats_dir(source):
        from edgeconv.calibration.stats import CalibrationStats
        from edgeconv.planning.from_stats import stats_plan

        k = _int_option("--experts", experts)
        result = stats_plan(CalibrationStats.load(Path(source)), experts=k, groups=groups, scoring=scoring,
                            grouping=grouping, scaling=scaling or "cp", seed=seed, model=model_path,
                            stats_path=str(Path(source).absolute()))
    else:
        from edgeconv.families import family_for
        from edgeconv.io.checkpoint import Checkpoint
        from edgeconv.planning.calibration_free import simple_plan

        if experts is not None and experts.isdigit():
            raise EdgeconvError(
                f"--experts {experts} needs calibration statistics to choose which experts",
                f"run `edgeconv calibrate` and pass its STATS dir, or choose without data: --experts first:{experts}",
            )
        if groups is not None or grouping != "none" or scoring != "do-acp":
            raise EdgeconvError(
                "--groups, --scoring and --grouping need calibration statistics",
                "run `edgeconv calibrate MODEL --data ... --out STATS` and plan from STATS",
            )
        ckpt = Checkpoint.open(source)
        family = family_for(ckpt.config, str(ckpt.path))
        result = simple_plan(family, experts, scaling or "uniform", ckpt.fingerprint, str(ckpt.path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result.save(out_path)
    console.print(f"plan: {len(result.layers)} MoE layers, dense FFN width {result.dense_width} -> {out_path}")


def _int_option(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise EdgeconvError(f"{name} {value!r}: with statistics, pass K as a number", "e.g. --experts 8") from None


@main.command()
@no_wait_option
@click.argument("model", required=False, default=DEFAULT_MODEL)
@click.option("--data", type=click.Path(exists=False, path_type=Path), default=None,
              help="Calibration text: a .txt file, a JSONL file with a 'text' field, a parquet file with a 'text' "
                   "column, a datasets save_to_disk directory, or a directory of such files "
                   "[default: the shipped demo text].")
@click.option("--tokens", default=CALIBRATION_TOKENS, show_default=True, help="Calibration tokens.")
@click.option("--seq-len", default=CALIBRATION_SEQ_LEN, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", default=4, show_default=True, help="Sequences per forward.")
@click.option("--gram-tokens", default=1024, show_default=True,
              help="Shared sample on which every expert runs (Gram matrix).")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16"]),
              help="Compute dtype; auto: bfloat16 on a GPU that has it, else float32.")
@click.option("--device", default="auto", show_default=True, help="Where the layers run: " + DEVICE_HELP)
@click.option("--max-activation-memory", default="4GB", show_default=True, help="Beyond this, activations go to disk.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Statistics directory.")
@click.option("--force", is_flag=True, help="Replace --out even if it holds something else.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def calibrate(model, data, tokens, seq_len, batch_size, gram_tokens, dtype, device, max_activation_memory, out_dir,
              force, no_progress):
    """Run the MoE on text one decoder layer at a time and save per-expert statistics.

    Collected per layer and expert: selection count, routing-weight sum (CP), mean ||f_e(x)|| and
    ||f_e(x)||^2, the REAP sum, the Gram matrix of expert outputs on a shared sample, router logit
    statistics and the shared-expert gate mean. Peak memory is about one layer plus the activations.
    """
    from edgeconv.demo import CALIBRATION_DATA
    from edgeconv.stages.calibrate import calibrate as run

    result = run(model, data or CALIBRATION_DATA, out_dir, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                 gram_tokens=gram_tokens,
                 dtype=dtype, device=device, max_activation_bytes=parse_size(max_activation_memory), force=force,
                 progress=not no_progress)
    s = result.manifest["summary"]
    verb = "up to date" if result.skipped else "wrote"
    console.print(f"{verb} {result.out}: {s['tokens']:,} tokens x {s['layers']} MoE layers, "
                  f"{s['tokens_per_second']:,.0f} tokens/s")


@main.command()
@no_wait_option
@click.argument("model", required=False, default=DEFAULT_MODEL)
@click.option("--plan", "plan_path", required=True, type=click.Path(path_type=Path),
              help="Plan JSON from `edgeconv plan`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory for the dense checkpoint.")
@click.option("--force", is_flag=True, help="Replace --out even if it holds something else.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def assemble(model, plan_path, out_dir, force, max_shard_size, no_progress):
    """Build the dense checkpoint from MODEL and a plan, one layer at a time.

    The output is a stock transformers checkpoint (AutoModelForCausalLM, no remote code) with
    sharded safetensors, the tokenizer, plan.json and manifest.json (sha256 of every file). It is
    written to a temp directory and renamed when complete; a rerun with the same inputs does nothing.
    """
    from edgeconv.stages.assemble import assemble as run

    result = run(model, plan_path, out_dir, force=force, max_shard_bytes=parse_size(max_shard_size),
                 progress=not no_progress)
    s = result.manifest["summary"]
    verb = "up to date" if result.skipped else "wrote"
    console.print(
        f"{verb} {result.out}: {s['dense_architecture']}, FFN width {s['dense_width']}, "
        f"{s['dense_params'] / 1e6:,.2f} M params (from {s['source_params'] / 1e6:,.2f} M)"
    )


def _inspect_stats(path: Path, as_json: bool) -> None:
    from edgeconv.calibration.stats import CalibrationStats

    stats = CalibrationStats.load(path)
    rows = []
    for layer, st in sorted(stats.layers.items()):
        freq = st.frequency
        top = sorted(range(st.num_experts), key=lambda e: -float(freq[e]))[:5]
        summary = st.summary()
        rows.append({
            "layer": layer,
            "tokens": st.tokens,
            "unused": summary["unused_experts"],
            "entropy": summary["usage_entropy_ratio"],
            "top": [(e, float(freq[e])) for e in top],
            "shared_gate_mean": st.shared_gate_mean,
        })
    if as_json:
        out.print_json(json.dumps({"model": stats.model, "data": stats.data, "layers": rows}))
        return
    m = stats.model
    table = Table(title=f"{path}: {m['architecture']}, {m['num_experts']} experts top-{m['top_k']}, "
                        f"{stats.data.get('tokens', 0):,} calibration tokens")
    for col in ("layer", "unused experts", "usage entropy / max", "most used (share of routing)", "shared gate"):
        table.add_column(col)
    for r in rows:
        gate = "" if r["shared_gate_mean"] is None else f"{r['shared_gate_mean']:.3f}"
        top = ", ".join(f"{e}: {f:.1%}" for e, f in r["top"])
        table.add_row(str(r["layer"]), str(r["unused"]), f"{r['entropy']:.3f}", top, gate)
    out.print(table)


@main.command()
def methods():
    """List the registered scoring, grouping and scaling methods."""
    from edgeconv.planning.methods import GROUPINGS, SCALINGS, SCORERS

    for title, reg in (("scoring", SCORERS), ("grouping", GROUPINGS), ("scaling", SCALINGS)):
        out.print(f"[bold]{title}[/bold]")
        for name, fn in reg.items():
            doc = (fn.__doc__ or "").strip().splitlines()
            out.print(f"  {name:16} {doc[0] if doc else ''}")


@main.command()
@no_wait_option
@click.argument("model", required=False, default=DEFAULT_MODEL)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Dense checkpoint directory (required). Statistics and plan go to OUT.work/ beside it.")
@click.option("--data", type=click.Path(path_type=Path), default=ConvertConfig.default("data"),
              help="Calibration text (.txt, JSONL, parquet, a datasets directory, or a directory of files) "
                   "[default: the shipped demo text].")
@click.option("--tokens", default=ConvertConfig.default("tokens"), show_default=True, help="Calibration tokens.")
@click.option("--seq-len", default=ConvertConfig.default("seq_len"), show_default=True,
              help="Tokens per calibration sequence.")
@click.option("--experts", type=int, default=ConvertConfig.default("experts"),
              help="K experts kept per layer (default: the group count).")
@click.option("--groups", type=int, default=ConvertConfig.default("groups"),
              help="Groups per layer (default: the router's top-k).")
@click.option("--scoring", default=ConvertConfig.default("scoring"), show_default=True)
@click.option("--grouping", default=ConvertConfig.default("grouping"), show_default=True)
@click.option("--scaling", default=ConvertConfig.default("scaling"), show_default=True)
@click.option("--seed", type=int, default=ConvertConfig.default("seed"), show_default=True)
@click.option("--distill-tokens", type=int, default=ConvertConfig.default("distill_tokens"), show_default=True,
              help="Then distill the student from the MoE on this many tokens (0: no distillation).")
@click.option("--distill-data", type=click.Path(path_type=Path), default=ConvertConfig.default("distill_data"),
              help="Distillation text (.txt, JSONL, parquet or a datasets directory) [default: --data]; it must hold "
                   "--distill-tokens tokens (used once each).")
@click.option("--distill-mode", type=click.Choice(ConvertConfig.choices("distill_mode")),
              default=ConvertConfig.default("distill_mode"), show_default=True,
              help="online: teacher forward each step; offline: cache its top-k log-probs first.")
@click.option("--distill-lr", type=float, default=ConvertConfig.default("distill_lr"), show_default=True,
              help="Peak learning rate of distillation.")
@click.option("--distill-lora-rank", type=click.IntRange(min=0), default=ConvertConfig.default("distill_lora_rank"),
              show_default=True, help=LORA_HELP)
@config_file_options
@click.option("--force", is_flag=True, help="Replace --out even if it holds something else.")
@click.option("--no-progress", is_flag=True)
def convert(force, no_progress, **params):
    """calibrate + plan + assemble [+ distill] in one resumable command, with the paper's defaults.

    DO-ACP scoring, pure pruning with K = the router's top-k, CP scaling. With --distill-tokens the
    assembled student goes to OUT.work/assembled/ and is distilled from the MoE into OUT (the other
    distillation options are `edgeconv distill`'s defaults). Rerunning after an interruption skips the
    finished stages and resumes distillation from its last checkpoint.
    """
    config = resolve_config(ConvertConfig, params, required=("out",))
    result = api.convert(params["model"], params["out_dir"], config, force=force, progress=not no_progress)
    s = result.manifest["summary"]
    what = "distilled dense model" if result.distilled else "dense model"
    console.print(f"{what}: {result.out} ({s['dense_architecture']}, FFN width {s['dense_width']}, "
                  f"{s['dense_params'] / 1e6:,.2f} M params from {s['source_params'] / 1e6:,.2f} M)")


@main.command()
@no_wait_option
@click.argument("dense")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The upcycled checkpoint (Glm4MoeForCausalLM) with upcycle_plan.json.")
@click.option("--runs", default=api_default(api.upcycle, "runs"), show_default=True,
              help="auto (from the similarities and --threshold), none (the source in the container, unchanged "
                   "in function), or FIRST-LAST,... inclusive layer runs, e.g. 3-4.")
@click.option("--threshold", default=api_default(api.upcycle, "threshold"), show_default=True,
              help="auto: a layer is absorbed when its input/output and MLP-input similarities are both >= this.")
@click.option("--top-k", default=api_default(api.upcycle, "top_k"), show_default=True,
              help="Routed experts per token in a fused layer.")
@click.option("--split", default=api_default(api.upcycle, "split"), show_default=True,
              help="Routed experts made from each absorbed MLP (its channels cut in equal parts).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Calibration text for the similarities (.txt, JSONL, parquet or a datasets directory) "
                   "[default: the shipped demo text].")
@click.option("--tokens", default=api_default(api.upcycle, "tokens"), show_default=True, help="Calibration tokens.")
@click.option("--seed", default=api_default(api.upcycle, "seed"), show_default=True,
              help="Seed of the fused layers' router initialisation.")
@click.option("--force", is_flag=True, help="Replace --out even if it holds something else.")
def upcycle(dense, out_dir, runs, threshold, top_k, split, data, tokens, seed, force):
    """Dense2MoE: fuse runs of redundant layers of a DENSE model into MoE layers.

    Per layer, on calibration text: cosine similarity between its input and output hidden states, and
    between its MLP input and the previous layer's. In each run the first layer keeps its attention and its
    MLP (now an always-on shared expert); the later layers lose their attention (less compute, no KV cache)
    and their MLPs become routed experts (top-1 by default). The result is a stock Glm4MoeForCausalLM
    (transformers, llama.cpp's glm4moe) holding the Qwen3 attention exactly; distill it from DENSE with
    `edgeconv distill --teacher DENSE --student OUT`.

    \b
    Examples:
      edgeconv upcycle demo-dense --out upcycled/                  runs chosen at --threshold 0.9
      edgeconv upcycle demo-dense --runs 3-4 --split 4 --out up/   layer 4's MLP as 4 experts, top-1
    """
    result = api.upcycle(dense, out_dir, runs=runs, threshold=threshold, top_k=top_k, split=split, data=data,
                         tokens=tokens, seed=seed, force=force)
    p = result.plan
    verb = "up to date" if result.skipped else "wrote"
    fig = p["figures"]
    table = Table("layer", "in/out similarity", "MLP-input similarity", "fate")
    fate = {a: "attention removed, MLP -> expert" for a in p["removed_attention_layers"]}
    fate |= {r["first"]: "keeps attention, MLP -> shared expert" for r in p["runs"]}
    for i, (a, b) in enumerate(zip(fig["layer_similarity"], fig["mlp_input_similarity"], strict=False)):
        table.add_row(str(i), f"{a:.3f}", f"{b:.3f}" if i else "-", fate.get(i, "kept"))
    console.print(table)
    runs_text = ", ".join(p["fused_runs"]) or "none"
    console.print(f"{verb} {result.out}: {p['source_layers']} -> {p['layers']} layers (runs {runs_text}), "
                  f"{p['params'] / 1e6:,.2f} M params ({p['active_params'] / 1e6:,.2f} M active per token) "
                  f"from {p['source_params'] / 1e6:,.2f} M")


@main.command()
@no_wait_option
@click.argument("dense")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The pruned checkpoint (same architecture, smaller FFN and head counts).")
@click.option("--ffn-width", type=int, default=None, help="FFN channels kept per layer.")
@click.option("--params", "params", default=None,
              help="Instead of --ffn-width: the widest FFN (multiple of 8) with at most this many parameters "
                   "(e.g. 5640192 or 5.6M), or a checkpoint directory whose parameter count to match.")
@click.option("--kv-heads", type=int, default=None, help="Key/value heads kept per layer, with their query heads "
                                                          "[default: all].")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Calibration text for the importance pass (.txt, JSONL, parquet or a datasets directory) "
                   "[default: the shipped demo text].")
@click.option("--tokens", default=api_default(api.prune, "tokens"), show_default=True, help="Calibration tokens.")
@click.option("--force", is_flag=True, help="Replace --out even if it holds something else.")
def prune(dense, out_dir, ffn_width, params, kv_heads, data, tokens, force):
    """Width-prune a DENSE model (the study's dense-to-dense baseline), Minitron-style.

    FFN channels are ranked by mean |activation| and attention heads (whole key/value groups) by the
    mean L2 norm of their outputs on calibration text; each layer keeps its most important ones. The
    result is the source's stock architecture, ready for `edgeconv distill --teacher DENSE`.

    \b
    Example: the demo dense model pruned to the size of the default MoE-to-dense student
      edgeconv prune demo-dense --params student/ --out pruned/
    """
    result = api.prune(dense, out_dir, data=data, ffn_width=ffn_width, params=params, kv_heads=kv_heads,
                       tokens=tokens, force=force)
    s = result.manifest["summary"]
    verb = "up to date" if result.skipped else "wrote"
    console.print(f"{verb} {result.out}: {s['architecture']}, FFN {s['source_ffn_width']} -> {s['ffn_width']}, "
                  f"{s['attention_heads']} heads / {s['kv_heads']} kv, {s['params'] / 1e6:,.2f} M params "
                  f"from {s['source_params'] / 1e6:,.2f} M")


@main.command()
@no_wait_option
@click.argument("model", required=False, default=DEFAULT_MODEL)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Study directory (required): calibration, plans, prescreen.jsonl, final/, final.jsonl, sweep.md, "
                   "plots.")
@click.option("--data", type=click.Path(path_type=Path), default=SweepConfig.default("data"),
              help="Calibration text (.txt, JSONL, parquet or a datasets directory) [default: the shipped demo text].")
@click.option("--tokens", default=SweepConfig.default("tokens"), show_default=True,
              help="Calibration tokens (one calibration for all).")
@click.option("--scoring", default=SweepConfig.default("scoring"), show_default=True,
              help="'all' or a comma list (`edgeconv methods`).")
@click.option("--grouping", default=SweepConfig.default("grouping"), show_default=True, help="'all' or a comma list.")
@click.option("--scaling", default=SweepConfig.default("scaling"), show_default=True, help="'all' or a comma list.")
@click.option("--k", "ks", default=SweepConfig.default("k"), show_default=True,
              help="Comma list of K (experts selected per layer); auto: G, 2G, 4G, ... below the expert count.")
@click.option("--groups", type=int, default=SweepConfig.default("groups"),
              help="G, fixed over the grid (default: the router's top-k).")
@click.option("--seed", type=int, default=SweepConfig.default("seed"), show_default=True)
@click.option("--eval-data", type=click.Path(file_okay=False, path_type=Path), default=SweepConfig.default("eval_data"),
              help="Evaluation data [default: the shipped held-out set].")
@click.option("--prescreen-examples", default=SweepConfig.default("prescreen_examples"), show_default=True,
              help="Skill examples per variant before distillation (0: perplexity and multiple choice only; "
                   "undistilled students solve none).")
@click.option("--prescreen-choices", default=SweepConfig.default("prescreen_choices"), show_default=True,
              help="Multiple-choice items per variant.")
@click.option("--jobs", default=SweepConfig.default("jobs"), show_default=True,
              help="Variants assembled and evaluated in parallel.")
@click.option("--threads", type=int, default=SweepConfig.default("threads"),
              help="Torch threads per job [default: cores / jobs].")
@click.option("--distill-tokens", default=SweepConfig.default("distill_tokens"), show_default=True,
              help="Then distill the --top best variants and the paper's default on this budget (0: prescreen only).")
@click.option("--top", default=SweepConfig.default("top"), show_default=True,
              help="Distinct best prescreen variants (by perplexity) to distill.")
@click.option("--distill-data", type=click.Path(path_type=Path), default=SweepConfig.default("distill_data"),
              help="Distillation text (.txt, JSONL, parquet or a datasets directory) "
                   "[default: the shipped distillation text].")
@click.option("--distill-lr", type=float, default=SweepConfig.default("distill_lr"), show_default=True,
              help="Peak learning rate (as `edgeconv build`).")
@click.option("--dense", default=SweepConfig.default("dense"),
              help="A dense model to prune to the students' size and distill from itself with the same budget "
                   "(dense-to-dense baseline), e.g. demo-dense.")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=SweepConfig.default("results"),
              help="Also copy the tables, rows and plots here (e.g. benchmarks/results/study).")
@click.option("--keep", is_flag=True, default=SweepConfig.default("keep"),
              help="Keep every prescreen student (deleted after its evaluation by default).")
@config_file_options
@click.option("--no-progress", is_flag=True)
def sweep(no_progress, **params):
    """The paper's study: scoring x grouping x scaling x K, then distillation of the best, and a baseline.

    \b
    1. one calibration; every valid variant planned, assembled and evaluated undistilled (prescreen);
       variants that make the same plan (any grouping at K = G is pure pruning) are evaluated once
    2. with --distill-tokens: the --top best distinct variants and the paper's default (DO-ACP, pure
       pruning, CP scaling, K = G) distilled from the MoE with that budget and evaluated in full
    3. with --dense: that dense model width-pruned to the students' parameter count (Minitron-style
       activation importance of FFN channels and attention heads), distilled from itself with the same
       budget, evaluated; accuracy difference and distillation wall-clock ratio vs MoE-to-dense
    Every step resumes: rerun the same command after an interruption.

    \b
    Example (the committed study, benchmarks/results/study):
      edgeconv sweep demo-moe --out study/ --distill-tokens 262144 --distill-lr 1e-3 \\
          --dense demo-dense --results benchmarks/results/study
    """
    config = resolve_config(SweepConfig, params, required=("out",))
    _, written = api.sweep(params["model"], params["out_dir"], config, progress=not no_progress)
    out.print(written["markdown"])
    console.print(f"study: {', '.join(str(p) for p in written['files'])}")


@main.command(epilog="\b\nQuantizations (--quant), from edgeconv/quant.py:\n" + listing())
@no_wait_option
@click.argument("model", required=False, default=DEFAULT_MODEL)
@click.option("--format", "fmt", type=click.Choice(ExportConfig.choices("format")),
              default=ExportConfig.default("format"), show_default=True,
              help="gguf: llama.cpp / Ollama file. onnx: optimum-onnx directory for onnxruntime (teachers and "
                   "students). onnx-genai: onnxruntime-genai model builder directory (dense students).")
@click.option("--quant", default=ExportConfig.default("quant"),
              help="Quantization of the artifact (each type is listed below). " + describe())
@click.option("--precision", default=None, hidden=True,
              help="Deprecated: the old ONNX spelling of --quant (kept for scripts).")
@click.option("--execution-provider", "provider", type=click.Choice(ExportConfig.choices("execution_provider")),
              default=ExportConfig.default("execution_provider"), show_default=True,
              help="onnx-genai only: the execution provider the model is built for.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Output .gguf file (gguf) or directory (onnx, onnx-genai).")
@click.option("--tokenizer-pre", default=ExportConfig.default("tokenizer_pre"),
              help="llama.cpp pre-tokenizer name, if it cannot be detected.")
@click.option("--imatrix-data", type=click.Path(path_type=Path), default=ExportConfig.default("imatrix_data"),
              help="GGUF: calibration text (.txt, JSONL, parquet or a datasets directory) for an importance "
                   "matrix that guides llama.cpp's quantizer.")
@click.option("--imatrix-tokens", default=ExportConfig.default("imatrix_tokens"), show_default=True,
              help="Tokens of --imatrix-data to use.")
@click.option("--device", default=ExportConfig.default("device"), show_default=True,
              help="Where the torch reference of the parity check runs: " + DEVICE_HELP)
@click.option("--dtype", default=ExportConfig.default("dtype"), show_default=True,
              type=click.Choice(ExportConfig.choices("dtype")),
              help="Dtype of the torch reference (the tolerances assume float32; auto: bfloat16 on a GPU that has it).")
@layer_by_layer_option("the torch reference", default=ExportConfig.default("layer_by_layer"))
@click.option("--allow-yarn-drift", is_flag=True, default=ExportConfig.default("allow_yarn_drift"),
              help="GGUF of a model whose YaRN has truncate=false (every released GPT-OSS teacher, e.g. for bench "
                   "--teacher): write llama.cpp's truncated YaRN, check parity against torch running that, and "
                   "record the drift from the model as configured, per position, in parity.json and the card.")
@click.option("--parity-layers", type=click.IntRange(min=0), default=ExportConfig.default("parity_layers"),
              help="GGUF: check parity on the file cut to its first N layers (their exact bytes; torch runs the same "
                   "N), so a file larger than memory is checked in the memory of N layers; 0: the whole file. "
                   "[default: the whole file when it fits in memory, else the fewest layers holding every kind]")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def export(model, precision, out_path, force, **params):
    """Export a dense student or a MoE teacher to GGUF (llama.cpp) or ONNX, checked against torch first.

    The artifact is published only if its logits match the torch model's within the tolerance of its
    type (see the README's parity table). GGUF: NAME.parity.json, an Ollama NAME.Modelfile and a model card
    NAME.md are written beside it; the real per-tensor type mix is reported (k-quants silently fall back
    to other types for tensors whose input width is not a multiple of 256). ONNX: --out is a directory with
    model.onnx (KV cache inputs/outputs), config, tokenizer, parity.json, a model card README.md and
    manifest.json; with --format onnx-genai it also holds genai_config.json and runs in onnxruntime-genai as is.

    \b
    Examples:
      edgeconv export dense/ --format gguf --quant Q4_K_M --out dense-Q4_K_M.gguf
      edgeconv export dense/ --format onnx --quant int8 --out dense-onnx-int8/
      edgeconv export dense/ --format onnx-genai --quant int4 --execution-provider cpu --out dense-genai/
    """
    params["quant"] = _export_quant(params["fmt"], params["quant"], precision)
    config = resolve_config(ExportConfig, params)
    result = api.export(model, out_path, config, force=force)
    if config.format == "gguf":
        _print_gguf(result, config.quant)
    else:
        _print_onnx(result)
    if precision is not None:  # after the result: a refused run prints its one error line only
        console.print("[yellow]note:[/yellow] --precision is deprecated: spell it --quant")


def _export_quant(fmt: str, quant: str | None, precision: str | None) -> str:
    """--quant, or the deprecated --precision (ONNX only), or the format's default; checked against the table."""
    from edgeconv.quant import default_quant, get_quant

    if precision is not None:
        if fmt == "gguf":
            raise EdgeconvError("--precision is the old ONNX spelling of --quant",
                                "for GGUF use --quant, e.g. --quant Q8_0")
        if quant is not None and quant != precision:
            raise EdgeconvError(f"--quant {quant} and --precision {precision} disagree",
                                "--precision is the deprecated spelling of --quant: pass --quant alone")
        quant = precision
    return get_quant(fmt, quant or default_quant(fmt)).name


def _print_gguf(result, quant: str) -> None:
    p = result.parity
    console.print(f"wrote {result.path}: {result.info['architecture']} {quant}; types {result.type_mix}")
    outliers = (f", {p.positions_over_tolerance} of {p.positions} positions beyond tolerance (routing near-ties)"
                if p.positions_over_tolerance else "")
    console.print(f"parity vs torch: max |diff| {p.max_abs_diff:.3g} ({p.rel_diff:.2e} of the largest "
                  f"logit{outliers}), top-1 {p.top1_agreement:.1%}, perplexity ratio {p.ppl_ratio:.4f} - passed")
    if result.fallbacks:
        console.print(f"[yellow]warning:[/yellow] {len(result.fallbacks)} tensors are not k-quants "
                      f"(input width not a multiple of 256): {', '.join(result.fallbacks[:6])}...")


def _print_onnx(result) -> None:
    p = result.parity
    console.print(f"wrote {result.path}: {result.info['precision']}, "
                  f"{human_bytes(result.info['total_bytes'])} in {len(result.files)} files")
    outliers = (f", {p.positions_over_tolerance} of {p.positions} positions beyond tolerance (routing near-ties)"
                if p.positions_over_tolerance else "")
    console.print(f"parity vs torch: max |diff| {p.max_abs_diff:.3g} ({p.rel_diff:.2e} of the largest "
                  f"logit{outliers}), top-1 {p.top1_agreement:.1%}, perplexity ratio {p.ppl_ratio:.4f} - passed")


@main.command()
@no_wait_option
@click.option("--teacher", default=api_default(api.distill, "teacher"), show_default=True,
              help="The teacher: any causal LM, usually the MoE.")
@click.option("--student", required=True,
              help="The dense student (from `edgeconv convert`), sharing the teacher's tokenizer.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Training text: a .txt file, a JSONL file with a 'text' field, a parquet file with a 'text' "
                   "column, a datasets save_to_disk directory, or a directory of such files "
                   "[default: the shipped demo text, about 100k tokens]. Each token is used once.")
@click.option("--tokens", default=DistillConfig.default("tokens"), show_default=True,
              help="Token budget: tokens trained on.")
@click.option("--seq-len", default=DistillConfig.default("seq_len"), show_default=True,
              help="Tokens per packed sequence.")
@click.option("--batch-size", default=DistillConfig.default("batch_size"), show_default=True,
              help="Sequences per optimizer step, over all processes (the global batch).")
@click.option("--grad-accum", default=DistillConfig.default("grad_accum"), show_default=True,
              help="Micro-batches per optimizer step and process.")
@click.option("--lr", default=DistillConfig.default("lr"), show_default=True,
              help="Peak learning rate (AdamW, cosine decay to 10%).")
@click.option("--warmup", default=DistillConfig.default("warmup"), show_default=True,
              help="Linear warm-up, as a fraction of the steps.")
@click.option("--temperature", default=DistillConfig.default("temperature"), show_default=True,
              help="Softmax temperature of the KL (loss x T^2).")
@click.option("--ce-weight", default=DistillConfig.default("ce_weight"), show_default=True,
              help="Mix in cross-entropy on the data: loss = (1 - w) KL + w CE.")
@click.option("--mode", type=click.Choice(DistillConfig.choices("mode")), default=DistillConfig.default("mode"),
              show_default=True,
              help="online: run the teacher every step. offline: cache its top-k log-probs first, then train "
                   "without it.")
@click.option("--top-k", default=DistillConfig.default("top_k"), show_default=True,
              help="offline: teacher log-probs cached per token.")
@click.option("--teacher-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="offline: where the cache lives (kept after the run) [default: OUT.work/distill/teacher-cache, "
                   "removed after the run].")
@click.option("--cache-only", is_flag=True, help="offline: build the teacher cache and stop.")
@click.option("--cache-device", default=api_default(api.distill, "cache_device"), show_default=True,
              help="offline: where the teacher runs to fill the cache: auto (this process's accelerate device), "
                   "cpu, cuda or cuda:N.")
@click.option("--cache-dtype", default=api_default(api.distill, "cache_dtype"), show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="offline: the teacher's dtype for the cache (auto: what --precision gives).")
@layer_by_layer_option("the teacher for the offline cache", default=api_default(api.distill, "layer_by_layer"))
@click.option("--cache-chunk", type=click.IntRange(min=1), default=api_default(api.distill, "cache_chunk"),
              help="offline, layer by layer: sequences per pass over the teacher (each pass reads every layer once) "
                   "[default: as many as 2 GB of activations hold].")
@click.option("--checkpoint-every", default=DistillConfig.default("checkpoint_every"), show_default=True,
              help="Optimizer steps between checkpoints.")
@click.option("--precision", type=click.Choice(DistillConfig.choices("precision")),
              default=DistillConfig.default("precision"), show_default=True,
              help="auto: bf16 autocast on GPUs that have it, fp32 on CPU.")
@click.option("--lora-rank", type=click.IntRange(min=0), default=DistillConfig.default("lora_rank"),
              show_default=True,
              help="0: train every weight (AdamW: ~16 bytes per parameter). R: freeze the student and train rank-R "
                   "LoRA adapters on its linear layers, merged into the weights at the end: for a student whose "
                   "AdamW state does not fit (a 3 B student needs ~48 GB; frozen, 12 GB).")
@click.option("--lora-alpha", type=float, default=DistillConfig.default("lora_alpha"),
              help="LoRA scale numerator: adapter output x alpha / R [default: 2 x rank].")
@click.option("--gradient-checkpointing", is_flag=True, default=DistillConfig.default("gradient_checkpointing"),
              help="Keep only each decoder layer's input and recompute the rest in the backward pass: activation "
                   "memory about one layer's instead of every layer's, for one more forward per step.")
@click.option("--seed", type=int, default=DistillConfig.default("seed"), show_default=True,
              help="Seed of the data order.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory for the distilled student. Checkpoints go to OUT.work/distill/.")
@click.option("--force", is_flag=True, help="Replace --out, and discard another run's checkpoints or cache.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def distill(teacher, student, data, teacher_cache, cache_only, cache_device, cache_dtype, layer_by_layer, cache_chunk,
            out_dir, force, no_progress, **params):
    """Distill a dense student from its teacher: forward KL on next-token distributions, the whole student trained
    (or, with --lora-rank, LoRA adapters on its frozen weights, merged at the end).

    AdamW with warm-up and cosine decay over packed sequences; the result is a stock transformers checkpoint
    in --out, with metrics.jsonl (one line per step), loss.png and manifest.json. Checkpoints are written every
    --checkpoint-every steps: rerunning an interrupted command resumes where it stopped and ends with the
    same weights; rerunning a finished one does nothing. The same command runs on several processes under
    `torchrun` (CPUs or GPUs) or `accelerate launch --multi_gpu` (DDP; FSDP with an accelerate config, see
    edgeconv/training/fsdp_accelerate_config.yaml); the loss is the one-process loss.

    \b
    Examples:
      edgeconv distill --student dense/ --data train.jsonl --tokens 2000000 --out distilled/
      edgeconv distill --teacher moe/ --student dense/ --data text/ --tokens 5000000 --mode offline \\
          --top-k 64 --temperature 2 --out distilled/
      torchrun --nproc_per_node 4 -m edgeconv.cli distill --teacher moe/ --student dense/ \\
          --data text/ --tokens 50000000 --batch-size 32 --out distilled/
      edgeconv distill --teacher moe/ --student dense/ --mode offline --lora-rank 16 --grad-accum 4 \\
          --out distilled/   # a student too large for AdamW in this machine's memory
    """
    config = resolve_config(DistillConfig, params)
    result = api.distill(student, out_dir, config, teacher=teacher, data=data, teacher_cache=teacher_cache,
                         cache_only=cache_only, cache_device=cache_device, cache_dtype=cache_dtype,
                         layer_by_layer=layer_by_layer, cache_chunk=cache_chunk, force=force,
                         progress=not no_progress)
    if not _is_main_process():
        return
    if result.cache:
        c = result.cache
        console.print(f"teacher cache: {human_bytes(c['bytes'])}, {c['bytes_per_token']} bytes per token "
                      f"(top-{c['spec']['top_k']} at T={c['spec']['temperature']:g})")
    if cache_only:
        return
    s = result.manifest["summary"]
    verb = "up to date" if result.skipped else "wrote"
    console.print(f"{verb} {result.out}: {s['tokens']:,} tokens in {s['steps']} steps ({s['mode']}, "
                  f"{s['processes']} process(es), {s['precision']}), loss {s['first_loss']:.4f} -> "
                  f"{s['final_loss']:.4f}, {s['train_tokens_per_second']:,.0f} tokens/s")


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


@main.command("eval")
@click.argument("model", required=False, default=DEFAULT_MODEL)
@click.option("--runtime", type=click.Choice(["auto", "torch", "gguf", "onnx", "onnx-genai"]),
              default=api_default(api.evaluate, "runtime"), show_default=True,
              help="auto: from MODEL (a .gguf file, an ONNX directory, an HF checkpoint).")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Evaluation data directory (text, skills and choice JSONL) [default: the shipped held-out set].")
@click.option("--tokens", default=api_default(api.evaluate, "tokens"), show_default=True,
              help="Tokens scored per corpus for perplexity.")
@click.option("--window", default=api_default(api.evaluate, "window"), show_default=True,
              help="Perplexity window (tokens of context at most).")
@click.option("--examples", default=api_default(api.evaluate, "examples"), show_default=True,
              help="Examples per skill (exact match); 0 skips the skills.")
@click.option("--choices", default=api_default(api.evaluate, "choices"), show_default=True,
              help="Multiple-choice items, spread over the corpora.")
@click.option("--threads", type=int, default=api_default(api.evaluate, "threads"), help="CPU threads [default: all].")
@click.option("--device", default=api_default(api.evaluate, "device"), show_default=True,
              help="torch runtime: where the model runs: " + DEVICE_HELP)
@click.option("--dtype", default=api_default(api.evaluate, "dtype"), show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="torch runtime: compute dtype (auto: bfloat16 on a GPU that has it, else float32).")
@layer_by_layer_option("the torch model", "Layer by layer, each part of the suite is one batch (one pass over the "
                       "model) and greedy skills cost one pass per generated token.",
                       default=api_default(api.evaluate, "layer_by_layer"))
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--lm-eval-tasks", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write lm-eval task YAMLs over the same data into this directory, and stop.")
@click.option("--lm-eval", "lm_eval_names", metavar="TASKS", default=None,
              help="Run lm-evaluation-harness instead: task names, tags or globs, comma separated (`edgeconv`: "
                   "edgeconv's tasks over --data). A checkpoint runs in lm-eval's hf model (CPU, float32 unless "
                   "--device/--dtype), a .gguf in edgeconv's llama-cpp-python model.")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="--lm-eval: a directory of task YAMLs [default: edgeconv's tasks written over --data to a "
                   "temporary directory]; names not there come from lm-eval's own tasks.")
@click.option("--limit", type=float, default=None, help="--lm-eval: at most this many documents per task.")
@click.option("--no-progress", is_flag=True)
def eval_(model, runtime, data, tokens, window, examples, choices, threads, device, dtype, layer_by_layer, out_path,
          as_json, lm_eval_tasks, lm_eval_names, include_path, limit, no_progress):
    """Held-out perplexity per corpus, exact match per skill and multiple-choice accuracy, on torch, GGUF
    (llama-cpp-python) or ONNX (onnxruntime, onnxruntime-genai).

    Every runtime tokenizes with its own tokenizer and is scored on the same data, so the numbers of a
    checkpoint and of its exports compare directly.

    \b
    Examples:
      edgeconv eval                                  the shipped demo teacher in torch
      edgeconv eval dense/ --out dense.eval.json
      edgeconv eval dense-F16.gguf
      edgeconv eval --lm-eval-tasks tasks/ && lm_eval --model hf --model_args pretrained=dense/ \\
          --include_path tasks/ --tasks edgeconv
      edgeconv eval dense-F32.gguf --lm-eval edgeconv   the same tasks through lm-eval, in llama.cpp
    """
    from edgeconv.demo import EVAL_DATA

    data = data or EVAL_DATA
    if lm_eval_tasks is not None:
        from edgeconv.evaluation.lm_eval_tasks import write_lm_eval_tasks

        names = write_lm_eval_tasks(lm_eval_tasks, data)
        console.print(f"wrote {len(names)} lm-eval tasks (tag `edgeconv`) to {lm_eval_tasks}: {', '.join(names)}")
        return
    if lm_eval_names is not None:
        from edgeconv.evaluation.lm_eval_run import results_table

        limit = int(limit) if limit is not None and limit >= 1 else limit
        res = api.lm_evaluate(model, lm_eval_names, include_path=include_path, data=data, runtime=runtime,
                              limit=limit, threads=threads, device="cpu" if device == "auto" else device,
                              dtype="float32" if dtype == "auto" else dtype)
        text = json.dumps(res["results"], indent=1, default=str)
        if out_path:
            out_path.write_text(text)
        if as_json:
            out.print_json(text)
        else:
            out.print(results_table(res["results"]))
        return
    from edgeconv.evaluation.suite import summary_table

    report = api.evaluate(model, data=data, runtime=runtime, tokens=tokens, window=window, examples=examples,
                          choices=choices, threads=threads, device=device, dtype=dtype,
                          layer_by_layer=layer_by_layer, progress=not no_progress)
    if out_path:
        out_path.write_text(report.model_dump_json(indent=1))
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        out.print(summary_table([(f"{Path(model).name} ({report.runtime})", report)]))
        console.print(f"{report.seconds:.0f} s")



@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def targets(as_json):
    """The device profiles `build --target` knows (TOML files in targets/).

    --target also takes the path of your own .toml with the same fields.
    """
    from edgeconv.device.profiles import ALIASES, all_targets

    profiles = all_targets()
    if as_json:
        out.print_json(json.dumps([p.model_dump() for p in profiles]))
        return
    rows = [("target", "memory (usable/total)", "bandwidth", "formats", "on", "quant", "context", "threads")]
    for p in profiles:
        rows.append((p.name, f"{p.usable_memory_gb:g} / {p.memory_gb:g} GB", f"{p.bandwidth_gb_s:g} GB/s",
                     ",".join(p.formats), p.accelerator, p.quant, str(p.context), str(p.threads)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)).rstrip())
    click.echo("aliases: " + ", ".join(f"{a} = {t}" for a, t in sorted(ALIASES.items())))
    click.echo("descriptions and benchmark commands: edgeconv targets --json")


@main.command()
@no_wait_option
@click.argument("model", required=False, default=DEFAULT_MODEL)
@click.option("--target", "-t", default=None,
              help="Device profile (see `edgeconv targets`), alias, or a .toml file (required).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Bundle directory [default: dist/<model>-<target>]; stages work in OUT.work/.")
@click.option("--format", "fmt", type=click.Choice(BuildConfig.choices("format")),
              default=BuildConfig.default("format"), help="Artifact format [default: the target's first].")
@click.option("--quant", default=BuildConfig.default("quant"),
              help="Quantization [default: the target's]. " + describe(BUILD_FORMATS, defaults=False))
@click.option("--groups", type=int, default=BuildConfig.default("groups"),
              help="Expert groups per layer = FFN width [default: the router's top-k].")
@click.option("--context", type=int, default=BuildConfig.default("context"),
              help="Context to reserve KV cache for [default: the target's].")
@click.option("--data", type=click.Path(path_type=Path), default=BuildConfig.default("data"),
              help="Calibration text (.txt, JSONL, parquet or a datasets directory) [default: the shipped demo text].")
@click.option("--calibration-tokens", default=BuildConfig.default("calibration_tokens"), show_default=True)
@click.option("--distill-tokens", type=int, default=BuildConfig.default("distill_tokens"), show_default=True,
              help="Distillation budget in tokens; 0 skips distillation.")
@click.option("--distill-data", type=click.Path(path_type=Path), default=BuildConfig.default("distill_data"),
              help="Distillation text (.txt, JSONL, parquet or a datasets directory) "
                   "[default: the shipped text for the demo teacher, else --data].")
@click.option("--distill-lr", type=float, default=BuildConfig.default("distill_lr"), show_default=True)
@click.option("--distill-mode", type=click.Choice(BuildConfig.choices("distill_mode")),
              default=BuildConfig.default("distill_mode"), show_default=True,
              help="online: the whole teacher runs beside the student every step. offline: the teacher's top-64 "
                   "log-probs are cached on disk first (OUT.work), then the student trains alone.")
@click.option("--distill-lora-rank", type=click.IntRange(min=0), default=BuildConfig.default("distill_lora_rank"),
              show_default=True, help=LORA_HELP)
@click.option("--eval-data", type=click.Path(file_okay=False, path_type=Path), default=BuildConfig.default("eval_data"),
              help="Evaluation data bundled for bench.py [default: the shipped held-out set].")
@click.option("--threads", type=int, default=BuildConfig.default("threads"),
              help="Threads of the benchmark run here [default: all].")
@click.option("--bench/--no-bench", default=BuildConfig.default("bench"), show_default=True,
              help="Run bench.py here after bundling.")
@click.option("--dry-run", is_flag=True, help="Print the plan (stages, sizes, memory on the target and on this "
              "host, disk, rough time) and stop.")
@click.option("--measure/--no-measure", default=BuildConfig.default("measure"), show_default=True,
              help="Time one layer here (a few seconds) for the plan's time estimates.")
@config_file_options
@click.option("--force", is_flag=True, help="Redo every stage and replace OUT.")
@click.option("--no-progress", is_flag=True)
def build(dry_run, force, no_progress, **params):
    """Everything for one device: convert -> distill -> export -> parity -> bundle -> bench here.

    The plan comes first, from config.json alone: if the student (weights + KV cache at the target's
    context + runtime buffers) cannot fit the target's usable memory, the build stops before any
    heavy work and names the largest configuration that fits. Each stage is skipped when already done.

    \b
    Examples:
      edgeconv build --target laptop                 the shipped demo teacher, a few minutes
      edgeconv build Qwen/Qwen3-30B-A3B --target jetson --dry-run
      edgeconv build my-moe/ --target phone --distill-tokens 0 --out dist/phone
    Then copy the bundle to the device and run its bench.py (see its README.md).
    """
    from edgeconv.pipelines.build import headline

    config = resolve_config(BuildConfig, params, required=("target",))
    plan = api.build_plan(params["model"], params["out_dir"], config)
    console.print(plan.render())
    if dry_run:
        return
    result = api.build(params["model"], params["out_dir"], config, plan=plan, force=force, progress=not no_progress)
    out.print(headline(result))



@main.command("bench")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--teacher", "with_teacher", is_flag=True,
              help="Also measure the MoE teacher, exported to GGUF at the same quantization, with the same runner.")
@click.option("--teacher-model", default=None, help="The teacher to compare with [default: the bundle's].")
@click.option("--threads", type=int, default=None, help="Runtime threads [default: the bundle's, else all cores].")
@click.option("--quick", is_flag=True, help="Fewer evaluation items and repeats (about a minute on the demo).")
@click.option("--eval-data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Evaluation data [default: the bundle's eval/, else the shipped held-out set].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"),
              show_default=True, help="Where results-*.json (and comparison.json) go.")
@click.option("--expect-sha256", default=None, metavar="HASH",
              help="The sha256 of the bundle's manifest.json that `edgeconv build` printed: refuse a bundle whose "
                   "manifest was rewritten (e.g. one back from a device).")
@click.option("--adb", "adb_serial", is_flag=False, flag_value="", default=None, metavar="[SERIAL]",
              help="Run llama.cpp's llama-bench on an Android phone over adb (the one connected, or SERIAL) instead: "
                   "pushes the model, eval text and --llama-bench to /data/local/tmp/edgeconv/, pulls the JSON "
                   "into OUT/android-SERIAL/ and reports it. Put it after BUNDLE.")
@click.option("--llama-bench", "llama_bench", type=click.Path(exists=True, path_type=Path), default=None,
              help="--adb: the Android build of llama-bench, or its install directory (bin/, lib/); llama-perplexity "
                   "next to it runs too.")
def bench_(path, with_teacher, teacher_model, threads, quick, eval_data, out_dir, expect_sha256, adb_serial,
           llama_bench):
    """Run a bundle's bench.py here (or the same runner on a .gguf / onnx-genai artifact).

    A bundle is checked first, here, before anything of it runs: every file's size and sha256 against
    manifest.json, bench.py included. That catches damage and partial edits, not someone who rewrote
    manifest.json too: for that, pass --expect-sha256 with the hash `edgeconv build` printed.

    It measures load time, peak RSS, time to first token, prefill and decode tokens/s at several prompt
    lengths, and accuracy on the evaluation data, in a separate process. With --teacher the MoE teacher
    runs next, so student and teacher are compared on one machine in one run.

    \b
    Examples:
      edgeconv bench dist/demo-moe-laptop --teacher
      edgeconv bench dist/demo-moe-laptop --expect-sha256 HASH
      edgeconv bench model-Q4_K_M.gguf --threads 4
      edgeconv bench dist/demo-moe-android --adb --llama-bench install-android/
    """
    if adb_serial is not None or llama_bench is not None:
        if adb_serial is None or llama_bench is None or with_teacher or teacher_model or eval_data:
            raise EdgeconvError("--adb and --llama-bench go together, without --teacher or --eval-data",
                                "edgeconv bench BUNDLE --adb [SERIAL] --llama-bench ANDROID_LLAMA_BENCH")
        from edgeconv.device.adb import bench_android

        done = bench_android(path, llama_bench, out_dir, serial=adb_serial or None, threads=threads, quick=quick,
                             expect_sha256=expect_sha256)
        for line in done["summary"]:
            click.echo(f"  {line}")
        console.print(f"results in {done['dir']}/ (report: {done['report']})")
        return
    from edgeconv.device.local_bench import bench, comparison_rows

    results = bench(path, out_dir, teacher=teacher_model, with_teacher=with_teacher or bool(teacher_model),
                    threads=threads, quick=quick, eval_data=eval_data, expect_sha256=expect_sha256)
    rows = [("", "student", "teacher" if "teacher" in results else "", "ratio" if "teacher" in results else "")]
    rows += comparison_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        cells = enumerate(zip(r, widths, strict=False))
        click.echo("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in cells).rstrip())
    d = results["student"].get("device", {})
    console.print(f"on {d.get('cpu') or d.get('processor') or d.get('machine', 'this machine')}; "
                  f"results in {out_dir}/ (edgeconv report {out_dir}/*.json --out report/)")


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for report.md and the PNG plots.")
def report(results, out_dir):
    """Tables and plots from bench.py's results*.json (from devices, or `edgeconv bench`).

    Writes report.md (one row per result, teacher vs student ratios) and PNGs: accuracy vs memory,
    decode tokens/s vs memory, teacher vs student, one per target.
    """
    from edgeconv.reporting import report as run

    result = run(list(results), out_dir)
    console.print(f"report: {out_dir / 'report.md'}")
    for png in getattr(result, "plots", []) or []:
        console.print(f"  {png}")


if __name__ == "__main__":
    main()
