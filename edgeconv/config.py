"""The options of a distillation run, validated before any model is loaded.

Sizes are counted in sequences and optimizer steps derived from the token budget: a step trains on
`batch_size` packed sequences of `seq_len` tokens (the global batch, whatever the number of processes), so
the run has ceil(tokens / (batch_size * seq_len)) steps and trains on exactly steps * batch_size * seq_len
tokens (at least `tokens`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeconv.errors import EdgeconvError

# Options that change how often work is saved, not what is computed: left out of the run key, so a run may be
# resumed with another --checkpoint-every.
NOT_IN_KEY = ("checkpoint_every", "keep_checkpoints")


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(65536, gt=0, description="training tokens (the budget)")
    seq_len: int = Field(256, ge=2, description="tokens per packed sequence")
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step, over all processes")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (per process)")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decays to lr * min_lr_ratio")
    warmup: float = Field(0.05, ge=0, lt=1, description="linear warm-up, as a fraction of the steps")
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0, description="softmax temperature of teacher and student in the KL")
    ce_weight: float = Field(0.0, ge=0, le=1, description="loss = (1 - w) * T^2 * KL + w * CE(data)")
    mode: Literal["online", "offline"] = "online"
    top_k: int = Field(64, ge=1, description="offline: teacher log-probs cached per token")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    @classmethod
    def make(cls, **options) -> "DistillConfig":
        """Validate, turning the first problem into one line that names the CLI option."""
        try:
            return cls(**options)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "options"
            value = options.get(name, "")
            raise EdgeconvError(f"--{name.replace('_', '-')} {value}: {first['msg'].lower()}",
                                "see `edgeconv distill --help`")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    @property
    def sequences(self) -> int:
        return self.steps * self.batch_size

    @property
    def trained_tokens(self) -> int:
        return self.sequences * self.seq_len

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.steps)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then cosine decay."""
        warm = self.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def key_options(self) -> dict:
        """What decides the result (everything but how often to checkpoint, and k when nothing is cached)."""
        skip = NOT_IN_KEY + (("top_k",) if self.mode == "online" else ())
        return {k: v for k, v in self.model_dump().items() if k not in skip}
