"""The device bundle: everything one target needs, in one directory that can be copied to the device.

    dist/<model>-<target>/
      <model>-<quant>.gguf        (or model/ for onnxruntime-genai)
      bench.py                    standalone runner: verifies hashes, then speed, memory and accuracy
      eval/                       the evaluation data bench.py scores
      Modelfile                   `ollama create NAME -f Modelfile`
      parity.json                 the export's parity against torch
      README.md                   a model card the Hugging Face Hub reads (base model, license, tags, method, parity,
                                  the bench headline once the build measured it), how to run it, the memory plan
      manifest.json               sha256 and size of every file above, and what the bundle was built for
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from edgeconv import __version__
from edgeconv.device.memory_fit import Estimate, gb
from edgeconv.device.profiles import TargetProfile
from edgeconv.io.checkpoint import model_id
from edgeconv.io.output_dir import MANIFEST, read_manifest, sha256_file
from edgeconv.reporting.model_card import ModelFacts, bundle_card, facts, with_bench
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
        return "model, bench.py, eval data, Modelfile, README, manifest with sha256"

    def identity(self) -> Identity:
        artifact_key = (read_manifest(self.export) or {}).get("key")
        return Identity({"artifact": artifact_key, "runner": sha256_file(RUNNER),
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
            parity = artifact / MANIFEST
        if parity.is_file():
            shutil.copy2(parity, tmp / "parity.json")
        shutil.copy2(RUNNER, tmp / "bench.py")
        shutil.copytree(self.eval_data, tmp / "eval", ignore=shutil.ignore_patterns("*.yaml", "__pycache__"))
        plan = self.student / "plan.json"
        if plan.is_file():
            shutil.copy2(plan, tmp / "plan.json")
        if self.fmt == "gguf":
            (tmp / "Modelfile").write_text(modelfile(model_rel, target))
        fields = {
            "name": self.bundle_name,
            "model": model_rel,
            "format": self.fmt,
            "quant": self.quant,
            "target": target.name,
            "context": self.estimate.config.context,
            "threads": target.threads,
            "teacher": self.teacher,
            "student": str(self.student),
            "estimate": self.estimate.as_dict(),
            "bench": target.bench.model_dump(),
        }
        model_bytes = sum(p.stat().st_size for p in [tmp / model_rel, *(tmp / model_rel).rglob("*")] if p.is_file())
        report = parity if self.fmt == "gguf" else artifact / "parity.json"  # genai: the figures are in model/
        (tmp / "README.md").write_text(readme(fields, target, self.estimate, model_bytes,
                                              facts(self.student, name=self.bundle_name), _read_json(report)))
        return fields

    def manifest(self, key: str, identity: Identity, files: dict, summary: dict) -> dict:
        """Flat, for bench.py (which reads it on the device without edgeconv): what the bundle is, and its files."""
        return {"edgeconv_version": __version__, "stage": self.name, "key": key, **summary,
                "files": dict(sorted(files.items()))}


def modelfile(model_rel: str, target: TargetProfile) -> str:
    # A base (non-chat) model: no TEMPLATE, so Ollama passes the prompt through as text.
    return (f"# ollama create my-model -f Modelfile && ollama run my-model 'To be, or not to be'\n"
            f"FROM ./{model_rel}\n"
            f"PARAMETER num_ctx {min(target.context, 4096)}\n"
            f"PARAMETER num_thread {target.threads}\n"
            "PARAMETER temperature 0.7\n")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def readme(manifest: dict, target: TargetProfile, estimate: Estimate, size: int, student: ModelFacts,
           parity: dict) -> str:
    """The bundle's README.md: a model card the Hugging Face Hub reads (edgeconv.reporting.model_card: base model,
    license, tags; the method, the parity table, the bench headline), then how to run it on the device."""
    runtime = "llama-cpp-python" if manifest["format"] == "gguf" else "onnxruntime-genai"
    intro = "\n".join([
        f"{target.description}. Built by edgeconv {__version__} from the MoE teacher "
        f"`{model_id(manifest['teacher'])}`.",
        "",
        f"- model: `{manifest['model']}` ({manifest['format']}, {manifest['quant']}, {gb(size)})",
        f"- context: {manifest['context']} tokens, threads: {manifest['threads']}",
        "- parity with the torch student: see `parity.json`",
    ])
    device = f"""## Benchmark it on the device

Needs Python 3.8+ and {runtime} only (no torch, no edgeconv):

    {target.bench.setup}
    {target.bench.command}

`bench.py` first checks every file against the sha256 in `manifest.json` and refuses a modified bundle, then
measures load time, peak memory, time to first token, prefill and decode tokens/s at several prompt lengths,
and accuracy on `eval/` (perplexity, exact match per skill, multiple choice); it writes `results.json`.
Bring the results back and compare targets with `edgeconv report results*.json --out report/`.

## Run it

    llama-cli -m {manifest['model']} -p "To be, or not to be" -n 64
    ollama create {manifest['name']} -f Modelfile
"""
    return bundle_card(student, title=f"{manifest['name']} for {target.name}", intro=intro,
                       fmt=manifest["format"], parity=parity, estimate=estimate.breakdown(),
                       tags=["gguf"] if manifest["format"] == "gguf" else ["onnx", "onnxruntime-genai"],
                       device=device.splitlines())


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
