"""Export ONNX: optimum-onnx (+ onnxruntime's quantizers) or onnxruntime-genai's model builder, check parity
against torch, then (only then) publish the directory.

`export_onnx` writes OUT/model.onnx (KV cache in and out, as optimum exports it), config.json, the tokenizer
(told to produce input_ids and attention_mask only), parity.json, a model card README.md (huggingface_hub reads it:
edgeconv.reporting.model_card.onnx_card) and manifest.json. `export_onnx_genai`
writes the builder's directory (model.onnx, model.onnx.data, genai_config.json, tokenizer) plus the same
card and two JSON files; it runs in onnxruntime-genai directly. Everything is built in a hidden temp directory beside
OUT and renamed into place when parity passes; a failed check leaves only OUT.parity-failed.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgeconv import __version__
from edgeconv.errors import EdgeconvError
from edgeconv.export.onnx import exporter as ox
from edgeconv.export.parity import (
    PROMPTS,
    Parity,
    ReferenceOptions,
    compare,
    gate,
    prompt_ids,
    reference_options,
    torch_logits,
)
from edgeconv.families.base import routed_experts
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.guard import guarded
from edgeconv.io.output_dir import (
    atomic_output_dir,
    check_can_write,
    remove_stale_temps,
    sha256_file,
    stage_key,
    temp_path,
    write_manifest,
)
from edgeconv.quant import get_quant
from edgeconv.reporting.model_card import CARD, facts, onnx_card


@dataclass
class OnnxExport:
    path: Path
    parity: Parity
    files: dict[str, int]
    info: dict


def _check_out(out: Path, force: bool) -> None:
    if out.suffix == ".onnx":
        raise EdgeconvError(f"--out {out} should be a directory",
                            "ONNX exports are directories, e.g. --out model-onnx/")
    try:
        parent = out.parent
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".edgeconv-probe-")
        probe.close()
    except OSError as exc:
        raise EdgeconvError(f"cannot write to {out.parent} ({exc.strerror or exc})", "choose a writable --out")
    check_can_write(out, force)


def _sizes(directory: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(directory.iterdir()) if f.is_file()}


def _publish(ckpt: Checkpoint, out: Path, tmp: Path, kind: str, stage: str, precision: str, parity: Parity,
             extra: dict, force: bool) -> dict:
    """Write parity.json (or OUT.parity-failed.json and raise) and the manifest into `tmp`."""
    files = _sizes(tmp)
    report = {
        "artifact": out.name,
        "format": stage,
        "precision": precision,
        "source": str(ckpt.path),
        "edgeconv_version": __version__,
        "files": files,
        "total_bytes": sum(files.values()),
        **extra,
        **parity.as_dict(),
    }
    gate(parity, report, out.parent / f"{out.name}.parity-failed.json",
         f"{kind} {precision} export of {ckpt.path.name}")
    (tmp / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / CARD).write_text(onnx_card(facts(ckpt.path), out.name, stage, precision, report))  # the Hub's card
    entries = {name: {"bytes": size, "sha256": sha256_file(tmp / name)} for name, size in _sizes(tmp).items()}
    options = {"precision": precision, **{k: v for k, v in extra.items() if k == "execution_provider"}}
    inputs = {"model": str(ckpt.path), "fingerprint": ckpt.fingerprint}
    write_manifest(tmp, stage, stage_key(stage, inputs, options), inputs, options, entries,
                   {"precision": precision, "total_bytes": report["total_bytes"], "parity_passed": True})
    return report


def _reference(model_dir: Path, prompts: list[str], reference: ReferenceOptions | None):
    from transformers import AutoTokenizer

    ids = prompt_ids(AutoTokenizer.from_pretrained(model_dir), prompts)
    with reference_options(reference):
        return ids, torch_logits(model_dir, ids)


@guarded("out", "model")
def export_onnx(model: str | Path, out: str | Path, precision: str = "fp32", *, force: bool = False,
                prompts: list[str] = PROMPTS, reference: ReferenceOptions | None = None) -> OnnxExport:
    """optimum-onnx export (fp32), then fp16 / dynamic int8 / int4 MatMulNBits, checked against torch (run as
    `reference` says: device, dtype, whole or layer by layer)."""
    get_quant("onnx", precision)  # unknown names refused with the known ones
    (reference or ReferenceOptions()).check()
    out = Path(out).absolute()
    _check_out(out, force)
    ckpt = Checkpoint.open(model)
    try:
        ox.check_onnx_supported(ckpt.config, str(ckpt.path))  # before any work
        routed = routed_experts(ckpt.config) > 1
        with atomic_output_dir(out, force=True) as tmp:
            t0 = time.time()
            ox.optimum_export(ckpt.path, tmp)
            ox.fix_tokenizer_inputs(tmp)
            conversion = ox.convert_precision(tmp / "model.onnx", precision)
            seconds = time.time() - t0
            ids, reference = _reference(ckpt.path, prompts, reference)
            parity = compare(f"onnx:{precision}", reference, ox.onnx_logits(tmp / "model.onnx", ids), ids,
                             routed=routed)
            extra = {"exporter": "optimum-onnx", "task": "text-generation-with-past",
                     "model_type": ox.model_type_of(ckpt.config), "routed": routed, "conversion": conversion,
                     "export_seconds": round(seconds, 2)}
            report = _publish(ckpt, out, tmp, "ONNX", "onnx", precision, parity, extra, force)
    finally:
        ckpt.close()
    return OnnxExport(out, parity, report["files"], report)


@guarded("out", "model")
def export_onnx_genai(model: str | Path, out: str | Path, precision: str = "int4", *, execution_provider: str = "cpu",
                      force: bool = False, prompts: list[str] = PROMPTS,
                      reference: ReferenceOptions | None = None) -> OnnxExport:
    """onnxruntime-genai's model builder on a dense student, then parity through onnxruntime-genai itself."""
    get_quant("onnx-genai", precision)  # unknown names (int8: the builder has none) refused with the known ones
    if execution_provider not in ox.GENAI_PROVIDERS:
        raise EdgeconvError(f"unknown execution provider {execution_provider!r}",
                            f"use one of {', '.join(ox.GENAI_PROVIDERS)}")
    (reference or ReferenceOptions()).check()
    out = Path(out).absolute()
    _check_out(out, force)
    ckpt = Checkpoint.open(model)
    try:
        ox.check_genai_supported(ckpt.config, str(ckpt.path))
        with atomic_output_dir(out, force=True) as tmp:
            # The builder's download/convert cache, named with our PID so a killed run's is swept by the next.
            cache_of = out.parent / f"{out.name}.genai-cache"
            remove_stale_temps(cache_of)
            cache = temp_path(cache_of)
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()
            try:
                t0 = time.time()
                ox.genai_build(ckpt.path, tmp, precision, execution_provider, cache)
                seconds = time.time() - t0
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            ox.fix_tokenizer_inputs(tmp)
            ids, reference = _reference(ckpt.path, prompts, reference)
            artifact = ox.genai_logits(tmp, ids, execution_provider)
            parity = compare(f"onnx-genai:{precision}", reference, artifact, ids)
            extra = {"exporter": "onnxruntime_genai.models.builder", "execution_provider": execution_provider,
                     "architecture": ckpt.config["architectures"][0], "export_seconds": round(seconds, 2)}
            report = _publish(ckpt, out, tmp, "onnxruntime-genai", "onnx-genai", precision, parity, extra, force)
    finally:
        ckpt.close()
    return OnnxExport(out, parity, report["files"], report)
