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
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from edgeconv.config import DistillConfig
from edgeconv.errors import EdgeconvError
from edgeconv.forward.layer_by_layer import (
    ALLOWANCE,
    ForwardOptions,
    LayerByLayerModel,
    resolve_device,
    resolve_dtype,
    use_layer_by_layer,
)
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import check_not_an_input, guarded, work_dir
from edgeconv.io.output_dir import stage_key
from edgeconv.progress import token_progress
from edgeconv.reporting.model_card import write_checkpoint_card
from edgeconv.stages.stage import Identity, StageBase, StageResult, run_stage
from edgeconv.training import metrics, train_state
from edgeconv.training import teacher_cache as cache_mod
from edgeconv.training.lora import merged, with_adapters
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

logger = logging.getLogger(__name__)

STAGE = "distill"
RUN_FILE = "run.json"


def distill_work(out: Path) -> Path:
    """OUT.work/distill/: this stage's tokens, checkpoints, metrics and (by default) teacher cache."""
    return work_dir(out) / "distill"


def resolve_precision(precision: str) -> str:
    """auto: bf16 autocast on a CUDA GPU that has bf16, fp32 elsewhere (CPU bf16 only when asked)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


class DistillStage(StageBase):
    """Teacher + dense student + text -> the distilled student. Every process of a torchrun / accelerate run
    runs the stage (the checks agree: they are deterministic); prepare() trains with all of them, and only the
    main process writes OUT (`writer`)."""

    name = STAGE

    def __init__(self, teacher: str | Path, student: str | Path, data: str | Path, out: str | Path,
                 config: DistillConfig | None = None, *, teacher_cache: str | Path | None = None,
                 cache_forward: ForwardOptions | None = None, progress: bool = True):
        self.teacher, self.student, self.data, self.out = teacher, student, data, Path(out).absolute()
        self.cfg = config or DistillConfig()
        self.teacher_cache, self.cache_forward, self.progress = teacher_cache, cache_forward, progress
        self.work = distill_work(self.out)
        self.fresh = False  # the work directory did not exist: a run refused before it started removes it
        self.started = False

    def describe(self) -> str:
        cfg = self.cfg
        how = (f"offline: the teacher's top-{cfg.top_k} log-probs cached first, then the student alone"
               if cfg.mode == "offline" else "online: the teacher runs every step")
        return f"{cfg.tokens:,} tokens from the teacher ({how})"

    def check(self) -> None:
        """What needs no model opened: the options against each other, and the cache's place."""
        cfg = self.cfg
        if self.cache_forward not in (None, ForwardOptions()) and cfg.mode != "offline":
            raise EdgeconvError("--cache-device, --cache-dtype, --layer-by-layer/--whole-model and --cache-chunk are "
                                "for the offline teacher cache", "pass --mode offline, or drop them")
        self.cache_forward = self.cache_forward or ForwardOptions()
        if cfg.mode == "offline":  # an unavailable --cache-device or a bad --cache-dtype fails before any work
            self.cache_forward.resolve("--cache-device", "--cache-dtype")
        if self.teacher_cache is not None:  # replacing OUT would delete a cache inside it
            check_not_an_input(self.out, {"teacher cache": self.teacher_cache}, existing_only=False)

    def identity(self) -> Identity:
        self.check()
        cfg = self.cfg
        t_ckpt, s_ckpt = self.t_ckpt, self.s_ckpt = Checkpoint.open(self.teacher), Checkpoint.open(self.student)
        check_pair(t_ckpt, s_ckpt)
        _check_sizes(cfg, t_ckpt, s_ckpt)
        t_tok = load_tokenizer(t_ckpt, "teacher")
        self.tokenizer_from = s_ckpt if has_tokenizer(s_ckpt) else t_ckpt
        if self.tokenizer_from is s_ckpt:
            check_same_tokenizer(t_tok, load_tokenizer(s_ckpt, "student"), t_ckpt, s_ckpt)
        budget = f"--tokens {cfg.tokens} = {cfg.steps} steps x --batch-size {cfg.batch_size} x --seq-len {cfg.seq_len}"
        self.fresh = not self.work.exists()
        # The packed tokens live on disk (4 bytes a token, memory-mapped) in the work directory, so a resumed
        # run does not tokenize again; they go with the work directory after success.
        self.ids, self.data_info = pack_tokens(t_tok, Path(self.data), cfg.sequences, cfg.seq_len, cfg.batch_size,
                                               budget, cache_dir=self.work / "tokens")
        self.precision = resolve_precision(cfg.precision)
        self.inputs = {"teacher_fingerprint": t_ckpt.fingerprint, "student_fingerprint": s_ckpt.fingerprint,
                       "tokens_sha256": self.data_info["sha256"]}
        self.options = {**cfg.key_options(), "precision": self.precision}
        return Identity(self.inputs, self.options,
                        {**self.inputs, "teacher": str(t_ckpt.path), "student": str(s_ckpt.path),
                         "data": str(Path(self.data).absolute())})

    def _start(self) -> None:
        """The checks that need the key and the processes; after them the run has started (the work is kept)."""
        if self.key is None:
            self.key = stage_key(STAGE, self.inputs, self.options)
        _check_work(self.work, self.key, self.inputs, self.options, self.force)
        self.accelerator = _accelerator(self.precision)
        check_split(self.cfg.batch_size, self.cfg.grad_accum, self.accelerator.num_processes)  # before caching too
        self.started = True
        self.writer = self.accelerator.is_main_process
        if self.writer:
            _claim_work(self.work, self.key, self.inputs, self.options, self.force)
        self.accelerator.wait_for_everyone()

    def build_cache(self) -> dict | None:
        """Offline mode: the teacher cache (built, or found complete); its manifest."""
        if self.cfg.mode != "offline":
            return None
        cfg, t_ckpt = self.cfg, self.t_ckpt
        device = self.accelerator.device
        teacher_dtype = torch.bfloat16 if self.precision == "bf16" and device.type == "cuda" else torch.float32
        self.cache_path = Path(self.teacher_cache).absolute() if self.teacher_cache else self.work / "teacher-cache"
        self.spec = cache_mod.CacheSpec(t_ckpt.fingerprint, self.data_info["sha256"], cfg.sequences, cfg.seq_len,
                                        cfg.top_k, cfg.temperature, int(self.s_ckpt.config["vocab_size"]))
        return _build_cache(self.accelerator, self.cache_path, self.spec, t_ckpt, self.ids, cfg, teacher_dtype,
                            self.force, self.progress, self.cache_forward)

    def prepare(self) -> None:
        self._start()
        cfg, accelerator = self.cfg, self.accelerator
        device = accelerator.device
        cache_manifest = self.build_cache()
        self.extra = {"cache": cache_manifest}
        if cfg.mode == "offline":
            teacher_source = CachedTeacher(cache_mod.TeacherCache(self.cache_path, self.spec))
        else:
            teacher_dtype = torch.bfloat16 if self.precision == "bf16" and device.type == "cuda" else torch.float32
            teacher_source = OnlineTeacher(load_model(self.t_ckpt, "teacher", teacher_dtype, device))

        torch.manual_seed(cfg.seed)
        model = load_model(self.s_ckpt, "student", torch.float32, device)
        if cfg.gradient_checkpointing:
            # transformers' own: each decoder layer keeps its input and reruns its forward in the backward pass.
            # Non-reentrant, so it needs no input that requires grad (with LoRA the embeddings are frozen).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora_rank:
            model = with_adapters(model, cfg)
        started = time.perf_counter()
        model, self.outcome = train(accelerator, model, teacher_source, self.ids,
                                    sequence_order(cfg.sequences, cfg.seed), cfg, self.work, self.key,
                                    progress=self.progress)
        del teacher_source
        gc.collect()
        if cfg.lora_rank:  # the adapters added into the weights: a plain checkpoint again
            model = merged(accelerator.unwrap_model(model))
        self.state = accelerator.get_state_dict(model)  # collective under FSDP (gathers the full weights)
        self.model = accelerator.unwrap_model(model)
        self.started_at = started

    def run(self, tmp: Path) -> dict:
        cfg, t_ckpt, s_ckpt = self.cfg, self.t_ckpt, self.s_ckpt
        rows = metrics.read(self.work / "metrics.jsonl")
        _save_student(self.model, self.state, weights_dtype(s_ckpt), tmp)
        for path in self.tokenizer_from.sidecar_files():
            if path.name != "generation_config.json" or self.tokenizer_from is s_ckpt:
                shutil.copy(path, tmp / path.name)
        if (s_ckpt.path / "plan.json").is_file():  # an edgeconv student: its plan goes on with it (cards, bundles)
            shutil.copy(s_ckpt.path / "plan.json", tmp / "plan.json")
        shutil.copy(self.work / "metrics.jsonl", tmp / "metrics.jsonl")
        metrics.plot(rows, tmp / "loss.png", f"distill {s_ckpt.path.name} from {t_ckpt.path.name}: "
                                             f"{cfg.mode}, T={cfg.temperature:g}, ce_weight={cfg.ce_weight:g}")
        summary = _summary(cfg, rows, self.outcome, self.accelerator.num_processes, self.precision, self.data_info,
                           time.perf_counter() - self.started_at, self.extra["cache"], self.tokenizer_from is t_ckpt)
        # The model card (README.md): the teacher as base model, the student's plan, this distillation.
        write_checkpoint_card(tmp, {"stage": STAGE, "inputs": {"teacher": str(t_ckpt.path),
                                                               "data": str(Path(self.data).absolute())},
                                    "options": self.options, "summary": summary}, name=self.out.name)
        return summary

    def done(self, result: StageResult) -> None:
        if result.skipped:
            if self.fresh:
                _remove_work(self.work, None)  # the tokens this check needed
            return
        if self.writer:
            _remove_work(self.work, Path(self.teacher_cache).absolute() if self.teacher_cache else None)
        self.accelerator.wait_for_everyone()

    def failed(self) -> None:
        if self.fresh and not self.started:
            _remove_work(self.work, None)  # a run refused before it started leaves nothing, tokens included


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
) -> StageResult:
    """`edgeconv distill`: the distill stage on its own (see DistillStage); `.cache` is the teacher cache's manifest
    (offline mode). With `cache_only`, only the offline teacher cache is built (OUT is not written)."""
    cfg = config or DistillConfig()
    if cache_only and cfg.mode != "offline":
        raise EdgeconvError("--cache-only builds the offline teacher cache", "pass --mode offline with it")
    stage = DistillStage(teacher, student, data, out, cfg, teacher_cache=teacher_cache, cache_forward=cache_forward,
                         progress=progress)
    stage.force = force
    if not cache_only:
        return run_stage(stage, force=force)
    try:
        stage.identity()
        stage._start()
    except BaseException:
        stage.failed()
        raise
    return StageResult(STAGE, stage.out, False, {}, {"cache": stage.build_cache()})


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
                 cfg: DistillConfig, dtype: torch.dtype, force: bool, progress: bool,
                 forward: ForwardOptions | None = None) -> dict:
    """The offline pass (all processes share the rows), unless a complete cache of this spec is there.

    The teacher runs whole when it fits in memory, else one layer at a time (edgeconv.forward), this process's
    rows in chunks, each chunk one pass over the teacher; `forward` (--cache-device, --cache-dtype,
    --layer-by-layer/--whole-model, --cache-chunk) decides, `auto` meaning this process's accelerate device and
    the dtype --precision gives."""
    forward = forward or ForwardOptions()
    status, why = cache_mod.cache_status(path, spec)
    if status == "complete":
        logger.info(f"teacher cache {path}: complete, reused")
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
    logger.info(f"teacher cache {path}: {len(missing):,} of {spec.sequences:,} sequences to compute "
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
                logger.info(f"teacher cache: {len(rows):,} sequences in {model.passes} layer-by-layer pass(es)")
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
