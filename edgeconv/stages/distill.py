"""`distill`: train a dense student on its MoE teacher's next-token distributions; writes a stock HF checkpoint.

    OUT/                 the distilled student (config.json, model.safetensors, the student's tokenizer files),
                         manifest.json, metrics.jsonl (one line per optimizer step), loss.png
    OUT.work/distill/    run.json (this run's key and options), checkpoints/step-N/ (the last two),
                         metrics.jsonl while training, teacher-cache/ (offline mode, unless --teacher-cache)

The offline cache's teacher runs whole when it fits in memory, else one decoder layer at a time (edgeconv.forward),
on --cache-device in --cache-dtype; the choice is logged.

Everything that can be wrong with the inputs is checked before a model is loaded: the pair (edgeconv.training.models),
the options (DistillConfig), the data against the token budget (edgeconv.training.packing). The run key is a hash
of the teacher's and student's fingerprints, the token ids' sha256 and the options that change the result; a
rerun of a finished run is a no-op, a rerun of an interrupted one resumes from its last checkpoint, and a work
directory holding another run's checkpoints is refused unless --force. OUT appears only when complete (atomic
rename); the work directory (and OUT.work/ if nothing else is in it) is removed after success, a --teacher-cache
elsewhere is kept.

Under several processes (`torchrun`, `accelerate launch`) every process runs this same function: the checks are
deterministic, so they agree; only the main process writes run.json, metrics and OUT.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeconv.config import DistillConfig
from edgeconv.errors import EdgeconvError
from edgeconv.forward.layer_by_layer import (ALLOWANCE, ForwardOptions, LayerByLayerModel, resolve_device,
                                             resolve_dtype, use_layer_by_layer)
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import check_not_an_input, guarded
from edgeconv.io.output_dir import (
    atomic_output_dir,
    check_can_write,
    finished_output,
    sha256_file,
    stage_key,
    write_manifest,
)
from edgeconv.progress import token_progress
from edgeconv.training import teacher_cache as cache_mod
from edgeconv.training import metrics, train_state
from edgeconv.training.models import (
    check_pair,
    check_same_tokenizer,
    has_tokenizer,
    load_model,
    load_tokenizer,
    weights_dtype,
)
from edgeconv.training.packing import check_split, pack_tokens, sequence_order
from edgeconv.training.trainer import CachedTeacher, OnlineTeacher, train

STAGE = "distill"
RUN_FILE = "run.json"


@dataclass
class DistillResult:
    out: Path
    skipped: bool  # OUT was already this run's finished output
    manifest: dict  # OUT's manifest ({} when only the teacher cache was built)
    cache: dict | None = field(default=None)  # the teacher cache's manifest (offline mode)


def work_dir(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f"{out.name}.work" / "distill"


def resolve_precision(precision: str) -> str:
    """auto: bf16 autocast on a CUDA GPU that has bf16, fp32 elsewhere (CPU bf16 only when asked)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


@guarded("out", "teacher", "student", "data", work="distill")
def distill(
    teacher: str | Path,
    student: str | Path,
    data: str | Path,
    out: str | Path,
    config: DistillConfig | None = None,
    *,
    teacher_cache: str | Path | None = None,
    cache_only: bool = False,
    cache_forward: ForwardOptions | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> DistillResult:
    cfg = config or DistillConfig()
    if cache_only and cfg.mode != "offline":
        raise EdgeconvError("--cache-only builds the offline teacher cache", "pass --mode offline with it")
    if cache_forward not in (None, ForwardOptions()) and cfg.mode != "offline":
        raise EdgeconvError("--cache-device, --cache-dtype, --layer-by-layer/--whole-model and --cache-chunk are "
                            "for the offline teacher cache", "pass --mode offline, or drop them")
    cache_forward = cache_forward or ForwardOptions()
    if cfg.mode == "offline":  # an unavailable --cache-device or a bad --cache-dtype fails before any work
        cache_forward.resolve("--cache-device", "--cache-dtype")
    out = Path(out).absolute()
    if teacher_cache is not None:  # replacing OUT would delete a cache inside it
        check_not_an_input(out, {"teacher cache": teacher_cache}, existing_only=False)
    t_ckpt, s_ckpt = Checkpoint.open(teacher), Checkpoint.open(student)
    check_pair(t_ckpt, s_ckpt)
    _check_sizes(cfg, t_ckpt, s_ckpt)
    t_tok = load_tokenizer(t_ckpt, "teacher")
    tokenizer_from = s_ckpt if has_tokenizer(s_ckpt) else t_ckpt
    if tokenizer_from is s_ckpt:
        check_same_tokenizer(t_tok, load_tokenizer(s_ckpt, "student"), t_ckpt, s_ckpt)
    budget = f"--tokens {cfg.tokens} = {cfg.steps} steps x --batch-size {cfg.batch_size} x --seq-len {cfg.seq_len}"
    work = work_dir(out)
    fresh = not work.exists()
    try:
        # The packed tokens live on disk (4 bytes a token, memory-mapped) in the work directory, so a resumed
        # run does not tokenize again; they go with the work directory after success.
        ids, data_info = pack_tokens(t_tok, Path(data), cfg.sequences, cfg.seq_len, cfg.batch_size, budget,
                                     cache_dir=work / "tokens")

        precision = resolve_precision(cfg.precision)
        inputs = {"teacher_fingerprint": t_ckpt.fingerprint, "student_fingerprint": s_ckpt.fingerprint,
                  "tokens_sha256": data_info["sha256"]}
        options = {**cfg.key_options(), "precision": precision}
        key = stage_key(STAGE, inputs, options)
        if not cache_only:
            done = finished_output(out, STAGE, key)
            if done:
                if fresh:
                    _remove_work(work, None)  # the tokens this check needed
                return DistillResult(out, True, done)
            check_can_write(out, force, key)
        _check_work(work, key, inputs, options, force)

        accelerator = _accelerator(precision)
        check_split(cfg.batch_size, cfg.grad_accum, accelerator.num_processes)  # before the caching pass too
    except BaseException:
        if fresh:
            _remove_work(work, None)  # a run refused before it started leaves nothing, tokens included
        raise
    main = accelerator.is_main_process
    if main:
        _claim_work(work, key, inputs, options, force)
    accelerator.wait_for_everyone()
    device = accelerator.device
    teacher_dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32

    cache_manifest = None
    if cfg.mode == "offline":
        cache_path = Path(teacher_cache).absolute() if teacher_cache else work / "teacher-cache"
        spec = cache_mod.CacheSpec(t_ckpt.fingerprint, data_info["sha256"], cfg.sequences, cfg.seq_len, cfg.top_k,
                                   cfg.temperature, int(s_ckpt.config["vocab_size"]))
        cache_manifest = _build_cache(accelerator, cache_path, spec, t_ckpt, ids, cfg, teacher_dtype, force,
                                      progress, log, cache_forward)
        if cache_only:
            return DistillResult(out, False, {}, cache_manifest)
        teacher_source = CachedTeacher(cache_mod.TeacherCache(cache_path, spec))
    else:
        teacher_source = OnlineTeacher(load_model(t_ckpt, "teacher", teacher_dtype, device))

    torch.manual_seed(cfg.seed)
    model = load_model(s_ckpt, "student", torch.float32, device)
    started = time.perf_counter()
    model, outcome = train(accelerator, model, teacher_source, ids, sequence_order(cfg.sequences, cfg.seed), cfg,
                           work, key, progress=progress, log=log)
    del teacher_source
    gc.collect()

    state = accelerator.get_state_dict(model)  # collective under FSDP (gathers the full weights)
    manifest: dict = {}
    if main:
        rows = metrics.read(work / "metrics.jsonl")
        with atomic_output_dir(out, force, key) as tmp:
            _save_student(accelerator.unwrap_model(model), state, weights_dtype(s_ckpt), tmp)
            for path in tokenizer_from.sidecar_files():
                if path.name != "generation_config.json" or tokenizer_from is s_ckpt:
                    shutil.copy(path, tmp / path.name)
            shutil.copy(work / "metrics.jsonl", tmp / "metrics.jsonl")
            metrics.plot(rows, tmp / "loss.png", f"distill {s_ckpt.path.name} from {t_ckpt.path.name}: "
                                                 f"{cfg.mode}, T={cfg.temperature:g}, ce_weight={cfg.ce_weight:g}")
            files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
            summary = _summary(cfg, rows, outcome, accelerator.num_processes, precision, data_info,
                               time.perf_counter() - started, cache_manifest, tokenizer_from is t_ckpt)
            manifest = write_manifest(tmp, STAGE, key, {**inputs, "teacher": str(t_ckpt.path),
                                                        "student": str(s_ckpt.path), "data": str(Path(data).absolute())},
                                      options, files, summary)
        _remove_work(work, Path(teacher_cache).absolute() if teacher_cache else None)
    accelerator.wait_for_everyone()
    return DistillResult(out, False, manifest, cache_manifest)


def _accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = "bf16" if precision == "bf16" else "no"
    known = AcceleratorState._shared_state.get("_mixed_precision")
    if known not in (None, mixed):
        # A second run in this process (a library caller, a test) at another precision: accelerate keeps one
        # process-wide state and refuses to change it. Its process group and device (PartialState) stay.
        AcceleratorState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed)


def _check_sizes(cfg: DistillConfig, teacher: Checkpoint, student: Checkpoint) -> None:
    for role, ckpt in (("teacher", teacher), ("student", student)):
        limit = ckpt.config.get("max_position_embeddings")
        if limit and cfg.seq_len > limit:
            raise EdgeconvError(f"--seq-len {cfg.seq_len} is longer than the {role}'s context ({limit} positions)",
                                f"use --seq-len {limit} or less")
    vocab = int(student.config["vocab_size"])
    if cfg.mode == "offline" and cfg.top_k >= vocab:
        raise EdgeconvError(f"--top-k {cfg.top_k} leaves no tail of the {vocab}-token vocabulary",
                            "cache fewer tokens (typically 32-128), or distill --mode online (full vocabulary)")


def _read_run(work: Path) -> dict:
    try:
        return json.loads((work / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _check_work(work: Path, key: str, inputs: dict, options: dict, force: bool) -> None:
    """Refuse a work directory holding another run's checkpoints (they would be lost), unless forced."""
    if force or not train_state.complete(work / "checkpoints"):
        return
    run = _read_run(work)
    if run.get("key") == key:
        return
    theirs = {**run.get("inputs", {}), **run.get("options", {})}
    ours = {**inputs, **options}
    diffs = sorted(k for k in ours if theirs.get(k) != ours[k]) if run else []
    what = f" (different {', '.join(d.replace('_', '-') for d in diffs)})" if diffs else ""
    raise EdgeconvError(
        f"{work} holds checkpoints of another distillation run{what}",
        "rerun that run's exact command to resume it, or pass --force to discard its checkpoints and start over",
    )


def _claim_work(work: Path, key: str, inputs: dict, options: dict, force: bool) -> None:
    """Main process: make the work directory this run's (discarding another run's state when forced)."""
    if _read_run(work).get("key") != key or force:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        (work / "metrics.jsonl").unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / RUN_FILE).write_text(json.dumps({"key": key, "inputs": inputs, "options": options}, indent=1) + "\n")


def _remove_work(work: Path, keep: Path | None) -> None:
    """After success: checkpoints, metrics and a cache kept in the work directory are not needed any more."""
    if keep is not None and keep.is_relative_to(work):
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        return
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.parent.rmdir()  # OUT.work/, if distill was all it held
    except OSError:
        pass


def _build_cache(accelerator, path: Path, spec: cache_mod.CacheSpec, t_ckpt: Checkpoint, ids: torch.Tensor,
                 cfg: DistillConfig, dtype: torch.dtype, force: bool, progress: bool, log,
                 forward: ForwardOptions | None = None) -> dict:
    """The offline pass (all processes share the rows), unless a complete cache of this spec is there.

    The teacher runs whole when it fits in memory, else one layer at a time (edgeconv.forward), this process's
    rows in chunks, each chunk one pass over the teacher; `forward` (--cache-device, --cache-dtype,
    --layer-by-layer/--whole-model, --cache-chunk) decides, `auto` meaning this process's accelerate device and
    the dtype --precision gives."""
    forward = forward or ForwardOptions()
    status, why = cache_mod.cache_status(path, spec)
    if status == "complete":
        log(f"teacher cache {path}: complete, reused")
        return json.loads((path / cache_mod.MANIFEST).read_text())
    if status == "foreign":
        raise EdgeconvError(why, "pass another --teacher-cache (a new or empty directory)")
    if status == "other" and not force:
        raise EdgeconvError(why, "pass --force to rebuild it, or another --teacher-cache")
    if accelerator.is_main_process:
        cache_mod.open_for_writing(path, spec, status)
    accelerator.wait_for_everyone()
    world, rank = accelerator.num_processes, accelerator.process_index
    writer = cache_mod.TeacherCache(path, spec, writable=True)
    missing = writer.missing_rows()
    rows = missing[missing % world == rank]
    log(f"teacher cache {path}: {len(missing):,} of {spec.sequences:,} sequences to compute "
        f"({spec.bytes_per_token} bytes per token)")
    started = time.perf_counter()
    complete_pass = len(missing) == spec.sequences
    if len(rows):
        device = accelerator.device if forward.device == "auto" else resolve_device(forward.device, "--cache-device")
        if forward.dtype != "auto":
            dtype = resolve_dtype(forward.dtype, device, "--cache-dtype")
        elif device.type != "cuda":
            dtype = torch.float32  # what --precision gives on a CPU
        micro = max(1, cfg.batch_size // (world * cfg.grad_accum))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        # The whole model's fp32 logits of one micro-batch, about four times over (logits, / T, log_softmax and the
        # tail's masked copy; measured: 17.8 GB peak for a 7.5 GB teacher with 2.5 GB of logits per micro-batch).
        logits_bytes = micro * spec.seq_len * spec.vocab_size * 4
        lbl = use_layer_by_layer(t_ckpt, "teacher cache", dtype, device, forward.layer_by_layer, processes=local,
                                 allowance=ALLOWANCE + 4 * logits_bytes)
        with token_progress(progress and accelerator.is_main_process) as bar:
            task = bar.add_task("teacher top-k cache", total=len(rows) * spec.seq_len)
            advance = lambda n: bar.update(task, advance=n * spec.seq_len)  # noqa: E731
            if lbl:
                model = LayerByLayerModel(t_ckpt, device=device, dtype=dtype, batch_size=micro,
                                          chunk_sequences=forward.chunk_sequences,
                                          max_activation_bytes=forward.max_activation_bytes)
                cache_mod.fill_layer_by_layer(writer, model, ids, rows, flush_rows=max(micro, 16), on_rows=advance)
                log(f"teacher cache: {len(rows):,} sequences in {model.passes} layer-by-layer pass(es)")
            else:
                model = load_model(t_ckpt, "teacher", dtype, device).eval()
                cache_mod.fill(writer, model, ids, rows, micro, device, accelerator.autocast, on_rows=advance)
        del model
        gc.collect()
    writer.close()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started if complete_pass else None  # teacher loading included
    manifest = cache_mod.finish(path, spec, seconds) if accelerator.is_main_process else {}
    accelerator.wait_for_everyone()
    return manifest or json.loads((path / cache_mod.MANIFEST).read_text())


def _save_student(model: torch.nn.Module, state: dict, dtype: torch.dtype, out: Path) -> None:
    """save_pretrained with the weights in the student's own dtype (tensors that shared storage still do)."""
    cast: dict[int, torch.Tensor] = {}
    weights = {}
    for name, t in state.items():
        ptr = t.data_ptr()
        if ptr not in cast:
            cast[ptr] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
        weights[name] = cast[ptr]
    model.save_pretrained(out, state_dict=weights, safe_serialization=True)
    for path in out.glob("*.safetensors"):  # written owner-only (0600); a shipped model is world-readable
        path.chmod(0o644)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for k in ("dtype", "torch_dtype"):
        if k in config:
            config[k] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _summary(cfg: DistillConfig, rows: list[dict], outcome, world: int, precision: str, data_info: dict,
             seconds: float, cache: dict | None, tokenizer_from_teacher: bool) -> dict:
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    return {
        "steps": cfg.steps,
        "tokens": cfg.trained_tokens,
        "sequences": cfg.sequences,
        "documents": data_info["documents"],
        "mode": cfg.mode,
        "processes": world,
        "precision": precision,
        "first_loss": first.get("loss"),
        "final_loss": last.get("loss"),
        "final_kl": last.get("kl"),
        "final_ce": last.get("ce"),
        "resumed_from_step": outcome.start_step,
        "train_seconds": round(outcome.seconds, 2),
        "train_tokens_per_second": round(outcome.tokens_per_second, 1),
        "seconds": round(seconds, 2),
        "cache_bytes_per_token": cache["bytes_per_token"] if cache else None,
        "cache_bytes": cache["bytes"] if cache else None,
        "tokenizer_from": "teacher" if tokenizer_from_teacher else "student",
        "median_step_seconds": float(np.median([r["seconds"] for r in rows])) if rows else None,
    }
