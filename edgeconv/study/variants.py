"""The study's grid: scoring x grouping x scaling x K, the valid combinations, and which are the same plan.

G (the number of groups, hence the dense width) is fixed across the grid so that every student has the same
size. With K = G every grouping keeps each expert as its own group, so those variants produce the plan of
grouping 'none'; they are listed (the table shows them) but evaluated once, by plan digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from edgeconv.errors import EdgeconvError
from edgeconv.planning.methods import GROUPINGS, SCALINGS, SCORERS
from edgeconv.planning.plan import Plan

PAPER_DEFAULT = {"scoring": "do-acp", "grouping": "none", "scaling": "cp"}  # with K = G = the router's top-k


@dataclass(frozen=True)
class Variant:
    scoring: str
    grouping: str
    scaling: str
    experts: int  # K, experts selected per layer
    groups: int  # G, groups merged into the dense FFN

    @property
    def name(self) -> str:
        return f"{self.scoring}/{self.grouping}/{self.scaling}/K{self.experts}"

    @property
    def slug(self) -> str:
        return self.name.replace("/", "_")

    @property
    def is_paper_default(self) -> bool:
        return self.experts == self.groups and all(getattr(self, k) == v for k, v in PAPER_DEFAULT.items())

    def as_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


def pick(names: str, registry, what: str) -> list[str]:
    """'all' or a comma list, each checked against the registry (unknown names list the known ones)."""
    if names.strip() == "all":
        return registry.names()
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    if not chosen:
        raise EdgeconvError(f"no {what} given", f"pass 'all' or a comma list of: {', '.join(registry.names())}")
    for n in chosen:
        registry.get(n)
    return chosen


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise EdgeconvError(f"--k {text!r} is not a comma list of integers", "pass e.g. --k 2,4,8")
    if not ks:
        raise EdgeconvError("--k is empty", "pass e.g. --k 2,4,8")
    return ks


def grid(scorings: list[str], groupings: list[str], scalings: list[str], ks: list[int], groups: int,
         num_experts: int) -> list[Variant]:
    """Every valid combination, in a stable order. 'none' only exists at K = G (pure pruning)."""
    bad = [k for k in ks if not groups <= k <= num_experts]
    if bad:
        raise EdgeconvError(f"K={bad[0]} is outside {groups}..{num_experts} (G={groups} groups, {num_experts} experts)",
                            f"pass --k values between {groups} and {num_experts}")
    for name, reg in ((scorings, SCORERS), (groupings, GROUPINGS), (scalings, SCALINGS)):
        for n in name:
            reg.get(n)
    out = []
    for k in ks:
        for scoring in scorings:
            for grouping in sorted(groupings, key=lambda g: g != "none"):  # at K = G, 'none' names the plan
                if grouping == "none" and k != groups:
                    continue
                for scaling in scalings:
                    out.append(Variant(scoring, grouping, scaling, k, groups))
    return out


def plan_digest(plan: Plan) -> str:
    """What the assembled student computes: per layer the groups' experts, merge weights and scales (group
    order only permutes the dense FFN's neurons, so groups are sorted)."""
    body = [
        [lp.layer, lp.width, lp.shared_scale,
         sorted([g.experts, [round(w, 9) for w in g.weights], round(g.scale, 9)] for g in lp.groups)]
        for lp in sorted(plan.layers, key=lambda lp: lp.layer)
    ]
    blob = json.dumps([plan.model.fingerprint, plan.alignment, body])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
