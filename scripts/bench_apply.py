"""Products with every kind of approximation against the dense product, and against the machine's limit.

For each kind (``chord``, ``butterfly``, ``lowrank``, ``sparse``, ``monarch``, ``lowrank+sparse``,
``chord+sparse``) at the Chord budget (``chord_budget(n)``) and at 5% of N^2, for each N, dtype,
thread count and block width b, it times ``A_hat @ X`` and ``A_hat.T @ X`` (X of shape N x b)
interleaved with the dense BLAS product ``D @ X`` of the same size (D a dense random N x N array),
and reports median seconds, the speedup over the dense product, the flop ratio N^2 / params and a
roofline bound:

    bound = max(multiply-adds / FMA rate, bytes / bandwidth)

with multiply-adds = params * b (every kind does one multiply-add per stored number and column),
bytes = the stored arrays (values and index arrays, as in the file) + X + the result, the FMA rate
measured here by a large dense GEMM and the bandwidth by a large array copy and sum, each for the
same dtype and thread count. ``@ / bound`` is how far a product is from that limit.

The approximations are not fitted: each is built with random values on its kind's support
(``SparseFactors.from_pattern`` for Chord and butterfly, random factors for low rank at the rank the
budget allows, a random support for the sparse matrix, ``Monarch`` at ``monarch_blocks(n)`` when it
fits the budget, and the two sums with half the budget each). ``path`` says how ``@`` multiplied:
``own`` (the kind's product) or ``dense`` (the materialized matrix, when the cost model prefers it;
:meth:`Approximation.prefers_dense`).

Every row is printed and the JSON file rewritten after it, so an interrupted run keeps what it did.

Examples:
    python scripts/bench_apply.py                                   # N = 1024, 4096: every kind, width, dtype, thread count
    nice -n 5 python scripts/bench_apply.py --n 1024,4096 --b 1,64 --kinds chord --dtypes float32
    python scripts/bench_apply.py --n 1024,4096,16384 --out docs/bench/apply.json   # the full run
    python scripts/bench_apply.py --compile on                      # the compiled circulant kernels (SFA_COMPILE=1)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from sfa_cli.approximations import kernels
from sfa_cli.approximations.kinds import LowRank, Monarch, SparseMatrix, SumApproximation
from sfa_cli.approximations.patterns import (butterfly_at_budget, butterfly_pattern, chord_at_budget, chord_budget,
                                             chord_pattern, resolve_budget, tsvd_rank_at_budget)
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.errors import NotApplicable
from sfa_cli.methods.monarch import monarch_blocks

KINDS = ("chord", "butterfly", "lowrank", "sparse", "monarch", "lowrank+sparse", "chord+sparse")
BUDGETS = ("chord", "5%")


# ---------------------------------------------------------------- the approximations

def budget_params(n: int, budget: str) -> int:
    return chord_budget(n)["params"] if budget == "chord" else resolve_budget(n, 0.05)


def _chord(n, params, dtype, seed):
    options, _ = chord_at_budget(n, params)
    return SparseFactors.from_pattern(chord_pattern(n, **options), seed=seed, dtype=dtype)


def _butterfly(n, params, dtype, seed):
    options, _ = butterfly_at_budget(n, params)
    return SparseFactors.from_pattern(butterfly_pattern(n, **options), seed=seed, dtype=dtype)


def _lowrank(n, params, dtype, seed):
    r = tsvd_rank_at_budget(n, params)
    if r < 1:
        raise NotApplicable(f"rank 1 needs {2 * n} parameters > {params}")
    rng = np.random.default_rng(seed)
    return LowRank(rng.standard_normal((n, r)).astype(dtype), rng.standard_normal((r, n)).astype(dtype), method="tsvd")


def _sparse(n, params, dtype, seed):
    """A random support of about ``params`` entries (drawn with repeats, which are merged), random values."""
    rng = np.random.default_rng(seed)
    flat = np.unique(rng.integers(0, n * n, size=params, dtype=np.int64))
    S = sp.csr_matrix((rng.standard_normal(flat.size).astype(dtype), (flat // n, flat % n)), shape=(n, n))
    return SparseMatrix(S, method="topk")


def _monarch(n, params, dtype, seed):
    s0, s1 = monarch_blocks(n)
    if n * (s0 + s1) > params:
        raise NotApplicable(f"Monarch with {s0} x {s1} blocks needs {n * (s0 + s1)} parameters > {params}")
    rng = np.random.default_rng(seed)
    return Monarch(rng.standard_normal((s1, s0, s0)).astype(dtype), rng.standard_normal((s1, s0, s1)).astype(dtype))


def _lowrank_sparse(n, params, dtype, seed):
    low = _lowrank(n, params // 2, dtype, seed)
    return SumApproximation([low, _sparse(n, params - low.params, dtype, seed + 1)], method="lowrank+sparse")


def _chord_sparse(n, params, dtype, seed):
    chord = _chord(n, params // 2, dtype, seed)
    return SumApproximation([chord, _sparse(n, params - chord.params, dtype, seed + 1)], method="chord+sparse")


BUILDERS = {"chord": _chord, "butterfly": _butterfly, "lowrank": _lowrank, "sparse": _sparse, "monarch": _monarch,
            "lowrank+sparse": _lowrank_sparse, "chord+sparse": _chord_sparse}


def stored_bytes(A) -> int:
    return int(sum(np.asarray(a).nbytes for a in A._arrays().values()))


# ---------------------------------------------------------------- the machine's rates

def threads_context(threads: int):
    """One thread count for numpy's BLAS (threadpoolctl) and torch alike."""
    torch.set_num_threads(threads)
    return threadpool_limits(limits=threads)


def _best(f, repeats: int) -> float:
    f()
    return min(_seconds(f) for _ in range(repeats))


def _seconds(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def machine_rates(dtype, repeats: int = 3) -> dict:
    """FMA/s of a large dense GEMM (numpy's BLAS) and bytes/s of streaming a large array (torch's copy and
    sum, which use the threads set), under the current thread settings."""
    m = 2048
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((m, m)).astype(dtype), rng.standard_normal((m, m)).astype(dtype)
    fma = m**3 / _best(lambda: A @ B, repeats)
    big = torch.ones(64 * 2**20 // np.dtype(dtype).itemsize * 4, dtype=getattr(torch, np.dtype(dtype).name))  # 256 MiB
    dst = torch.empty_like(big)
    copy = 2 * big.numel() * big.element_size() / _best(lambda: dst.copy_(big), repeats)
    read = big.numel() * big.element_size() / _best(lambda: big.sum(), repeats)
    return {"fma_per_s": fma, "bytes_per_s": max(copy, read), "copy_bytes_per_s": copy, "sum_bytes_per_s": read}


# ---------------------------------------------------------------- one row

def time_row(A, D, X, repeats: int) -> dict:
    """Median seconds of A @ X, A.T @ X and D @ X, the three interleaved in every repeat."""
    products = {"apply": lambda: A @ X, "apply_t": lambda: A.T @ X, "dense": lambda: D @ X}
    for f in products.values():  # warm: operands prepared, caches formed, kernels compiled if at all
        f()
    times = {k: [] for k in products}
    for _ in range(repeats):
        for k, f in products.items():
            times[k].append(_seconds(f))
    return {k: statistics.median(v) for k, v in times.items()}


def compile_context(mode: str):
    return {"on": kernels.use_compiled(True), "off": kernels.csr_only()}.get(mode, nullcontext())


HEADER = (f"{'N':>6} {'kind':<15}{'budget':<7}{'dtype':<8}{'thr':>3} {'b':>4} {'params':>9} {'ratio':>6} "
          f"{'@ ms':>9} {'.T@ ms':>9} {'dense ms':>9} {'x dense':>7} {'bound ms':>9} {'@/bound':>7}  path")


def format_row(r: dict) -> str:
    return (f"{r['n']:>6} {r['kind']:<15}{r['budget']:<7}{r['dtype']:<8}{r['threads']:>3} {r['b']:>4} {r['params']:>9} "
            f"{r['flop_ratio']:>6.1f} {r['apply_s'] * 1e3:>9.3f} {r['apply_t_s'] * 1e3:>9.3f} {r['dense_s'] * 1e3:>9.3f} "
            f"{r['speedup']:>7.2f} {r['bound_s'] * 1e3:>9.3f} {r['apply_s'] / r['bound_s']:>7.2f}  {r['path']}")


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", default="1024,4096", help="sizes N (1024,4096,16384 for the full run)")
    p.add_argument("--b", default="1,16,64,256", help="block widths")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--budgets", default=",".join(BUDGETS), help="chord (the Chord budget) and/or 5%%")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts (numpy BLAS and torch)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="the compiled circulant kernels: sfa's policy (auto), always (on), never (off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/bench/apply.json")
    args = p.parse_args(argv)

    sizes = [int(v) for v in args.n.split(",")]
    widths = [int(v) for v in args.b.split(",")]
    kinds = args.kinds.split(",")
    budgets = args.budgets.split(",")
    dtypes = [np.dtype(v) for v in args.dtypes.split(",")]
    thread_counts = sorted({int(v) for v in args.threads.split(",")})
    unknown = set(kinds) - set(KINDS) or set(budgets) - set(BUDGETS)
    if unknown:
        p.error(f"unknown kinds or budgets: {', '.join(sorted(unknown))}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
        "compile": args.compile, "repeats": args.repeats, "rates": {}, "rows": [],
    }

    def save():
        out.write_text(json.dumps(report, indent=1) + "\n")

    print(HEADER, flush=True)
    with compile_context(args.compile):
        for threads in thread_counts:
            with threads_context(threads):
                rates = {dt.name: machine_rates(dt) for dt in dtypes}
                report["rates"][str(threads)] = rates
                for dt in dtypes:
                    print(f"# {threads} thread(s), {dt.name}: GEMM {rates[dt.name]['fma_per_s'] / 1e9:.1f} GFMA/s, "
                          f"streaming {rates[dt.name]['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
                for n in sizes:
                    rng = np.random.default_rng(args.seed)
                    for dt in dtypes:
                        D = rng.standard_normal((n, n)).astype(dt)
                        Xs = {b: rng.standard_normal((n, b)).astype(dt) for b in widths}
                        rate = rates[dt.name]
                        for budget in budgets:
                            params = budget_params(n, budget)
                            for kind in kinds:
                                try:
                                    A = BUILDERS[kind](n, params, dt, args.seed)
                                except NotApplicable as exc:
                                    print(f"# {kind} at N = {n}, budget {budget}: not applicable ({exc})", flush=True)
                                    continue
                                for b in widths:
                                    X = Xs[b]
                                    t = time_row(A, D, X, args.repeats)
                                    fma = A.params * b
                                    moved = stored_bytes(A) + 2 * X.nbytes
                                    bound = max(fma / rate["fma_per_s"], moved / rate["bytes_per_s"])
                                    dense_bound = max(n * n * b / rate["fma_per_s"], D.nbytes / rate["bytes_per_s"])
                                    row = {"n": n, "kind": kind, "budget": budget, "dtype": dt.name, "threads": threads,
                                           "b": b, "params": A.params, "flop_ratio": n * n / A.params,
                                           "apply_s": t["apply"], "apply_t_s": t["apply_t"], "dense_s": t["dense"],
                                           "speedup": t["dense"] / t["apply"], "speedup_t": t["dense"] / t["apply_t"],
                                           "multiply_adds": fma, "bytes": moved, "bound_s": bound,
                                           "dense_bound_s": dense_bound,
                                           "path": "dense" if A.prefers_dense(b) else "own",
                                           "modelled_speedup": A.dense_seconds(b) / A.product_seconds(b)}
                                    report["rows"].append(row)
                                    print(format_row(row), flush=True)
                                    save()
                                del A
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
