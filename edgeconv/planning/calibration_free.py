"""Plans that need no calibration: pure pruning with experts chosen by position, at random or by id.

`--experts` forms:
  first:K          experts 0..K-1 in every MoE layer
  random:K[:SEED]  K distinct experts drawn per layer (seeded; default seed 0)
  ids:A,B,C        the same ids in every MoE layer
  ids:A,B|C,D|...  one list per MoE layer, in layer order
Each expert is its own group (K groups, dense width K x expert width + shared width). Scaling is
`uniform` (each group's output x 1/K, the average of K equally weighted experts) or a number used for
every group.
"""

from __future__ import annotations

import math
import random

from edgeconv.errors import EdgeconvError
from edgeconv.families.base import MoEFamily
from edgeconv.planning.plan import Group, LayerPlan, ModelRef, Plan, check_expert_ids

SPEC_HELP = "use first:K, random:K[:SEED] or ids:A,B,..."


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise EdgeconvError(f"--experts: {what} {text!r} is not an integer", SPEC_HELP)


def choose_experts(spec: str, family: MoEFamily) -> dict[int, list[int]]:
    layers, n = family.moe_layers(), family.num_experts
    kind, _, rest = spec.partition(":")
    if kind == "first":
        k = _int(rest, "K")
        chosen = {layer: list(range(k)) for layer in layers}
    elif kind == "random":
        k_text, _, seed_text = rest.partition(":")
        k, seed = _int(k_text, "K"), _int(seed_text, "seed") if seed_text else 0
        if k > n:
            check_expert_ids(list(range(k)), n, "--experts")
        rng = random.Random(seed)
        chosen = {layer: sorted(rng.sample(range(n), k)) for layer in layers}
    elif kind == "ids":
        per_layer = [[_int(x, "expert id") for x in part.split(",") if x.strip()] for part in rest.split("|")]
        if len(per_layer) == 1:
            per_layer = per_layer * len(layers)
        if len(per_layer) != len(layers):
            raise EdgeconvError(
                f"--experts gives {len(per_layer)} id lists for {len(layers)} MoE layers",
                "give one list for all layers or one per MoE layer, separated by |",
            )
        chosen = dict(zip(layers, per_layer))
    else:
        raise EdgeconvError(f"--experts {spec!r} is not understood", SPEC_HELP)
    for layer, ids in chosen.items():
        if not ids:
            raise EdgeconvError(f"--experts {spec!r} selects no expert", "K must be at least 1")
        check_expert_ids(ids, n, f"--experts {spec} (layer {layer})")
    return chosen


def group_scale(scaling: str, groups: int) -> float:
    if scaling == "uniform":
        return 1.0 / groups
    try:
        scale = float(scaling)  # float() also reads "nan", "inf" and "-1e999"
    except ValueError:
        raise EdgeconvError(f"--scaling {scaling!r} is not understood", "use uniform or a number")
    if not (math.isfinite(scale) and scale >= 0):
        raise EdgeconvError(f"--scaling {scaling} must be a finite number >= 0",
                            "pass the factor each group's output is multiplied by, e.g. 0.5, or uniform")
    return scale


def model_ref(family: MoEFamily, fingerprint: str | None = None, path: str | None = None) -> ModelRef:
    return ModelRef(
        architecture=family.moe_architecture,
        num_layers=family.num_layers,
        num_experts=family.num_experts,
        top_k=family.top_k,
        expert_width=family.expert_width,
        shared_width=family.shared_width,
        moe_layers=family.moe_layers(),
        fingerprint=fingerprint,
        path=path,
    )


def simple_plan(
    family: MoEFamily,
    experts: str | None = None,
    scaling: str = "uniform",
    fingerprint: str | None = None,
    path: str | None = None,
) -> Plan:
    spec = experts or f"first:{family.top_k}"
    chosen = choose_experts(spec, family)
    layers = []
    for layer, ids in chosen.items():
        scale = group_scale(scaling, len(ids))
        layers.append(
            LayerPlan(
                layer=layer,
                groups=[Group(experts=[e], weights=[1.0], scale=scale) for e in ids],
                width=len(ids) * family.expert_width + family.shared_width,
            )
        )
    method = {"planner": "simple", "experts": spec, "scaling": scaling, "grouping": "none"}
    return Plan(model=model_ref(family, fingerprint, path), method=method, layers=layers)
