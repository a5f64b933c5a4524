"""The dense plan: per MoE layer, which experts form which groups, how they merge, how each group is scaled.

A plan is versioned, human-readable JSON (see `Plan`), validated on load and checked against the model it
is applied to, so a plan made for another model fails before any weight is read.

Semantics of one layer: the dense FFN is the concatenation, along the neuron axis, of one block per group
plus the shared expert (if the family has one). A group's block is the parameter average of its experts
(gate, up and down averaged with `weights`, which sum to 1), with its output multiplied by `scale`.
Before averaging, with `alignment: weight-matching` (the default), each expert's neurons are permuted to
best match the group's first (most frequent) expert, since neuron i of two experts need not compute
anything alike (see `families.ffn.align_to`); experts wider than `MAX_ALIGN_WIDTH` are averaged as stored.
The family adapter multiplies in constants the router itself applies (DeepSeek's routed_scaling_factor);
`shared_scale` replaces a shared expert's gate (Qwen2-MoE) with a constant, null meaning the family default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from edgeconv.errors import EdgeconvError

PLAN_FORMAT = "edgeconv-plan"
PLAN_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Numbers are strict: pydantic's lax mode reads JSON `true` as the expert id 1 (and as the scale 1.0), so a
# hand-edited plan holding a boolean would silently pick an expert. Strict ints refuse booleans, floats and
# strings; strict floats refuse booleans and strings but take integers (a scale of 1).


def _check_scale(value: float | None, what: str) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value}")


class Group(_Strict):
    experts: list[StrictInt] = Field(min_length=1)
    weights: list[StrictFloat]
    scale: StrictFloat

    @model_validator(mode="after")
    def _check(self) -> Group:
        if len(self.weights) != len(self.experts):
            raise ValueError(f"group {self.experts} has {len(self.weights)} weights for {len(self.experts)} experts")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"group {self.experts}: merge weights must be finite, got {self.weights}")
        if any(w < 0 for w in self.weights) or not math.isclose(sum(self.weights), 1.0, rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(f"group {self.experts}: merge weights must be >= 0 and sum to 1, got {self.weights}")
        _check_scale(self.scale, f"group {self.experts}: scale")
        return self


class LayerPlan(_Strict):
    layer: StrictInt = Field(ge=0)
    groups: list[Group] = Field(min_length=1)
    shared_scale: StrictFloat | None = None
    width: StrictInt = Field(gt=0, description="dense FFN width of this layer, shared expert included")
    scores: dict[str, list[float]] | None = Field(default=None, description="per-expert scores, if a scorer ran")

    @model_validator(mode="after")
    def _check(self) -> LayerPlan:
        _check_scale(self.shared_scale, f"layer {self.layer}: shared_scale")
        return self

    @property
    def experts(self) -> list[int]:
        return [e for g in self.groups for e in g.experts]


class ModelRef(_Strict):
    architecture: str
    num_layers: StrictInt
    num_experts: StrictInt
    top_k: StrictInt
    expert_width: StrictInt
    shared_width: StrictInt = 0
    moe_layers: list[StrictInt]
    fingerprint: str | None = None
    path: str | None = None


class Plan(_Strict):
    format: Literal["edgeconv-plan"] = PLAN_FORMAT
    version: Literal[1] = PLAN_VERSION
    model: ModelRef
    method: dict = Field(default_factory=dict, description="how the plan was made, for the record")
    alignment: Literal["weight-matching", "none"] = Field(
        default="weight-matching", description="how neurons of merged experts are matched before averaging"
    )
    layers: list[LayerPlan]

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, layers: list[LayerPlan]) -> list[LayerPlan]:
        seen = [lp.layer for lp in layers]
        if len(set(seen)) != len(seen):
            raise ValueError(f"a layer appears twice: {seen}")
        return layers

    @property
    def dense_width(self) -> int:
        return max(lp.width for lp in self.layers)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise EdgeconvError(f"plan file {path} does not exist",
                                "make one with `edgeconv plan MODEL --out plan.json`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EdgeconvError(f"plan {path} is not valid JSON ({exc})", "make it again with `edgeconv plan`")
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise EdgeconvError(f"{path} is not an edgeconv plan",
                                "make one with `edgeconv plan MODEL --out plan.json`")
        if data.get("version") != PLAN_VERSION:
            raise EdgeconvError(
                f"plan {path} has version {data.get('version')}, this edgeconv reads version {PLAN_VERSION}",
                "make the plan again with this edgeconv",
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise EdgeconvError(f"plan {path} is invalid {validation_problem(exc)}", "fix the plan or make it again")


def validation_problem(exc: ValidationError) -> str:
    """Where and what the first pydantic error is, on one line: "at layers.0.groups.1.experts.0: ..."."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = f" (got {json.dumps(value)})" if first["type"] != "value_error" and (
        value is None or isinstance(value, (bool, int, float))) else ""
    return f"at {where}: {msg}{shown}" if where else f"({msg}{shown})"


def check_plan_fits(plan: Plan, family, where: str = "the model", fingerprint: str | None = None) -> None:
    """Fail at once when a plan was made for another model or names experts the model lacks."""
    ref, arch = plan.model, family.moe_architecture
    if ref.architecture != arch:
        raise EdgeconvError(f"the plan was made for a {ref.architecture}, {where} is a {arch}",
                            "make a plan for this model")
    if ref.num_layers != family.num_layers or sorted(lp.layer for lp in plan.layers) != family.moe_layers():
        raise EdgeconvError(
            f"the plan covers MoE layers {[lp.layer for lp in plan.layers]} of a {ref.num_layers}-layer model, "
            f"{where} has {family.num_layers} layers with MoE layers {family.moe_layers()}",
            "the plan was made for another model; make a plan for this one",
        )
    if ref.num_experts != family.num_experts:
        raise EdgeconvError(
            f"the plan was made for {ref.num_experts} experts per layer, {where} has {family.num_experts}",
            "the plan was made for another model; make a plan for this one",
        )
    if ref.fingerprint and fingerprint and ref.fingerprint != fingerprint:
        raise EdgeconvError(
            f"the plan was made for the checkpoint at {ref.path} (from its calibration statistics), "
            f"{where} is a different one",
            "make the plan from this model's own statistics (`edgeconv calibrate` it first)",
        )
    for lp in plan.layers:
        check_expert_ids(lp.experts, family.num_experts, f"layer {lp.layer}")
        expected = len(lp.groups) * family.expert_width + family.shared_width
        if lp.width != expected:
            raise EdgeconvError(
                f"layer {lp.layer} of the plan says width {lp.width}, but {len(lp.groups)} groups of "
                f"{family.expert_width} plus a shared width of {family.shared_width} make {expected}",
                "fix the plan's width or make the plan again",
            )


def check_expert_ids(ids: list[int], num_experts: int, where: str) -> None:
    if len(ids) > num_experts:
        raise EdgeconvError(
            f"{where}: {len(ids)} experts requested but the model has only {num_experts}",
            f"choose K <= {num_experts}",
        )
    bad = [e for e in ids if not 0 <= e < num_experts]
    if bad:
        raise EdgeconvError(f"{where}: expert id {bad[0]} is out of range", f"ids go from 0 to {num_experts - 1}")
    repeated = sorted({e for e in ids if ids.count(e) > 1})
    if repeated:
        raise EdgeconvError(f"{where}: expert {repeated[0]} is used more than once", "list each expert once")
