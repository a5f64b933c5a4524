"""`edgeconv inspect`: what a MoE checkpoint is, counted from the safetensors headers alone."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeconv.families import family_for
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import dense_width, output_layout


@dataclass
class ModelInfo:
    path: str
    architecture: str
    dense_architecture: str
    num_layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    expert_width: int
    shared_width: int
    expert_layout: str
    total_params: int
    active_params: int
    default_dense_width: int
    default_dense_params: int
    checkpoint_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def inspect_model(model: str | Path) -> ModelInfo:
    ckpt = Checkpoint.open(model)
    family = family_for(ckpt.config, str(ckpt.path))
    total = sum(info.numel for shard in ckpt.shards for info in shard.tensors.values())
    n_moe = len(family.moe_layers())
    per_expert = family.expert_params(ckpt)
    inactive = n_moe * (family.num_experts - family.top_k) * per_expert
    width = dense_width(family, simple_plan(family))
    # Exact: the shapes the assembler would write for the default plan, from the headers alone.
    dense_params = sum(math.prod(spec.shape) for _, _, specs in output_layout(ckpt, family, width) for spec in specs)
    first = family.moe_layers()[0]
    return ModelInfo(
        path=str(ckpt.path),
        architecture=family.moe_architecture,
        dense_architecture=family.dense_architecture,
        num_layers=family.num_layers,
        moe_layers=n_moe,
        num_experts=family.num_experts,
        top_k=family.top_k,
        expert_width=family.expert_width,
        shared_width=family.shared_width,
        expert_layout=type(family.layout(ckpt, first)).__name__,
        total_params=total,
        active_params=total - inactive,
        default_dense_width=width,
        default_dense_params=dense_params,
        checkpoint_bytes=ckpt.total_bytes,
    )
