"""The models and data shipped inside the package, so every command works on a fresh machine offline.

`demo-moe` (the default MODEL of every command) is a 16-expert top-2 Qwen3-MoE trained from scratch for this
project; `demo-dense` is a dense Qwen3 with the same total parameters trained on the same data for the same
wall-clock time. Both were trained by benchmarks/demo/train.py; their card is docs/demo-models.md.
"""

from __future__ import annotations

from pathlib import Path

from edgeconv.errors import EdgeconvError

ASSETS = Path(__file__).parent / "assets"
DEMO_MODELS = {
    "demo-moe": "16-expert top-2 Qwen3-MoE teacher, 22 M parameters, trained here (Shakespeare, Python docs, skills)",
    "demo-dense": "dense Qwen3 with the teacher's total parameter count, trained on the same data and budget",
}
DEFAULT_MODEL = "demo-moe"
EVAL_DATA = ASSETS / "eval"  # held-out text, skills and multiple choice (edgeconv.evaluation.eval_data)
CALIBRATION_DATA = ASSETS / "calibration.jsonl"  # training-split text + skills, for calibrate/convert
DISTILL_DATA = ASSETS / "distill.jsonl"  # more of the same (~330 k tokens), for `build`'s default distillation


def is_demo(path: Path) -> bool:
    """Whether `path` is one of the shipped demo models."""
    return Path(path).resolve().parent == ASSETS.resolve() and Path(path).name in DEMO_MODELS


def demo_path(name: str) -> Path:
    path = ASSETS / name
    if not (path / "config.json").exists():
        raise EdgeconvError(f"the demo model {name} is not in this installation ({path})",
                            "reinstall edgeconv, or rebuild it with benchmarks/demo/train.py")
    return path
