"""Export GGUF: write, quantize with llama.cpp, check parity against torch, then (only then) publish.

Next to `NAME.gguf` it writes `NAME.parity.json`, an Ollama `NAME.Modelfile` and a model card `NAME.md`.
Everything is built in a temp directory beside the output and renamed into place when parity passes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeconv import __version__
from edgeconv.errors import EdgeconvError
from edgeconv.export import llamacpp
from edgeconv.export.gguf_arch import gguf_arch_for
from edgeconv.export.gguf_convert import FLOAT_TYPES, write_gguf
from edgeconv.families.base import routed_experts
from edgeconv.export.parity import PROMPTS, Parity, compare, gate, prompt_ids, torch_logits
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.io.output_dir import disk_full_error, sha256_file

GGUF_QUANTS = list(FLOAT_TYPES) + list(llamacpp.QUANT_FTYPES)


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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out.parent, prefix=".edgeconv-probe-")
        probe.close()
    except OSError as exc:
        raise EdgeconvError(f"cannot write to {out.parent} ({exc.strerror})", "choose a writable --out")


def export_gguf(model: str | Path, out: str | Path, quant: str = "Q4_K_M", *, force: bool = False,
                tokenizer_pre: str | None = None, prompts: list[str] = PROMPTS, imatrix_data: Path | None = None,
                imatrix_tokens: int = 8192) -> GgufExport:
    if quant not in GGUF_QUANTS:
        raise EdgeconvError(f"unknown GGUF quantization {quant!r}", f"use one of {', '.join(GGUF_QUANTS)}")
    out = Path(out).absolute()
    _check_out(out, force)
    ckpt = Checkpoint.open(model)
    gguf_arch_for(ckpt.config)  # unsupported architectures fail before any work
    if imatrix_data is not None and quant in FLOAT_TYPES:
        raise EdgeconvError(f"--imatrix-data applies to quantized types, not {quant}", "drop it or pick e.g. Q4_K_M")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.edgeconv-tmp-", dir=out.parent))
    try:
        staged = tmp / out.name
        if quant in FLOAT_TYPES:
            info = write_gguf(ckpt.path, staged, quant, tokenizer_pre)
        else:
            # Quantize from a lossless float file: BF16 for bf16 sources, F32 otherwise.
            source_dtype = ckpt.config.get("torch_dtype") or ckpt.config.get("dtype")
            base = "BF16" if source_dtype == "bfloat16" else "F32"
            info = write_gguf(ckpt.path, tmp / f"base-{base}.gguf", base, tokenizer_pre)
            imatrix = None
            if imatrix_data is not None:
                from edgeconv.export.imatrix import compute_imatrix

                imatrix = compute_imatrix(ckpt.path, Path(imatrix_data), imatrix_tokens)
                info["imatrix"] = {"data": str(imatrix_data), "tokens": imatrix_tokens, "tensors": len(imatrix)}
            llamacpp.quantize(tmp / f"base-{base}.gguf", staged, quant, imatrix=imatrix)
            (tmp / f"base-{base}.gguf").unlink()
        types = llamacpp.tensor_types(staged)
        fallbacks = llamacpp.k_quant_fallbacks(types, quant)
        parity = _parity(ckpt.path, staged, quant, prompts, routed=routed_experts(ckpt.config) > 1)
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
        }
        gate(parity, report, stem.parent / f"{stem.name}.parity-failed.json", f"GGUF {quant} export of {ckpt.path.name}")
        report["sha256"] = sha256_file(staged)
        (tmp / f"{stem.name}.parity.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / f"{stem.name}.Modelfile").write_text(_modelfile(out.name))
        (tmp / f"{stem.name}.md").write_text(_card(ckpt, quant, report))
        for f in tmp.iterdir():
            (out.parent / f.name).unlink(missing_ok=True)
            f.rename(out.parent / f.name)
    except OSError as exc:
        if exc.errno == 28:
            raise disk_full_error(out) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.close()
    return GgufExport(out, parity, report["type_mix"], fallbacks, info)


def _parity(model_dir: Path, gguf_path: Path, quant: str, prompts: list[str], routed: bool) -> Parity:
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
    return compare(f"gguf:{quant}", torch_logits(model_dir, ids), artifact, ids, routed=routed)


def _modelfile(name: str) -> str:
    return f"""# Ollama: ollama create my-model -f THIS_FILE && ollama run my-model
FROM ./{name}
PARAMETER temperature 0.7
PARAMETER num_ctx 4096
"""


def _card(ckpt: Checkpoint, quant: str, report: dict) -> str:
    plan = ckpt.path / "plan.json"
    method = json.loads(plan.read_text()).get("method", {}) if plan.is_file() else {}
    mix = ", ".join(f"{t}: {n}" for t, n in report["type_mix"].items())
    lines = [
        f"# {report['artifact']}",
        "",
        f"- source checkpoint: `{ckpt.path}` ({(ckpt.config.get('architectures') or ['?'])[0]})",
        f"- edgeconv plan: {json.dumps(method) if method else 'none (not an edgeconv conversion)'}",
        f"- quantization: {quant}; tensor types actually stored: {mix}",
        f"- importance matrix: {report['imatrix'] or 'none'}",
        f"- parity vs torch on {len(PROMPTS)} prompts: max |diff| {report['max_abs_diff']:.3g} "
        f"(largest logit {report['max_abs_logit']:.3g}), top-1 agreement {report['top1_agreement']:.1%}, "
        f"perplexity ratio {report['ppl_ratio']:.4f}",
        f"- produced by edgeconv {__version__}",
    ]
    if report["k_quant_fallbacks"]:
        lines.append(f"- warning: {len(report['k_quant_fallbacks'])} tensors fell back from k-quants "
                     "(input width not a multiple of 256)")
    return "\n".join(lines) + "\n"
