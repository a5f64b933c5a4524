"""The device bundle: everything one target needs, in one directory that can be copied to the device.

    dist/<model>-<target>/
      <model>-<quant>.gguf        (or model/ for onnxruntime-genai)
      bench.py                    standalone runner: verifies hashes, then speed, memory and accuracy
      bench.sh                    (GGUF) the same check, then llama.cpp's llama-bench and llama-perplexity
      eval/                       the evaluation data bench.py scores; eval/<corpus>.txt for llama-perplexity (GGUF)
      Modelfile                   `ollama create NAME -f Modelfile` (GGUF): the chat template as Ollama's TEMPLATE,
                                  stop tokens, num_ctx (edgeconv.export.ollama)
      parity.json                 the export's parity against torch
      README.md                   a model card the Hugging Face Hub reads (base model, license, tags, method, parity,
                                  the bench headline once the build measured it), how to run it (the setup line of
                                  the runtime its format needs: edgeconv.device.bundle_runtime), the memory plan
      manifest.json               sha256 and size of every file above, and what the bundle was built for
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from edgeconv import __version__
from edgeconv.device.bench_sh import BENCH_SH, add_to_bundle
from edgeconv.device.bundle_runtime import ARM_PYTHON, Launch, launch
from edgeconv.device.memory_fit import Estimate, gb
from edgeconv.device.profiles import TargetProfile
from edgeconv.export.ollama import modelfile
from edgeconv.io.checkpoint import model_id
from edgeconv.io.output_dir import MANIFEST, read_manifest, sha256_file
from edgeconv.reporting.model_card import ModelFacts, bundle_card, facts, with_bench
from edgeconv.stages.export import parity_line
from edgeconv.stages.stage import Identity, StageBase

RUNNER = Path(__file__).parents[1] / "device" / "runner.py"  # copied into the bundle as bench.py


class BundleStage(StageBase):
    """The export stage's artifact (its directory `export`), bench.py, the evaluation data, and the plan, in OUT.
    Its key holds the export's key, so it chains back to the student and the teacher. `replace`: OUT may hold
    another bundle of this same build (a new edgeconv's bench.py changes the key) and is replaced without --force."""

    name = "bundle"
    force_redoes = True

    def __init__(self, out: Path, *, name: str, export: Path, artifact: Path, fmt: str, quant: str,
                 target: TargetProfile, estimate: Estimate, eval_data: Path, teacher: str, student: Path,
                 replace: bool = False):
        self.out, self.bundle_name, self.export, self.artifact = Path(out), name, Path(export), Path(artifact)
        self.fmt, self.quant, self.target, self.estimate = fmt, quant, target, estimate
        self.eval_data, self.teacher, self.student, self.replaces = Path(eval_data), teacher, Path(student), replace

    def describe(self) -> str:
        return "model, bench.py, bench.sh, eval data, Modelfile, README, manifest with sha256"

    def identity(self) -> Identity:
        artifact_key = (read_manifest(self.export) or {}).get("key")
        return Identity({"artifact": artifact_key, "runner": sha256_file(RUNNER), "bench_sh": sha256_file(BENCH_SH),
                         "eval": [sha256_file(f) for f in sorted(self.eval_data.glob("*.jsonl"))]},
                        {"target": self.target.model_dump(exclude={"source"})})

    def run(self, tmp: Path) -> dict:
        artifact, target = self.artifact, self.target
        if self.fmt == "gguf":
            model_rel = artifact.name
            shutil.copy2(artifact, tmp / model_rel)
            parity = artifact.with_suffix(".parity.json")
        else:
            model_rel = "model"
            shutil.copytree(artifact, tmp / model_rel, ignore=shutil.ignore_patterns(MANIFEST))
            parity = artifact / "parity.json"  # the export's full report (its manifest holds only a summary)
            if not parity.is_file():
                parity = artifact / MANIFEST
        if parity.is_file():
            shutil.copy2(parity, tmp / "parity.json")
        shutil.copy2(RUNNER, tmp / "bench.py")
        shutil.copytree(self.eval_data, tmp / "eval", ignore=shutil.ignore_patterns("*.yaml", "__pycache__"))
        if self.fmt == "gguf":
            add_to_bundle(tmp)  # bench.sh, and eval/<corpus>.txt for llama-perplexity (edgeconv.device.bench_sh)
        plan = self.student / "plan.json"
        if plan.is_file():
            shutil.copy2(plan, tmp / "plan.json")
        if self.fmt == "gguf":
            (tmp / "Modelfile").write_text(modelfile(model_rel, self.student, context=self.estimate.config.context,
                                                     threads=target.threads))
        report = _read_json(parity)
        run = launch(target, self.fmt, report.get("execution_provider"))
        fields = {
            "name": self.bundle_name,
            "model": model_rel,
            "format": self.fmt,
            "quant": self.quant,
            "target": target.name,
            "context": self.estimate.config.context,
            "threads": target.threads,
            "accelerator": target.accelerator,  # bench.sh offloads to the GPU on cuda and metal
            "teacher": self.teacher,
            "student": str(self.student),
            "estimate": self.estimate.as_dict(),
            "runtime": run.runtime,
            **({"execution_provider": run.provider} if run.provider else {}),
            "bench": {"setup": run.setup, "command": run.command},  # its format's runtime: device.bundle_runtime
        }
        model_bytes = sum(p.stat().st_size for p in [tmp / model_rel, *(tmp / model_rel).rglob("*")] if p.is_file())
        (tmp / "README.md").write_text(readme(fields, target, self.estimate, model_bytes,
                                              facts(self.student, name=self.bundle_name), report, run))
        return fields

    def manifest(self, key: str, identity: Identity, files: dict, summary: dict) -> dict:
        """Flat, for bench.py (which reads it on the device without edgeconv): what the bundle is, and its files."""
        return {"edgeconv_version": __version__, "stage": self.name, "key": key, **summary,
                "files": dict(sorted(files.items()))}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def readme(manifest: dict, target: TargetProfile, estimate: Estimate, size: int, student: ModelFacts,
           parity: dict, run: Launch | None = None) -> str:
    """The bundle's README.md: a model card the Hugging Face Hub reads (edgeconv.reporting.model_card: base model,
    license, tags; the method, the parity table, the bench headline), then how to run it on the device: the setup
    line and command of the runtime its format needs (`run`, edgeconv.device.bundle_runtime: llama-cpp-python for a
    GGUF, onnxruntime-genai for its models, built for the execution provider parity.json names)."""
    fmt, model = manifest["format"], manifest["model"]
    run = run or launch(target, fmt, parity.get("execution_provider"))
    built = f", built for the {run.provider.upper()} execution provider" if run.provider else ""
    figures = parity_line(parity) if parity.get("ppl_ratio") is not None else "not recorded"
    intro = "\n".join([
        f"{target.description}. Built by edgeconv {__version__} from the MoE teacher "
        f"`{model_id(manifest['teacher'])}`.",
        "",
        f"- model: `{model}` ({fmt}, {manifest['quant']}{built}, {gb(size)}), runs in {run.runtime}",
        f"- context: {manifest['context']} tokens, threads: {manifest['threads']}",
        f"- parity with the torch student: {figures}; every figure in `parity.json`",
    ])
    python = "3.11" if run.setup.startswith(ARM_PYTHON) else "3.8"
    notes = [*(f"{n}\n" for n in run.notes)]
    if run.command:
        device = [
            "## Benchmark it on the device", "",
            f"Needs Python {python}+ and {run.package} only (no torch, no edgeconv):", "",
            f"    {run.setup}", f"    {run.command}", "", *notes,
            "`bench.py` first checks every file against the sha256 in `manifest.json` and refuses a modified bundle, "
            "then", "measures load time, peak memory, time to first token, prefill and decode tokens/s at several "
            "prompt lengths,", "and accuracy on `eval/` (perplexity, exact match per skill, multiple choice); it "
            "writes `results.json`.", "Bring the results back and compare targets with `edgeconv report "
            "results*.json --out report/`.", ""]
    else:
        device = ["## Set it up on the device", "", f"Needs Python {python}+ and {run.package}:", "",
                  f"    {run.setup}", "", *notes]
    if fmt == "gguf":
        device += ["With llama.cpp's own tools instead (`llama-bench` and `llama-perplexity` on PATH, or "
                   "`--llama-cpp DIR`):", "", f"    sh bench.sh --threads {manifest['threads']}", "",
                   "It checks the same hashes, then writes `llama-bench.json` and `perplexity.txt` (`edgeconv report` "
                   "reads them);", "without llama-bench it prints how to build llama.cpp for this device.", ""]
    device += ["## Run it", ""]
    if fmt == "gguf":
        device += [f'    llama-cli -m {model} -p "To be, or not to be" -n 64',
                   f"    ollama create {manifest['name']} -f Modelfile"]
    elif fmt == "onnx-genai":
        device += ["    venv/bin/python - <<'EOF'", "    import onnxruntime_genai as og",
                   f'    model = og.Model("{model}")', "    tokenizer = og.Tokenizer(model)",
                   "    params = og.GeneratorParams(model)", "    params.set_search_options(max_length=64)",
                   "    generator = og.Generator(model, params)",
                   '    generator.append_tokens(tokenizer.encode("To be, or not to be"))',
                   "    while not generator.is_done():", "        generator.generate_next_token()",
                   "    print(tokenizer.decode(generator.get_sequence(0)))", "    EOF"]
    else:
        device += ["    venv/bin/python -c \"import onnxruntime as ort; "
                   f"s = ort.InferenceSession('{model}/model.onnx'); print([i.name for i in s.get_inputs()])\""]
    tags = {"gguf": ["gguf"], "onnx": ["onnx"]}.get(fmt, ["onnx", "onnxruntime-genai"])
    return bundle_card(student, title=f"{manifest['name']} for {target.name}", intro=intro, fmt=fmt, parity=parity,
                       estimate=estimate.breakdown(), tags=tags, device=device,
                       quantized=None if fmt == "gguf" else manifest["quant"] != "fp32")


def add_bench_headline(bundle: Path, results: dict, where: str) -> bool:
    """Put the bench headline of `results` into the bundle's README.md and its manifest entry (size, sha256), so
    the bundle still verifies; False when there was nothing to change. The build's bench stage calls this after
    measuring the bundle here: the bundle is written first (bench.py checks its hashes before it runs)."""
    bundle = Path(bundle)
    card, manifest_path = bundle / "README.md", bundle / MANIFEST
    manifest = read_manifest(bundle)
    if manifest is None or "README.md" not in manifest.get("files", {}) or not card.is_file():
        return False
    text = card.read_text()
    new = with_bench(text, results, where)
    if new == text:
        return False
    data = new.encode()
    manifest["files"]["README.md"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    for path, content in ((card, data), (manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())):
        tmp = path.with_name(f".{path.name}.edgeconv-tmp-{os.getpid()}")
        tmp.write_bytes(content)
        os.replace(tmp, path)  # the card first: a run killed in between leaves a bundle that fails its check
    return True
