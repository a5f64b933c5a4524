"""The device bundle: everything one target needs, in one directory that can be copied to the device.

    dist/<model>-<target>/
      <model>-<quant>.gguf        (or model/ for onnxruntime-genai)
      bench.py                    standalone runner: verifies hashes, then speed, memory and accuracy
      eval/                       the evaluation data bench.py scores
      Modelfile                   `ollama create NAME -f Modelfile`
      parity.json                 the export's parity against torch
      README.md                   what this is, how to run it, the estimate it was planned with
      manifest.json               sha256 and size of every file above, and what the bundle was built for
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgeconv import __version__
from edgeconv.device.memory_fit import Estimate, gb
from edgeconv.device.profiles import TargetProfile
from edgeconv.io.output_dir import (
    MANIFEST,
    atomic_output_dir,
    finished_output,
    sha256_file,
    stage_key,
)

RUNNER = Path(__file__).parents[1] / "device" / "runner.py"  # copied into the bundle as bench.py


def bundle_key(artifact_key: str, target: TargetProfile, eval_data: Path) -> str:
    return stage_key("bundle", {"artifact": artifact_key, "runner": sha256_file(RUNNER),
                                "eval": [sha256_file(f) for f in sorted(Path(eval_data).glob("*.jsonl"))]},
                     {"target": target.model_dump(exclude={"source"})})


def write_bundle(out: Path, *, name: str, artifact: Path, fmt: str, quant: str, artifact_key: str,
                 target: TargetProfile, estimate: Estimate, eval_data: Path, teacher: str, student: Path,
                 force: bool = False, replace: bool = False) -> tuple[dict, bool]:
    """Write the bundle atomically; returns (manifest, skipped). Skipped when OUT already holds this bundle
    (unless `force`); another bundle in OUT is replaced only with `force` or `replace` (the same build's)."""
    key = bundle_key(artifact_key, target, eval_data)
    done = finished_output(out, "bundle", key)
    if done and not force:
        return done, True
    artifact = Path(artifact)
    with atomic_output_dir(out, force=force or replace, key=key) as tmp:
        if fmt == "gguf":
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
        shutil.copytree(eval_data, tmp / "eval", ignore=shutil.ignore_patterns("*.yaml", "__pycache__"))
        plan = Path(student) / "plan.json"
        if plan.is_file():
            shutil.copy2(plan, tmp / "plan.json")
        if fmt == "gguf":
            (tmp / "Modelfile").write_text(modelfile(model_rel, target))
        files = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "edgeconv_version": __version__,
            "stage": "bundle",
            "key": key,
            "name": name,
            "model": model_rel,
            "format": fmt,
            "quant": quant,
            "target": target.name,
            "context": estimate.config.context,
            "threads": target.threads,
            "teacher": teacher,
            "student": str(student),
            "estimate": estimate.as_dict(),
            "bench": target.bench.model_dump(),
            "files": files,
        }
        (tmp / "README.md").write_text(readme(manifest, target, estimate))
        files["README.md"] = {"sha256": sha256_file(tmp / "README.md"), "bytes": (tmp / "README.md").stat().st_size}
        manifest["files"] = dict(sorted(files.items()))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest, False


def modelfile(model_rel: str, target: TargetProfile) -> str:
    # A base (non-chat) model: no TEMPLATE, so Ollama passes the prompt through as text.
    return (f"# ollama create my-model -f Modelfile && ollama run my-model 'To be, or not to be'\n"
            f"FROM ./{model_rel}\n"
            f"PARAMETER num_ctx {min(target.context, 4096)}\n"
            f"PARAMETER num_thread {target.threads}\n"
            "PARAMETER temperature 0.7\n")


def readme(manifest: dict, target: TargetProfile, estimate: Estimate) -> str:
    size = sum(f["bytes"] for p, f in manifest["files"].items() if p == manifest["model"] or
               p.startswith(manifest["model"] + "/"))
    runtime = "llama-cpp-python" if manifest["format"] == "gguf" else "onnxruntime-genai"
    return f"""# {manifest['name']} for {target.name}

{target.description}. Built by edgeconv {__version__} from the MoE teacher `{manifest['teacher']}`.

- model: `{manifest['model']}` ({manifest['format']}, {manifest['quant']}, {gb(size)})
- planned memory on the device: {estimate.breakdown()}
- context: {manifest['context']} tokens, threads: {manifest['threads']}
- parity with the torch student: see `parity.json`

## Benchmark it on the device

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
