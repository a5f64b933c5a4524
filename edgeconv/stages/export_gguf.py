"""Export GGUF: write (float types and Q8_0 directly, other types through llama.cpp's quantizer), check parity
against torch, then (only then) publish.

Next to `NAME.gguf` it writes `NAME.parity.json`, an Ollama `NAME.Modelfile` and a model card `NAME.md` (front matter
the Hugging Face Hub reads: base model, `base_model_relation: quantized`, license, tags; then the method and the
parity table: edgeconv.reporting.model_card).
Everything is built in a temp directory beside the output (`.NAME.gguf.edgeconv-tmp-PID`) and renamed into
place when parity passes; a killed run's temp directory (with its whole-size float GGUF) is removed by the next
export to the same output. The free space is checked before anything is written: the float file's size is
known exactly, the quantized one's bounded from above.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeconv import __version__
from edgeconv.errors import EdgeconvError
from edgeconv.export.gguf import llamacpp
from edgeconv.export.gguf.arch import gguf_arch_for, untruncated_yarn
from edgeconv.export.gguf.depth_cut import cut_gguf, cut_overrides, cut_refusal, default_cut
from edgeconv.export.gguf.writer import check_free_space, disk_nearly_full, is_disk_full, not_enough_space, plan_gguf
from edgeconv.export.ollama import modelfile
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
from edgeconv.io.output_dir import remove_stale_temps, sha256_file, temp_path
from edgeconv.quant import get_quant
from edgeconv.reporting.model_card import facts, gguf_card

logger = logging.getLogger(__name__)
SIDE_FILES_BYTES = 1024**2  # NAME.parity.json, NAME.Modelfile, NAME.md: a few KB
IMATRIX_SOURCE = "edgeconv: computed in torch, passed to llama.cpp in memory"  # quantize.imatrix.file


@dataclass
class GgufExport:
    path: Path
    parity: Parity
    type_mix: dict[str, int]
    fallbacks: list[str]
    info: dict


def _check_out(out: Path, force: bool) -> None:
    if out.suffix != ".gguf":
        raise EdgeconvError(f"--out {out} should end in .gguf", "name the output file, e.g. model-Q4_K_M.gguf")
    if out.exists() and not force:
        raise EdgeconvError(f"{out} exists", "choose another --out or pass --force to replace it")
    if out.exists() and not _written_by_edgeconv(out):
        raise EdgeconvError(f"{out} exists and edgeconv did not write it (no {out.stem}.parity.json beside it)",
                            "choose another --out, or remove the file yourself: "
                            "--force replaces only edgeconv's exports")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out.parent, prefix=".edgeconv-probe-")
        probe.close()
    except OSError as exc:
        raise EdgeconvError(f"cannot write to {out.parent} ({exc.strerror})", "choose a writable --out")


def _written_by_edgeconv(out: Path) -> bool:
    """An export of ours: a file with the parity report edgeconv publishes beside it, naming it."""
    try:
        report = json.loads(out.with_suffix(".parity.json").read_text())
    except (OSError, ValueError):
        return False
    return (out.is_file() and isinstance(report, dict) and "edgeconv_version" in report
            and report.get("artifact") == out.name)


@guarded("out", "model", "imatrix_data")
def export_gguf(model: str | Path, out: str | Path, quant: str = "Q4_K_M", *, force: bool = False,
                tokenizer_pre: str | None = None, prompts: list[str] = PROMPTS, imatrix_data: Path | None = None,
                imatrix_tokens: int = 8192, reference: ReferenceOptions | None = None,
                name: str | None = None, allow_yarn_drift: bool = False,
                parity_layers: int | None = None) -> GgufExport:
    """`reference`: how the torch model the GGUF is checked against runs (device, dtype, whole or layer by
    layer; by default float32, the whole model when it fits in memory, else layer by layer). `name`: the GGUF's
    general.name [default: the model's hub id, else its directory name]. `allow_yarn_drift`: a model whose YaRN has
    truncate=false (a released GPT-OSS teacher) is exported with the YaRN llama.cpp runs (truncated), checked
    against torch running that same rope, and its drift from the model as configured is measured per position
    and written to parity.json and the card (see `yarn_drift`). `parity_layers`: run the parity check on the GGUF cut
    to its first N layers (its exact bytes; edgeconv.export.gguf.depth_cut), 0 on the whole file; None: the whole
    file when it fits in memory, else the cut (`parity_depth`)."""
    entry = get_quant("gguf", quant)  # unknown names refused with the known ones
    is_float = entry.float_type is not None
    # One pass of edgeconv's writer (the float types, and Q8_0 quantized by gguf-py), else a lossless float file that
    # llama.cpp's quantizer reads (with an importance matrix, too, which only llama.cpp takes).
    direct = entry.written_by_edgeconv and imatrix_data is None
    (reference or ReferenceOptions()).check()
    out = Path(out).absolute()
    _check_out(out, force)
    ckpt = Checkpoint.open(model)
    gguf_arch_for(ckpt.config)  # unsupported architectures fail before any work
    if parity_layers:  # a depth llama.cpp cannot run is refused before any work
        refusal = cut_refusal(ckpt.config, parity_layers)
        if refusal:
            raise EdgeconvError(f"--parity-layers {parity_layers}: {refusal}", "pass 0 to check the whole file")
    yarn = untruncated_yarn(ckpt.config) if allow_yarn_drift else None
    overrides = {"rope_scaling": yarn} if yarn else None
    if imatrix_data is not None and is_float:
        raise EdgeconvError(f"--imatrix-data applies to quantized types, not {quant}", "drop it or pick e.g. Q4_K_M")
    if imatrix_data is not None:
        from edgeconv.io.text_data import check_data

        check_data(imatrix_data)  # not text, or missing: before the float GGUF is written
    remove_stale_temps(out)  # killed runs' temp directories, whole-size float GGUFs included
    # Quantize from a lossless float file: BF16 for bf16 sources, F32 otherwise.
    source_dtype = ckpt.config.get("torch_dtype") or ckpt.config.get("dtype")
    base = quant if direct else ("BF16" if source_dtype == "bfloat16" else "F32")
    what = f"the {quant} GGUF export {out.name}" + ("" if direct else f" and its {base} intermediate")
    plan, needed = None, 0
    tmp = temp_path(out)
    try:
        plan = plan_gguf(ckpt.path, base, tokenizer_pre, name, config_overrides=overrides)
        needed = plan.nbytes + SIDE_FILES_BYTES
        if not direct:  # the float file and the quantized one are both on disk at the end
            needed += llamacpp.quantized_bytes_bound(plan.tensors(), quant, plan.metadata_bytes)
        check_free_space(out.parent, needed, what)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        staged = tmp / out.name
        if direct:
            info = plan.write(staged)
            plan.close()
        else:
            base_file = tmp / f"base-{base}.gguf"
            info = plan.write(base_file)
            plan.close()
            imatrix, metadata = None, None
            if imatrix_data is not None:
                from edgeconv.export.gguf.imatrix import compute_imatrix

                imatrix = compute_imatrix(ckpt.path, Path(imatrix_data), imatrix_tokens)
                info["imatrix"] = {"data": str(imatrix_data), "tokens": imatrix_tokens, "tensors": len(imatrix),
                                   "chunks": imatrix.chunks, "chunk_size": imatrix.chunk_size}
                # The keys llama-quantize writes for an --imatrix file. There is no file here (the matrix goes to
                # llama.cpp in memory), so quantize.imatrix.file says where it came from instead of a path.
                metadata = llamacpp.imatrix_metadata(IMATRIX_SOURCE, imatrix.dataset, len(imatrix), imatrix.chunks)
            try:
                llamacpp.quantize(base_file, staged, quant, imatrix=imatrix, metadata=metadata)
            except EdgeconvError as exc:
                if disk_nearly_full(out.parent):  # llama.cpp ran out of space (it says so only in its log)
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise not_enough_space(out.parent, needed, what) from exc
                raise
            base_file.unlink()
        types = llamacpp.tensor_types(staged)
        fallbacks = llamacpp.k_quant_fallbacks(types, quant)
        depth = parity_depth(ckpt.config, staged, parity_layers)
        cut = depth["layers"] < depth["of"]
        checked = tmp / f"cut-{depth['layers']}.gguf" if cut else staged
        if cut:
            cut_gguf(staged, checked, depth["layers"])
        with reference_options(reference):
            parity, drift = _parity(ckpt.path, checked, quant, prompts, routed=routed_experts(ckpt.config) > 1,
                                    overrides=overrides,
                                    cut=cut_overrides(ckpt.config, depth["layers"]) if cut else None)
        if cut:
            checked.unlink()
        stem = out.with_suffix("")
        report = {
            "artifact": out.name,
            "format": "gguf",
            "quantization": quant,
            "source": str(ckpt.path),
            "edgeconv_version": __version__,
            "type_mix": llamacpp.type_mix(types),
            "k_quant_fallbacks": fallbacks,
            "imatrix": info.get("imatrix"),
            **parity.as_dict(),
            "parity_depth": depth,
        }
        if drift is not None:
            report["yarn_drift"] = drift
        gate(parity, report, stem.parent / f"{stem.name}.parity-failed.json",
             f"GGUF {quant} export of {ckpt.path.name}")
        report["sha256"] = sha256_file(staged)
        (tmp / f"{stem.name}.parity.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / f"{stem.name}.Modelfile").write_text(modelfile(out.name, ckpt.path, context=4096,
                                                              name=f"{stem.name}.Modelfile"))
        (tmp / f"{stem.name}.md").write_text(gguf_card(facts(ckpt.path), out.name, quant, report)
                                              + (_drift_section(drift) if drift is not None else ""))
        for f in tmp.iterdir():
            (out.parent / f.name).unlink(missing_ok=True)
            f.rename(out.parent / f.name)
    except OSError as exc:
        full = needed and is_disk_full(exc, out.parent)  # judged before the partial files go
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise not_enough_space(out.parent, needed, what) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if plan is not None:
            plan.close()
        ckpt.close()
    return GgufExport(out, parity, report["type_mix"], fallbacks, info)


def parity_depth(config: dict, gguf_path: Path, parity_layers: int | None) -> dict:
    """How deep the parity check runs: {"layers": N, "of": all layers, "why"}. As asked (`parity_layers`, 0 = all),
    else the whole file when it fits in memory (llama.cpp maps it while the prompts run), else the fewest layers
    that hold every kind of layer (depth_cut.default_cut) when llama.cpp can run that cut."""
    import torch

    from edgeconv.forward.layer_by_layer import SAFETY, available_bytes, human

    total = int(config["num_hidden_layers"])
    if parity_layers is not None:
        layers = parity_layers or total
        return {"layers": layers, "of": total, "why": f"--parity-layers {parity_layers}"}
    size, usable = gguf_path.stat().st_size, int(SAFETY * available_bytes(torch.device("cpu")))
    if size <= usable:
        return {"layers": total, "of": total, "why": f"the file ({human(size)}) fits in {human(usable)} usable"}
    layers = default_cut(config)
    refusal = cut_refusal(config, layers)
    if refusal:
        logger.warning(f"parity: the whole {human(size)} file, more than the {human(usable)} usable: "
                       f"llama.cpp cannot run it cut ({refusal})")
        return {"layers": total, "of": total, "why": f"no cut: {refusal}"}
    why = (f"the file ({human(size)}) exceeds {human(usable)} usable: its first {layers} of {total} layers, "
           "every kind of layer, as written")
    logger.info(f"parity: {why}")
    return {"layers": layers, "of": total, "why": why}


def _parity(model_dir: Path, gguf_path: Path, quant: str, prompts: list[str], routed: bool,
            overrides: dict | None = None, cut: dict | None = None) -> tuple[Parity, dict | None]:
    """The gate's parity (torch with `overrides`, i.e. what llama.cpp runs) and, with overrides, the drift from the
    model as its config.json says (yarn_drift). `cut`: `gguf_path` is the file cut in depth, and torch runs the
    same layers (depth_cut.cut_overrides)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = prompt_ids(tokenizer, prompts)
    runner = llamacpp.LlamaRunner(gguf_path, n_ctx=max(len(i) for i in ids) + 8)
    try:
        for text in prompts:  # llama.cpp must split text exactly like the HF tokenizer
            want = tokenizer(text, add_special_tokens=False)["input_ids"]
            got = runner.tokenize(text)
            if got != want:
                raise EdgeconvError(
                    f"llama.cpp tokenizes {text[:40]!r} as {got[:12]}... but the HF tokenizer gives {want[:12]}...",
                    "the GGUF pre-tokenizer does not match; pass --tokenizer-pre with the right llama.cpp name",
                )
        artifact = [runner.logits(i) for i in ids]
    finally:
        runner.close()
    cut = cut or {}
    parity = compare(f"gguf:{quant}", torch_logits(model_dir, ids, {**(overrides or {}), **cut} or None), artifact,
                     ids, routed=routed)
    return parity, (yarn_drift(torch_logits(model_dir, ids, cut or None), artifact) if overrides else None)


def yarn_drift(configured: list, artifact: list) -> dict:
    """How far the GGUF (llama.cpp's truncated YaRN) is from the model run as configured (truncate=false), per
    position: the largest |logit difference| at that position over the prompts, relative to the prompt's largest
    |logit|; and the top-1 agreement over all positions."""
    by_position: dict[int, float] = {}
    agree = total = 0
    for want, got in zip(configured, artifact, strict=True):
        scale = float(np.abs(want).max()) or 1.0
        for p, diff in enumerate(np.abs(got - want).max(axis=-1) / scale):
            by_position[p] = max(by_position.get(p, 0.0), float(diff))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(want)
    rel = [round(by_position[p], 6) for p in sorted(by_position)]
    return {"reference": "the model as configured (YaRN truncate=false); the gate used truncate=true, as llama.cpp",
            "rel_diff_by_position": rel, "max_rel_diff": max(rel), "top1_agreement": agree / total}


def _drift_section(drift: dict) -> str:
    rel = drift["rel_diff_by_position"]
    marks = ", ".join(f"{rel[p]:.1e} at {p}" for p in sorted({0, len(rel) // 4, len(rel) // 2, len(rel) - 1}))
    return ("\n## YaRN drift\n\nllama.cpp always truncates YaRN's correction range; this model's config does not. "
            "The GGUF matches torch run with the truncated range (the parity above); against the model as configured "
            f"it drifts by {marks} (largest |logit difference| relative to the largest logit, by position), top-1 "
            f"agreement {drift['top1_agreement']:.1%}. The drift grows with the position.\n")
