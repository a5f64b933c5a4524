"""Per-layer expert statistics: accumulated during calibration, saved as safetensors + a JSON summary.

Raw sums are stored (not means) so that runs can be merged and every derived quantity is one division
away. For a layer with E routed experts, over the calibration tokens T and the tokens T_e routed to e:

  count[e]        |T_e|                                     selection frequency (SF)
  weight_sum[e]   sum_{x in T_e} g_e(x)                     g = routing weight, before any constant
                                                            factor the router applies afterwards
  norm_sum[e]     sum_{x in T_e} ||f_e(x)||                 EAN
  norm_sq_sum[e]  sum_{x in T_e} ||f_e(x)||^2
  reap_sum[e]     sum_{x in T_e} g_e(x) ||f_e(x)||          REAP
  out_sum[e]      sum_{x in T_e} f_e(x)            [E, H]   mean routed output, for output similarity
  gram_sum[i, j]  sum_{x in S} <f_i(x), f_j(x)>    [E, E]   S = a shared sample on which every expert runs
  gram_tokens     |S|
  logit_sum[e], logit_sq_sum[e]  router logit sums over T (mean and spread of each expert's logit)
  shared_gate_sum, tokens        sum over T of the shared expert's gate value (Qwen2-MoE), |T|
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgeconv.errors import EdgeconvError

STATS_FILE = "stats.safetensors"
SUMMARY_FILE = "summary.json"
VECTORS = ("count", "weight_sum", "norm_sum", "norm_sq_sum", "reap_sum", "logit_sum", "logit_sq_sum")


@dataclass
class LayerStats:
    layer: int
    count: torch.Tensor
    weight_sum: torch.Tensor
    norm_sum: torch.Tensor
    norm_sq_sum: torch.Tensor
    reap_sum: torch.Tensor
    logit_sum: torch.Tensor
    logit_sq_sum: torch.Tensor
    out_sum: torch.Tensor
    gram_sum: torch.Tensor
    gram_tokens: int = 0
    tokens: int = 0
    shared_gate_sum: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, layer: int, num_experts: int, hidden: int, has_shared_gate: bool = False) -> LayerStats:
        vec = lambda: torch.zeros(num_experts, dtype=torch.float64)  # noqa: E731
        return cls(
            layer,
            *(vec() for _ in VECTORS),
            out_sum=torch.zeros(num_experts, hidden, dtype=torch.float64),
            gram_sum=torch.zeros(num_experts, num_experts, dtype=torch.float64),
            shared_gate_sum=0.0 if has_shared_gate else None,
        )

    @property
    def num_experts(self) -> int:
        return self.count.shape[0]

    # --- derived quantities (all float64, [E]) ------------------------------------------------------
    def _per_routed(self, total: torch.Tensor) -> torch.Tensor:
        return total / self.count.clamp(min=1)

    @property
    def frequency(self) -> torch.Tensor:
        """Fraction of routing slots that went to each expert (sums to 1)."""
        return self.count / self.count.sum().clamp(min=1)

    @property
    def cp(self) -> torch.Tensor:
        """Conditional probability: mean routing weight over the tokens routed to the expert."""
        return self._per_routed(self.weight_sum)

    @property
    def mean_norm(self) -> torch.Tensor:
        return self._per_routed(self.norm_sum)

    @property
    def mean_norm_sq(self) -> torch.Tensor:
        return self._per_routed(self.norm_sq_sum)

    @property
    def reap(self) -> torch.Tensor:
        return self._per_routed(self.reap_sum)

    @property
    def out_mean(self) -> torch.Tensor:
        return self.out_sum / self.count.clamp(min=1).unsqueeze(1)

    @property
    def gram(self) -> torch.Tensor:
        """E[<f_i(x), f_j(x)>] over the shared sample."""
        return self.gram_sum / max(self.gram_tokens, 1)

    @property
    def shared_gate_mean(self) -> float | None:
        if self.shared_gate_sum is None or not self.tokens:
            return None
        return self.shared_gate_sum / self.tokens

    @property
    def logit_mean(self) -> torch.Tensor:
        return self.logit_sum / max(self.tokens, 1)

    @property
    def logit_std(self) -> torch.Tensor:
        var = self.logit_sq_sum / max(self.tokens, 1) - self.logit_mean**2
        return var.clamp(min=0).sqrt()

    def nonfinite(self) -> str | None:
        """The name of the first statistic holding NaN or Inf (None when all are finite)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f.name
            if isinstance(value, float) and not math.isfinite(value):
                return f.name
        return None

    def summary(self) -> dict:
        freq = self.frequency
        entropy = float(-(freq[freq > 0] * freq[freq > 0].log()).sum())
        return {
            "layer": self.layer,
            "tokens": self.tokens,
            "gram_tokens": self.gram_tokens,
            "unused_experts": int((self.count == 0).sum()),
            "usage_entropy_ratio": entropy / math.log(self.num_experts),
            "frequency": [round(float(v), 6) for v in freq],
            "cp": [round(float(v), 6) for v in self.cp],
            "mean_norm": [round(float(v), 6) for v in self.mean_norm],
            "shared_gate_mean": self.shared_gate_mean,
        }


@dataclass
class CalibrationStats:
    """All MoE layers of one model, plus what they were computed from."""

    model: dict  # architecture, num_layers, num_experts, top_k, fingerprint, path
    data: dict  # tokens, seq_len, sources
    layers: dict[int, LayerStats]

    def check_finite(self, what: str, hint: str) -> None:
        """Fail with one line when a statistic holds NaN or Inf: the scores, groups and scales made from it
        would be NaN. `what` names the statistics (e.g. their directory), `hint` says what to do."""
        for i in sorted(self.layers):
            bad = self.layers[i].nonfinite()
            if bad:
                raise EdgeconvError(f"{what} hold NaN/Inf values (layer {i}, {bad})", hint)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        tensors, scalars = {}, {}
        for i, st in self.layers.items():
            for f in fields(LayerStats):
                value = getattr(st, f.name)
                if isinstance(value, torch.Tensor):
                    tensors[f"layers.{i}.{f.name}"] = value.contiguous()
            scalars[str(i)] = {"gram_tokens": st.gram_tokens, "tokens": st.tokens,
                               "shared_gate_sum": st.shared_gate_sum}
        save_file(tensors, directory / STATS_FILE, metadata={"format": "edgeconv-stats"})
        summary = {
            "format": "edgeconv-stats",
            "version": 1,
            "model": self.model,
            "data": self.data,
            "scalars": scalars,
            "layers": [st.summary() for st in self.layers.values()],
        }
        (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> CalibrationStats:
        directory = Path(directory)
        if not (directory / SUMMARY_FILE).is_file() or not (directory / STATS_FILE).is_file():
            raise EdgeconvError(
                f"{directory} holds no calibration statistics",
                "run `edgeconv calibrate MODEL --data ... --out STATS_DIR` first",
            )
        summary = json.loads((directory / SUMMARY_FILE).read_text())
        tensors = load_file(directory / STATS_FILE)
        layers = {}
        for key, scalars in summary["scalars"].items():
            i = int(key)
            parts = {f.name: tensors[f"layers.{i}.{f.name}"] for f in fields(LayerStats)
                     if f"layers.{i}.{f.name}" in tensors}
            layers[i] = LayerStats(layer=i, **parts, **scalars)
        return cls(summary["model"], summary["data"], layers)
