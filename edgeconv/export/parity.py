"""Parity of an exported artifact against the torch model it came from, with the tolerances of edgeconv.quant's table.

Compared on a fixed prompt set: max |logit difference| (absolute, and relative to the largest |logit|),
checked per position: a dense model must keep every position within tolerance; a routed (MoE) model may
have up to `ROUTED_OUTLIER_SHARE` of positions beyond it, because when two experts' router scores nearly
tie, a different summation order picks the other expert and that position moves a lot, and so do the later
positions that attend to it (seen here: one OLMoE position off by 0.42 while all others were within 0.004;
the shipped demo-moe, whose routers are flatter after its balance phases, has two top-2/top-3 ties within
2e-5 in the 140 prompt positions, which moved 10 positions in F32 while perplexity moved 0.36 % and every
decisive top-1 agreed),
top-1 agreement on positions where torch's top-1 is decisive (it leads the runner-up by more than
`DECISIVE_MARGIN` of the largest |logit|), and the ratio of the artifact's perplexity on the prompts to
torch's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass

import numpy as np
import torch

from edgeconv.errors import EdgeconvError
from edgeconv.forward.layer_by_layer import ForwardOptions
from edgeconv.quant import FORMATS, TABLE, Tolerance, get_quant

# The tolerance per format and quantization is edgeconv.quant's table (Tolerance: rel_diff, top1, ppl).

ROUTED_OUTLIER_SHARE = 0.1
# Top-1 agreement is counted where torch's top-1 leads the runner-up by more than this share of the largest
# |logit|: exact near-ties are a coin toss for any rounding and say nothing about the artifact.
DECISIVE_MARGIN = 0.01

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "12 + 34 = 46. The capital of France is Paris. Water boils at 100 degrees Celsius.",
]


@dataclass
class Parity:
    kind: str
    routed: bool
    max_abs_diff: float
    positions: int
    positions_over_tolerance: int
    max_abs_logit: float
    rel_diff: float
    top1_agreement: float
    decisive_positions: int
    ppl_torch: float
    ppl_artifact: float
    ppl_ratio: float
    tolerance: dict
    passed: bool
    failures: list[str]

    def as_dict(self) -> dict:
        return asdict(self)


def _nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    x = torch.from_numpy(logits[:-1]).double()
    target = torch.tensor(ids[1:])
    return float(torch.nn.functional.cross_entropy(x, target, reduction="sum")), len(ids) - 1


def tolerance(kind: str) -> Tolerance:
    """The tolerance of artifact type `kind` (FORMAT:QUANT, e.g. gguf:Q4_K_M) from edgeconv.quant's table."""
    fmt, sep, name = kind.partition(":")
    if not sep or fmt not in FORMATS:
        raise EdgeconvError(f"no parity tolerance for {kind}", f"known: {', '.join(q.key for q in TABLE)}")
    return get_quant(fmt, name).tolerance


def compare(kind: str, reference: list[np.ndarray], artifact: list[np.ndarray], token_ids: list[list[int]],
            routed: bool = False) -> Parity:
    tol = asdict(tolerance(kind))
    max_diff = max(float(np.abs(r - a).max()) for r, a in zip(reference, artifact))
    max_logit = max(float(np.abs(r).max()) for r in reference)
    agree = decisive = 0
    for r, a in zip(reference, artifact):
        top2 = np.sort(r, axis=-1)[:, -2:]
        # A fixed share of the logit scale, independent of the artifact's own error (a threshold tied to the
        # largest difference seen would make a flip nearly impossible to count, so the check could not fail).
        mask = (top2[:, 1] - top2[:, 0]) > DECISIVE_MARGIN * max_logit
        decisive += int(mask.sum())
        agree += int((r.argmax(-1) == a.argmax(-1))[mask].sum())
    nll_r = nll_a = n = 0.0
    for r, a, ids in zip(reference, artifact, token_ids):
        lr, k = _nll(r, ids)
        la, _ = _nll(a, ids)
        nll_r, nll_a, n = nll_r + lr, nll_a + la, n + k
    ppl_r, ppl_a = math.exp(nll_r / n), math.exp(nll_a / n)
    top1 = agree / decisive if decisive else 1.0
    rel = max_diff / max(max_logit, 1e-12)
    per_position = np.concatenate([np.abs(r - a).max(-1) for r, a in zip(reference, artifact)])
    over = 0
    failures = []
    if tol["rel_diff"] is not None:
        over = int((per_position > tol["rel_diff"] * max_logit).sum())
        allowed = int(ROUTED_OUTLIER_SHARE * len(per_position)) if routed else 0
        if over > allowed:
            failures.append(
                f"max |diff| {max_diff:.3g} is {rel:.2e} of the largest logit (tolerance {tol['rel_diff']:.0e}) "
                f"at {over} of {len(per_position)} positions ({allowed} allowed)"
            )
    if tol["top1"] is not None and top1 < tol["top1"]:
        failures.append(f"top-1 agreement {top1:.1%} < {tol['top1']:.0%} on {decisive} decisive positions")
    if abs(ppl_a / ppl_r - 1) > tol["ppl"]:
        failures.append(f"perplexity ratio {ppl_a / ppl_r:.4f} is off by more than {tol['ppl']:.1%}")
    return Parity(kind, routed, max_diff, len(per_position), over, max_logit, rel, top1, decisive, ppl_r, ppl_a,
                  ppl_a / ppl_r, tol, not failures, failures)


def gate(parity: Parity, report: dict, failed_path, what: str) -> None:
    """Stop an export that missed its tolerance: keep the measurements in `failed_path`, publish nothing.
    On success, a failure report left by an earlier attempt is removed."""
    import json
    from pathlib import Path

    failed_path = Path(failed_path)
    if parity.passed:
        failed_path.unlink(missing_ok=True)
        return
    failed_path.write_text(json.dumps(report, indent=2) + "\n")
    raise EdgeconvError(
        f"{what} failed its parity check: {'; '.join(parity.failures)}",
        f"nothing was published; the measurements are in {failed_path}",
    )


@dataclass(frozen=True)
class ReferenceOptions(ForwardOptions):
    """How the torch reference runs (see ForwardOptions): float32 by default, since the tolerances above are
    against an fp32 reference; `auto` would be bf16 on a GPU that has it. `check()` refuses an unavailable
    device before any work."""

    dtype: str = "float32"

    def check(self) -> None:
        self.resolve()


# None (not a shared mutable default): read as ReferenceOptions() in torch_logits
_REFERENCE: ContextVar[ReferenceOptions | None] = ContextVar("edgeconv_parity_reference", default=None)


@contextmanager
def reference_options(options: ReferenceOptions | None):
    """Within the block, `torch_logits` runs with `options` (the export stages set them around their check)."""
    token = _REFERENCE.set(options or ReferenceOptions())
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def torch_logits(model_dir, token_ids: list[list[int]], config_overrides: dict | None = None) -> list[np.ndarray]:
    """The torch model's float32 logits [len, V] for each prompt: the whole model when it is small (ONE_PASS_ABOVE)
    and fits in memory, else one decoder layer at a time (edgeconv.forward), with the options of
    `reference_options` (logged: which, and why)."""
    from edgeconv.forward.layer_by_layer import ONE_PASS_ABOVE, LayerByLayerModel, use_layer_by_layer
    from edgeconv.io.checkpoint import Checkpoint

    opts = _REFERENCE.get() or ReferenceOptions()
    device, dtype = opts.resolve()
    ckpt = Checkpoint.open(model_dir)
    try:
        if use_layer_by_layer(ckpt, "parity reference", dtype, device, opts.layer_by_layer,
                              one_pass_above=ONE_PASS_ABOVE):
            # A few prompts, one pass: each expert is cast when reached and the next layer is not read ahead,
            # so the reference holds one layer as stored (a prefetched layer would double that for a read that
            # overlaps almost no compute).
            lbl = LayerByLayerModel(ckpt, device=device, dtype=dtype, batch_size=len(token_ids),
                                    max_activation_bytes=opts.max_activation_bytes, prefetch=False,
                                    cast_on_use=True, config_overrides=config_overrides)
            return lbl.full_logits(token_ids)
    finally:
        ckpt.close()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if "num_hidden_layers" in (config_overrides or {}):  # a depth cut: the deeper layers' weights go unused
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **(config_overrides or {}))
    finally:
        hf_logging.set_verbosity(level)
    model = model.to(device).eval()
    out = []
    with torch.no_grad():
        for ids in token_ids:
            out.append(model(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy())
    return out


def prompt_ids(tokenizer, prompts: list[str] = PROMPTS, max_len: int = 64) -> list[list[int]]:
    ids = []
    for p in prompts:
        toks = tokenizer(p, add_special_tokens=False)["input_ids"][:max_len]
        if len(toks) >= 2:
            ids.append(toks)
    if not ids:
        raise EdgeconvError("the parity prompts tokenize to nothing", "check the tokenizer")
    return ids
