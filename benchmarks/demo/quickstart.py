"""Quickstart until the shipped demo teacher lands: make a small random Qwen3-MoE, convert it, load it.

    python benchmarks/demo/quickstart.py [--workdir DIR]

Runs the real CLI (inspect -> plan -> assemble) on a freshly built checkpoint, then loads the dense
result with stock transformers and checks the exactness property on it: with the router zeroed and
top_k = E, the dense model built from all experts at 1/E gives the MoE's logits.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig


def build_teacher(path: Path, experts: int = 8) -> None:
    config = Qwen3MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_experts=experts, num_experts_per_tok=experts, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()  # uniform routing, so the exactness check below applies
    model.save_pretrained(path)


def edgeconv(*args: str) -> None:
    print("$ edgeconv", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "edgeconv.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgeconv-quickstart-"))
    teacher, plan, dense = work / "teacher", work / "plan.json", work / "dense"
    build_teacher(teacher)
    edgeconv("inspect", str(teacher))
    edgeconv("plan", str(teacher), "--experts", "first:8", "--scaling", "uniform", "--out", str(plan))
    edgeconv("assemble", str(teacher), "--plan", str(plan), "--out", str(dense), "--force")
    moe = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (moe(ids).logits - student(ids).logits).abs().max().item()
    print(f"{type(student).__name__} loaded from {dense}; max |logit diff| vs the MoE = {diff:.2e}")
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
