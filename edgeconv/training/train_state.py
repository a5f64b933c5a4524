"""Resumable training state, saved every N optimizer steps and loaded by a rerun of the same command.

A checkpoint holds no pickle, and loading one unpickles nothing: tensors are read with safetensors, the rest
with json (a work directory is not trusted more than the data: whoever can write a pickle there could run
code in the next resume). `step-00000040/` holds

    model.safetensors        the student's weights (tensors that share storage, tied embeddings, saved once);
                             with LoRA only the adapters (the frozen weights are the student's own)
    optimizer.safetensors    the AdamW state's tensors (exp_avg, exp_avg_sq, step per parameter)
    optimizer.json           the rest of its state_dict (param_groups' hyperparameters), naming those tensors
    scheduler.json           the LR scheduler's state_dict
    rng-P.json, rng-P.safetensors   process P's python, numpy, torch (and CUDA) RNG states
    edgeconv_state.json      the step, the run key, the format; written last

The data position is the step itself (edgeconv.training.packing). Under DDP every process holds the same weights
and AdamW state, so the main process writes them; each process writes its own RNG files. A checkpoint folder
holding a pickle-like file (`*.pkl`, `*.bin`, `*.pt`, `*.pth`, `*.pickle`: an older edgeconv's accelerate
checkpoint, or a planted file) is refused before anything in it is read.

FSDP (and DeepSpeed) checkpoints are refused: they would need the sharded weights and AdamW state gathered
into full state dicts (FSDP.optim_state_dict and friends) and scattered again on load, which cannot be run on
the CPU-only machines this is tested on (tried: FSDP's optimizer-state gathering crashes on CPU over gloo), so
it is not implemented rather than shipped untested; an FSDP run trains without checkpoints (--checkpoint-every at
least the step count).

Every process writes its part into `.step-00000040.tmp/`, and the main process renames it when all are done,
so a checkpoint directory that exists is complete; a run killed while saving leaves only the temp directory,
removed by the next run. The last `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from edgeconv.errors import EdgeconvError

STATE = "edgeconv_state.json"
FORMAT = "edgeconv-distill-2"  # 1 was accelerate's save_state (pickles)
NAME = re.compile(r"^step-(\d{8})$")
MODEL, OPTIMIZER, SCHEDULER = "model", "optimizer", "scheduler"
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".pickle")
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate's distributed types that shard the state
TAG = "__edgeconv__"  # marks a JSON object standing for a tuple, a tensor, an array or a non-string-keyed dict


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


def check_supported(accelerator, steps: int | None = None) -> None:
    """Refuse a checkpoint under FSDP / DeepSpeed (see the module's docstring); `steps`: the run's step count."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind in SHARDED:
        raise EdgeconvError(
            f"distillation checkpoints under {kind} are not supported (gathering the sharded weights and AdamW "
            "state into edgeconv's pickle-free checkpoint is not implemented)",
            f"pass --checkpoint-every {steps if steps else 'N (at least the step count)'} to train without "
            "checkpoints, or train under DDP (torchrun, accelerate launch --multi_gpu)",
        )


def save(accelerator, root: Path, step: int, run_key: str, keep: int, *, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer, scheduler) -> Path:
    """Collective: every process must call it. Returns the checkpoint directory."""
    check_supported(accelerator)
    root = Path(root)
    final, tmp = root / name(step), root / f".{name(step)}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_weights(accelerator.unwrap_model(model), tmp / f"{MODEL}.safetensors")
        _write(tmp, OPTIMIZER, optimizer.state_dict())
        _write(tmp, SCHEDULER, scheduler.state_dict())
    _write(tmp, f"rng-{accelerator.process_index}", _rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"format": FORMAT, "step": step, "run_key": run_key, "processes": accelerator.num_processes}
        (tmp / STATE).write_text(json.dumps(state) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path, run_key: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler) -> int:
    """Restore the state saved in `path` (every process calls it); returns its step."""
    path = Path(path)
    start_over = f"delete {path.parent} or pass --force to start over"
    refuse_pickles(path, start_over)
    check_supported(accelerator)
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise EdgeconvError(f"checkpoint {path} is unreadable ({exc})", start_over) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        raise EdgeconvError(f"checkpoint {path} was written by another edgeconv version", start_over)
    if state.get("run_key") != run_key:
        raise EdgeconvError(f"checkpoint {path} belongs to another run", "pass --force to start over")
    try:
        # Read on the CPU (safetensors refuses accelerate's "cpu:0"); load_state_dict copies onto the parameters.
        _load_weights(accelerator.unwrap_model(model), path / f"{MODEL}.safetensors")
        optimizer.load_state_dict(_read(path, OPTIMIZER))
        scheduler.load_state_dict(_read(path, SCHEDULER))
        rng = f"rng-{accelerator.process_index}"
        if (path / f"{rng}.json").is_file():  # absent when resumed on more processes: nothing to restore
            _set_rng_state(_read(path, rng))
    except EdgeconvError:
        raise
    except Exception as exc:  # a truncated or edited file: safetensors, json, or a state_dict that does not fit
        raise EdgeconvError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})", start_over) from None
    return int(state["step"])


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    """Every weight, or only the trained ones when some are frozen (LoRA: the student's own weights are read
    from its checkpoint again on resume, so only the adapters are saved)."""
    if all(p.requires_grad for p in model.parameters()):
        # save_model writes tensors that share storage (tied embeddings) once; load_model ties them again.
        save_model(model, str(path))
    else:
        save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(path))


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    if all(p.requires_grad for p in model.parameters()):
        load_model(model, path)
        return
    tensors = load_file(path)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != trained:
        raise ValueError(f"it holds {len(tensors)} tensors, this run trains {len(trained)} "
                         f"(e.g. {sorted(set(tensors) ^ trained)[:1]})")
    model.load_state_dict(tensors, strict=False)


def refuse_pickles(path: Path, hint: str) -> None:
    """Refuse a checkpoint folder holding a file that only pickle would read (none is opened)."""
    for f in sorted(Path(path).rglob("*")):
        if f.suffix.lower() in PICKLE_SUFFIXES:
            raise EdgeconvError(f"checkpoint {path} holds {f.relative_to(path)}, a pickle file, which edgeconv "
                                "does not load (an older edgeconv's checkpoint, or a planted file)", hint)


def remove_temps(root: Path) -> None:
    for stale in Path(root).glob(".step-*.tmp") if Path(root).is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)


# --- RNG states ---------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)


# --- state dicts as JSON + safetensors ------------------------------------------------------------------------

def _write(directory: Path, stem: str, obj) -> None:
    """obj (state_dict-like: dicts, lists, tuples, numbers, strings, None, tensors, numpy arrays) as
    STEM.json, its tensors in STEM.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(obj, tensors, "")
    if tensors:
        save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(doc) + "\n")


def _read(directory: Path, stem: str):
    doc = json.loads((directory / f"{stem}.json").read_text())
    tensor_file = directory / f"{stem}.safetensors"
    tensors = load_file(tensor_file) if tensor_file.is_file() else {}
    return _decode(doc, tensors)


def _encode(obj, tensors: dict, where: str):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = where or "."
        if key in tensors:
            raise ValueError(f"two tensors at {key} in a distillation checkpoint")
        tensors[key] = obj.detach().cpu().contiguous()
        return {TAG: "tensor", "key": key}
    if isinstance(obj, np.ndarray):
        return {TAG: "ndarray", "dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {TAG: "tuple", "items": [_encode(v, tensors, f"{where}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {TAG: "dict", "items": [[_encode(k, tensors, f"{where}.key{i}"), _encode(v, tensors, f"{where}.{k}")]
                                       for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot save a {type(obj).__name__} at {where or 'the top'} in a distillation checkpoint")


def _decode(doc, tensors: dict):
    if isinstance(doc, list):
        return [_decode(v, tensors) for v in doc]
    if not isinstance(doc, dict):
        return doc
    kind = doc.get(TAG)
    if kind is None:
        return {k: _decode(v, tensors) for k, v in doc.items()}
    if kind == "tensor":
        return tensors[doc["key"]]
    if kind == "ndarray":
        return np.array(doc["data"], dtype=np.dtype(doc["dtype"])).reshape(doc["shape"])
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in doc["items"])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in doc["items"]}
    raise ValueError(f"unknown {TAG} entry {kind!r}")
