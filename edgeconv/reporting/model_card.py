"""Model cards the Hugging Face Hub understands: README.md with YAML front matter, then what the model is and how it
was made.

Written into every dense checkpoint edgeconv writes (assemble, distill, prune: `README.md`), beside every GGUF export
(`NAME.md`), into every ONNX export's directory and every device bundle (`README.md`). The front matter
(huggingface_hub's `ModelCardData`):

    base_model           the model it was made from (the MoE teacher): its hub id, else its directory name
    base_model_relation  `quantized` for a GGUF or a quantized ONNX export; not set for a dense student, since none
                         of the Hub's relations (adapter, merge, quantized, finetune) is what it is: the card says
                         it in words (experts pruned and merged into a dense model, then distilled from the teacher)
    library_name         transformers (checkpoints), llama-cpp-python (GGUF), onnxruntime (ONNX), onnxruntime-genai
    pipeline_tag         text-generation
    tags                 moe-to-dense, distillation (when distilled), gguf (GGUF), the model types (e.g. qwen3,
                         qwen3_moe), edgeconv
    license              the source's (its card's `license`, else its config's), when known

then the method (the plan: scoring, grouping, scaling, K, calibration data and tokens; the distillation: tokens
and data), and for exports and bundles the parity table and the bench headline. Everything is read from what is on
disk (edgeconv.io.lineage, plan.json, the calibration statistics' summary, the stage manifests), and nothing that
changes from run to run (times, output paths) goes into a checkpoint's card, so an unchanged rebuild writes the
same bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from edgeconv import __version__
from edgeconv.io.checkpoint import model_id
from edgeconv.io.lineage import Lineage, lineage
from edgeconv.io.output_dir import read_manifest

CARD = "README.md"
PIPELINE_TAG = "text-generation"
PAPER = "arXiv 2605.28207"
BENCH_START, BENCH_END = "<!-- bench -->", "<!-- /bench -->"  # the bench headline's place in a bundle's card


@dataclass
class ModelFacts:
    """What a card says about a checkpoint, gathered from its directory (see `facts`)."""

    name: str
    lineage: Lineage
    architecture: str | None = None  # the HF class of the checkpoint
    model_type: str | None = None
    params: int | None = None
    config: dict = field(default_factory=dict)
    teacher: dict | None = None  # the plan's model: architecture, num_layers, num_experts, top_k, expert_width
    method: dict | None = None  # the plan's method (scoring, grouping, scaling, experts, groups, ...)
    experts: dict[int, list[int]] | None = None  # layer -> the teacher's experts kept in it
    width: int | None = None  # the dense FFN width
    calibration: dict | None = None  # data (file name), tokens, seq_len
    distillation: dict | None = None  # tokens, data, mode, temperature, ce_weight, top_k, final_kl, final_loss
    pruning: dict | None = None  # prune's summary

    @property
    def teacher_model_type(self) -> str | None:
        return model_type_of((self.teacher or {}).get("architecture"))


def model_type_of(architecture: str | None) -> str | None:
    """transformers' model_type of a causal-LM class name (qwen3_moe for Qwen3MoeForCausalLM), if it knows it."""
    if not architecture:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return next((t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls == architecture), None)


def _params(directory: Path) -> int | None:
    try:
        from edgeconv.io.checkpoint import Checkpoint

        ckpt = Checkpoint(directory)
        return sum(info.numel for shard in ckpt.shards for info in shard.tensors.values())
    except Exception:
        return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def calibration_of(method: dict) -> dict | None:
    """The calibration a stats plan was made from: tokens from the plan, data and sequence length from the
    statistics' summary.json when it is still there."""
    if not method or method.get("planner") != "stats":
        return None
    out = {"tokens": method.get("calibration_tokens")}
    summary = _read_json(Path(method["stats"]) / "summary.json") if method.get("stats") else None
    data = (summary or {}).get("data") or {}
    if data.get("path"):
        out["data"] = Path(data["path"]).name
    if data.get("seq_len"):
        out["seq_len"] = data["seq_len"]
    return out


def facts(directory: str | Path, manifest: dict | None = None, name: str | None = None) -> ModelFacts:
    """Everything a card says about the checkpoint in `directory`: its lineage, config, plan.json, the calibration
    statistics the plan names, and its manifest (`manifest`: the one a stage is about to write)."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else (read_manifest(directory) or {})
    config = _read_json(directory / "config.json") or {}
    lin = lineage(directory, manifest)
    f = ModelFacts(name=name or model_id(directory), lineage=lin, config=config,
                   architecture=(config.get("architectures") or [None])[0], model_type=config.get("model_type"),
                   params=_params(directory))
    plan = _read_json(directory / "plan.json")
    if plan and plan.get("format") == "edgeconv-plan":
        f.teacher, f.method = plan.get("model"), plan.get("method") or {}
        f.experts = {int(lp["layer"]): [e for g in lp["groups"] for e in g["experts"]] for lp in plan.get("layers", [])}
        f.width = max((int(lp["width"]) for lp in plan.get("layers", [])), default=None)
        f.calibration = calibration_of(f.method)
    summary, options = manifest.get("summary") or {}, manifest.get("options") or {}
    inputs = manifest.get("inputs") or {}
    if manifest.get("stage") == "distill":
        f.distillation = {
            "tokens": summary.get("tokens"), "data": Path(inputs["data"]).name if inputs.get("data") else None,
            "documents": summary.get("documents"), "mode": options.get("mode", summary.get("mode")),
            "temperature": options.get("temperature"), "ce_weight": options.get("ce_weight"),
            "top_k": options.get("top_k"), "seq_len": options.get("seq_len"), "lr": options.get("lr"),
            "final_kl": summary.get("final_kl"), "final_loss": summary.get("final_loss"),
        }
    if manifest.get("stage") == "prune":
        f.pruning = {**summary, "data": Path(inputs["data"]).name if inputs.get("data") else None}
    return f


# --- front matter ---------------------------------------------------------------------------------------------------


def tags_of(f: ModelFacts, *extra: str) -> list[str]:
    tags = []
    if f.method is not None or (f.lineage.stage in ("assemble", "distill") and f.teacher):
        tags.append("moe-to-dense")
    if f.lineage.stage == "prune":
        tags.append("pruning")
    if f.lineage.distilled:
        tags.append("distillation")
    tags += [*extra, f.model_type, f.teacher_model_type, "edgeconv"]
    return list(dict.fromkeys(t for t in tags if t))


def front_matter(f: ModelFacts, *, library_name: str, relation: str | None = None, tags: list[str]) -> str:
    from huggingface_hub import ModelCardData

    base = f.lineage.source
    data = ModelCardData(base_model=base, base_model_relation=relation if base else None, library_name=library_name,
                         pipeline_tag=PIPELINE_TAG, tags=tags, license=f.lineage.license)
    return f"---\n{data.to_yaml()}\n---\n"


# --- body -----------------------------------------------------------------------------------------------------------


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def _m(params: int | None) -> str:
    return f"{params / 1e6:,.2f} M" if params else "?"


def what_it_is(f: ModelFacts, quantized: bool = False, runtime: str = "llama.cpp") -> str:
    """The paragraph that says what the model is, its relation to its base model in words (`quantized`: said of a
    GGUF of it, or an ONNX export (`runtime`: onnxruntime), whose card sets base_model_relation: quantized)."""
    src = f"`{f.lineage.source}`" if f.lineage.source else "its source"
    arch = f"`{f.architecture}`" if f.architecture else "model"
    if f.lineage.stage == "prune":
        p = f.pruning or {}
        return (f"A dense {arch} of {_m(f.params)} parameters, width-pruned from the dense model {src} "
                f"(FFN {_n(p.get('source_ffn_width', '?'))} -> {_n(p.get('ffn_width', '?'))} channels, "
                f"{_n(p.get('kv_heads', '?'))} key/value heads, by activation importance, Minitron-style). "
                "It is not a fine-tune, a merge or a quantization of it: its channels are a subset of the source's."
                + (f" This file is a {runtime} quantization of that pruned model (`base_model_relation: quantized`)."
                   if quantized else ""))
    t = f.teacher or {}
    teacher = (f"the Mixture-of-Experts model {src} (`{t.get('architecture', '?')}`, {t.get('num_layers', '?')} "
               f"layers, {t.get('num_experts', '?')} experts per MoE layer, top-{t.get('top_k', '?')})")
    if f.method is not None:
        made = (f"made from {teacher} by keeping and merging some of each layer's experts into one dense FFN "
                f"(MoE to dense, {PAPER}; the router is gone)")
        if f.lineage.distilled:
            made += f", then distilled from {src} as the teacher"
        relation = ("experts pruned and merged into a dense model" +
                    (", then knowledge distillation from the MoE" if f.lineage.distilled else ""))
    elif f.lineage.distilled:
        made = f"distilled from {src} as the teacher (forward KL on its next-token distributions)"
        relation = "knowledge distillation from the MoE"
    else:
        return f"A {arch} of {_m(f.params)} parameters."
    if quantized:
        said = (f"{relation}, then quantized for {runtime} (this file). The Hub's relations (adapter, merge, "
                "quantized, finetune) name one step only: `base_model_relation` is `quantized`, the last one.")
    else:
        said = (f"{relation}. None of the Hub's relations (adapter, merge, quantized, finetune) describes that, so "
                "`base_model_relation` is not set.")
    return f"A dense {arch} of {_m(f.params)} parameters, {made}.\n\n**Relation to the base model** {src}: {said}"


def method_table(f: ModelFacts) -> list[str]:
    """The method as a two-column table: the plan, the calibration, the distillation (what is known)."""
    rows = []
    t, m = f.teacher or {}, f.method
    if f.lineage.source and t:
        rows.append(("base model (teacher)", f"`{f.lineage.source}`: {t.get('architecture', '?')}, "
                     f"{t.get('num_layers', '?')} layers, {t.get('num_experts', '?')} experts per MoE layer, "
                     f"top-{t.get('top_k', '?')}"))
    if f.architecture:
        rows.append(("dense model", f"{f.architecture}" + (f", FFN width {_n(f.width)}" if f.width else "")
                     + (f", {_n(f.params)} parameters" if f.params else "")))
    if m is not None:
        planner = m.get("planner")
        if planner == "stats":
            rows += [("expert scoring", f"`{m.get('scoring')}`"), ("grouping", f"`{m.get('grouping')}`"),
                     ("scaling", f"`{m.get('scaling')}`"),
                     ("K: experts kept per layer", f"{m.get('experts')} of {t.get('num_experts', '?')}, merged into "
                      f"{m.get('groups')} groups"), ("seed", str(m.get("seed")))]
        else:
            rows += [("experts kept", f"`{m.get('experts')}` (no calibration: {planner} plan)"),
                     ("grouping", f"`{m.get('grouping', 'none')}`"), ("scaling", f"`{m.get('scaling')}`")]
        c = f.calibration
        if c:
            data = f"`{c['data']}`, " if c.get("data") else ""
            seq = f" in sequences of {_n(c['seq_len'])}" if c.get("seq_len") else ""
            rows.append(("calibration data", f"{data}{_n(c.get('tokens'))} tokens{seq}"))
    d = f.distillation
    if d:
        data = f" of `{d['data']}`" if d.get("data") else ""
        loss = f"forward KL at T = {d.get('temperature')}"
        if d.get("ce_weight"):
            loss += f" + {d['ce_weight']} x cross-entropy on the data"
        teacher_how = ("offline: the teacher's top-{} log-probs cached".format(d.get("top_k"))
                       if d.get("mode") == "offline" else "online teacher")
        rows.append(("distillation", f"{_n(d.get('tokens'))} tokens{data}, {loss}, {teacher_how}, "
                     f"sequences of {_n(d.get('seq_len'))}, lr {d.get('lr')}"))
        if d.get("final_kl") is not None:
            rows.append(("distillation, last step", f"loss {d['final_loss']:.4f}, KL {d['final_kl']:.4f}"))
    if f.pruning:
        p = f.pruning
        rows.append(("pruning", f"FFN {_n(p.get('source_ffn_width'))} -> {_n(p.get('ffn_width'))} channels, "
                     f"{_n(p.get('kv_heads'))} KV heads, importance from {_n(p.get('calibration_tokens'))} tokens"
                     + (f" of `{p['data']}`" if p.get("data") else "")))
    if not rows:
        return []
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if f.experts:
        kept = "; ".join(f"{layer}: {ids}" for layer, ids in sorted(f.experts.items()))
        lines += ["", f"Experts kept, per MoE layer: {kept}."]
    return lines


def parity_table(report: dict) -> list[str]:
    """The parity check of an export against torch, and the tolerance it passed."""
    if not report or report.get("ppl_ratio") is None:
        return ["Parity against torch: not recorded."]
    tol = report.get("tolerance") or {}
    kind = report.get("kind", "")
    rows = [
        ("max \\|diff\\| / max \\|logit\\|", f"{report['max_abs_diff']:.3g} / {report['max_abs_logit']:.3g} = "
         f"{report.get('rel_diff', math.nan):.2e}", f"{tol['rel_diff']:.0e}" if tol.get("rel_diff") else "-"),
        (f"top-1 agreement ({report.get('decisive_positions', '?')} decisive positions)",
         f"{report['top1_agreement']:.1%}", f"{tol['top1']:.0%}" if tol.get("top1") else "-"),
        ("perplexity, artifact / torch", f"{report['ppl_artifact']:.3f} / {report['ppl_torch']:.3f} = "
         f"{report['ppl_ratio']:.4f}", f"within {tol['ppl']:.0%}" if tol.get("ppl") is not None else "-"),
    ]
    depth = report.get("parity_depth") or {}
    cut = (f" Checked on the file's first {depth['layers']} of {depth['of']} layers (their exact bytes, torch running "
           f"the same layers): {depth['why']}." if depth and depth.get("layers", 0) < depth.get("of", 0) else "")
    return [f"Parity vs torch ({kind}, {report.get('positions', '?')} positions of fixed prompts): "
            + ("passed." if report.get("passed", True) else "FAILED.") + cut, "",
            "| check | measured | tolerance |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


def bench_headline(results: dict) -> list[str]:
    """The headline of a bench.py results.json: where, memory, speed, accuracy."""
    rt, dev = results.get("runtime") or {}, results.get("device") or {}
    where = dev.get("jetson_model") or dev.get("board_model") or dev.get("processor") or dev.get("machine") or "?"
    acc = results.get("accuracy") or {}
    ppl = ", ".join(f"{k} {v:.1f}" for k, v in (acc.get("perplexity") or {}).items())
    quick = " (--quick)" if (acc.get("settings") or {}).get("quick") else ""
    speed = results.get("speed") or [{}]
    first = speed[0] if speed else {}
    rows = [
        ("device", f"{where}, {dev.get('logical_cores', '?')} cores; {rt.get('version', rt.get('name', '?'))}, "
         f"{rt.get('threads', '?')} threads"),
        ("load", f"{results.get('load_s', math.nan):.2f} s; RSS after load "
         f"{results.get('rss_after_load_mb') or 0:.0f} MB, peak {results.get('peak_rss_mb') or 0:.0f} MB"),
        ("decode", f"{results.get('decode_tok_s') or 0:,.0f} tok/s"
         + (f" after a {first['prompt_tokens']}-token prompt (time to first token {first['ttft_ms']:.1f} ms)"
            if first.get("prompt_tokens") and first.get("ttft_ms") is not None else "")),
    ]
    if acc:
        rows.append(("accuracy" + quick, f"perplexity {ppl or '-'}; exact match {acc.get('exact_match_mean', 0):.1%}, "
                     f"multiple choice {acc.get('choice_acc', 0):.1%}"))
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


# --- the cards ------------------------------------------------------------------------------------------------------


def checkpoint_card(f: ModelFacts) -> str:
    """README.md of a dense checkpoint (assemble, distill, prune)."""
    lines = [front_matter(f, library_name="transformers", tags=tags_of(f)), f"# {f.name}", "", what_it_is(f), ""]
    method = method_table(f)
    if method:
        lines += ["## Method", "", *method, ""]
    lines += [
        "## Use", "",
        "A stock transformers checkpoint:", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{f.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{f.name}")',
        "```", "",
        f"GGUF for llama.cpp and Ollama: `edgeconv export {f.name} --quant Q4_K_M --out {f.name}-Q4_K_M.gguf` "
        "(checked against this checkpoint before it is written).", "",
        f"Made with edgeconv {__version__}.",
    ]
    return "\n".join(lines) + "\n"


def write_checkpoint_card(directory: Path, manifest: dict, name: str | None = None) -> Path:
    """Write `directory`/README.md for the checkpoint a stage is writing there (its `manifest` to be)."""
    path = Path(directory) / CARD
    path.write_text(checkpoint_card(facts(directory, manifest, name)))
    return path


def gguf_card(f: ModelFacts, artifact: str, quant: str, report: dict) -> str:
    """NAME.md beside a GGUF export: a quantization of the checkpoint `f` describes."""
    own = f.lineage.source is None  # a model edgeconv did not make: the GGUF is a quantization of that model
    base = f if not own else ModelFacts(**{**f.__dict__, "lineage": Lineage(f.name, False, f.lineage.license, None)})
    mix = ", ".join(f"{t}: {n}" for t, n in (report.get("type_mix") or {}).items())
    lines = [front_matter(base, library_name="llama-cpp-python", relation="quantized", tags=tags_of(f, "gguf")),
             f"# {artifact}", "",
             f"GGUF ({quant}) of `{f.name}` for llama.cpp, Ollama and anything else that reads GGUF."
             + ("" if own else f" `{f.name}`: " + what_it_is(f, quantized=True)), ""]
    method = method_table(f)
    if method:
        lines += ["## Method", "", *method, ""]
    lines += ["## Quantization", "",
              f"- {quant} by llama.cpp's own quantizer; tensor types actually stored: {mix or '?'}",
              f"- importance matrix: {_imatrix_line(report.get('imatrix'))}"]
    if report.get("k_quant_fallbacks"):
        lines.append(f"- warning: {len(report['k_quant_fallbacks'])} tensors fell back from k-quants "
                     "(input width not a multiple of 256)")
    lines += ["", "## Parity", "", *parity_table(report), "",
              f"- source checkpoint: `{f.name}` ({f.architecture or '?'}); the full report: "
              f"`{Path(artifact).stem}.parity.json`",
              f"- parity vs torch on the prompts above: perplexity ratio {report.get('ppl_ratio', math.nan):.4f}",
              f"- produced by edgeconv {__version__}"]
    return "\n".join(lines) + "\n"


def _imatrix_line(info: dict | None) -> str:
    if not info:
        return "none"
    return (f"computed in torch from `{Path(info['data']).name}` ({_n(info.get('tokens'))} tokens, "
            f"{_n(info.get('chunks'))} sequences), {_n(info.get('tensors'))} tensors")


def onnx_card(f: ModelFacts, artifact: str, fmt: str, precision: str, report: dict) -> str:
    """README.md in an ONNX export's directory (`fmt` onnx: optimum's model.onnx for onnxruntime; onnx-genai: an
    onnxruntime-genai model): an export of the checkpoint `f` describes, `quantized` unless fp32."""
    own = f.lineage.source is None  # a model edgeconv did not make: the export is one of that model
    base = f if not own else ModelFacts(**{**f.__dict__, "lineage": Lineage(f.name, False, f.lineage.license, None)})
    genai, quantized = fmt == "onnx-genai", precision != "fp32"
    runtime = LIBRARY_OF[fmt]
    provider = report.get("execution_provider", "cpu")
    lines = [front_matter(base, library_name=runtime, relation="quantized" if quantized else None,
                          tags=tags_of(f, "onnx", *(["onnxruntime-genai"] if genai else []))),
             f"# {artifact}", "",
             (f"An onnxruntime-genai model ({precision}, built for the {provider.upper()} execution provider) of "
              f"`{f.name}`: runs in onnxruntime-genai as it is (`genai_config.json`)." if genai else
              f"ONNX ({precision}) of `{f.name}` for onnxruntime: `model.onnx` with its KV cache as inputs and "
              "outputs, as optimum exports it (text-generation-with-past).")
             + ("" if own else f" `{f.name}`: " + what_it_is(f, quantized=quantized, runtime=runtime)), ""]
    method = method_table(f)
    if method:
        lines += ["## Method", "", *method, ""]
    conversion = report.get("conversion")
    lines += ["## Export", "", f"- {report.get('exporter', '?')}, {precision}"
              + (f"; {conversion}" if isinstance(conversion, str) else ""),
              "", "## Parity", "", *parity_table(report), "",
              f"- source checkpoint: `{f.name}` ({f.architecture or '?'}); the full report: `parity.json`",
              f"- produced by edgeconv {__version__}", "", "## Use", ""]
    if genai:
        lines += [f"`pip install {'onnxruntime-genai-cuda' if provider == 'cuda' else 'onnxruntime-genai'}`, then:",
                  "", "```python", "import onnxruntime_genai as og", 'model = og.Model("model")  # this directory',
                  "tokenizer = og.Tokenizer(model)", "params = og.GeneratorParams(model)",
                  "params.set_search_options(max_length=64)", "generator = og.Generator(model, params)",
                  'generator.append_tokens(tokenizer.encode("To be, or not to be"))',
                  "while not generator.is_done():", "    generator.generate_next_token()",
                  "print(tokenizer.decode(generator.get_sequence(0)))", "```"]
    else:
        lines += ["`pip install onnxruntime`; to generate, optimum's `ORTModelForCausalLM` runs it with its tokenizer:",
                  "", "```python", "from optimum.onnxruntime import ORTModelForCausalLM",
                  "from transformers import AutoTokenizer", 'model = ORTModelForCausalLM.from_pretrained("model")',
                  'tokenizer = AutoTokenizer.from_pretrained("model")', "```"]
    return "\n".join(lines) + "\n"


LIBRARY_OF = {"gguf": "llama-cpp-python", "onnx": "onnxruntime", "onnx-genai": "onnxruntime-genai"}


def bundle_card(f: ModelFacts, *, title: str, intro: str, fmt: str, parity: dict, estimate: str,
                tags: list[str], device: list[str], quantized: bool | None = None) -> str:
    """README.md of a device bundle: front matter, what the model is, the method, parity, the bench headline
    (filled in by the build's bench stage: `with_bench`), then `device`: how to run it on the device.
    `quantized`: base_model_relation quantized (default: for a GGUF)."""
    gguf = fmt == "gguf"
    quantized = gguf if quantized is None else quantized
    lines = [front_matter(f, library_name=LIBRARY_OF.get(fmt, "onnxruntime-genai"),
                          relation="quantized" if quantized else None, tags=tags_of(f, *tags)),
             f"# {title}", "", intro, "", what_it_is(f, quantized=quantized, runtime=LIBRARY_OF.get(fmt, fmt)), ""]
    method = method_table(f)
    if method:
        lines += ["## Method", "", *method, ""]
    lines += ["## Parity", "", *parity_table(parity), "", "Every figure: `parity.json`.", "",
              "## Benchmark", "", f"Planned memory on the device: {estimate}.", "",
              BENCH_START, "Not measured yet: `bench.py` (below) measures it on the device.", BENCH_END, "", *device]
    return "\n".join(lines) + "\n"


def with_bench(card: str, results: dict, where: str) -> str:
    """`card` with its bench section holding the headline of `results` (measured `where`)."""
    start, end = card.find(BENCH_START), card.find(BENCH_END)
    if start < 0 or end < start:
        return card
    body = "\n".join([f"Measured {where} by the bundle's own `bench.py`:", "", *bench_headline(results)])
    return card[: start + len(BENCH_START)] + "\n" + body + "\n" + card[end:]
