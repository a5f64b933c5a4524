"""lm-evaluation-harness on an artifact: an HF checkpoint through lm-eval's `hf` model (CPU, float32 by default), a
GGUF through our `edgeconv-gguf` model on llama-cpp-python (edgeconv/evaluation/lm_eval_gguf.py says why not
lm-eval's own `gguf` model). Tasks come from an include path, by default edgeconv's own task YAMLs written over
the evaluation data (edgeconv/evaluation/lm_eval_tasks.py), then lm-eval's built-in tasks if a name is not there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgeconv.errors import EdgeconvError


def _task_manager(include_path: Path, tasks: list[str]):
    """The TaskManager (over `include_path`, and lm-eval's own tasks if needed) and the names, globs expanded."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    if not all(manager.match_tasks([t]) for t in tasks):
        manager = TaskManager(include_path=str(include_path))  # lm-eval's own tasks too (a few seconds to index)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise EdgeconvError(f"no lm-eval task or tag {', '.join(missing)} in {include_path} or lm-eval's tasks",
                            "see `lm_eval ls tasks`, or pass --include-path with your task YAMLs")
    return manager, list(dict.fromkeys(name for t in tasks for name in manager.match_tasks([t])))


def run_lm_eval(model: Path, tasks: str | list[str], *, runtime: str | None = None, include_path: Path | None = None,
                data: Path | None = None, limit: int | float | None = None, max_length: int = 2048,
                batch_size: int = 1, threads: int | None = None, device: str = "cpu", dtype: str = "float32",
                log_samples: bool = False) -> dict:
    """Run lm_eval.simple_evaluate on `model` (an HF checkpoint directory: `hf`; a .gguf file: `edgeconv-gguf`).

    `tasks`: names, tags or globs (a list or a comma list; `edgeconv` is the tag of edgeconv's tasks). Without
    `include_path` edgeconv's task YAMLs are written over `data` (default: the shipped held-out set) into a
    temporary directory. Returns simple_evaluate's output: `["results"][task]["acc,none"]`, ...
    """
    import lm_eval

    from edgeconv.evaluation.runtimes import detect_runtime

    model = Path(model)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    if not names:
        raise EdgeconvError("no lm-eval tasks given", "pass --lm-eval edgeconv, or a comma list of task names")
    runtime = runtime or detect_runtime(model)
    if runtime == "torch":
        if threads:
            import torch

            torch.set_num_threads(threads)
        lm, model_args = "hf", {"pretrained": str(model), "dtype": dtype, "max_length": max_length}
    elif runtime == "gguf":
        from edgeconv.evaluation.lm_eval_gguf import NAME

        lm = NAME
        model_args = {"pretrained": str(model), "max_length": max_length, "n_threads": threads}
        device = None  # llama.cpp runs where the GGUF's layers are offloaded (n_gpu_layers, 0: the CPU)
    else:
        raise EdgeconvError(f"lm-eval runs an HF checkpoint or a GGUF, and {model.name} runs in {runtime}",
                            "evaluate the HF checkpoint it came from, or its GGUF export")
    with tempfile.TemporaryDirectory(prefix="edgeconv-lm-eval-") as tmp:
        if include_path is None:
            from edgeconv.demo import EVAL_DATA
            from edgeconv.evaluation.lm_eval_tasks import write_lm_eval_tasks

            include_path = Path(tmp)
            write_lm_eval_tasks(include_path, Path(data or EVAL_DATA))
        manager, names = _task_manager(Path(include_path), names)
        out = lm_eval.simple_evaluate(model=lm, model_args={k: v for k, v in model_args.items() if v is not None},
                                      tasks=names, task_manager=manager, batch_size=batch_size, device=device,
                                      limit=limit, log_samples=log_samples)
    if out is None:  # only a non-zero rank of a distributed run gets None
        raise EdgeconvError("lm-eval returned no results", "run it in one process")
    return out


def results_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every metric of every task in simple_evaluate's `results`."""
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric if filt == "none" else key, float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def results_table(results: dict) -> str:
    """A markdown table: task, metric, value, stderr."""
    lines = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, metric, value, stderr in results_rows(results):
        lines.append(f"| {task} | {metric} | {value:.6g} | {'' if stderr is None else f'{stderr:.4f}'} |")
    return "\n".join(lines)
