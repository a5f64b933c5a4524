"""Assemble: MoE checkpoint + plan -> stock dense checkpoint, streamed one layer at a time.

Memory holds the tensors of one layer (the selected experts, in fp32 while they are merged) and one output
tensor at a time: output shapes are known from the plan, so shard headers are written first and tensors
streamed into them. The output is built in a hidden temp directory and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import torch

from edgeconv.families import family_for
from edgeconv.families.base import MoEFamily
from edgeconv.families.ffn import MAX_ALIGN_WIDTH, Ffn, concat, weighted_average
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded
from edgeconv.io.safetensors_writer import ShardedWriter, TensorSpec
from edgeconv.planning.plan import LayerPlan, Plan, check_plan_fits
from edgeconv.progress import byte_progress
from edgeconv.reporting.model_card import write_checkpoint_card
from edgeconv.stages.stage import Identity, StageBase, StageResult, run_stage

STAGE = "assemble"
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def _layer_of(name: str) -> int | None:
    m = LAYER_NAME.match(name)
    return int(m.group(1)) if m else None


def dense_width(family: MoEFamily, plan: Plan) -> int:
    """One width for every layer (the dense config has one intermediate_size): the widest layer's."""
    widths = [lp.width for lp in plan.layers]
    if len(family.moe_layers()) < family.num_layers:
        widths.append(family.dense_layer_width)
    return max(widths)


def layer_ffn(ckpt: Checkpoint, family: MoEFamily, layer: int, lp: LayerPlan | None, width: int,
              align: bool = True) -> Ffn:
    """The dense FFN of one layer: merged, scaled groups (+ shared expert), zero-padded to `width`.

    Merging averages in fp32 and rounds once; a single-expert group is only scaled, in its own dtype
    (torch multiplies bf16 in fp32 and rounds once, so the result is the same, without the copies).
    """
    if lp is None:  # a layer that is dense in the source already
        return concat([family.read_dense_mlp(ckpt, layer)], width)
    blocks = []
    for group in lp.groups:
        scale = group.scale * family.routed_scale()
        if len(group.experts) == 1:
            blocks.append(family.read_expert(ckpt, layer, group.experts[0]).scaled(scale))
            continue
        experts = [family.read_expert(ckpt, layer, e) for e in group.experts]
        dtype = experts[0].gate.dtype
        aligned = align and family.expert_width <= MAX_ALIGN_WIDTH
        merged = weighted_average([x.float() for x in experts], group.weights, aligned).scaled(scale)
        blocks.append(Ffn(*(t.to(dtype) if t is not None else None for t in merged._parts())))
        del experts, merged
    shared = family.read_shared(ckpt, layer)
    if shared is not None:
        scale = lp.shared_scale if lp.shared_scale is not None else family.default_shared_scale()
        blocks.append(shared.scaled(scale))
    return concat(blocks, width)


def _ffn_specs(family: MoEFamily, layer: int, width: int, dtype: torch.dtype) -> list[TensorSpec]:
    """Names and shapes of a dense FFN, found by running the adapter on weightless (meta) tensors."""
    hidden = family.hidden_size

    def meta(*shape):
        return torch.empty(*shape, dtype=dtype, device="meta")

    bias = family.has_ffn_bias
    ffn = Ffn(meta(width, hidden), meta(width, hidden), meta(hidden, width),
              *(meta(width), meta(width), meta(hidden)) if bias else ())
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in family.dense_ffn_tensors(layer, ffn).items()]


def output_layout(ckpt: Checkpoint, family: MoEFamily, width: int):
    """Every output tensor, in write order: per layer its copied tensors, its FFN, its zero tensors."""
    ffn_dtype = family.layout(ckpt, family.moe_layers()[0]).dtype(ckpt, family.prefix(family.moe_layers()[0]))
    zeros = family.zero_tensors(ckpt)
    zero_dtype = ckpt.info(next(n for n in ckpt.names() if _layer_of(n) is not None)).dtype
    by_layer: dict[int | None, list[str]] = {}
    for name in sorted(ckpt.names()):
        layer = _layer_of(name)
        if layer is not None and family.owns(name, layer):
            continue
        by_layer.setdefault(layer, []).append(name)
    for name in zeros:
        by_layer.setdefault(_layer_of(name), [])
    steps = []  # (kind, layer, specs)
    for name in by_layer.get(None, []):
        info = ckpt.info(name)
        steps.append(("copy", None, [TensorSpec(name, info.shape, info.dtype)]))
    for layer in range(family.num_layers):
        for name in by_layer.get(layer, []):
            info = ckpt.info(name)
            steps.append(("copy", layer, [TensorSpec(name, info.shape, info.dtype)]))
        steps.append(("ffn", layer, _ffn_specs(family, layer, width, ffn_dtype)))
        for name, shape in zeros.items():
            if _layer_of(name) == layer:
                steps.append(("zero", layer, [TensorSpec(name, tuple(shape), zero_dtype)]))
    return steps


class AssembleStage(StageBase):
    """MoE checkpoint + plan (a Plan, or the path of its JSON, read when the stage is reached) -> dense checkpoint."""

    name = STAGE

    def __init__(self, model: str | Path, plan: Plan | str | Path, out: str | Path, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True):
        self.model, self.plan, self.out = model, plan, Path(out)
        self.max_shard_bytes, self.progress = max_shard_bytes, progress

    def describe(self) -> str:
        return "the dense student, streamed one layer at a time from the teacher's files and the plan"

    def identity(self) -> Identity:
        ckpt = self.ckpt = Checkpoint.open(self.model)
        family = self.family = family_for(ckpt.config, str(ckpt.path))
        family.check_checkpoint(ckpt)
        plan = self.plan = self.plan if isinstance(self.plan, Plan) else Plan.load(Path(self.plan))
        check_plan_fits(plan, family, str(ckpt.path), ckpt.fingerprint)
        self.plan_json = plan.model_dump_json(indent=2) + "\n"
        inputs = {
            "model": str(ckpt.path),
            "model_fingerprint": ckpt.fingerprint,
            "plan_sha256": hashlib.sha256(self.plan_json.encode()).hexdigest(),
        }
        options = {"max_shard_bytes": self.max_shard_bytes}
        return Identity({k: v for k, v in inputs.items() if k != "model"}, options, inputs)

    def run(self, tmp: Path) -> dict:
        ckpt, family, plan = self.ckpt, self.family, self.plan
        width = dense_width(family, plan)
        steps = output_layout(ckpt, family, width)
        specs = [spec for _, _, group in steps for spec in group]
        plans_by_layer = {lp.layer: lp for lp in plan.layers}
        writer = ShardedWriter(tmp, specs, self.max_shard_bytes)
        try:
            with byte_progress(self.progress) as bar:
                task = bar.add_task("assemble", total=writer.total_bytes)
                for kind, layer, group in steps:
                    if kind == "copy":
                        tensors = {group[0].name: ckpt.read(group[0].name)}
                    elif kind == "zero":
                        tensors = {group[0].name: torch.zeros(group[0].shape, dtype=group[0].dtype)}
                    else:
                        ffn = layer_ffn(ckpt, family, layer, plans_by_layer.get(layer), width,
                                        plan.alignment == "weight-matching")
                        tensors = family.dense_ffn_tensors(layer, ffn)
                        del ffn
                    for spec in group:
                        writer.write(spec.name, tensors[spec.name])
                        bar.advance(task, spec.nbytes)
                    del tensors
            hashes = writer.close()
        finally:
            writer.abort()
            ckpt.close()
        # The shards were hashed as they were written: the runner hashes only the rest.
        self.known_files = {name: {"sha256": digest, "bytes": (tmp / name).stat().st_size}
                            for name, digest in hashes.items()}
        (tmp / "config.json").write_text(json.dumps(family.dense_config(width), indent=2) + "\n")
        (tmp / "plan.json").write_text(self.plan_json)
        for src in ckpt.sidecar_files():
            shutil.copyfile(src, tmp / src.name)
        summary = _summary(ckpt, family, plan, width, specs)
        # The model card (README.md): the teacher as base model, its license, the plan and its calibration.
        write_checkpoint_card(tmp, {"stage": STAGE, "inputs": {"model": str(ckpt.path)}, "summary": summary},
                              name=self.out.name)
        return summary


@guarded("out", "model", "plan")
def assemble(
    model: str | Path,
    plan: Plan | str | Path,
    out: str | Path,
    *,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> StageResult:
    """`edgeconv assemble`: the assemble stage on its own (see AssembleStage)."""
    return run_stage(AssembleStage(model, plan, out, max_shard_bytes=max_shard_bytes, progress=progress), force=force)


def _summary(ckpt: Checkpoint, family: MoEFamily, plan: Plan, width: int, specs: list[TensorSpec]) -> dict:
    dense_params = sum(math.prod(s.shape) for s in specs)
    source_params = sum(info.numel for shard in ckpt.shards for info in shard.tensors.values())
    used = sum(lp.width for lp in plan.layers) + family.dense_layer_width * (family.num_layers - len(plan.layers))
    padded = width * family.num_layers - used
    return {
        "source_architecture": family.moe_architecture,
        "dense_architecture": family.dense_architecture,
        "dense_width": width,
        "experts_per_layer": {str(lp.layer): lp.experts for lp in plan.layers},
        "source_params": source_params,
        "dense_params": dense_params,
        "zero_padded_neurons": padded,
        "merged_groups": sum(len(g.experts) > 1 for lp in plan.layers for g in lp.groups),
        "alignment": plan.alignment if family.expert_width <= MAX_ALIGN_WIDTH else "none (experts too wide)",
    }
