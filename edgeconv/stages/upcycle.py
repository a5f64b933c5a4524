"""`edgeconv upcycle`: Dense2MoE layer fusion. Measure redundancy, choose runs, write the GLM-4-MoE
checkpoint and `upcycle_plan.json` (which layers were fused, and the similarity figures that chose them)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeconv.dense2moe.container import container_config, container_state, layer_map
from edgeconv.dense2moe.redundancy import Run, absorbable, check_runs, measure, parse_runs, select_runs
from edgeconv.errors import EdgeconvError
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded
from edgeconv.io.output_dir import atomic_output_dir, check_can_write, finished_output, sha256_file, stage_key, write_manifest

STAGE = "upcycle"
PLAN = "upcycle_plan.json"
SOURCES = ("Qwen3ForCausalLM",)  # the attention GLM-4-MoE holds exactly (see container.py)
DEFAULT_THRESHOLD = 0.9


@dataclass
class UpcycleResult:
    out: Path
    skipped: bool
    manifest: dict
    plan: dict


def check_source(ckpt: Checkpoint) -> None:
    from edgeconv.families.base import looks_moe, routed_experts

    arch = (ckpt.config.get("architectures") or ["?"])[0]
    if routed_experts(ckpt.config) > 1 or looks_moe(ckpt.config):
        raise EdgeconvError(f"{ckpt.path} is already a Mixture-of-Experts ({arch})",
                            "upcycling turns a dense model into an MoE; for MoE -> dense use `edgeconv convert`")
    if arch not in SOURCES:
        raise EdgeconvError(f"upcycling supports {', '.join(SOURCES)} sources, not {arch}",
                            "its attention must fit the GLM-4-MoE container exactly (see `edgeconv upcycle --help`)")


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
    log=lambda msg: None,
) -> UpcycleResult:
    from transformers import AutoModelForCausalLM

    from edgeconv.io.text_data import token_sequences
    from edgeconv.stages.calibrate import load_tokenizer

    out = Path(out)
    ckpt = Checkpoint.open(dense)
    check_source(ckpt)
    n_layers = int(ckpt.config["num_hidden_layers"])
    width = int(ckpt.config["intermediate_size"])
    if split < 1 or width % split:
        raise EdgeconvError(f"--split {split} must divide the FFN width {width}", "pass e.g. --split 1, 2 or 4")
    explicit = None if runs == "auto" else parse_runs(runs, n_layers)
    if explicit is not None:
        check_runs(explicit, n_layers)
    most = max((len(r.absorbed) for r in explicit or []), default=1)
    if explicit is not None and not 1 <= top_k <= max(2, most * split):
        raise EdgeconvError(f"--top-k {top_k}: a fused layer has {most * split} routed experts", "use --top-k 1")
    if data is None:
        from edgeconv.demo import CALIBRATION_DATA

        data = CALIBRATION_DATA
    ids, data_info = token_sequences(load_tokenizer(ckpt), Path(data), tokens, seq_len)
    data_sha = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    inputs = {"model_fingerprint": ckpt.fingerprint, "tokens_sha256": data_sha}
    options = {"runs": runs, "threshold": threshold if runs == "auto" else None, "top_k": top_k, "split": split,
               "seed": seed, "container": "Glm4MoeForCausalLM"}
    key = stage_key(STAGE, inputs, options)
    done = finished_output(out, STAGE, key)
    if done:
        return UpcycleResult(out, True, done, json.loads((out / PLAN).read_text()))
    check_can_write(out, force, key)  # before the heavy work, not at its end

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    figures = measure(model, ids)
    chosen = explicit if explicit is not None else select_runs(figures, threshold)
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
        log("--runs none: the output is the source in the GLM-4-MoE container, unchanged in function"
            if not chosen else f"runs given: {', '.join(r.label() for r in chosen)}")
    config = container_config(ckpt.config, chosen, split, top_k)
    state = container_state(model.state_dict(), config, n_layers, chosen, split, seed)
    if not 1 <= top_k <= config.n_routed_experts:
        raise EdgeconvError(f"--top-k {top_k}: a fused layer has {config.n_routed_experts} routed experts",
                            "use --top-k 1")
    dtype = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "float32"
    with torch.device("meta"):
        moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    moe.load_state_dict(state, assign=True, strict=True)
    moe = moe.to(getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else torch.float32)
    plan = _plan(ckpt, figures, chosen, threshold if runs == "auto" else None, config, n_layers,
                 sum(p.numel() for p in moe.parameters()), sum(p.numel() for p in model.parameters()))
    with atomic_output_dir(out, force, key) as tmp:
        moe.save_pretrained(tmp, safe_serialization=True)
        for path in ckpt.sidecar_files():
            if not (tmp / path.name).exists():
                shutil.copy(path, tmp / path.name)
        (tmp / PLAN).write_text(json.dumps(plan, indent=2) + "\n")
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        summary = {k: plan[k] for k in ("source_layers", "layers", "fused_runs", "removed_attention_layers",
                                        "source_params", "params", "active_params")}
        summary["seconds"] = round(time.perf_counter() - started, 2)
        manifest = write_manifest(tmp, STAGE, key, {**inputs, "model": str(ckpt.path), "data": str(data)},
                                  options, files, summary)
    return UpcycleResult(out, False, manifest, plan)


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
                       else ("fused" if run else "moe-holder (zero experts, pinned)")} for k, (s, run) in enumerate(kept)],
        "source_layers": n_layers,
        "layers": len(kept),
        "routed_experts": config.n_routed_experts,
        "top_k": config.num_experts_per_tok,
        "source_params": source_params,
        "params": params,
        # what one token reads: everything but the routed experts it does not use
        "active_params": params - moe_layers * (config.n_routed_experts - config.num_experts_per_tok) * expert,
    }
