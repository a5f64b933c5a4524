"""Train the shipped demo models from scratch on this machine: a 16-expert top-2 Qwen3-MoE teacher and a dense
Qwen3 of the same total parameter count (its FFN is as wide as all 16 experts side by side).

    python benchmarks/demo/train.py tokenizer               # corpus splits + BPE tokenizer (seconds)
    python benchmarks/demo/train.py moe   --steps 450       # teacher phase 1, ~23 min of compute on 2 cores
    python benchmarks/demo/train.py moe   --phase anneal --steps 500 --batch 8 --lr 1e-3 --warmup 20 --every 100
    python benchmarks/demo/train.py moe   --phase balance --steps 300 --batch 8 --lr 1e-3 --warmup 10 --every 50
    python benchmarks/demo/train.py moe   --phase focus --steps 1200 --batch 8 --lr 1e-3 --warmup 20 --every 100
    python benchmarks/demo/train.py dense --steps 212       # dense phase 1, the same compute time
    python benchmarks/demo/train.py dense --phase anneal --steps 300 --batch 8 --lr 1e-3 --warmup 20 --every 50
    python benchmarks/demo/train.py dense --phase focus --steps 550 --batch 8 --lr 1e-3 --warmup 20 --every 100
    python benchmarks/demo/train.py ship                    # bf16 weights + tokenizer + eval data into the package
    python benchmarks/demo/train.py distill-data            # text for distilling students of demo-moe

Data: see corpus.py (Shakespeare, Python docs, the synthetic skills of edgeconv.evaluation.skills), mixed
35/35/30 by sampled windows. Everything is seeded; a step's batch depends only on (seed, step), so a run
killed part-way resumes from its last checkpoint and ends where the uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import corpus  # noqa: E402

from edgeconv.evaluation import skills  # noqa: E402

WORK = Path("benchmarks/_work/demo")
SEED = 0
SEQ = 256
VOCAB = 4096
MIX = {"shakespeare": 0.35, "pydocs": 0.35, "skills": 0.30}
# Phase 2 ("anneal"): from phase 1's weights, a skill-heavy mix, smaller batches (more updates per token) and
# a lower peak learning rate. Phase 1 used the harder skill sizes of edgeconv commit d807720 (5-digit
# addition, 2-5 words to copy, ...); after it the teacher solved only `brackets`, so the skills were
# shortened (see edgeconv/evaluation/skills.py) and phase 2 trains on the short ones, stored separately.
ANNEAL_MIX = {"shakespeare": 0.25, "pydocs": 0.25, "skills": 0.50}
# Phase 3 ("balance"): HF's load-balancing loss averages expert usage over all layers together, so each
# layer can collapse onto a few experts while the average looks balanced; that is what phases 1-2 did
# (held-out share of the busiest expert: 52-99 % per layer, several experts at 0 %). Phase 3 continues
# from phase 2 with a balance loss computed per layer (`layer_balance_loss`) and a larger coefficient.
BALANCE_COEF = 0.3
# Phase 4 ("focus"): after phase 3 the teacher still scored 0 % on add, copy and reverse (no induction-style
# copying had formed). Phase 4 continues with the per-layer balance loss, a skill-heavy mix in which those
# three skills are twice as frequent as the others, and `reverse` in its spaced form (one token per letter).
FOCUS_MIX = {"shakespeare": 0.2, "pydocs": 0.2, "skills": 0.6}
FOCUS_CYCLE = ["copy", "reverse", "add", "sort", "copy", "reverse", "add", "recall", "brackets"]
SKILLS_FILE = {"main": "skills", "anneal": "skills-short", "balance": "skills-short", "focus": "skills-focus"}
PHASES = ("main", "anneal", "balance", "focus")
PHASE = "main"


def phase_dir(kind: str, phase: str) -> Path:
    return WORK / (kind if phase == "main" else f"{kind}-{phase}")
SKILL_SEEDS = {"train": 1, "valid": 2, "test": 3}
HELD_OUT_SKILLS = 200  # per skill, in valid and in test
ARCH = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False, rope_theta=10000.0)


# ---------------------------------------------------------------------------------------------- tokenizer
def held_out_skill_prompts() -> set[str]:
    n = HELD_OUT_SKILLS * len(skills.SKILLS.names())
    return {e.prompt for split in ("valid", "test") for e in skills.examples(SKILL_SEEDS[split], n)}


def train_skill_lines(n: int, cycle: list[str] | None = None) -> list[str]:
    banned = held_out_skill_prompts()
    return [e.text for e in skills.examples(SKILL_SEEDS["train"], n, cycle) if e.prompt not in banned]


def build_tokenizer(data: Path, out: Path) -> None:
    """Byte-level BPE with Qwen2's split regex (digits one by one, which llama.cpp knows as `qwen2`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgeconv.export.gguf.vocab import QWEN2_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = corpus.read(data, "train", "shakespeare") + corpus.read(data, "train", "pydocs")
    texts.append("".join(train_skill_lines(20000)))
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                            model_max_length=1024).save_pretrained(out)


def prepare() -> None:
    data = WORK / "data"
    if not (data / "test" / "pydocs.jsonl").exists():
        print(json.dumps(corpus.build(data, SEED), indent=1))
    if not (WORK / "tokenizer" / "tokenizer.json").exists():
        t = time.time()
        build_tokenizer(data, WORK / "tokenizer")
        print(f"tokenizer trained in {time.time() - t:.0f} s")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(WORK / "tokenizer")
    for split in ("train", "valid"):
        for name in ("shakespeare", "pydocs"):
            path = WORK / "tokens" / f"{split}-{name}.npy"
            if not path.exists():
                docs = corpus.read(data, split, name)
                ids = [i for enc in tok(docs, add_special_tokens=False)["input_ids"] for i in enc + [tok.eos_token_id]]
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, np.array(ids, dtype=np.int32))
        path = WORK / "tokens" / f"{split}-{SKILLS_FILE[PHASE]}.npy"
        if not path.exists():
            cycle = FOCUS_CYCLE if PHASE == "focus" else None
            lines = train_skill_lines(400_000, cycle) if split == "train" else \
                [e.text for e in skills.examples(SKILL_SEEDS["valid"], HELD_OUT_SKILLS * 6)]
            ids = [i for enc in tok(lines, add_special_tokens=False)["input_ids"] for i in enc]
            np.save(path, np.array(ids, dtype=np.int32))
    for f in sorted((WORK / "tokens").glob("*.npy")):
        print(f"{f.name}: {len(np.load(f, mmap_mode='r')):,} tokens")


# ---------------------------------------------------------------------------------------------- training
def streams(split: str) -> dict[str, torch.Tensor]:
    files = {"shakespeare": "shakespeare", "pydocs": "pydocs", "skills": SKILLS_FILE[PHASE]}
    return {name: torch.from_numpy(np.load(WORK / "tokens" / f"{split}-{f}.npy").astype(np.int64))
            for name, f in files.items()}


def batch(data: dict[str, torch.Tensor], step: int, size: int) -> torch.Tensor:
    """[size, SEQ + 1] windows; which source and where depend only on (SEED, step)."""
    offset = {"main": 0, "anneal": 500_000, "balance": 900_000, "focus": 1_300_000}[PHASE]
    g = torch.Generator().manual_seed(SEED * 1_000_003 + step + offset)
    mix = {"main": MIX, "focus": FOCUS_MIX}.get(PHASE, ANNEAL_MIX)
    names = list(mix)
    picks = torch.multinomial(torch.tensor([mix[n] for n in names]), size, replacement=True, generator=g)
    rows = []
    for p in picks.tolist():
        s = data[names[p]]
        start = int(torch.randint(0, len(s) - SEQ - 1, (1,), generator=g))
        rows.append(s[start:start + SEQ + 1])
    return torch.stack(rows)


def make_model(kind: str):
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    if kind == "moe":
        config = Qwen3MoeConfig(**ARCH, intermediate_size=1024, moe_intermediate_size=256, num_experts=16,
                                num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.02)
    else:  # as wide as all 16 experts together: the same total parameters, minus the routers
        config = Qwen3Config(**ARCH, intermediate_size=16 * 256)
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(config)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def valid_loss(model, data: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    out = {}
    for name, s in data.items():
        n = min(16, (len(s) - 1) // SEQ)
        x = torch.stack([s[i * SEQ:(i + 1) * SEQ + 1] for i in range(n)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[name] = float(loss_of(model, x))
    model.train()
    return out


def loss_of(model, x: torch.Tensor, aux: bool = False):
    out = model(input_ids=x[:, :-1], output_router_logits=aux)
    ce = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
    if aux:
        return ce, layer_balance_loss(out.router_logits, model.config.num_experts_per_tok) \
            if PHASE in ("balance", "focus") else out.aux_loss
    return ce


def layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Per layer, then averaged: the Switch balance loss E * sum_e f_e * P_e (1 when balanced; f_e the share
    of routing slots, P_e the mean router probability of expert e), plus -mean_e log(E * P_e) (0 when
    balanced). The Switch term alone barely moves an expert the router has abandoned (its gradient scales
    with P_e, near 0); the log term's gradient grows as P_e shrinks, which revives it."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        n = probs.shape[-1]
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, n).sum(1).float()
        mean_p = probs.mean(0)
        losses.append(n * (chosen.mean(0) / top_k * mean_p).sum() - torch.log(n * mean_p + 1e-9).mean())
    return torch.stack(losses).mean()


@torch.no_grad()
def skill_exact(model, per_skill: int = 50) -> dict[str, float]:
    """Teacher-forced exact match per skill on validation examples: every answer token (and the closing
    newline) is the argmax. Equals greedy generation's exact match, in one forward pass."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(WORK / "tokenizer")
    names = skills.SKILLS.names()
    ex = skills.examples(SKILL_SEEDS["valid"], per_skill * len(names))
    rows = [(e.skill, tok(e.prompt)["input_ids"], tok(e.text)["input_ids"]) for e in ex]
    width = max(len(full) for _, _, full in rows)
    x = torch.full((len(rows), width), tok.eos_token_id)
    for i, (_, _, full) in enumerate(rows):
        x[i, :len(full)] = torch.tensor(full)
    model.eval()
    pred = model(input_ids=x).logits.argmax(-1)
    model.train()
    hits: dict[str, list[bool]] = {n: [] for n in names}
    for i, (name, prompt, full) in enumerate(rows):
        n = len(prompt)
        hits[name].append(bool((pred[i, n - 1:len(full) - 1] == x[i, n:len(full)]).all()))
    return {n: round(sum(h) / len(h), 3) for n, h in hits.items()}


@torch.no_grad()
def expert_shares(model, data: dict[str, torch.Tensor]) -> list[float]:
    """Per layer, the smallest share of valid tokens routed to one expert (text corpora only)."""
    x = torch.cat([torch.stack([s[i * SEQ:(i + 1) * SEQ] for i in range(16)])
                   for n, s in data.items() if n != "skills"])
    out = model(input_ids=x, output_router_logits=True)
    k = model.config.num_experts_per_tok
    return [round(float(torch.nn.functional.one_hot(r.topk(k, -1).indices, r.shape[-1])
                        .sum(1).float().mean(0).min()), 4)
            for r in out.router_logits]


def train(kind: str, steps: int, batch_size: int, peak_lr: float, warmup: int, every: int) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count() or 2)))
    out = phase_dir(kind, PHASE)
    ckpt = out / "checkpoint.pt"
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(kind)
    if PHASE != "main":  # continue from the previous phase's weights with a fresh optimizer
        from transformers import AutoModelForCausalLM

        previous = [phase_dir(kind, p) / "final" for p in PHASES[:PHASES.index(PHASE)]
                    if (phase_dir(kind, p) / "final").exists()][-1]
        print(f"starting from {previous}")
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(previous).state_dict())
    if PHASE in ("balance", "focus") and kind == "moe":
        model.config.router_aux_loss_coef = BALANCE_COEF
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    start, elapsed = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
        print(f"resumed at step {start}")
    train_data, valid_data = streams("train"), streams("valid")
    log = open(out / "log.jsonl", "a")
    coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    t0 = time.time() - elapsed
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup)
        x = batch(train_data, step, batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kind == "moe":
                ce, aux = loss_of(model, x, aux=True)
                loss = ce + coef * aux
            else:
                ce = loss = loss_of(model, x)
                aux = None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, "tokens": (step + 1) * batch_size * SEQ, "seconds": round(time.time() - t0, 1),
               "lr": group["lr"], "loss": round(float(ce), 4)}
        if aux is not None:
            row["aux"] = round(float(aux), 4)
        if (step + 1) % every == 0 or step + 1 == steps:
            row["valid"] = {k: round(v, 4) for k, v in valid_loss(model, valid_data).items()}
            row["skill_exact"] = skill_exact(model)
            if kind == "moe":
                model.eval()
                row["min_expert_share"] = expert_shares(model, valid_data)
                model.train()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "elapsed": time.time() - t0}, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
        log.write(json.dumps(row) + "\n")
        log.flush()
        if (step + 1) % 10 == 0 or "valid" in row:
            tps = row["tokens"] / row["seconds"]
            print(f"{kind} step {step + 1}/{steps} loss {row['loss']:.3f} {tps:.0f} tok/s "
                  f"{row.get('valid', '')} {row.get('skill_exact', '')}", flush=True)
    model.save_pretrained(out / "final")
    plot(kind)


def plot(kind: str) -> None:
    """Both phases on one token axis, phase 2 after the dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for phase in PHASES:
        path = phase_dir(kind, phase) / "log.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in open(path)]
        ax.plot([(offset + r["tokens"]) / 1e6 for r in rows], [r["loss"] for r in rows], lw=0.8, color="tab:blue",
                label="train" if phase == "main" else None)
        for name, color in zip(MIX, ("tab:orange", "tab:green", "tab:red")):
            v = [((offset + r["tokens"]) / 1e6, r["valid"][name]) for r in rows if "valid" in r]
            ax.plot(*zip(*v), marker="o", ms=3, color=color, label=f"valid {name}" if phase == "main" else None)
        if phase != "main":
            ax.axvline(offset / 1e6, color="gray", ls=":", lw=0.8)
        offset += rows[-1]["tokens"]
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"demo-{kind} training (dotted: start of a phase; valid skills are the short ones from phase 2)",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(WORK / f"{kind}-loss.png", dpi=110)


# ---------------------------------------------------------------------------------------------- shipping
ASSETS = Path("edgeconv/assets")


def ship() -> None:
    """bf16 weights + tokenizer of both models, the held-out evaluation set and a calibration text."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeconv.evaluation.eval_data import write_eval_data

    for kind, name in (("moe", "demo-moe"), ("dense", "demo-dense")):
        phases = [p for p in PHASES if (phase_dir(kind, p) / "final").exists()]
        if phases in ([], ["main"]):
            print(f"skip {name}: phase 2 of {kind} is not trained yet")
            continue
        src = phase_dir(kind, phases[-1]) / "final"
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        model.save_pretrained(ASSETS / name, max_shard_size="100MB")
        AutoTokenizer.from_pretrained(WORK / "tokenizer").save_pretrained(ASSETS / name)
        plot(kind)
        shutil.copy(WORK / f"{kind}-loss.png", ASSETS / name / "training_loss.png")
        with open(ASSETS / name / "training_log.jsonl", "w") as fh:  # both phases, tagged
            for phase in phases:
                for line in open(phase_dir(kind, phase) / "log.jsonl"):
                    fh.write(json.dumps({"phase": phase, **json.loads(line)}) + "\n")
        print(f"shipped {name}: {sum(f.stat().st_size for f in (ASSETS / name).iterdir()) / 1e6:.1f} MB")
    data = WORK / "data"
    held_out = {c: [(json.loads(line)["name"], json.loads(line)["text"])
                    for line in (data / "test" / f"{c}.jsonl").read_text().splitlines()]
                for c in ("shakespeare", "pydocs")}
    print(write_eval_data(ASSETS / "eval", held_out, seed=SKILL_SEEDS["test"]))
    rng = random.Random(SEED)
    rows = []
    for c in ("shakespeare", "pydocs"):
        docs = corpus.read(data, "train", c)
        for _ in range(40):
            doc = rng.choice(docs)
            start = rng.randrange(max(1, len(doc) - 4000))
            rows.append(doc[start:start + 4000])
    rows.append("".join(train_skill_lines(600)))
    rng.shuffle(rows)
    (ASSETS / "calibration.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    print(f"calibration text: {sum(map(len, rows)):,} chars")
    ship_distill_text()


def ship_distill_text(chars: int = 1_200_000, piece: int = 6000) -> None:
    """`edgeconv build`'s default distillation text for the demo teacher: random 6,000-character pieces of the
    training documents (Shakespeare and Python docs alike) and 200-line blocks of skills, ~1.2 M characters."""
    import random

    rng = random.Random(SEED + 1)
    data = WORK / "data"
    docs = corpus.read(data, "train", "shakespeare") + corpus.read(data, "train", "pydocs")
    pieces = [d[i:i + piece] for d in docs for i in range(0, len(d), piece)]
    rng.shuffle(pieces)
    lines = train_skill_lines(12_000, FOCUS_CYCLE)
    rows = ["".join(lines[i:i + 200]) for i in range(0, len(lines), 200)]
    size = sum(map(len, rows))
    for p in pieces:
        if size > chars:
            break
        rows.append(p)
        size += len(p)
    rng.shuffle(rows)
    (ASSETS / "distill.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    print(f"distillation text: {len(rows)} pieces, {size:,} chars")


def distill_data() -> Path:
    """Text for distilling a student from demo-moe: the teacher's training documents and short-skill lines,
    shuffled by document (a JSONL file; `edgeconv distill` uses each token once)."""
    import random

    data = WORK / "data"
    rows = corpus.read(data, "train", "shakespeare") + corpus.read(data, "train", "pydocs")
    lines = train_skill_lines(200_000)
    rows += ["".join(lines[i:i + 200]) for i in range(0, len(lines), 200)]
    random.Random(SEED).shuffle(rows)
    out = WORK / "distill-data.jsonl"
    out.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    print(f"wrote {out}: {len(rows)} documents, {sum(map(len, rows)):,} characters")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["tokenizer", "moe", "dense", "plot", "ship", "distill-data", "distill-text"])
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--every", type=int, default=50, help="validate and checkpoint every N steps")
    p.add_argument("--phase", choices=PHASES, default="main")
    a = p.parse_args()
    global PHASE
    PHASE = a.phase
    prepare()
    if a.what in ("moe", "dense"):
        train(a.what, a.steps, a.batch, a.lr, a.warmup, a.every)
    elif a.what == "ship":
        ship()
    elif a.what == "distill-data":
        distill_data()
    elif a.what == "distill-text":
        ship_distill_text()
    elif a.what == "plot":
        for kind in ("moe", "dense"):
            if (WORK / kind / "log.jsonl").exists():
                plot(kind)


if __name__ == "__main__":
    main()
