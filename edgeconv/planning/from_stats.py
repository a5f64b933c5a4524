"""Plans from calibration statistics: score, select K experts, group them into G, scale each group.

Defaults follow the paper: DO-ACP scoring, pure pruning with K = G = the router's top-k (the dense FFN
has the MoE's *active* width), CP scaling. Every argument is checked before any work.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ValidationError

from edgeconv.calibration.stats import CalibrationStats
from edgeconv.errors import EdgeconvError
from edgeconv.planning.methods import GROUPINGS, SCALINGS, SCORERS
from edgeconv.planning.methods.grouping import merge_weights
from edgeconv.planning.plan import Group, LayerPlan, ModelRef, Plan, validation_problem

# Weight-cluster compares experts on this many coordinates of their flattened weights (a fixed random
# subset): distances between long vectors are well estimated from a random sample of their coordinates,
# and it keeps one layer's features small for 100+ experts of millions of weights each.
WEIGHT_FEATURES = 65536


def check_plan_args(model: ModelRef, experts: int | None, groups: int | None, scoring: str, grouping: str,
                    scaling: str) -> tuple[int, int]:
    """Resolve K and G (defaults: G = top-k, K = G) and fail at once on anything that cannot work."""
    SCORERS.get(scoring), GROUPINGS.get(grouping), SCALINGS.get(scaling)
    g = groups if groups is not None else model.top_k
    k = experts if experts is not None else g
    if g < 1:
        raise EdgeconvError(f"--groups {g} must be at least 1", "the default is the router's top-k")
    if k > model.num_experts:
        raise EdgeconvError(
            f"K={k} experts requested but the model has only {model.num_experts} per layer",
            f"choose --experts <= {model.num_experts}",
        )
    if k < g:
        raise EdgeconvError(f"K={k} experts cannot form {g} groups", "choose --experts >= --groups")
    if grouping == "none" and k != g:
        raise EdgeconvError(
            f"grouping 'none' keeps each expert as its own group, so K={k} must equal the group count {g}",
            "set --experts equal to --groups, or pick a clustering --grouping",
        )
    return k, g


def _weight_features(family, ckpt, layer: int, ids: list[int], seed: int) -> torch.Tensor:
    rows = []
    pick = None
    for e in ids:
        ffn = family.read_expert(ckpt, layer, e)
        flat = torch.cat([ffn.gate.flatten(), ffn.up.flatten(), ffn.down.flatten()]).float()
        if flat.numel() > WEIGHT_FEATURES:
            if pick is None:
                gen = torch.Generator().manual_seed(seed)
                pick = torch.randperm(flat.numel(), generator=gen)[:WEIGHT_FEATURES]
            flat = flat[pick]
        rows.append(flat)
    return torch.stack(rows)


def stats_plan(
    stats: CalibrationStats,
    *,
    experts: int | None = None,
    groups: int | None = None,
    scoring: str = "do-acp",
    grouping: str = "none",
    scaling: str = "cp",
    seed: int = 0,
    model: str | Path | None = None,
    stats_path: str | None = None,
) -> Plan:
    where = f"calibration statistics {stats_path}" if stats_path else "the calibration statistics"
    try:
        ref = ModelRef(**stats.model)
    except (ValidationError, TypeError) as exc:
        problem = validation_problem(exc) if isinstance(exc, ValidationError) else f"({exc})"
        raise EdgeconvError(f"{where} describe the model wrongly {problem}", "calibrate again")
    k, g = check_plan_args(ref, experts, groups, scoring, grouping, scaling)
    missing = [layer for layer in ref.moe_layers if layer not in stats.layers]
    if missing:
        raise EdgeconvError(f"{where} lack MoE layer {missing[0]}", "calibrate again")
    # NaN/Inf statistics (a damaged model, overflowing activations) would make NaN scores, groups and scales.
    stats.check_finite(where, "calibrate again; if it recurs, the model's weights or activations are not finite")
    family = ckpt = None
    if grouping == "weight-cluster":  # the only method that needs the expert weights themselves
        from edgeconv.families import family_for
        from edgeconv.io.checkpoint import Checkpoint

        ckpt = Checkpoint.open(model or ref.path)
        if ckpt.fingerprint != ref.fingerprint:
            raise EdgeconvError(f"{ckpt.path} is not the model these statistics were computed on",
                                "pass the calibrated model with --model")
        family = family_for(ckpt.config, str(ckpt.path))
    score_fn, group_fn, scale_fn = SCORERS.get(scoring), GROUPINGS.get(grouping), SCALINGS.get(scaling)
    layers = []
    for layer in ref.moe_layers:
        st = stats.layers[layer]
        gen = torch.Generator().manual_seed(seed * 100003 + layer)
        ranking = score_fn(st, k, gen)
        features = _weight_features(family, ckpt, layer, ranking.selected, seed) if family else None
        parts = group_fn(st, ranking.selected, g, gen, features)
        scales = scale_fn(st, parts)
        try:
            layers.append(
                LayerPlan(
                    layer=layer,
                    groups=[Group(experts=[int(e) for e in p], weights=merge_weights(st, p), scale=float(s))
                            for p, s in zip(parts, scales)],
                    shared_scale=st.shared_gate_mean,
                    width=g * ref.expert_width + ref.shared_width,
                    scores={**ranking.scores, "selected_order": [float(e) for e in ranking.selected]},
                )
            )
        except ValidationError as exc:  # not expected once the statistics are finite; one line all the same
            raise EdgeconvError(f"the plan for layer {layer} from {where} is invalid {validation_problem(exc)}",
                                "check the statistics (`edgeconv inspect STATS`) and calibrate again")
    method = {
        "planner": "stats",
        "scoring": scoring,
        "grouping": grouping,
        "scaling": scaling,
        "experts": k,
        "groups": g,
        "seed": seed,
        "stats": stats_path,
        "calibration_tokens": stats.data.get("tokens"),
    }
    return Plan(model=ref, method=method, layers=layers)

