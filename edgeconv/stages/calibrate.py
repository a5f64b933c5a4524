"""Calibrate: run the MoE teacher on text, one decoder layer at a time, and save per-expert statistics."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

from edgeconv.calibration.moe_block import CalibratedMoeBlock
from edgeconv.calibration.stats import CalibrationStats, LayerStats
from edgeconv.config import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS
from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.forward.layer_by_layer import dtype_name, resolve_device, resolve_dtype
from edgeconv.forward.layer_runner import run_layer_by_layer
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded
from edgeconv.io.text_data import check_data, check_seq_len, token_sequences
from edgeconv.planning.calibration_free import model_ref
from edgeconv.progress import token_progress
from edgeconv.stages.stage import Identity, StageBase, StageResult, run_stage

logger = logging.getLogger(__name__)

STAGE = "calibrate"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(ckpt: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise EdgeconvError(
            f"cannot load a tokenizer from {ckpt.path} ({type(exc).__name__})",
            "calibration needs the model's tokenizer files (tokenizer.json, tokenizer_config.json) next to it",
        )


class CalibrateStage(StageBase):
    """`device`: auto (the GPU if there is one), cpu, cuda, cuda:N. `dtype`: auto (bfloat16 on a GPU that has it,
    else float32), float32 or bfloat16; the key holds the dtype it resolves to."""

    name = STAGE

    def __init__(self, model: str | Path, data: str | Path, out: str | Path, *, tokens: int = CALIBRATION_TOKENS,
                 seq_len: int = CALIBRATION_SEQ_LEN, batch_size: int = 4, gram_tokens: int = 1024, dtype: str = "auto",
                 device: str = "auto", max_activation_bytes: int = 4 * 1024**3, progress: bool = True):
        self.model, self.data, self.out = model, data, Path(out)
        self.tokens, self.seq_len, self.batch_size, self.gram_tokens = tokens, seq_len, batch_size, gram_tokens
        self.dtype, self.device = dtype, device
        self.max_activation_bytes, self.progress = max_activation_bytes, progress

    def describe(self) -> str:
        return f"{self.tokens:,} tokens through the teacher, one layer at a time: per-expert statistics"

    def identity(self) -> Identity:
        if self.dtype not in ("auto", *DTYPES):
            raise EdgeconvError(f"--dtype {self.dtype} is not supported", f"use auto or one of {', '.join(DTYPES)}")
        self.compute_device = resolve_device(self.device)
        self.dtype = dtype_name(resolve_dtype(self.dtype, self.compute_device))
        ckpt = self.ckpt = Checkpoint.open(self.model)
        family = self.family = family_for(ckpt.config, str(ckpt.path))
        family.check_checkpoint(ckpt)
        if self.tokens < family.num_experts:
            raise EdgeconvError(
                f"--tokens {self.tokens} is fewer than the {family.num_experts} experts per layer: most experts "
                "would never be seen",
                f"calibrate on at least {family.num_experts} tokens (thousands in practice)",
            )
        if self.gram_tokens < 1:
            raise EdgeconvError(f"--gram-tokens {self.gram_tokens} must be positive", "pass e.g. 1024")
        check_seq_len(ckpt.config, self.seq_len)
        check_data(self.data)  # before the tokenizer and the model; what it does not read is checked as it is read
        tokenizer = load_tokenizer(ckpt)
        self.ids, self.data_info = token_sequences(tokenizer, Path(self.data), self.tokens, self.seq_len)
        self.data_info["sha256"] = hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()
        options = {"gram_tokens": self.gram_tokens, "dtype": self.dtype, "batch_size": self.batch_size}
        inputs = {"model_fingerprint": ckpt.fingerprint, "tokens_sha256": self.data_info["sha256"]}
        return Identity(inputs, options, {**inputs, "model": str(ckpt.path), "data": str(self.data)})

    def prepare(self) -> None:
        ckpt, family, ids = self.ckpt, self.family, self.ids
        total = ids.numel()
        stride = max(1, total // self.gram_tokens)
        layers: dict[int, LayerStats] = {}

        def make_block(layer: int) -> CalibratedMoeBlock:
            has_gate = family.read_shared_gate(ckpt, layer) is not None
            layers[layer] = LayerStats.zeros(layer, family.num_experts, family.hidden_size, has_gate)
            return CalibratedMoeBlock(family, ckpt, layer, layers[layer], stride, self.gram_tokens, DTYPES[self.dtype])

        started = time.perf_counter()
        with token_progress(self.progress) as bar:
            task = bar.add_task("calibrate", total=total * family.num_layers)

            def on_batch(layer: int, n: int) -> None:
                bar.update(task, advance=n, description=f"calibrate layer {layer + 1}/{family.num_layers}")

            # Read the next layer ahead only on a GPU, where a layer computes in about the time its read takes.
            # On a CPU the read is a few seconds of a layer's minute (Qwen3-30B-A3B shape, 65,536 tokens), and
            # the layer read ahead would hold its stored bytes (1.2 GB there) on top of the one computing.
            prefetch = self.compute_device.type != "cpu"
            logger.debug(f"calibrate on {self.compute_device} in {self.dtype}, "
                        f"{'reading the next layer ahead' if prefetch else 'one layer in memory at a time'}")
            run_layer_by_layer(ckpt, family, ids, make_block, batch_size=self.batch_size, dtype=DTYPES[self.dtype],
                               device=self.compute_device, max_activation_bytes=self.max_activation_bytes,
                               spill_dir=self.out.absolute().parent, on_batch=on_batch, prefetch=prefetch)
        self.seconds = time.perf_counter() - started
        ckpt.close()
        self.layers = layers
        self.stats = CalibrationStats(model_ref(family, ckpt.fingerprint, str(ckpt.path)).model_dump(), self.data_info,
                                      layers)
        # Finite weights (checked as they are read) can still overflow: no plan can use NaN statistics, so save none.
        self.stats.check_finite(f"the statistics calibrated from {ckpt.path}",
                                "its activations overflow on this data: check the checkpoint, calibrate with "
                                "--dtype float32")

    def run(self, tmp: Path) -> dict:
        self.stats.save(tmp)
        total = self.ids.numel()
        return {
            "tokens": total,
            "layers": len(self.layers),
            "seconds": round(self.seconds, 2),
            "tokens_per_second": round(total * self.family.num_layers / max(self.seconds, 1e-9), 1),
            "unused_experts": {str(i): int((st.count == 0).sum()) for i, st in self.layers.items()},
        }


@guarded("out", "model", "data")
def calibrate(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    tokens: int = CALIBRATION_TOKENS,
    seq_len: int = CALIBRATION_SEQ_LEN,
    batch_size: int = 4,
    gram_tokens: int = 1024,
    dtype: str = "auto",
    device: str = "auto",
    max_activation_bytes: int = 4 * 1024**3,
    force: bool = False,
    progress: bool = True,
) -> StageResult:
    """`edgeconv calibrate`: the calibrate stage on its own (see CalibrateStage); `.stats()` loads what it wrote."""
    return run_stage(CalibrateStage(model, data, out, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                                    gram_tokens=gram_tokens, dtype=dtype, device=device,
                                    max_activation_bytes=max_activation_bytes, progress=progress), force=force)
