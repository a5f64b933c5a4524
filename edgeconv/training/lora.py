"""Distillation with LoRA adapters (`--lora-rank R`): the student's weights are frozen and rank-R adapters on its
linear layers are trained, then merged into the weights, so the output is a plain dense checkpoint again.

Why: full training keeps, per parameter, an fp32 weight, its gradient and AdamW's two moments (16 bytes), so a
3 B-parameter student (Qwen3-30B-A3B's, 48 layers) needs ~48 GB before a single activation. With adapters the
frozen weights cost 4 bytes each and the trained state is a few MB; activations are the rest (cut them with
--grad-accum). The adapters come from peft (LoraConfig with target_modules="all-linear": every nn.Linear of the
decoder, not the output head).
"""

from __future__ import annotations

import logging

import torch

from edgeconv.config import DistillConfig

logger = logging.getLogger(__name__)


def with_adapters(model: torch.nn.Module, cfg: DistillConfig) -> torch.nn.Module:
    """The student wrapped with rank-`cfg.lora_rank` adapters (peft), only those trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha_value, lora_dropout=0.0,
                        target_modules="all-linear", bias="none", init_lora_weights=True)
    wrapped = get_peft_model(model, config)
    trained, total = trainable_counts(wrapped)
    logger.info(f"LoRA rank {cfg.lora_rank} (alpha {cfg.lora_alpha_value:g}): {trained:,} trained parameters "
                f"of {total:,} ({100 * trained / max(total, 1):.2f} %), the student's own weights frozen")
    return wrapped


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with the trained adapters added into its weights (peft's merge_and_unload)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def trainable_counts(model: torch.nn.Module) -> tuple[int, int]:
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in model.parameters())
