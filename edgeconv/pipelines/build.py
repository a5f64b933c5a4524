"""`edgeconv build`: convert -> distill -> export -> parity -> bundle [-> bench here], planned before any work.

The plan is made from config.json alone: the target profile, the student's shape and the memory estimate.
If the student cannot fit the target, the build stops there and names the largest configuration that fits.
Every stage writes its own directory under OUT.work and is skipped when its inputs have not changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeconv.device.host_plan import HostPlan, plan_host, tree_bytes
from edgeconv.device.memory_fit import Config, Estimate, estimate, gb, largest_fit, tensor_shapes
from edgeconv.device.profiles import TargetProfile, get_target
from edgeconv.errors import EdgeconvError
from edgeconv.families import family_for
from edgeconv.io.checkpoint import resolve_model_path
from edgeconv.io.guard import check_not_an_input, guard_output
from edgeconv.io.output_dir import (
    atomic_output_dir,
    as_record,
    check_out_early,
    claim_work,
    finished_output,
    read_manifest,
    read_work_record,
    sha256_file,
    stage_key,
)

DEFAULT_DISTILL_TOKENS = 262_144  # about 3 minutes on the demo student on 2 CPU cores


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
    stages: list[tuple[str, Path, str]] = field(default_factory=list)  # (name, where, what)
    distill_mode: str = "online"
    host: HostPlan | None = None  # what the build needs on this machine (edgeconv.device.host_plan)

    def render(self) -> str:
        t, e = self.target, self.estimate
        lines = [
            f"build {self.name} for {t.name}: {t.description}",
            f"  budget      {t.usable_memory_gb:g} GB usable of {t.memory_gb:g} GB, {t.bandwidth_gb_s:g} GB/s, "
            f"{t.accelerator}, {t.threads} threads",
            f"  student     {e.params / 1e6:,.2f} M parameters (FFN width {self.candidate.width} = "
            f"{self.candidate.groups} groups), {self.fmt} {self.candidate.quant}, context {self.candidate.context}",
            f"  memory      {e.breakdown()}: {'fits' if e.fits else 'DOES NOT FIT'}",
            "  stages",
        ]
        for i, (name, where, what) in enumerate(self.stages, 1):
            lines.append(f"    {i}. {name:<8} {what} -> {where}")
        if self.host is not None:
            lines += self.host.lines()
        return "\n".join(lines)


def plan_build(model: str | Path, target: str, *, out: Path | None = None, fmt: str | None = None,
               quant: str | None = None, groups: int | None = None, context: int | None = None,
               distill_tokens: int = DEFAULT_DISTILL_TOKENS, bench: bool = True, calibration_tokens: int = 65536,
               distill_options: dict | None = None, eval_data: Path | None = None, measure: bool = True,
               host=None) -> BuildPlan:
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
        raise EdgeconvError(f"target {profile.name} runs {', '.join(profile.formats)}, not {fmt}",
                            f"drop --format or pick one of {', '.join(profile.formats)}")
    quant = quant or (profile.quant if fmt == "gguf" else profile.onnx_precision)
    groups = groups or family.top_k
    if groups < 1 or groups > family.num_experts:
        raise EdgeconvError(f"--groups {groups} is outside 1..{family.num_experts} (the model's experts)",
                            "pick a smaller --groups")
    width = groups * family.expert_width + family.shared_width
    cand = Config(groups, width, fmt, quant, context or profile.context)
    dense = family.dense_config(width)
    est = estimate(dense, cand, profile.usable_bytes)
    name = path.name if path.name != "." else "model"
    if not est.fits:
        best = largest_fit(dense, cand, family.expert_width, family.shared_width, profile.usable_bytes)
        hint = (f"the largest configuration that fits: {best.config.flags()} ({gb(best.total_bytes)}: "
                f"{best.params / 1e9:.2f} B parameters)" if best else
                "nothing fits: not even one expert group at the lowest precision and 512 tokens of context")
        raise EdgeconvError(f"{name} does not fit {profile.name}: {est.breakdown()}", hint)
    out = Path(out or Path("dist") / f"{name}-{profile.name}").absolute()
    work = out.parent / f"{out.name}.work"
    check_not_an_input(out, {"model": path}, work=work)  # the dry run says so too
    distill_config = None
    if distill_tokens:
        from edgeconv.config import DistillConfig

        distill_config = DistillConfig.make(tokens=distill_tokens, **(distill_options or {}))
    mode = distill_config.mode if distill_config else "online"
    plan = BuildPlan(path, name, profile, fmt, cand, est, out, work, distill_tokens, distill_mode=mode)
    how = (f"offline: the teacher's top-{distill_config.top_k} log-probs cached first, then the student alone"
           if mode == "offline" else "online: the teacher runs every step")
    plan.stages = [
        ("convert", work / "student", f"calibrate, plan and assemble {groups} expert groups per layer"),
        ("distill", work / "student", f"{distill_tokens:,} tokens from the teacher ({how})" if distill_tokens
         else "skipped (--distill-tokens 0)"),
        ("export", work / "export", f"{fmt} {quant}"),
        ("parity", work / "export", "artifact logits vs the torch student, within the tolerance of " + quant),
        ("bundle", out, "model, bench.py, eval data, Modelfile, README, manifest with sha256"),
    ]
    if bench:
        plan.stages.append(("bench", work / "bench" / "results.json", "bench.py --quick here, on this machine"))
    from edgeconv.demo import EVAL_DATA

    plan.host = plan_host(config=config, family=family, path=path, dense=dense, student_params=est.params,
                          student_shapes=tensor_shapes({**dense, "intermediate_size": width}), fmt=fmt, quant=quant,
                          quant_bytes=est.weights_bytes, target_bytes=est.total_bytes, out=out, work=work,
                          calibration_tokens=calibration_tokens, distill_config=distill_config,
                          eval_bytes=tree_bytes(Path(eval_data or EVAL_DATA)), bench=bench, measure_throughput=measure,
                          host=host)
    plan.host.check()  # memory or disk this host cannot give: refused now, --dry-run included
    return plan


@dataclass
class BuildResult:
    plan: BuildPlan
    bundle: Path
    manifest: dict
    parity: dict
    results: dict | None
    seconds: float


def build(plan: BuildPlan, *, data: Path | None = None, distill_data: Path | None = None,
          eval_data: Path | None = None, calibration_tokens: int = 65536, distill_options: dict | None = None,
          threads: int | None = None, force: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> BuildResult:
    from edgeconv.demo import DISTILL_DATA, is_demo

    t0 = time.time()
    if plan.distill_tokens and distill_data is None:
        if is_demo(plan.model):
            distill_data = DISTILL_DATA
        elif data is None:
            raise EdgeconvError("distillation needs text: none given",
                                "pass --distill-data (or --data), or --distill-tokens 0 to skip distillation")
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
        # it (a new edgeconv's bench.py changes its key). Any other bundle is refused now, not at stage 5.
        owned = read_work_record(plan.work, "build") == record
        check_out_early(plan.out, force, ("bundle",) if owned else ())
        claim_work(plan.work, "build", record, force)
        return _build(plan, t0, data, distill_data, eval_data, calibration_tokens, distill_options, threads,
                      force, owned, progress, log)


def _build(plan: BuildPlan, t0: float, data, distill_data, eval_data, calibration_tokens, distill_options,
           threads, force, owned, progress, log) -> BuildResult:
    from edgeconv.demo import EVAL_DATA
    from edgeconv.pipelines.convert import convert
    from edgeconv.stages.bundle import write_bundle

    n = len(plan.stages)
    student = plan.work / "student"
    log(f"[1-2/{n}] convert{' + distill' if plan.distill_tokens else ''} -> {student}")
    convert(plan.model, student, data=data, tokens=calibration_tokens, groups=plan.candidate.groups,
            distill_tokens=plan.distill_tokens, distill_data=distill_data, distill_options=distill_options,
            force=force, progress=progress, log=lambda m: log("      " + m))
    student_id = sha256_file(student / "manifest.json")
    artifact, export_key, parity = export_stage(plan, student, student_id, force, log)
    log(f"[4/{n}] parity: {parity_line(parity)}")
    eval_data = Path(eval_data or EVAL_DATA)
    log(f"[5/{n}] bundle -> {plan.out}")
    manifest, skipped = write_bundle(plan.out, name=f"{plan.name}-dense", artifact=artifact, fmt=plan.fmt,
                                     quant=plan.candidate.quant, artifact_key=export_key, target=plan.target,
                                     estimate=plan.estimate, eval_data=eval_data, teacher=str(plan.model),
                                     student=student, force=force, replace=owned)
    if skipped:
        log("      up to date")
    results = None
    if any(s[0] == "bench" for s in plan.stages):
        log(f"[6/{n}] bench here (bench.py --quick) -> {plan.work / 'bench' / 'results.json'}")
        results = bench_stage(plan, manifest, threads, log)
    return BuildResult(plan, plan.out, manifest, parity, results, time.time() - t0)


def export_stage(plan: BuildPlan, student: Path, student_id: str, force: bool, log) -> tuple[Path, str, dict]:
    where = plan.work / "export"
    quant = plan.candidate.quant
    key = stage_key("build-export", {"student": student_id}, {"format": plan.fmt, "quant": quant})
    log(f"[3/{len(plan.stages)}] export {plan.fmt} {quant} -> {where}")
    done = None if force else finished_output(where, "build-export", key)
    if done:
        log("      up to date")
    else:
        with atomic_output_dir(where, force=True, key=key) as tmp:
            if plan.fmt == "gguf":
                from edgeconv.stages.export_gguf import export_gguf

                export_gguf(student, tmp / f"{plan.name}-dense-{quant}.gguf", quant)
            else:
                from edgeconv.stages.export_onnx import export_onnx_genai

                export_onnx_genai(student, tmp / "model", quant)
            files = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                     for p in tmp.rglob("*") if p.is_file()}
            from edgeconv.io.output_dir import write_manifest

            write_manifest(tmp, "build-export", key, {"student": str(student)}, {"format": plan.fmt, "quant": quant},
                           files, {})
    if plan.fmt == "gguf":
        artifact = where / f"{plan.name}-dense-{quant}.gguf"
        parity = json.loads(artifact.with_suffix(".parity.json").read_text())
    else:
        artifact = where / "model"
        parity = read_manifest(artifact) or {}
        parity = parity.get("summary", parity)
    return artifact, key, parity


def parity_line(parity: dict) -> str:
    ratio = parity.get("ppl_ratio")
    top1 = parity.get("top1_agreement")
    parts = []
    if ratio is not None:
        parts.append(f"perplexity ratio {ratio:.4f} vs torch")
    if top1 is not None:
        parts.append(f"top-1 agreement {top1:.1%}")
    return (", ".join(parts) or "see parity.json") + " (passed the tolerance of the format)"


def bench_stage(plan: BuildPlan, manifest: dict, threads: int | None, log) -> dict | None:
    """Run the bundle's own bench.py here, in a separate process so its peak RSS is the runner's alone."""
    out = plan.work / "bench" / "results.json"
    done = out.parent / "bundle-key"
    if out.is_file() and done.is_file() and done.read_text() == manifest["key"]:
        log("      up to date")
        return json.loads(out.read_text())
    from edgeconv.device.local_bench import resolve, run_runner

    try:  # verified in this process first, like `edgeconv bench`: the bundle's bench.py runs only as hashed
        results = run_runner(resolve(plan.out), out, role="student", label=f"{plan.name}-dense ({plan.target.name})",
                             threads=threads, quick=True, eval_data=None, extra=["--target", plan.target.name])
    except EdgeconvError as exc:
        log(f"      bench.py failed: {exc.line()}")
        return None
    done.write_text(manifest["key"])
    return results


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
            f"{r.get('peak_rss_with_scoring_mb') or r['peak_rss_mb'] or 0:.0f} MB with the accuracy run), load {r['load_s']:.2f} s, decode "
            f"{r['decode_tok_s'] or 0:.0f} tok/s, {r['runtime']['threads']} threads",
            f"  accuracy   perplexity {ppl}; exact match {acc.get('exact_match_mean', 0):.1%}, "
            f"multiple choice {acc.get('choice_acc', 0):.1%} (bench.py --quick)",
        ]
    manifest_hash = sha256_file(result.bundle / "manifest.json")
    lines += [f"  on device  {plan.target.bench.command}   (in the bundle; setup: {plan.target.bench.setup})",
              f"  manifest   sha256 {manifest_hash}",
              f"  back here  edgeconv bench {result.bundle} --expect-sha256 {manifest_hash}   (refuses a bundle "
              "whose manifest was rewritten)",
              f"  took       {result.seconds:.0f} s"]
    return "\n".join(lines)
