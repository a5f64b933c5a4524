"""The public Python API: one function per command, the very functions the CLI calls.

Each takes the model and output paths, then a config (edgeconv.config) or keyword options that build one (both:
the options replace the config's fields), and returns what the library returns. Problems with the input are
EdgeconvError (one line; an option refused is a ConfigError naming its field). torch and transformers are imported
inside the functions, so `import edgeconv` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from edgeconv.config import BuildConfig, ConfigError, ConvertConfig, DistillConfig, ExportConfig, SweepConfig, literal
from edgeconv.demo import DEFAULT_MODEL

__all__ = ["convert", "build", "build_plan", "distill", "export", "evaluate", "upcycle", "prune", "sweep"]


def convert(model: str | Path, out: str | Path, config: ConvertConfig | None = None, *, force: bool = False,
            progress: bool = True, **options):
    """Calibrate, plan and assemble a dense student from a MoE [and distill it]: `edgeconv convert`.

    Writes the dense checkpoint (stock transformers, safetensors + tokenizer + manifest.json) to `out`, and the
    calibration statistics, the plan and checkpoints to `out`.work/ beside it. A rerun skips finished stages.

    Args:
        model: the MoE: a checkpoint directory, a hub id, or a shipped demo name ("demo-moe").
        out: the dense checkpoint directory.
        config: a ConvertConfig; `options` (its field names: tokens, seq_len, experts, groups, scoring, grouping,
            scaling, seed, data, distill_tokens, distill_data, distill_mode, distill_lr) replace its fields.
        force: replace `out` even if it holds something else.
        progress: show progress bars.

    Returns:
        edgeconv.pipelines.convert.ConvertResult: `.out` (the student), `.manifest` (its summary: widths,
        parameter counts), `.distilled` (the distillation stage's result, or None), `.stages`.
    """
    cfg = ConvertConfig.of(config, options)
    from edgeconv.pipelines.convert import convert as run

    return run(model, out, data=cfg.data, tokens=cfg.tokens, seq_len=cfg.seq_len, experts=cfg.experts,
               groups=cfg.groups, scoring=cfg.scoring, grouping=cfg.grouping, scaling=cfg.scaling, seed=cfg.seed,
               distill_tokens=cfg.distill_tokens, distill_data=cfg.distill_data,
               distill_options=cfg.distill_options(), force=force, progress=progress)


def build_plan(model: str | Path = DEFAULT_MODEL, out: str | Path | None = None, config: BuildConfig | None = None,
               **options):
    """What `build` will do, decided from config.json alone (`edgeconv build --dry-run`); nothing is written.

    Args: as `build`. Raises EdgeconvError when the student cannot fit the target (naming the largest
    configuration that does) or the build cannot fit this host.

    Returns:
        edgeconv.pipelines.build.BuildPlan: `.render()` is the text --dry-run prints; `.stages`, `.estimate`.
    """
    cfg = BuildConfig.of(config, options)
    from edgeconv.pipelines.build import plan_build

    return plan_build(model, cfg.target, out=out, fmt=cfg.format, quant=cfg.quant,
                      groups=cfg.groups, context=cfg.context, distill_tokens=cfg.distill_tokens, bench=cfg.bench,
                      calibration_tokens=cfg.calibration_tokens, distill_options=cfg.distill_options(),
                      eval_data=cfg.eval_data, measure=cfg.measure)


def build(model: str | Path = DEFAULT_MODEL, out: str | Path | None = None, config: BuildConfig | None = None, *,
          plan=None, force: bool = False, progress: bool = True, **options):
    """Everything for one device: convert -> distill -> export -> parity -> bundle [-> bench here] (`edgeconv build`).

    Writes the device bundle (the artifact, its runtime settings, bench.py, README.md, manifest.json with every
    file's sha256) to `out` (default dist/<model>-<target>); each stage works in `out`.work/ and is skipped when
    already done.

    Args:
        model: the MoE teacher (default: the shipped demo-moe).
        out: the bundle directory.
        config: a BuildConfig; `options` (its fields: target, format, quant, groups, context, data,
            calibration_tokens, distill_tokens, distill_data, distill_lr, distill_mode, eval_data, threads, bench,
            measure) replace its fields. `target` is required.
        plan: the BuildPlan from `build_plan` with the same arguments, if already made.
        force: redo every stage and replace `out`.
        progress: show progress bars.

    Returns:
        edgeconv.pipelines.build.BuildResult: `.bundle`, `.manifest`, `.parity`, `.results` (the benchmark run
        here, or None), `.seconds`; edgeconv.pipelines.build.headline(result) is what the CLI prints.
    """
    cfg = BuildConfig.of(config, options)
    from edgeconv.pipelines.build import build as run

    plan = plan if plan is not None else build_plan(model, out, cfg)
    return run(plan, data=cfg.data, distill_data=cfg.distill_data, eval_data=cfg.eval_data,
               calibration_tokens=cfg.calibration_tokens, distill_options=cfg.distill_options(), threads=cfg.threads,
               force=force, progress=progress)


def distill(student: str | Path, out: str | Path, config: DistillConfig | None = None, *,
            teacher: str | Path = DEFAULT_MODEL, data: str | Path | None = None,
            teacher_cache: str | Path | None = None, cache_only: bool = False, cache_device: str = "auto",
            cache_dtype: str = "auto", layer_by_layer: bool | None = None, cache_chunk: int | None = None,
            force: bool = False, progress: bool = True, **options):
    """Distill a dense student from its teacher (forward KL on next-token distributions): `edgeconv distill`.

    Writes the trained student (a stock transformers checkpoint) with metrics.jsonl, loss.png and manifest.json to
    `out`; checkpoints go to `out`.work/distill/, and a rerun resumes from the last one.

    Args:
        student: the dense student (from `convert`), sharing the teacher's tokenizer.
        out: the distilled student's directory.
        config: a DistillConfig; `options` (its fields: tokens, seq_len, batch_size, lr, warmup, temperature,
            ce_weight, mode, top_k, checkpoint_every, precision, seed, ...) replace its fields.
        teacher: the teacher (default: the shipped demo-moe).
        data: the training text (default: the shipped demo text); each token is used once.
        teacher_cache: offline mode: where the teacher's top-k log-probs are cached (kept after the run).
        cache_only: offline mode: build the teacher cache and stop.
        cache_device, cache_dtype, layer_by_layer, cache_chunk: offline mode: how the teacher runs to fill the
            cache (edgeconv.forward.layer_by_layer.ForwardOptions).
        force: replace `out`, and discard another run's checkpoints or cache.
        progress: show a progress bar.

    Returns:
        edgeconv.stages.stage.StageResult: `.out`, `.manifest` (`["summary"]`: tokens, steps, losses, tokens/s),
        `.skipped` (already done), `.cache` (the teacher cache's manifest, offline).
    """
    cfg = DistillConfig.of(config, options)
    from edgeconv.forward.layer_by_layer import ForwardOptions
    from edgeconv.stages.distill import distill as run

    if data is None:
        from edgeconv.demo import CALIBRATION_DATA

        data = CALIBRATION_DATA
    forward = ForwardOptions(device=cache_device, dtype=cache_dtype, layer_by_layer=layer_by_layer,
                             chunk_sequences=cache_chunk)
    return run(teacher, student, data, out, cfg, teacher_cache=teacher_cache, cache_only=cache_only,
               cache_forward=forward, force=force, progress=progress)


def export(model: str | Path, out: str | Path, config: ExportConfig | None = None, *, force: bool = False,
           **options):
    """Export a dense student (or a MoE) to GGUF or ONNX, published only if it matches torch: `edgeconv export`.

    GGUF: writes the .gguf file `out` with NAME.parity.json, an Ollama NAME.Modelfile and a model card NAME.md
    beside it. ONNX (format "onnx" or "onnx-genai"): `out` is a directory with the model, tokenizer,
    parity.json and manifest.json.

    Args:
        model: the checkpoint directory (or a shipped demo name).
        out: the .gguf file, or the ONNX directory.
        config: an ExportConfig; `options` (its fields: format, quant, execution_provider, tokenizer_pre,
            imatrix_data, imatrix_tokens, device, dtype, layer_by_layer, allow_yarn_drift, parity_layers) replace its
            fields.
        force: replace `out` if it exists.

    Returns:
        edgeconv.stages.export_gguf.GgufExport (format "gguf": `.path`, `.parity`, `.type_mix`, `.fallbacks`) or
        edgeconv.stages.export_onnx.OnnxExport (`.path`, `.parity`, `.files`, `.info`).
    """
    cfg = ExportConfig.of(config, options)
    from edgeconv.export.parity import ReferenceOptions
    from edgeconv.quant import default_quant, get_quant

    quant = get_quant(cfg.format, cfg.quant or default_quant(cfg.format)).name
    reference = ReferenceOptions(device=cfg.device, dtype=cfg.dtype, layer_by_layer=cfg.layer_by_layer)
    if cfg.format == "gguf":
        from edgeconv.stages.export_gguf import export_gguf

        return export_gguf(model, out, quant, force=force, tokenizer_pre=cfg.tokenizer_pre,
                           imatrix_data=cfg.imatrix_data, imatrix_tokens=cfg.imatrix_tokens, reference=reference,
                           allow_yarn_drift=cfg.allow_yarn_drift, parity_layers=cfg.parity_layers)
    from edgeconv.stages.export_onnx import export_onnx, export_onnx_genai

    if cfg.format == "onnx":
        if cfg.execution_provider != "cpu":
            raise ConfigError("{execution_provider} is for {format} onnx-genai",
                              "a {format} onnx model runs on any onnxruntime provider as is", config="ExportConfig")
        return export_onnx(model, out, quant, force=force, reference=reference)
    return export_onnx_genai(model, out, quant, execution_provider=cfg.execution_provider, force=force,
                             reference=reference)


def evaluate(model: str | Path = DEFAULT_MODEL, *, data: str | Path | None = None, runtime: str = "auto",
             tokens: int = 16384, window: int = 256, examples: int = 50, choices: int = 200,
             threads: int | None = None, device: str = "auto", dtype: str = "auto",
             layer_by_layer: bool | None = None, progress: bool = True):
    """Held-out perplexity per corpus, exact match per skill and multiple-choice accuracy: `edgeconv eval`.

    Writes nothing. Every runtime tokenizes with its own tokenizer and is scored on the same data.

    Args:
        model: an HF checkpoint directory or demo name (torch), a .gguf file (llama.cpp), or an ONNX directory.
        data: the evaluation data directory (default: the shipped held-out set).
        runtime: auto (from `model`), torch, gguf, onnx or onnx-genai.
        tokens: tokens scored per corpus for perplexity; window: the perplexity window.
        examples: examples per skill (0 skips the skills); choices: multiple-choice items.
        threads: CPU threads (default: all).
        device, dtype, layer_by_layer: how the torch runtime runs the model.
        progress: show a progress bar.

    Returns:
        edgeconv.evaluation.suite.EvalReport: `.perplexity` (per corpus), `.exact_match` (per skill),
        `.choice_acc`, `.runtime`, `.seconds`.
    """
    from edgeconv.demo import EVAL_DATA
    from edgeconv.evaluation.suite import evaluate as run
    from edgeconv.forward.layer_by_layer import ForwardOptions

    path = Path(model)
    if not path.exists():
        from edgeconv.io.checkpoint import resolve_model_path

        path = resolve_model_path(model)
    return run(path, Path(data or EVAL_DATA), runtime=None if runtime == "auto" else runtime, tokens=tokens,
               window=window, examples=examples, choices=choices, threads=threads, show_progress=progress,
               forward=ForwardOptions(device=device, dtype=dtype, layer_by_layer=layer_by_layer))


def lm_evaluate(model: str | Path = DEFAULT_MODEL, tasks: str | list[str] = "edgeconv", *,
                include_path: str | Path | None = None, data: str | Path | None = None, runtime: str = "auto",
                limit: int | float | None = None, max_length: int = 2048, batch_size: int = 1,
                threads: int | None = None, device: str = "cpu", dtype: str = "float32"):
    """lm-evaluation-harness on a torch checkpoint or a GGUF: `edgeconv eval --lm-eval TASKS`.

    Writes nothing (edgeconv's task YAMLs go to a temporary directory). A checkpoint runs in lm-eval's `hf` model, a
    .gguf in edgeconv's `edgeconv-gguf` model on llama-cpp-python (edgeconv/evaluation/lm_eval_gguf.py).

    Args:
        model: an HF checkpoint directory or demo name, or a .gguf file.
        tasks: lm-eval task names, tags or globs (a list or a comma list); `edgeconv` tags edgeconv's own tasks.
        include_path: a directory of task YAMLs (default: edgeconv's tasks written over `data`); names not found
            there are looked up in lm-eval's own tasks.
        data: the evaluation data directory for edgeconv's tasks (default: the shipped held-out set).
        runtime: auto (from `model`), torch or gguf.
        limit: at most this many documents per task (a fraction below 1).
        max_length: context in tokens (both runtimes; longer texts are scored in windows).
        batch_size: the hf model's batch size.
        threads: CPU threads (default: all); device, dtype: the hf model's (default CPU, float32).

    Returns:
        dict: lm_eval.simple_evaluate's output; `["results"][task]["acc,none"]` etc.
    """
    from edgeconv.evaluation.lm_eval_run import run_lm_eval

    path = Path(model)
    if not path.exists():
        from edgeconv.io.checkpoint import resolve_model_path

        path = resolve_model_path(model)
    return run_lm_eval(path, tasks, runtime=None if runtime == "auto" else runtime,
                       include_path=Path(include_path) if include_path else None, data=Path(data) if data else None,
                       limit=limit, max_length=max_length, batch_size=batch_size, threads=threads, device=device,
                       dtype=dtype)


def upcycle(dense: str | Path, out: str | Path, *, runs: str = "auto", threshold: float = 0.9, top_k: int = 1,
            split: int = 1, data: str | Path | None = None, tokens: int = 16384, seed: int = 0,
            force: bool = False):
    """Dense2MoE: fuse runs of redundant layers of a dense model into MoE layers: `edgeconv upcycle`.

    Writes a stock Glm4MoeForCausalLM checkpoint with upcycle_plan.json to `out`.

    Args:
        dense: the dense model (a checkpoint directory or "demo-dense").
        out: the upcycled checkpoint directory.
        runs: auto (from the layer similarities and `threshold`), none, or inclusive layer runs "FIRST-LAST,...".
        threshold: auto: a layer is absorbed when both of its similarities are at least this.
        top_k: routed experts per token in a fused layer; split: routed experts made from each absorbed MLP.
        data: calibration text for the similarities (default: the shipped demo text); tokens: how much of it.
        seed: seed of the fused layers' router initialisation.
        force: replace `out` even if it holds something else.

    Returns:
        edgeconv.stages.stage.StageResult: `.out`, `.skipped`, `.plan` (upcycle_plan.json: runs, parameter counts).
    """
    from edgeconv.stages.upcycle import upcycle as run

    return run(dense, out, runs=runs, threshold=threshold, top_k=top_k, split=split, data=data, tokens=tokens,
               seed=seed, force=force)


def prune(dense: str | Path, out: str | Path, *, ffn_width: int | None = None, params: int | str | Path | None = None,
          kv_heads: int | None = None, data: str | Path | None = None, tokens: int = 16384, force: bool = False):
    """Width-prune a dense model, Minitron-style (the study's dense-to-dense baseline): `edgeconv prune`.

    Writes the pruned checkpoint (the source's architecture, smaller FFN and head counts) to `out`.

    Args:
        dense: the dense model (a checkpoint directory or "demo-dense").
        out: the pruned checkpoint directory.
        ffn_width: FFN channels kept per layer; or
        params: the widest FFN (multiple of 8) with at most this many parameters: a number, a count like "5.6M",
            or a checkpoint directory whose parameter count to match.
        kv_heads: key/value heads kept per layer, with their query heads (default: all).
        data: calibration text for the importance pass (default: the shipped demo text); tokens: how much of it.
        force: replace `out` even if it holds something else.

    Returns:
        edgeconv.stages.stage.StageResult: `.out`, `.skipped`, `.manifest` (`["summary"]`: widths, heads, params).
    """
    from edgeconv.stages.prune import prune as run

    return run(dense, out, data=data, ffn_width=ffn_width, params=_param_count(params), kv_heads=kv_heads,
               tokens=tokens, force=force)


def _param_count(params: int | str | Path | None) -> int | None:
    if params is None or isinstance(params, int):
        return params
    if Path(params).is_dir():
        import json

        from edgeconv.study.dense_prune import param_count

        return param_count(json.loads((Path(params) / "config.json").read_text()))
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}
    t = str(params).strip().upper()
    try:
        return int(float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t))
    except (ValueError, KeyError, IndexError):
        raise ConfigError("{params} " + literal(repr(str(params))) + " is not a count or a checkpoint directory",
                          "pass e.g. 5.6M") from None


def sweep(model: str | Path, out: str | Path, config: SweepConfig | None = None, *, progress: bool = True,
          **options):
    """The paper's study on one MoE: every scoring x grouping x scaling x K, then distillation of the best and a
    dense-to-dense baseline (`edgeconv sweep`).

    Writes the study to `out` (calibration, plans, prescreen.jsonl, final/, final.jsonl) with its report (sweep.md,
    effects.json and plots; also copied to `results` when the config names it). Every step resumes.

    Args:
        model: the MoE.
        out: the study directory.
        config: a SweepConfig; `options` (its fields) replace its fields.
        progress: show progress bars.

    Returns:
        (edgeconv.pipelines.sweep.SweepResult, dict): the result (`.prescreen`, `.final`, `.comparison` rows) and
        what the report wrote (`["markdown"]`, `["files"]`).
    """
    cfg = SweepConfig.of(config, options)
    from edgeconv.pipelines.sweep import sweep as run
    from edgeconv.study.study_report import write_report

    result = run(model, out, data=cfg.data, calibration_tokens=cfg.tokens, scorings=cfg.scoring,
                 groupings=cfg.grouping, scalings=cfg.scaling, ks=cfg.k, groups=cfg.groups, seed=cfg.seed,
                 eval_data=cfg.eval_data, eval_options=cfg.eval_options(), jobs=cfg.jobs, threads=cfg.threads,
                 distill_tokens=cfg.distill_tokens, top=cfg.top, distill_data=cfg.distill_data,
                 distill_options=cfg.distill_options(), dense=cfg.dense, keep=cfg.keep, progress=progress)
    return result, write_report(result, cfg.results)

