"""Quickstart: the pipeline on the shipped demo teacher (demo-moe, the default MODEL) with the real CLI:
inspect -> convert (calibrate + plan + assemble) -> eval -> export to GGUF -> eval the GGUF in llama.cpp.

    python benchmarks/demo/quickstart.py [--workdir DIR]

It also checks the method's anchor on the way: on a small random MoE with the router zeroed and top_k = E,
the dense model built from all experts at 1/E gives the MoE's logits (stock transformers loads it).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig

WORDS = "the a of to in is it that on was for with as by at from this be or are an which one all".split()


def write_corpus(path: Path, docs: int = 400) -> None:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(docs):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(80)) + "."}) + "\n")


def build_teacher(path: Path, corpus: Path, uniform: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    experts = 8
    config = Qwen3MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_experts=experts, num_experts_per_tok=experts if uniform else 2, norm_topk_prob=True,
                            max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.05 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
        if uniform:
            for layer in model.model.layers:
                layer.mlp.gate.weight.zero_()
    model.save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([json.loads(line)["text"] for line in corpus.read_text().splitlines()], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


def edgeconv(*args: str) -> None:
    print("\n$ edgeconv", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "edgeconv.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgeconv-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    write_corpus(corpus)

    # 1. The shipped teacher (16 experts, top-2): DO-ACP keeps 2 experts per layer (the active width).
    dense = work / "dense"
    quick = ["--tokens", "4096", "--examples", "10", "--choices", "40", "--no-progress"]
    edgeconv("inspect")
    edgeconv("convert", "--out", str(dense), "--force", "--no-progress")
    edgeconv("eval", str(dense), *quick)
    edgeconv("export", str(dense), "--quant", "Q8_0", "--out", str(work / "dense-Q8_0.gguf"), "--force")
    edgeconv("eval", str(work / "dense-Q8_0.gguf"), *quick)

    # 2. The anchor: uniform routing over all experts == the dense model of all experts at 1/E.
    uniform, exact = work / "uniform-teacher", work / "uniform-dense"
    build_teacher(uniform, corpus, uniform=True)
    edgeconv("plan", str(uniform), "--experts", "first:8", "--scaling", "uniform", "--out", str(work / "all.json"))
    edgeconv("assemble", str(uniform), "--plan", str(work / "all.json"), "--out", str(exact), "--force",
             "--no-progress")
    moe = AutoModelForCausalLM.from_pretrained(uniform, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(exact, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (moe(ids).logits - student(ids).logits).abs().max().item()
    print(f"\nuniform-routing anchor: {type(student).__name__} vs the MoE, max |logit diff| = {diff:.2e}")
    print(f"outputs in {work}")
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
