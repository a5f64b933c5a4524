"""Resumable training state, saved every N optimizer steps and loaded by a rerun of the same command.

A checkpoint `step-00000040/` holds what accelerate's `save_state` writes (the student's weights, the AdamW
state, the registered LR scheduler, and per process the python, numpy, torch and CUDA RNG states; under FSDP
the sharded model and optimizer) plus `edgeconv_state.json` with the step and the run key. The data position
is the step itself (edgeconv.distill.data). Every process writes its part into `.step-00000040.tmp/`, and the
main process renames it when all are done, so a checkpoint directory that exists is complete; a run killed
while saving leaves only the temp directory, removed by the next run. The last `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from edgeconv.errors import EdgeconvError

STATE = "edgeconv_state.json"
NAME = re.compile(r"^step-(\d{8})$")


def name(step: int) -> str:
    return f"step-{step:08d}"


def complete(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under root, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(root).iterdir() if (m := NAME.match(p.name)) and (p / STATE).is_file()]
    return sorted(found)


def latest(root: Path) -> tuple[int, Path] | None:
    found = complete(root)
    return found[-1] if found else None


def save(accelerator, root: Path, step: int, run_key: str, keep: int) -> Path:
    """Collective: every process must call it. Returns the checkpoint directory."""
    root = Path(root)
    final, tmp = root / name(step), root / f".{name(step)}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Tied embeddings are saved once and tied again on load: accelerate's warning about it is noise here.
    quiet = logging.getLogger("accelerate.utils.other")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    finally:
        quiet.setLevel(level)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps({"step": step, "run_key": run_key}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path, run_key: str) -> int:
    """Restore the state saved in `path` (collective); returns its step."""
    state = json.loads((Path(path) / STATE).read_text())
    if state.get("run_key") != run_key:
        raise EdgeconvError(f"checkpoint {path} belongs to another run", "pass --force to start over")
    accelerator.load_state(str(path))
    return int(state["step"])


def remove_temps(root: Path) -> None:
    for stale in Path(root).glob(".step-*.tmp") if Path(root).is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
