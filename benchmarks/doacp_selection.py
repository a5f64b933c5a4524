#!/usr/bin/env python
"""Time of DO-ACP expert selection for a Qwen3-30B-A3B-sized model: 48 MoE layers x 128 experts, k = 8.

Statistics are random (counts, routing-weight and norm sums, a random positive-definite Gram matrix per
layer); selection cost does not depend on their values. Prints the total over all layers and the goal.
"""

from __future__ import annotations

import argparse
import time

import torch

from edgeconv.calibration.stats import LayerStats
from edgeconv.planning.methods import SCORERS

GOAL_S = 10.0


def random_stats(layer: int, experts: int, gen: torch.Generator) -> LayerStats:
    st = LayerStats.zeros(layer, experts, hidden=8)
    st.count = torch.randint(1, 10_000, (experts,), generator=gen).double()
    st.weight_sum = st.count * torch.rand(experts, generator=gen, dtype=torch.float64)
    st.norm_sq_sum = st.count * torch.rand(experts, generator=gen, dtype=torch.float64) * 4
    st.norm_sum = st.norm_sq_sum.sqrt()
    a = torch.randn(experts, experts, generator=gen, dtype=torch.float64)
    st.gram_sum = a @ a.T + experts * torch.eye(experts, dtype=torch.float64)  # positive definite
    st.gram_tokens = 1
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    layers = [random_stats(i, args.experts, gen) for i in range(args.layers)]
    do_acp = SCORERS.get("do-acp")
    start = time.perf_counter()
    picks = [do_acp(st, args.k, torch.Generator().manual_seed(args.seed)).selected for st in layers]
    total = time.perf_counter() - start

    assert all(len(set(p)) == args.k for p in picks)
    print(f"DO-ACP selection: {args.layers} layers x {args.experts} experts, k = {args.k}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"total {total:.3f} s ({1000 * total / args.layers:.2f} ms per layer)   goal < {GOAL_S:.0f} s   "
          f"{'PASS' if total < GOAL_S else 'FAIL'}")


if __name__ == "__main__":
    main()
