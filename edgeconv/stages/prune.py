"""`edgeconv prune`: dense-to-dense width pruning (the study's baseline) as a stage; the method itself (importance,
slicing, parameter matching) is edgeconv/study/dense_prune.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from edgeconv.errors import EdgeconvError
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded
from edgeconv.reporting.model_card import write_checkpoint_card
from edgeconv.stages.stage import Identity, StageBase, StageResult, run_stage
from edgeconv.study.dense_prune import (
    attention_shape,
    check_dense_source,
    ckpt_dtype,
    importance,
    param_count,
    pruned_state,
    width_for_params,
)

STAGE = "prune"


class PruneStage(StageBase):
    """Width-prune DENSE to `ffn_width` FFN channels (or to at most `params` parameters) and `kv_heads` key/value
    groups per layer. One of ffn_width / params is required."""

    name = STAGE

    def __init__(self, dense: str | Path, out: str | Path, *, data: str | Path | None = None,
                 ffn_width: int | None = None, params: int | None = None, kv_heads: int | None = None,
                 tokens: int = 16384, seq_len: int = 512):
        self.dense, self.out, self.data = dense, Path(out), data
        self.ffn_width, self.params, self.kv_heads = ffn_width, params, kv_heads
        self.tokens, self.seq_len = tokens, seq_len

    def describe(self) -> str:
        size = f"{self.ffn_width} FFN channels" if self.ffn_width else f"at most {self.params:,} parameters"
        return f"width-pruned to {size} by activation importance (Minitron)"

    def identity(self) -> Identity:
        from edgeconv.io.text_data import token_sequences
        from edgeconv.stages.calibrate import load_tokenizer

        ckpt = self.ckpt = Checkpoint.open(self.dense)
        self.arch = check_dense_source(ckpt)
        config = ckpt.config
        heads, kv, d = attention_shape(config)
        kv_heads = self.kv_heads = self.kv_heads or kv
        if not 1 <= kv_heads <= kv:
            raise EdgeconvError(f"--kv-heads {kv_heads}: the model has {kv} key/value heads", f"choose 1..{kv}")
        if (self.ffn_width is None) == (self.params is None):
            raise EdgeconvError("give exactly one of --ffn-width and --params", "e.g. --ffn-width 512")
        if self.params is not None:
            self.ffn_width = width_for_params(config, self.params, kv_heads)
        if not 1 <= self.ffn_width <= config["intermediate_size"]:
            raise EdgeconvError(f"--ffn-width {self.ffn_width}: the model's FFN has {config['intermediate_size']} "
                                f"channels", f"choose 1..{config['intermediate_size']}")
        if self.data is None:
            from edgeconv.demo import CALIBRATION_DATA

            self.data = CALIBRATION_DATA
        tokenizer = load_tokenizer(ckpt)
        self.ids, data_info = token_sequences(tokenizer, Path(self.data), self.tokens, self.seq_len)
        data_info["sha256"] = hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()
        inputs = {"model_fingerprint": ckpt.fingerprint, "tokens_sha256": data_info["sha256"]}
        options = {"ffn_width": self.ffn_width, "kv_heads": kv_heads, "importance": "minitron-activation"}
        return Identity(inputs, options, {**inputs, "model": str(ckpt.path), "data": str(self.data)})

    def prepare(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        ckpt, config = self.ckpt, self.ckpt.config
        heads, kv, d = attention_shape(config)
        self.started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
        self.importance = importance(model, self.ids)
        state, self.kept = pruned_state(model, self.importance, self.ffn_width, self.kv_heads)
        new_config = self.new_config = AutoConfig.from_pretrained(ckpt.path)
        new_config.intermediate_size = self.ffn_width
        new_config.num_key_value_heads = self.kv_heads
        new_config.num_attention_heads = self.kv_heads * (heads // kv)
        new_config.head_dim = d  # explicit: hidden_size / heads would no longer give it
        with torch.device("meta"):
            small = AutoModelForCausalLM.from_config(new_config, dtype=torch.float32)
        small.load_state_dict(state, assign=True, strict=True)
        self.small = small.to(ckpt_dtype(config, torch.float32))

    def run(self, tmp: Path) -> dict:
        ckpt, config, imp, kept = self.ckpt, self.ckpt.config, self.importance, self.kept
        self.small.save_pretrained(tmp, safe_serialization=True)
        for path in ckpt.sidecar_files():
            if path.name not in ("config.json",) and not (tmp / path.name).exists():
                shutil.copy(path, tmp / path.name)
        (tmp / "importance.json").write_text(json.dumps(
            {str(i): {"channels": v["channels"].tolist(), "heads": v["heads"].tolist(), **kept[i]}
             for i, v in imp.items()}) + "\n")
        summary = {
            "architecture": self.arch,
            "source_params": param_count(config),
            "params": sum(p.numel() for p in self.small.parameters()),
            "ffn_width": self.ffn_width,
            "source_ffn_width": config["intermediate_size"],
            "kv_heads": self.kv_heads,
            "attention_heads": self.new_config.num_attention_heads,
            "calibration_tokens": int(self.ids.numel()),
            "seconds": round(time.perf_counter() - self.started, 2),
        }
        # The model card (README.md): the source as base model, its license, the pruning.
        write_checkpoint_card(tmp, {"stage": STAGE, "inputs": {"model": str(ckpt.path), "data": str(self.data)},
                                    "summary": summary}, name=self.out.name)
        return summary


@guarded("out", "dense", "data")
def prune(
    dense: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    ffn_width: int | None = None,
    params: int | None = None,
    kv_heads: int | None = None,
    tokens: int = 16384,
    seq_len: int = 512,
    force: bool = False,
    progress: bool = True,
) -> StageResult:
    """`edgeconv prune`: the prune stage on its own (see PruneStage). `progress` is accepted for symmetry with the
    other stages (the importance pass shows no bar)."""
    return run_stage(PruneStage(dense, out, data=data, ffn_width=ffn_width, params=params, kv_heads=kv_heads,
                                tokens=tokens, seq_len=seq_len), force=force)
