"""`edgeconv build`: convert's stages (calibrate -> plan -> assemble -> distill), then export + parity -> bundle
[-> bench here]: one stage list (`build_stages`), planned before any work and run by edgeconv.stages.stage.

The plan is made from config.json alone: the target profile, the student's shape and the memory estimate.
If the student cannot fit the target, the build stops there and names the largest configuration that fits.
Every stage writes its own directory under OUT.work and is skipped when its inputs have not changed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeconv.config import CALIBRATION_TOKENS, DEFAULT_DISTILL_TOKENS, ConfigError, literal
from edgeconv.device.bundle_runtime import genai_provider
from edgeconv.device.host_plan import HostPlan, plan_host, tree_bytes
from edgeconv.device.memory_fit import Config, Estimate, estimate, gb, largest_fit, tensor_shapes
from edgeconv.device.profiles import TargetProfile, get_target
from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.io.checkpoint import resolve_model_path
from edgeconv.io.guard import check_not_an_input, guard_output, work_dir
from edgeconv.io.output_dir import as_record, check_out_early, claim_work, read_work_record, sha256_file
from edgeconv.quant import get_quant
from edgeconv.stages.export import parity_line

CONVERT_STAGES = 3  # calibrate, plan, assemble (+ distill): the part of the list that is `edgeconv convert`


@dataclass
class BuildPlan:
    model: Path
    name: str
    target: TargetProfile
    fmt: str
    candidate: Config
    estimate: Estimate
    out: Path
    work: Path
    distill_tokens: int
    stages: list = field(default_factory=list)  # the stages that run (build_stages), edgeconv.stages.stage.Stage
    distill_mode: str = "online"
    host: HostPlan | None = None  # what the build needs on this machine (edgeconv.device.host_plan)
    bench: bool = True  # bench.py runs here after bundling
    distill_options: dict | None = None
    calibration_tokens: int = CALIBRATION_TOKENS

    def render(self) -> str:
        t, e = self.target, self.estimate
        lines = [
            f"build {self.name} for {t.name}: {t.description}",
            f"  budget      {t.usable_memory_gb:g} GB usable of {t.memory_gb:g} GB, {t.bandwidth_gb_s:g} GB/s, "
            f"{t.accelerator}, {t.threads} threads",
            f"  student     {e.params / 1e6:,.2f} M parameters (FFN width {self.candidate.width} = "
            f"{self.candidate.groups} groups), {self.fmt} {self.candidate.quant}, context {self.candidate.context}",
            f"  memory      {e.breakdown()}: {'fits' if e.fits else 'DOES NOT FIT'}",
            f"  stages      (1-{CONVERT_STAGES + bool(self.distill_tokens)}: convert, the student in "
            f"{self.work / 'student'})",
        ]
        from edgeconv.stages.stage import describe_stages

        lines += describe_stages(self.stages)
        if self.host is not None:
            lines += self.host.lines()
        return "\n".join(lines)


def plan_build(model: str | Path, target: str, *, out: Path | None = None, fmt: str | None = None,
               quant: str | None = None, groups: int | None = None, context: int | None = None,
               distill_tokens: int = DEFAULT_DISTILL_TOKENS, bench: bool = True,
               calibration_tokens: int = CALIBRATION_TOKENS, distill_options: dict | None = None,
               eval_data: Path | None = None, measure: bool = True, host=None) -> BuildPlan:
    """Everything decided before any heavy work; raises EdgeconvError if the student cannot fit the target, or
    the build cannot fit this host (memory per stage, disk at the peak: edgeconv.device.host_plan). `distill_options`
    are build()'s (mode, lr, ...); `measure` times one layer here for the time estimates; `host` replaces the
    detected edgeconv.device.host_plan.Host (tests)."""
    profile = get_target(target)
    path = resolve_model_path(model)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeconvError(f"cannot read {path / 'config.json'} ({exc})", "pass a checkpoint directory")
    family = family_for(config, str(path))
    fmt = fmt or profile.formats[0]
    if fmt not in profile.formats:
        formats = literal(", ".join(profile.formats))
        raise ConfigError(f"target {literal(profile.name)} runs {formats}, not {literal(fmt)}",
                          f"drop {{format}} or pick one of {formats}")
    # Checked against edgeconv.quant's table for this format now, before any work (--dry-run included): a name
    # the format's exporter does not have (onnx-genai int8) is refused with the names it has.
    quant = get_quant(fmt, quant or (profile.quant if fmt == "gguf" else profile.onnx_precision)).name
    groups = groups or family.top_k
    if groups < 1 or groups > family.num_experts:
        raise ConfigError(f"{{groups}} {groups} is outside 1..{family.num_experts} (the model's experts)",
                          "pick a smaller {groups}")
    width = groups * family.expert_width + family.shared_width
    cand = Config(groups, width, fmt, quant, context or profile.context)
    dense = family.dense_config(width)
    check_exportable(dense, fmt, "the student")
    est = estimate(dense, cand, profile.usable_bytes, tokenizer=path)  # the student carries the teacher's tokenizer
    name = path.name if path.name != "." else "model"
    if not est.fits:
        best = largest_fit(dense, cand, family.expert_width, family.shared_width, profile.usable_bytes,
                           tokenizer=path)
        hint = (f"the largest configuration that fits: {best.config.flags()} ({gb(best.total_bytes)}: "
                f"{best.params / 1e9:.2f} B parameters)" if best else
                "nothing fits: not even one expert group at the lowest precision and 512 tokens of context")
        raise EdgeconvError(f"{name} does not fit {profile.name}: {est.breakdown()}", hint)
    out = Path(out or Path("dist") / f"{name}-{profile.name}").absolute()
    work = work_dir(out)
    check_not_an_input(out, {"model": path}, work=work)  # the dry run says so too
    distill_config = None
    if distill_tokens:
        from edgeconv.config import DistillConfig

        distill_config = DistillConfig.make(tokens=distill_tokens, **(distill_options or {}))
    mode = distill_config.mode if distill_config else "online"
    plan = BuildPlan(path, name, profile, fmt, cand, est, out, work, distill_tokens, distill_mode=mode, bench=bench,
                     distill_options=distill_options, calibration_tokens=calibration_tokens)
    plan.stages = build_stages(plan, eval_data=eval_data)
    from edgeconv.demo import EVAL_DATA

    plan.host = plan_host(config=config, family=family, path=path, dense=dense, student_params=est.params,
                          student_shapes=tensor_shapes({**dense, "intermediate_size": width}), fmt=fmt, quant=quant,
                          quant_bytes=est.weights_bytes, target_bytes=est.total_bytes, out=out, work=work,
                          calibration_tokens=calibration_tokens, distill_config=distill_config,
                          eval_bytes=tree_bytes(Path(eval_data or EVAL_DATA)), bench=bench, measure_throughput=measure,
                          host=host)
    plan.host.check()  # memory or disk this host cannot give: refused now, --dry-run included
    return plan


def check_exportable(config: dict, fmt: str, what: str) -> None:
    """What the exporter would refuse about `config` alone (GGUF: the architecture, rope scaling, DeepSeek-V2's q
    LoRA, dense layers in a MoE; onnx-genai: the builder's architectures and head widths), raised while planning,
    --dry-run included, instead of after calibration and assembly."""
    if fmt == "gguf":
        from edgeconv.export.gguf.arch import check_config

        check_config(config)
    elif fmt == "onnx-genai":
        from edgeconv.export.onnx.exporter import check_genai_supported

        check_genai_supported(config, what)


def build_stages(plan: BuildPlan, *, data: Path | None = None, distill_data: Path | None = None,
                 eval_data: Path | None = None, calibration_tokens: int | None = None,
                 distill_options: dict | None = None, threads: int | None = None, progress: bool = True,
                 owned: bool = False) -> list:
    """Every stage the build runs, in order: what --dry-run prints and what build() runs. The student is a
    convert into OUT.work/student (its statistics and plan in OUT.work/student.work)."""
    from edgeconv.demo import EVAL_DATA
    from edgeconv.pipelines.convert import convert_stages
    from edgeconv.stages.bench import BenchStage
    from edgeconv.stages.bundle import BundleStage
    from edgeconv.stages.export import ExportStage

    student = plan.work / "student"
    distill_config = None
    if plan.distill_tokens:
        from edgeconv.config import DistillConfig

        options = plan.distill_options if distill_options is None else distill_options
        distill_config = DistillConfig.make(tokens=plan.distill_tokens, **(options or {}))
    tokens = plan.calibration_tokens if calibration_tokens is None else calibration_tokens
    stages = convert_stages(plan.model, student, data=data, tokens=tokens, groups=plan.candidate.groups,
                            distill_config=distill_config, distill_data=distill_data, progress=progress)
    export = ExportStage(student, plan.work / "export", name=f"{plan.name}-dense", fmt=plan.fmt,
                         quant=plan.candidate.quant, execution_provider=genai_provider(plan.target))
    stages += [
        export,
        BundleStage(plan.out, name=f"{plan.name}-dense", export=export.out, artifact=export.artifact, fmt=plan.fmt,
                    quant=plan.candidate.quant, target=plan.target, estimate=plan.estimate,
                    eval_data=Path(eval_data or EVAL_DATA), teacher=str(plan.model), student=student, replace=owned),
    ]
    if plan.bench:
        stages.append(BenchStage(plan.work / "bench", bundle=plan.out, label=f"{plan.name}-dense ({plan.target.name})",
                                 target=plan.target.name, threads=threads))
    return stages


@dataclass
class BuildResult:
    plan: BuildPlan
    bundle: Path
    manifest: dict
    parity: dict
    results: dict | None
    seconds: float


def build(plan: BuildPlan, *, data: Path | None = None, distill_data: Path | None = None,
          eval_data: Path | None = None, calibration_tokens: int = CALIBRATION_TOKENS,
          distill_options: dict | None = None, threads: int | None = None, force: bool = False,
          progress: bool = True) -> BuildResult:
    from edgeconv.demo import DISTILL_DATA, is_demo
    from edgeconv.pipelines.convert import check_convert
    from edgeconv.stages.bench import bench_results
    from edgeconv.stages.stage import run_pipeline

    t0 = time.time()
    if plan.distill_tokens and distill_data is None:
        if is_demo(plan.model):
            distill_data = DISTILL_DATA
        elif data is None:
            raise ConfigError("distillation needs text: none given",
                              "pass {distill_data} (or {data}), or {distill_tokens} 0 to skip distillation")
    inputs = {"model": plan.model, "data": data, "distill data": distill_data, "eval data": eval_data}
    with guard_output(plan.out, inputs, work=plan.work):
        record = as_record({
            "model": plan.model, "target": plan.target.model_dump(exclude={"source"}), "format": plan.fmt,
            "candidate": asdict(plan.candidate), "distill_tokens": plan.distill_tokens,
            "data": Path(data).absolute() if data else None,
            "distill_data": Path(distill_data).absolute() if distill_data else None,
            "eval_data": Path(eval_data).absolute() if eval_data else None,
            "calibration_tokens": calibration_tokens, "distill_options": distill_options})
        # The bundle is this build's own when the work directory records the same build: a rerun may replace
        # it (a new edgeconv's bench.py changes its key). Any other bundle is refused now, not at its stage.
        owned = read_work_record(plan.work, "build") == record
        check_out_early(plan.out, force, ("bundle",) if owned else ())
        claim_work(plan.work, "build", record, force)
        # The student is `edgeconv convert` into OUT.work/student: its --out checked and locked, its arguments
        # checked and its work directory claimed, as the command would.
        student = plan.work / "student"
        with guard_output(student, {"model": plan.model, "data": data, "distill data": distill_data},
                          work=work_dir(student)):
            checked = check_convert(plan.model, student, data=data, tokens=calibration_tokens,
                                    groups=plan.candidate.groups, distill_tokens=plan.distill_tokens,
                                    distill_data=distill_data, distill_options=distill_options, force=force)
            plan.stages = build_stages(plan, data=checked.data, distill_data=distill_data, eval_data=eval_data,
                                       calibration_tokens=calibration_tokens, distill_options=distill_options,
                                       threads=threads, progress=progress, owned=owned)
            results = {r.name: r for r in run_pipeline(plan.stages, work=work_dir(student), command="convert",
                                                       record=checked.record, force=force)}
    export = next(s for s in plan.stages if s.name == "build-export")
    bench = results.get("bench")
    return BuildResult(plan, plan.out, results["bundle"].manifest, export.parity(),
                       bench_results(bench.out) if bench and "error" not in bench.extra else None, time.time() - t0)


def headline(result: BuildResult) -> str:
    plan, m = result.plan, result.manifest
    model_bytes = sum(f["bytes"] for p, f in m["files"].items() if p == m["model"] or p.startswith(m["model"] + "/"))
    lines = [
        f"bundle: {result.bundle}",
        f"  model      {m['model']} ({gb(model_bytes)}, {plan.estimate.params / 1e6:,.1f} M parameters)",
        f"  planned    {gb(plan.estimate.total_bytes)} on {plan.target.name} "
        f"(of {plan.target.usable_memory_gb:g} GB usable)",
        f"  parity     {parity_line(result.parity)}",
    ]
    r = result.results
    if r:
        acc = r.get("accuracy") or {}
        ppl = ", ".join(f"{k} {v:.1f}" for k, v in (acc.get("perplexity") or {}).items())
        lines += [
            f"  here       RSS after load {r.get('rss_after_load_mb') or 0:.0f} MB (peak "
            f"{r.get('peak_rss_with_scoring_mb') or r['peak_rss_mb'] or 0:.0f} MB with the accuracy run), "
            f"load {r['load_s']:.2f} s, decode "
            f"{r['decode_tok_s'] or 0:.0f} tok/s, {r['runtime']['threads']} threads",
            f"  accuracy   perplexity {ppl}; exact match {acc.get('exact_match_mean', 0):.1%}, "
            f"multiple choice {acc.get('choice_acc', 0):.1%} (bench.py --quick)",
        ]
    manifest_hash = sha256_file(result.bundle / "manifest.json")
    # The bundle's own lines: its format's runtime (edgeconv.device.bundle_runtime), as its README says.
    bench = m.get("bench") if isinstance(m.get("bench"), dict) and m["bench"].get("setup") else plan.target.bench
    bench = bench if isinstance(bench, dict) else {"setup": bench.setup, "command": bench.command}
    lines += [f"  on device  {bench.get('command') or 'see its README.md'}   (in the bundle; setup: {bench['setup']})",
              f"  manifest   sha256 {manifest_hash}",
              f"  back here  edgeconv bench {result.bundle} --expect-sha256 {manifest_hash}   (refuses a bundle "
              "whose manifest was rewritten)",
              f"  took       {result.seconds:.0f} s"]
    return "\n".join(lines)
