"""Why a GGUF misses its parity gate: quantization error per tensor, and how flat the logits are (issue 21, point 4).

    python benchmarks/quant_error.py tensors REF.gguf QUANT.gguf [QUANT2.gguf ...] [--json OUT]
        relative RMS error ||dequant(Q) - ref|| / ||ref|| of every tensor of each quantized GGUF against the float
        GGUF of the same model (F16/BF16), with its GGUF type, summed up per role (attn_q, ffn_down, output, ...)
    python benchmarks/quant_error.py logits MODEL_DIR [GGUF ...] [--json OUT]
        the torch model's logits on the parity prompts (edgeconv.export.parity): perplexity against the vocabulary
        size, std of the logits, mean top-1 probability; for each GGUF (llama.cpp logits, as the gate runs it) the
        perplexity ratio, and how systematic the logit error is: the mean cosine between the (centred) logit-error
        vectors of different positions (near 1: one error vector shifts every position the same way, so it does
        not average out over the prompts), and the share of the NLL change that comes from the target logits.
    python benchmarks/quant_error.py prior STUDENT_DIR OUT_DIR --unigram-prior B [--logit-scale S]
        a copy of a converted dense (Llama/Mistral/Qwen-style) student with real_shape_models' unigram prior put in
        directly (residual channel 0 = 1 in every embedding row, input column 0 of q/k/v/gate/up and output row 0 of
        o/down zeroed, head column 0 = B x log p_unigram), and the head's other columns times S: the student that
        `real_shape.py write --unigram-prior B --logit-scale S` + convert would give, without the convert's memory.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def _tensors(path: Path) -> dict:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        out[t.name] = (t.tensor_type.name, lambda t=t: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    return out


def role(name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")


def tensor_errors(ref_path: Path, quant_path: Path) -> list[dict]:
    ref, q = _tensors(ref_path), _tensors(quant_path)
    rows = []
    for name, (qtype, load) in q.items():
        if name not in ref:
            continue
        a, b = ref[name][1](), load()
        if a.size != b.size or a.ndim < 2:
            continue
        b = b.reshape(a.shape)
        err = float(np.sqrt(np.mean((b.astype(np.float64) - a) ** 2)))
        rms = float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))
        rows.append({"tensor": name, "role": role(name), "type": qtype, "ref_type": ref[name][0],
                     "shape": list(a.shape), "rel_rms": err / rms if rms else float("nan"),
                     "max_abs_over_rms": float(np.abs(a).max()) / rms if rms else float("nan")})
    return rows


def cmd_tensors(args) -> dict:
    report = {}
    for qp in args.quant:
        rows = tensor_errors(Path(args.ref), Path(qp))
        by_role = defaultdict(list)
        for r in rows:
            by_role[(r["role"], r["type"])].append(r["rel_rms"])
        print(f"\n{qp} against {args.ref}: {len(rows)} tensors")
        print(f"  {'role':<24} {'type':<8} {'n':>3} {'rel RMS err (mean)':>19} {'max':>8}")
        for (rl, ty), v in sorted(by_role.items()):
            print(f"  {rl:<24} {ty:<8} {len(v):>3} {np.mean(v):>19.4f} {np.max(v):>8.4f}")
        total = [r["rel_rms"] for r in rows]
        print(f"  all: mean {np.mean(total):.4f}, max {np.max(total):.4f}")
        report[qp] = {"rows": rows, "by_role": {f"{k[0]} {k[1]}": [float(np.mean(v)), float(np.max(v)), len(v)]
                                                for k, v in by_role.items()}}
    return report


def _lse(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]


def logit_stats(logits: list[np.ndarray], ids: list[list[int]], vocab: int) -> dict:
    nll = n = 0.0
    stds, top1p = [], []
    for x, t in zip(logits, ids):
        x64 = x.astype(np.float64)
        lse = _lse(x64)
        nll += float((lse[:-1] - x64[np.arange(len(t) - 1), t[1:]]).sum())
        n += len(t) - 1
        stds.extend(x64.std(-1).tolist())
        top1p.extend(np.exp(x64.max(-1) - lse).tolist())
    ppl = math.exp(nll / n)
    return {"ppl": ppl, "vocab": vocab, "ppl_over_vocab": ppl / vocab, "logit_std": float(np.mean(stds)),
            "mean_top1_prob": float(np.mean(top1p)), "positions": int(n)}


def error_structure(ref: list[np.ndarray], art: list[np.ndarray], ids: list[list[int]]) -> dict:
    deltas, d_target, d_lse, per_pos = [], 0.0, 0.0, []
    for r, a, t in zip(ref, art, ids):
        r64, a64 = r.astype(np.float64), a.astype(np.float64)
        d = a64 - r64
        deltas.append(d - d.mean(-1, keepdims=True))
        rows = np.arange(len(t) - 1)
        d_target += float(d[rows, t[1:]].sum())
        dl = (_lse(a64) - _lse(r64))[:-1]
        d_lse += float(dl.sum())
        per_pos.extend((dl - d[rows, t[1:]]).tolist())
    d = np.concatenate(deltas)
    unit = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-30)
    cos = unit @ unit.T
    k = len(cos)
    mean_cos = float((cos.sum() - np.trace(cos)) / (k * (k - 1)))
    n = sum(len(t) - 1 for t in ids)
    ref_std = float(np.mean([x.std(-1).mean() for x in ref]))
    return {"mean_cos_between_positions": mean_cos, "err_std_over_logit_std": float(d.std(-1).mean()) / ref_std,
            "dnll_per_token": (d_lse - d_target) / n, "dnll_from_target_logits": -d_target / n,
            "dnll_from_logsumexp": d_lse / n,
            # the standard error of the mean NLL change over the prompts: log(ppl ratio) is one draw of about
            # N(mean, sem) when the error is unsystematic, so a gate at |ratio - 1| <= tol sits tol / sem sigmas out
            "dnll_sem": float(np.std(per_pos) / math.sqrt(len(per_pos)))}


def cmd_logits(args) -> dict:
    from transformers import AutoTokenizer

    from edgeconv.export.gguf import llamacpp
    from edgeconv.export.parity import prompt_ids, torch_logits

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = prompt_ids(tok)
    ref = torch_logits(args.model, ids)
    vocab = ref[0].shape[-1]
    report = {"model": args.model, "torch": logit_stats(ref, ids, vocab)}
    print(json.dumps(report["torch"]))
    for g in args.gguf:
        runner = llamacpp.LlamaRunner(Path(g), n_ctx=max(len(i) for i in ids) + 8)
        try:
            art = [runner.logits(i) for i in ids]
        finally:
            runner.close()
        st = logit_stats(art, ids, vocab)
        row = {"ppl": st["ppl"], "ppl_ratio": st["ppl"] / report["torch"]["ppl"], **error_structure(ref, art, ids)}
        report[g] = row
        print(g, json.dumps(row))
    return report


READS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # [out, in]: input column 0 zeroed
WRITES = ("o_proj", "down_proj")  # output row 0 zeroed


def cmd_prior(args) -> dict:
    import shutil

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_shape_models import PRIOR_CHANNEL, unigram_log_probs

    src, out = Path(args.student), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    logp = unigram_log_probs(vocab)
    for f in sorted(src.glob("*.safetensors")):
        sd = load_file(str(f))
        for name, x in sd.items():
            if name.endswith("embed_tokens.weight"):
                x[:, 0] = PRIOR_CHANNEL
            elif name.endswith("lm_head.weight"):
                x[:, 1:] *= args.logit_scale
                x[:, 0] = (args.unigram_prior * logp).to(x.dtype)
            elif any(k in name for k in READS):
                x[:, 0] = 0
            elif any(k in name for k in WRITES):
                x[0] = 0
        save_file(sd, str(out / f.name), metadata={"format": "pt"})
        del sd
    spec = {"from": str(src), "unigram_prior": args.unigram_prior, "logit_scale": args.logit_scale}
    (out / "quant_error_prior.json").write_text(json.dumps(spec) + "\n")
    print(f"wrote {out}: {spec}")
    return spec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tensors", help="per-tensor quantization error against the float GGUF")
    t.add_argument("ref")
    t.add_argument("quant", nargs="+")
    t.add_argument("--json")
    lo = sub.add_parser("logits", help="how flat the torch logits are, and the structure of each GGUF's error")
    lo.add_argument("model")
    lo.add_argument("gguf", nargs="*")
    lo.add_argument("--json")
    pr = sub.add_parser("prior", help="a copy of a dense student with the unigram prior (and head scale) put in")
    pr.add_argument("student")
    pr.add_argument("out")
    pr.add_argument("--unigram-prior", type=float, required=True)
    pr.add_argument("--logit-scale", type=float, default=1.0)
    pr.add_argument("--json")
    args = ap.parse_args(argv)
    report = {"tensors": cmd_tensors, "logits": cmd_logits, "prior": cmd_prior}[args.cmd](args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
