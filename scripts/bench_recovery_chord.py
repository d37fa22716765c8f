#!/usr/bin/env python
"""Benchmark: does the fit reach a fixed Chord pattern's optimum? Old default against the new engine.

Cases (issue 14, Chord rows): exact products of random Chord factors at N = 64, 256, 1024
(signed normal / sqrt(L+1) entries, or positive row-stochastic rows), exact and with 0.1%, 1%,
10% Gaussian noise; the 32x32 grid Laplacian; the authors' N = 64 anchors
(../shared/data/anchors/, errors of their MATLAB code in its README). Methods, each with the
case's time limit, in the same run:

  old       sfa_cli.engine.fit.fit with its defaults (L-BFGS from the paper's start, float32)
  lbfgs+id  the same L-BFGS from the identity start (sfa_cli.engine.gauss_newton.start_values)
  lm        Levenberg-Marquardt from the identity start (sfa_cli.engine.gauss_newton.fit_lm, float32)
  lm+paper  Levenberg-Marquardt from the paper's start (fit(optimizer="lm", start="paper"))
  lifted    the lifted start (sfa_cli.engine.lifted), then Levenberg-Marquardt (fit(optimizer="lm",
            start="lifted")); refused where the pattern has more than sfa_cli.engine.lifted.MAX_PATHS paths

Shallow cases (``signed64-f2``, ``-f3``, ``-f4``, ``signed256-f2``): products of 2-4 Chord
factors, fitted on the same shallow pattern (the depth study of docs/recovery.md); with noise
(``signed64-f3-n0.01`` and so on, for the noise levels above) when named in ``--cases``.

For each: the error reached, the seconds of the whole call, and the optimiser's seconds to
first come within 1% of that error, and to reach the case's target when it has one (for
``lifted`` these include the start's seconds). Prints a
table and writes JSON (default docs/bench/recovery_chord.json). Run it under ``nice`` on a
shared machine and compare methods within one run, not across runs.

Usage:
    python scripts/bench_recovery_chord.py --quick          # N = 64 cases, grid, anchors (~11 min)
    python scripts/bench_recovery_chord.py                  # every case (hours)
    python scripts/bench_recovery_chord.py --cases signed64,grid32 --methods old,lm
    python scripts/bench_recovery_chord.py --cases signed64-f2,signed64-f3,signed64-f4,signed256-f2 --out docs/bench/recovery_chord_shallow.json
    python scripts/bench_recovery_chord.py --cases signed64-f3-n0.001,signed64-f3-n0.01,signed64-f3-n0.1 --out docs/bench/recovery_chord_shallow_noise.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfa_cli.errors import SfaError  # noqa: E402
from sfa_cli.approximations.sparse_factors import SparseFactors, pattern_structures  # noqa: E402
from sfa_cli.engine.fit import fit  # noqa: E402
from sfa_cli.engine.gauss_newton import chord_product, fit_lm, start_values  # noqa: E402
from sfa_cli.approximations.patterns import chord_pattern  # noqa: E402
from sfa_cli.synthetic import grid_laplacian  # noqa: E402

ANCHORS = ROOT.parent / "shared" / "data" / "anchors"
#: The authors' Chord errors at N = 64 (anchors/README.md).
AUTHORS_N64 = {"graph": 0.2675, "grid": 0.2769, "lowrank": 0.0257, "gauss": 0.3583}
METHODS = ("old", "lbfgs+id", "lm", "lm+paper", "lifted")
#: Shallow products (n, factors): the lifted start's cases.
SHALLOW = ((64, 2), (64, 3), (64, 4), (256, 2))
#: Seconds per case: the issue's targets where it names them.
LIMITS = {64: 60.0, 256: 180.0, 1024: 120.0}
NOISES = (0.0, 0.001, 0.01, 0.1)
QUICK = ("signed64", "positive64", "signed64-n0.01", "grid32", "anchors")


def chord_cases():
    """(name, n, kind, noise) of every Chord product case."""
    for n in (64, 256, 1024):
        for kind in ("signed", "positive"):
            for noise in NOISES:
                yield (f"{kind}{n}" + (f"-n{noise:g}" if noise else ""), n, kind, noise)


def target_of(n: int, kind: str, noise: float, level: float) -> float | None:
    """The issue's target error for a case (None where it names none)."""
    if kind == "signed" and not noise:
        return {64: 1e-4, 256: 1e-3}.get(n)
    if noise:
        return 1.05 * level
    return None


def make_cases(selected):
    """Yield dicts: name, matrix, time limit, target, noise level."""
    for name, n, kind, noise in chord_cases():
        if selected and name not in selected:
            continue
        A = chord_product(n, kind=kind, noise=noise, seed=1)
        level = 0.0
        if noise:
            clean = chord_product(n, kind=kind, seed=1)
            level = float(np.linalg.norm(A - clean) / np.linalg.norm(A))
        limit = LIMITS[n] if (kind == "signed" and not noise) or n == 1024 else min(LIMITS[n], 60.0)
        yield {"name": name, "A": A, "limit": limit, "target": target_of(n, kind, noise, level),
               "noise_level": level}
    for n, factors in SHALLOW:
        for noise in NOISES:
            name = f"signed{n}-f{factors}" + (f"-n{noise:g}" if noise else "")
            if (selected and name not in selected) or (noise and not selected):
                continue  # the noisy shallow cases run when named
            A = chord_product(n, factors=factors, noise=noise, seed=1)
            level = 0.0
            if noise:
                clean = chord_product(n, factors=factors, seed=1)
                level = float(np.linalg.norm(A - clean) / np.linalg.norm(A))
            yield {"name": name, "A": A, "limit": 60.0, "target": target_of(n, "signed", noise, level),
                   "noise_level": level, "factors": factors}
    if not selected or "grid32" in selected:
        yield {"name": "grid32", "A": grid_laplacian(32).toarray(), "limit": 120.0, "target": 0.40, "noise_level": 0.0}
    if not selected or "anchors" in selected:
        for kind, err in AUTHORS_N64.items():
            path = ANCHORS / f"{kind}_N64.npz"
            if path.exists():
                yield {"name": f"anchor-{kind}64", "A": np.load(path)["A"], "limit": 1.0, "target": err,
                       "noise_level": 0.0}


def identity_init(A: np.ndarray, seed: int, factors: int | None = None) -> SparseFactors:
    """The identity start as factors for fit(init=...), carrying A's scale as fit expects."""
    pat = chord_pattern(A.shape[0], factors=factors)
    structs, _ = pattern_structures(pat)
    x = start_values(structs, "identity", seed=seed)
    c = float(np.linalg.norm(A)) ** (1.0 / pat.factors)
    return SparseFactors.from_pattern(pat, [v.numpy() * c for v in x])


def run_method(method: str, A: np.ndarray, limit: float, seed: int, factors: int | None = None):
    t0 = time.perf_counter()
    common = dict(time_limit=limit, seed=seed, device="cpu", dtype="float32", factors=factors)
    if method == "old":
        r = fit(A, **common)
    elif method == "lbfgs+id":
        r = fit(A, init=identity_init(A, seed, factors), **common)
    elif method == "lm":
        r = fit_lm(A, max_iter=10**6, **common)
    elif method in ("lm+paper", "lifted"):
        r = fit(A, optimizer="lm", start=method.replace("lm+", ""), max_iter=10**6, **common)
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return r, time.perf_counter() - t0


def first_time(history, threshold: float, before: float = 0.0):
    """Optimiser seconds (plus ``before``) when the error first fell to ``threshold`` (None if never)."""
    for h in history:
        if h["rel_error"] <= threshold:
            return before + h["seconds"]
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--cases", help="comma-separated case names (see chord_cases; grid32, anchors)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--limit-scale", type=float, default=1.0, help="multiply every time limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "recovery_chord.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    selected = set(QUICK) if args.quick else (set(args.cases.split(",")) if args.cases else set())
    methods = args.methods.split(",")
    rows = []
    out_path = Path(args.out)

    def save():  # after every row, so that a stopped run keeps what it measured
        out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                           "torch": torch.__version__, "load_average": os.getloadavg()},
               "note": "shared machine: compare methods within this run (ratios), not absolute seconds",
               "rows": rows}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1))

    print(f"{'case':22} {'method':9} {'limit':>6} {'error':>10} {'seconds':>8} {'t(1%)':>7} {'target':>9} {'t(target)':>9} stop")
    for case in make_cases(selected):
        for method in methods:
            limit = case["limit"] * args.limit_scale
            try:
                r, wall = run_method(method, case["A"], limit, args.seed, case.get("factors"))
            except SfaError as e:  # the lifted start at full depth
                rows.append({"case": case["name"], "method": method, "n": int(case["A"].shape[0]), "refused": str(e)})
                print(f"{case['name']:22} {method:9} refused: {e}", flush=True)
                save()
                continue
            # seconds outside the optimiser's clock: the lifted start's sweeps
            before = wall - r.history[-1]["seconds"] if method == "lifted" and r.history else 0.0
            reach = first_time(r.history, 1.01 * r.rel_error, before)
            hit = None if case["target"] is None else first_time(r.history, case["target"], before)
            row = {"case": case["name"], "method": method, "n": int(case["A"].shape[0]), "time_limit": limit,
                   "rel_error": r.rel_error, "seconds": wall, "seconds_to_1pct_of_final": reach,
                   "target": case["target"], "seconds_to_target": hit, "noise_level": case["noise_level"],
                   "iterations": r.iterations, "evaluations": r.evaluations, "stopped_because": r.stopped_because}
            rows.append(row)
            tgt = "-" if case["target"] is None else f"{case['target']:.3g}"
            print(f"{case['name']:22} {method:9} {limit:6.0f} {r.rel_error:10.3e} {wall:8.1f} {reach or 0:7.1f} "
                  f"{tgt:>9} {'-' if hit is None else f'{hit:.1f}':>9} {r.stopped_because}", flush=True)
            save()
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
