#!/usr/bin/env python
"""The full fit's two objectives at small n, one thread: the column-block chain (BlockObjective)
against dense factor blocks (DenseChainObjective), in one process, calls interleaved.

    python scripts/bench_dense_chain.py --sizes 32,64,77,128 --rounds 5 --calls 50

Prints, per n and dtype, the median seconds of one evaluation (value + gradient) of each and their
ratio, and checks that both give the same loss and gradient. docs/performance.md quotes the output.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfa_cli.approximations.patterns import chord_pattern  # noqa: E402
from sfa_cli.approximations.sparse_factors import initial_values, pattern_structures  # noqa: E402
from sfa_cli.engine.objective import BlockObjective, DenseChainObjective  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="32,64,77,128")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| n | dtype | block ms | dense ms | block / dense | max gradient difference (relative) |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        for dtype in (torch.float64, torch.float32):
            structs, _ = pattern_structures(chord_pattern(n), "cpu")
            values = [v + 0.1 * torch.randn_like(v) for v in initial_values(structs, seed=0, dtype=dtype)]
            target = torch.randn(n, n, dtype=dtype, generator=torch.Generator().manual_seed(n))
            objectives = {"block": BlockObjective(structs, target), "dense": DenseChainObjective(structs, target)}
            grads = {k: [torch.zeros_like(v) for v in values] for k in objectives}
            for k, objective in objectives.items():
                objective(values, grads[k])
            diff = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(grads["block"], grads["dense"]))
            times = {k: [] for k in objectives}
            for _ in range(args.rounds):
                for k, objective in objectives.items():
                    g = [torch.zeros_like(v) for v in values]
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        objective(values, g)
                    times[k].append((time.perf_counter() - t0) / args.calls)
            block, dense = (statistics.median(times[k]) for k in ("block", "dense"))
            print(f"| {n} | {str(dtype).replace('torch.', '')} | {1e3 * block:.3f} | {1e3 * dense:.3f} | "
                  f"{block / dense:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
