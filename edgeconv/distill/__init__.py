"""Knowledge distillation of a dense student from its (MoE) teacher: `edgeconv distill`.

config.py (options), models.py (teacher/student checks and loading), data.py (packed token stream, step ->
batch), losses.py (full-vocabulary and cached top-k forward KL), cache.py (offline teacher top-k cache),
checkpoint.py (resumable state), metrics.py (JSONL + loss curve), trainer.py (the loop, on accelerate),
stage.py (the stage: checks, run key, output directory).
"""

from edgeconv.distill.config import DistillConfig
from edgeconv.distill.stage import DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "distill"]
