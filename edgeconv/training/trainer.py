"""The training loop: AdamW with warm-up and cosine decay, gradient accumulation, checkpoints, metrics.

One optimizer step trains on the step's global batch of `batch_size` sequences (edgeconv.training.packing): with P
processes each takes batch_size / P of them and cuts them into `grad_accum` micro-batches. Every micro-batch
loss is a mean over its tokens divided by grad_accum, and DDP averages the gradients over the processes, so
(all sequences having the same length) the gradient is the mean over the global batch's tokens whatever P
is: P processes compute what one does, up to the order of floating-point sums. The logged loss is the same
mean, averaged over processes.

Distribution comes from accelerate: `Accelerator` wraps the student in DDP under `torchrun` or `accelerate
launch` (gloo on CPU, NCCL on GPUs), in FSDP with an accelerate config that asks for it (see
fsdp_accelerate_config.yaml beside this file), and does nothing in a plain single process.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeconv.config import DistillConfig
from edgeconv.progress import training_progress
from edgeconv.training import train_state
from edgeconv.training.losses import forward_kl, next_token_ce, topk_kl
from edgeconv.training.metrics import MetricsLog
from edgeconv.training.packing import check_split, step_rows
from edgeconv.training.teacher_cache import TeacherCache

logger = logging.getLogger(__name__)

# Test hook: SIGKILL the main process once this step is done (logged, and checkpointed if one is due): the
# resume tests.
KILL_AFTER_STEP = "EDGECONV_DISTILL_KILL_AFTER_STEP"


class OnlineTeacher:
    """The teacher model, run on each micro-batch; full-vocabulary KL."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def kl(self, student_logits: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, temperature: float,
           autocast: Callable) -> torch.Tensor:
        with torch.no_grad(), autocast():
            teacher_logits = self.model(input_ids=x, use_cache=False).logits
        return forward_kl(student_logits, teacher_logits, temperature)


class CachedTeacher:
    """Top-k teacher log-probs read from the offline cache; KL over k + 1 buckets."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def kl(self, student_logits: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, temperature: float,
           autocast: Callable) -> torch.Tensor:
        target = self.cache.targets(rows)
        device = student_logits.device
        target.logp, target.ids, target.tail_logp = (t.to(device) for t in (target.logp, target.ids, target.tail_logp))
        return topk_kl(student_logits, target, temperature)


@dataclass
class TrainOutcome:
    start_step: int  # the step this process resumed from (0 for a fresh run)
    steps: int
    seconds: float  # time in training steps in this process (checkpoint saves excluded)
    tokens: int  # tokens trained by all processes in this process's lifetime

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train(accelerator, student: torch.nn.Module, teacher, ids: torch.Tensor, order: torch.Tensor,
          cfg: DistillConfig, work: Path, run_key: str, progress: bool = True) -> tuple[torch.nn.Module, TrainOutcome]:
    """Train `student` (in place; returned wrapped by accelerate) from its last checkpoint in `work`."""
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = check_split(cfg.batch_size, cfg.grad_accum, world)
    student.train()
    # Only what is trained gets AdamW state: every parameter, or the LoRA adapters (edgeconv.training.lora).
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    # Stepped by us once per optimizer step; not passed through accelerator.prepare, whose wrapper would
    # step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cfg.lr_factor(step))
    student, optimizer = accelerator.prepare(student, optimizer)
    # After prepare: under FSDP accelerate recognises the wrapped model's own parameter list and clips through it.
    clipped = [p for p in student.parameters() if p.requires_grad]
    # Saved and restored by edgeconv.training.train_state (no pickle), not by accelerate's save_state/load_state.
    state = {"model": student, "optimizer": optimizer, "scheduler": scheduler}

    ckpt_root = Path(work) / "checkpoints"
    start = 0
    if accelerator.is_main_process:
        train_state.remove_temps(ckpt_root)
    accelerator.wait_for_everyone()
    found = train_state.latest(ckpt_root)
    if cfg.checkpoint_every < cfg.steps:
        train_state.check_supported(accelerator, cfg.steps)  # before training, not at the first checkpoint
    if found:
        start = train_state.load(accelerator, found[1], run_key, **state)
        logger.info(f"resumed from {found[1]} (step {start} of {cfg.steps})")
    metrics = MetricsLog(Path(work) / "metrics.jsonl", start, enabled=accelerator.is_main_process)
    kill_after = int(os.environ.get(KILL_AFTER_STEP, "-1"))

    trained_seconds, per_step = 0.0, cfg.tokens_per_step
    with training_progress(progress and accelerator.is_main_process) as bar:
        task = bar.add_task("distill", total=cfg.trained_tokens, completed=start * per_step, loss="?")
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            rows = step_rows(order, step, cfg.batch_size, rank, world)
            parts = torch.zeros(3)  # loss, kl, ce of this process's share, each a mean over its tokens
            for i in range(cfg.grad_accum):
                mrows = rows[i * micro:(i + 1) * micro]
                x = ids[mrows].long().to(accelerator.device)
                # DDP all-reduces gradients on the last micro-batch only.
                sync = nullcontext() if i == cfg.grad_accum - 1 else accelerator.no_sync(student)
                with sync:
                    with accelerator.autocast():
                        logits = student(input_ids=x, use_cache=False).logits
                    kl = teacher.kl(logits, x, mrows, cfg.temperature, accelerator.autocast)
                    with torch.no_grad() if not cfg.ce_weight else nullcontext():  # logged either way
                        ce = next_token_ce(logits, x)
                    loss = (1 - cfg.ce_weight) * kl + cfg.ce_weight * ce if cfg.ce_weight else kl
                    accelerator.backward(loss / cfg.grad_accum)
                parts += torch.stack([loss.detach(), kl.detach(), ce.detach()]).float().cpu() / cfg.grad_accum
            grad_norm = accelerator.clip_grad_norm_(clipped, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            parts = accelerator.reduce(parts.to(accelerator.device), reduction="mean").cpu()
            seconds = time.perf_counter() - t0
            trained_seconds += seconds
            loss_v, kl_v, ce_v = (float(v) for v in parts)
            metrics.write({"step": step + 1, "tokens": (step + 1) * per_step, "loss": loss_v, "kl": kl_v,
                           "ce": ce_v, "lr": lr, "grad_norm": float(grad_norm), "seconds": round(seconds, 4),
                           "tokens_per_second": round(per_step / seconds, 1)})
            bar.update(task, advance=per_step, loss=f"{loss_v:.4f}")
            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                train_state.save(accelerator, ckpt_root, done, run_key, cfg.keep_checkpoints, **state)
            if done == kill_after and accelerator.is_main_process:
                os.kill(os.getpid(), signal.SIGKILL)
    outcome = TrainOutcome(start, cfg.steps, trained_seconds, (cfg.steps - start) * per_step)
    return student, outcome
