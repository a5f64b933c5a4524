"""`edgeconv upcycle`: Dense2MoE layer fusion. Measure redundancy, choose runs, write the GLM-4-MoE
checkpoint and `upcycle_plan.json` (which layers were fused, and the similarity figures that chose them)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from edgeconv.dense2moe.container import container_config, container_state, layer_map
from edgeconv.dense2moe.redundancy import Run, absorbable, check_runs, measure, parse_runs, select_runs
from edgeconv.errors import EdgeconvError
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded
from edgeconv.stages.stage import Identity, StageBase, StageResult, run_stage

logger = logging.getLogger(__name__)

STAGE = "upcycle"
PLAN = "upcycle_plan.json"
SOURCES = ("Qwen3ForCausalLM",)  # the attention GLM-4-MoE holds exactly (see container.py)
DEFAULT_THRESHOLD = 0.9


def check_source(ckpt: Checkpoint) -> None:
    from edgeconv.families.base import looks_moe, routed_experts

    arch = (ckpt.config.get("architectures") or ["?"])[0]
    if routed_experts(ckpt.config) > 1 or looks_moe(ckpt.config):
        raise EdgeconvError(f"{ckpt.path} is already a Mixture-of-Experts ({arch})",
                            "upcycling turns a dense model into an MoE; for MoE -> dense use `edgeconv convert`")
    if arch not in SOURCES:
        raise EdgeconvError(f"upcycling supports {', '.join(SOURCES)} sources, not {arch}",
                            "its attention must fit the GLM-4-MoE container exactly (see `edgeconv upcycle --help`)")


class UpcycleStage(StageBase):
    name = STAGE

    def __init__(self, dense: str | Path, out: str | Path, *, runs: str = "auto", threshold: float = DEFAULT_THRESHOLD,
                 top_k: int = 1, split: int = 1, data: str | Path | None = None, tokens: int = 16384,
                 seq_len: int = 512, seed: int = 0):
        self.dense, self.out, self.runs, self.threshold = dense, Path(out), runs, threshold
        self.top_k, self.split, self.data = top_k, split, data
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def describe(self) -> str:
        runs = f"runs {self.runs}" if self.runs != "auto" else f"runs of layers at similarity >= {self.threshold}"
        return f"{runs} fused into MoE layers (GLM-4-MoE container), top-{self.top_k}"

    def identity(self) -> Identity:
        from edgeconv.io.text_data import token_sequences
        from edgeconv.stages.calibrate import load_tokenizer

        ckpt = self.ckpt = Checkpoint.open(self.dense)
        check_source(ckpt)
        n_layers = self.n_layers = int(ckpt.config["num_hidden_layers"])
        width = int(ckpt.config["intermediate_size"])
        runs, split, top_k = self.runs, self.split, self.top_k
        if split < 1 or width % split:
            raise EdgeconvError(f"--split {split} must divide the FFN width {width}", "pass e.g. --split 1, 2 or 4")
        explicit = self.explicit = None if runs == "auto" else parse_runs(runs, n_layers)
        if explicit is not None:
            check_runs(explicit, n_layers)
        most = max((len(r.absorbed) for r in explicit or []), default=1)
        if explicit is not None and not 1 <= top_k <= max(2, most * split):
            raise EdgeconvError(f"--top-k {top_k}: a fused layer has {most * split} routed experts", "use --top-k 1")
        if self.data is None:
            from edgeconv.demo import CALIBRATION_DATA

            self.data = CALIBRATION_DATA
        self.ids, _ = token_sequences(load_tokenizer(ckpt), Path(self.data), self.tokens, self.seq_len)
        data_sha = hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()
        inputs = {"model_fingerprint": ckpt.fingerprint, "tokens_sha256": data_sha}
        options = {"runs": runs, "threshold": self.threshold if runs == "auto" else None, "top_k": top_k,
                   "split": split, "seed": self.seed, "container": "Glm4MoeForCausalLM"}
        return Identity(inputs, options, {**inputs, "model": str(ckpt.path), "data": str(self.data)})

    def prepare(self) -> None:
        from transformers import AutoModelForCausalLM

        ckpt, n_layers, runs, threshold, split, top_k = (self.ckpt, self.n_layers, self.runs, self.threshold,
                                                         self.split, self.top_k)
        self.started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
        figures = measure(model, self.ids)
        chosen = self.explicit if self.explicit is not None else select_runs(figures, threshold)
        if runs == "auto":
            if not chosen:
                score = [min(a, b) for a, b in zip(figures["layer_similarity"], figures["mlp_input_similarity"])]
                best = max(range(1, n_layers), key=lambda i: score[i])
                raise EdgeconvError(
                    f"--threshold {threshold} selects no layer to fuse: the most redundant is layer {best} "
                    f"(min of its two similarities {score[best]:.3f})",
                    f"lower --threshold to at most {score[best]:.3f}, or name runs with --runs; nothing was written")
            check_runs(chosen, n_layers)
        else:
            logger.info("--runs none: the output is the source in the GLM-4-MoE container, unchanged in function"
                        if not chosen else f"runs given: {', '.join(r.label() for r in chosen)}")
        config = container_config(ckpt.config, chosen, split, top_k)
        state = container_state(model.state_dict(), config, n_layers, chosen, split, self.seed)
        if not 1 <= top_k <= config.n_routed_experts:
            raise EdgeconvError(f"--top-k {top_k}: a fused layer has {config.n_routed_experts} routed experts",
                                "use --top-k 1")
        dtype = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "float32"
        with torch.device("meta"):
            moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        moe.load_state_dict(state, assign=True, strict=True)
        self.moe = moe.to(getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else torch.float32)
        self.plan = _plan(ckpt, figures, chosen, threshold if runs == "auto" else None, config, n_layers,
                          sum(p.numel() for p in self.moe.parameters()), sum(p.numel() for p in model.parameters()))

    def run(self, tmp: Path) -> dict:
        self.moe.save_pretrained(tmp, safe_serialization=True)
        for path in self.ckpt.sidecar_files():
            if not (tmp / path.name).exists():
                shutil.copy(path, tmp / path.name)
        (tmp / PLAN).write_text(json.dumps(self.plan, indent=2) + "\n")
        summary = {k: self.plan[k] for k in ("source_layers", "layers", "fused_runs", "removed_attention_layers",
                                             "source_params", "params", "active_params")}
        summary["seconds"] = round(time.perf_counter() - self.started, 2)
        return summary


@guarded("out", "dense", "data")
def upcycle(
    dense: str | Path,
    out: str | Path,
    *,
    runs: str = "auto",
    threshold: float = DEFAULT_THRESHOLD,
    top_k: int = 1,
    split: int = 1,
    data: str | Path | None = None,
    tokens: int = 16384,
    seq_len: int = 512,
    seed: int = 0,
    force: bool = False,
) -> StageResult:
    """`edgeconv upcycle`: the upcycle stage on its own (see UpcycleStage); `.plan` is its upcycle_plan.json."""
    return run_stage(UpcycleStage(dense, out, runs=runs, threshold=threshold, top_k=top_k, split=split, data=data,
                                  tokens=tokens, seq_len=seq_len, seed=seed), force=force)


def _plan(ckpt: Checkpoint, figures: dict, runs: list[Run], threshold: float | None, config, n_layers: int,
          params: int, source_params: int) -> dict:
    kept = layer_map(n_layers, runs)
    moe_layers = len(kept) - config.first_k_dense_replace
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    return {
        "format": "edgeconv-upcycle-plan",
        "version": 1,
        "source": str(ckpt.path),
        "container": "Glm4MoeForCausalLM",
        "threshold": threshold,
        "figures": figures,
        "absorbable": absorbable(figures, threshold) if threshold is not None else None,
        "fused_runs": [r.label() for r in runs],
        "runs": [{"first": r.first, "last": r.last, "absorbed": r.absorbed,
                  "layer_similarity": [figures["layer_similarity"][a] for a in r.absorbed],
                  "mlp_input_similarity": [figures["mlp_input_similarity"][a] for a in r.absorbed]} for r in runs],
        "removed_attention_layers": [a for r in runs for a in r.absorbed],
        "layer_map": [{"layer": k, "source_layer": s, "kind": "dense" if k < config.first_k_dense_replace
                       else ("fused" if run else "moe-holder (zero experts, pinned)")}
                      for k, (s, run) in enumerate(kept)],
        "source_layers": n_layers,
        "layers": len(kept),
        "routed_experts": config.n_routed_experts,
        "top_k": config.num_experts_per_tok,
        "source_params": source_params,
        "params": params,
        # what one token reads: everything but the routed experts it does not use
        "active_params": params - moe_layers * (config.n_routed_experts - config.num_experts_per_tok) * expert,
    }
