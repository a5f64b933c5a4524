"""The `edgeconv` command: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from edgeconv import __version__
from edgeconv.errors import EdgeconvError

console = Console(stderr=True, soft_wrap=True)
out = Console()


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise EdgeconvError(f"size {text!r} is not understood", "use a byte count or e.g. 500MB, 2GB")


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:,.2f} TB"


class EdgeconvGroup(click.Group):
    """Turns EdgeconvError into one line on stderr and exit status 2, wherever it is raised."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeconvError as exc:
            click.echo(f"error: {exc.line()}", err=True)
            sys.exit(2)


@click.group(cls=EdgeconvGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgeconv")
def main():
    """Turn a Mixture-of-Experts LLM into a small dense model for the edge.

    \b
    Typical flow:
      edgeconv inspect MODEL                      what the MoE is, what the default plan makes
      edgeconv plan MODEL --out plan.json         which experts go into the dense FFN
      edgeconv assemble MODEL --plan plan.json --out dense/
    MODEL is a local checkpoint directory (config.json + *.safetensors) or a hub id.
    """


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def inspect(model, as_json):
    """Describe a MoE checkpoint: family, layers, experts, top-k, total vs active parameters.

    Reads only config.json and the safetensors headers, so it is instant even on huge models.
    """
    from edgeconv.model_info import inspect_model

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


@main.command()
@click.argument("model")
@click.option("--experts", default=None, metavar="SPEC",
              help="first:K | random:K[:SEED] | ids:A,B,.. (or ids:A,B|C,D per MoE layer). Default: first:TOP_K.")
@click.option("--scaling", default="uniform", show_default=True, metavar="uniform|NUMBER",
              help="Output scale of each kept expert: uniform = 1/K, or a constant.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the plan JSON.")
def plan(model, experts, scaling, out_path):
    """Make a dense plan without calibration (pure pruning: each kept expert is its own group)."""
    from edgeconv.families import family_for
    from edgeconv.io.checkpoint import Checkpoint
    from edgeconv.simple_planner import simple_plan

    ckpt = Checkpoint.open(model)
    family = family_for(ckpt.config, str(ckpt.path))
    result = simple_plan(family, experts, scaling, ckpt.fingerprint, str(ckpt.path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result.save(out_path)
    console.print(f"plan: {len(result.layers)} MoE layers, dense FFN width {result.dense_width} -> {out_path}")


@main.command()
@click.argument("model")
@click.option("--plan", "plan_path", required=True, type=click.Path(path_type=Path), help="Plan JSON from `edgeconv plan`.")
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


if __name__ == "__main__":
    main()
