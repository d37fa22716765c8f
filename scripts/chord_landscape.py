#!/usr/bin/env python
"""Why signed Chord products are not recovered: the basin of the truth, and where the fit stalls.

For an exact product A of random signed Chord factors (``chord_factors(n, seed=1)``), this runs
the Levenberg-Marquardt engine (:func:`sfa_cli.engine.gauss_newton.lm_fit`, the same code as
``sfa fit --optimizer lm``):

1. **Basin.** From the true factors plus noise of relative size eps (each entry gets
   eps * N(0, 1/k), the scale of the entries themselves), and from the identity and random starts.
   Does the fit return to the truth (error <= 1e-6)?
2. **Anatomy of a stall** (the identity start's end point): is it near the truth up to the gauge?
   Columns of the left partial products W(1)...W(m) of the fit and of the truth are parallel when
   the two differ by a diagonal gauge; the table gives the median |cosine| of those column pairs.
   And where is the error: the share of ||A - P||_F^2 in the span of A's smallest 10% of
   singular directions (for an error spread evenly it would be about 0.10).

3. **Depth** (``--factors``): the same, on products of fewer factors than the pattern's log2(N).
   With two factors every entry of the product is a sum of 2 or 3 rank-one terms (the script
   prints the count of paths per offset), so no entry identifies one term.

Prints a table and writes JSON (default docs/bench/chord_landscape.json).

Usage:
    python scripts/chord_landscape.py                            # N = 32 and 64, 2 seeds, 1,500 LM steps each
    python scripts/chord_landscape.py --sizes 32 --max-iter 300  # quick
    python scripts/chord_landscape.py --sizes 16,64 --factors 2,3 --eps 0.3 --seeds 2 --max-iter 20000 --seconds 40
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfa_cli.approximations.sparse_factors import SparseFactors, pattern_structures  # noqa: E402
from sfa_cli.engine.gauss_newton import chord_factors, lm_fit, start_values  # noqa: E402


def _left_products(pat, values) -> list[np.ndarray]:
    """W(1), W(1) W(2), ..., as dense arrays."""
    mats = SparseFactors.from_pattern(pat, values).factors
    out, P = [], np.eye(pat.n)
    for W in mats:
        P = np.asarray(P @ W)
        out.append(P)
    return out


def anatomy(pat, fitted, truth, A) -> dict:
    """Median |cosine| of matching columns of the left partial products; the error's share in
    A's smallest 10% of singular directions."""
    cosines = []
    fitted_products = _left_products(pat, fitted)
    for P, Q in zip(fitted_products, _left_products(pat, truth)):
        c = np.abs((P * Q).sum(0)) / (np.linalg.norm(P, axis=0) * np.linalg.norm(Q, axis=0))
        cosines.append(round(float(np.median(c)), 4))
    E = fitted_products[-1] - A
    U, s, _ = np.linalg.svd(A)
    tail = max(1, pat.n // 10)
    share = float(np.linalg.norm(U[:, -tail:].T @ E) ** 2 / np.linalg.norm(E) ** 2)
    return {"median_cosine_left_products": cosines, "error_share_smallest_10pct": round(share, 4),
            "cond_A": float(s[0] / s[-1])}


def paths_per_offset(pat) -> dict[int, int]:
    """For a product of two factors of ``pat``'s first factor's offsets: how many (s, t) pairs
    give each offset d = s + t (mod N), that is, how many rank-one terms share each entry."""
    offsets = [int(v) for v in pat.tables[0][0]]  # row 0's columns are the offsets
    counts: dict[int, int] = {}
    for s in offsets:
        for t in offsets:
            d = (s + t) % pat.n
            counts[d] = counts.get(d, 0) + 1
    return counts


def run(n: int, eps_list, seeds, seconds: float, max_iter: int, save, factors: int | None = None) -> list[dict]:
    pat, truth = chord_factors(n, seed=1, factors=factors)
    k, m = pat.nnz_per_row, pat.factors
    structs, _ = pattern_structures(pat)
    A = SparseFactors.from_pattern(pat, truth).to_dense()
    scale = float(np.linalg.norm(A))
    target = torch.as_tensor(A / scale)
    c = scale ** (-1.0 / m)  # the truth, scaled to the unit-norm target
    rows = []
    starts = [(f"truth + {eps:g} noise", eps) for eps in eps_list] + [("identity", None), ("random", None)]
    for label, eps in starts:
        for seed in seeds:
            rng = np.random.default_rng(100 + seed)
            if eps is not None:
                x0 = [torch.as_tensor(c * (t + eps * rng.standard_normal(t.size) / math.sqrt(k))) for t in truth]
            else:
                x0 = start_values(structs, label, seed=seed, dtype=torch.float64)
            t0 = time.perf_counter()
            values, history, stopped = lm_fit(structs, x0, target, max_iter=max_iter, time_limit=seconds, tol=0)
            row = {"n": n, "factors": m, "start": label, "seed": seed,
                   "start_error": history[0]["rel_error"], "error": min(h["rel_error"] for h in history),
                   "steps": sum("accepted" in h for h in history), "seconds": round(time.perf_counter() - t0, 1),
                   "stopped_because": stopped}
            if label == "identity" and seed == seeds[0]:
                fitted = [v.numpy() / c for v in values]
                row["anatomy"] = anatomy(pat, fitted, truth, A)
            rows.append(row)
            save(row)
            print(f"N={n:<4} M={m} {label:<22} seed {seed}: {row['start_error']:.3g} -> {row['error']:.3g} "
                  f"({row['steps']} steps, {row['seconds']} s)", flush=True)
            if "anatomy" in row:
                print("    stall anatomy:", row["anatomy"], flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--eps", default="0.1,0.3,0.6,1.0", help="relative sizes of the noise added to the truth")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=300.0, help="time limit of each fit")
    p.add_argument("--max-iter", type=int, default=1500, help="LM steps of each fit")
    p.add_argument("--factors", help="comma-separated numbers of factors (default: the pattern's, log2 N)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "docs" / "bench" / "chord_landscape.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    done = []

    def save(row):  # after every fit, so a stopped run keeps what it measured
        done.append(row)
        Path(a.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": done}, indent=2) + "\n")

    depths = [int(f) for f in a.factors.split(",")] if a.factors else [None]
    for n in (int(s) for s in a.sizes.split(",")):
        counts = paths_per_offset(chord_factors(n, factors=2)[0])
        print(f"N={n}: two factors reach {len(counts)} offsets, each entry a sum of "
              f"{min(counts.values())}-{max(counts.values())} rank-one terms", flush=True)
        for m in depths:
            run(n, [float(e) for e in a.eps.split(",")], list(range(a.seeds)), a.seconds, a.max_iter, save, m)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
