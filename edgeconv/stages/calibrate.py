"""Calibrate: run the MoE teacher on text, one decoder layer at a time, and save per-expert statistics."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeconv.calibration.moe_block import CalibratedMoeBlock
from edgeconv.calibration.stats import CalibrationStats, LayerStats
from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.forward.layer_by_layer import dtype_name, resolve_device, resolve_dtype
from edgeconv.forward.layer_runner import run_layer_by_layer
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded
from edgeconv.io.output_dir import atomic_output_dir, check_can_write, finished_output, sha256_file, stage_key, write_manifest
from edgeconv.io.text_data import check_data, check_seq_len, token_sequences
from edgeconv.planning.calibration_free import model_ref
from edgeconv.progress import token_progress

STAGE = "calibrate"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class CalibrateResult:
    out: Path
    skipped: bool
    manifest: dict

    def stats(self) -> CalibrationStats:
        return CalibrationStats.load(self.out)


def load_tokenizer(ckpt: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise EdgeconvError(
            f"cannot load a tokenizer from {ckpt.path} ({type(exc).__name__})",
            "calibration needs the model's tokenizer files (tokenizer.json, tokenizer_config.json) next to it",
        )


@guarded("out", "model", "data")
def calibrate(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    tokens: int = 65536,
    seq_len: int = 512,
    batch_size: int = 4,
    gram_tokens: int = 1024,
    dtype: str = "auto",
    device: str = "auto",
    max_activation_bytes: int = 4 * 1024**3,
    force: bool = False,
    progress: bool = True,
) -> CalibrateResult:
    """`device`: auto (the GPU if there is one), cpu, cuda, cuda:N. `dtype`: auto (bfloat16 on a GPU that has it,
    else float32), float32 or bfloat16; the run key holds the dtype it resolves to."""
    out = Path(out)
    if dtype not in ("auto", *DTYPES):
        raise EdgeconvError(f"--dtype {dtype} is not supported", f"use auto or one of {', '.join(DTYPES)}")
    compute_device = resolve_device(device)
    dtype = dtype_name(resolve_dtype(dtype, compute_device))
    ckpt = Checkpoint.open(model)
    family = family_for(ckpt.config, str(ckpt.path))
    family.check_checkpoint(ckpt)
    if tokens < family.num_experts:
        raise EdgeconvError(
            f"--tokens {tokens} is fewer than the {family.num_experts} experts per layer: most experts would never be seen",
            f"calibrate on at least {family.num_experts} tokens (thousands in practice)",
        )
    if gram_tokens < 1:
        raise EdgeconvError(f"--gram-tokens {gram_tokens} must be positive", "pass e.g. 1024")
    check_seq_len(ckpt.config, seq_len)
    check_data(data)  # before the tokenizer and the model; what it does not read is checked as it is read
    tokenizer = load_tokenizer(ckpt)
    ids, data_info = token_sequences(tokenizer, Path(data), tokens, seq_len)
    data_info["sha256"] = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    options = {"gram_tokens": gram_tokens, "dtype": dtype, "batch_size": batch_size}
    inputs = {"model_fingerprint": ckpt.fingerprint, "tokens_sha256": data_info["sha256"]}
    key = stage_key(STAGE, inputs, options)
    done = finished_output(out, STAGE, key)
    if done:
        return CalibrateResult(out, True, done)
    check_can_write(out, force, key)  # before the heavy work, not at its end

    total = ids.numel()
    stride = max(1, total // gram_tokens)
    layers: dict[int, LayerStats] = {}

    def make_block(layer: int) -> CalibratedMoeBlock:
        has_gate = family.read_shared_gate(ckpt, layer) is not None
        layers[layer] = LayerStats.zeros(layer, family.num_experts, family.hidden_size, has_gate)
        return CalibratedMoeBlock(family, ckpt, layer, layers[layer], stride, gram_tokens, DTYPES[dtype])

    started = time.perf_counter()
    with token_progress(progress) as bar:
        task = bar.add_task("calibrate", total=total * family.num_layers)

        def on_batch(layer: int, n: int) -> None:
            bar.update(task, advance=n, description=f"calibrate layer {layer + 1}/{family.num_layers}")

        run_layer_by_layer(ckpt, family, ids, make_block, batch_size=batch_size, dtype=DTYPES[dtype],
                           device=compute_device, max_activation_bytes=max_activation_bytes,
                           spill_dir=out.absolute().parent, on_batch=on_batch)
    seconds = time.perf_counter() - started
    ckpt.close()
    stats = CalibrationStats(model_ref(family, ckpt.fingerprint, str(ckpt.path)).model_dump(), data_info, layers)
    # Finite weights (checked as they are read) can still overflow: no plan can use NaN statistics, so save none.
    stats.check_finite(f"the statistics calibrated from {ckpt.path}",
                       "its activations overflow on this data: check the checkpoint, calibrate with --dtype float32")
    with atomic_output_dir(out, force, key) as tmp:
        stats.save(tmp)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        summary = {
            "tokens": total,
            "layers": len(layers),
            "seconds": round(seconds, 2),
            "tokens_per_second": round(total * family.num_layers / max(seconds, 1e-9), 1),
            "unused_experts": {str(i): int((st.count == 0).sum()) for i, st in layers.items()},
        }
        manifest = write_manifest(tmp, STAGE, key, {**inputs, "model": str(ckpt.path), "data": str(data)},
                                  options, files, summary)
    return CalibrateResult(out, False, manifest)
