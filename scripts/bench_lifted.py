#!/usr/bin/env python
"""Benchmark: how deep a product the lifted start (sfa_cli.engine.lifted) recovers, and how fast.

For each N and number of factors M: the exact product of random Chord factors (signed normal /
sqrt(k) entries, or positive row-stochastic rows; ``chord_factors(N, factors=M, seed=1)``), the
lifted start alone (no gradient polish), float64, one thread. Reports the paths (unknowns), the
sweeps, the seconds, the last consistency residual and the relative error of the factors it reads
off, and how many distinct offsets the product covers (of N: a product that covers every entry
with more paths than unknowns per row is not identifiable by counting alone). Prints a table and
writes JSON (default docs/bench/lifted.json).

``--real``: instead, on the real matrices of ../shared/data/real/ up to N = 1024, ``sfa fit
--factors M`` (M = 2, 3; L-BFGS, 20 s) from the default start (auto) and from the lifted start:
does the lifted start help on matrices that are not products? (docs/bench/lifted_real.json)

Usage:
    python scripts/bench_lifted.py                          # the grid below (~3 min)
    python scripts/bench_lifted.py --cases 64:2,64:3 --sweeps 5000
    python scripts/bench_lifted.py --real --json docs/bench/lifted_real.json   # ~4 min
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfa_cli.approximations.sparse_factors import SparseFactors  # noqa: E402
from sfa_cli.engine.fit import fit  # noqa: E402
from sfa_cli.engine.gauss_newton import chord_factors  # noqa: E402
from sfa_cli.io import load_matrix  # noqa: E402
from sfa_cli.engine.lifted import LIFTED_DEFAULTS, MAX_PATHS, lifted_start, path_count  # noqa: E402
from sfa_cli.approximations.patterns import chord_pattern  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"
CASES = "16:2,64:2,256:2,1024:2,64:2:positive,16:3,32:3,64:3,256:3,64:4"


def covered(pat) -> int:
    """Distinct offsets (j - i mod N) that the product of the pattern's factors can reach."""
    reach = {0}
    for table in pat.tables:
        offsets = {int(c) for c in table[0]}  # circulant: row 0's columns are the offsets
        reach = {(r + o) % pat.n for r in reach for o in offsets}
    return len(reach)


def real(out: Path) -> None:
    """fit --factors M from the default start and the lifted start on each real matrix."""
    rows = []
    print(f"{'matrix':24} {'N':>5} {'M':>2} {'auto':>9} {'(start)':9} {'s':>5} {'lifted':>9} {'s':>5}")
    for path in sorted(REAL.glob("*.*")):
        if path.suffix in (".md", ".json"):
            continue
        A = load_matrix(path)
        A = A.toarray() if hasattr(A, "toarray") else A
        n = A.shape[0]
        for m in (2, 3):
            if n > 1024 or path_count(chord_pattern(n, factors=m)) > MAX_PATHS:
                continue
            r = {s: fit(A, factors=m, start=s, time_limit=20, device="cpu") for s in ("auto", "lifted")}
            rows.append({"matrix": path.name, "n": n, "factors": m,
                         **{f"{s}_{k}": getattr(x, k) for s, x in r.items() for k in ("rel_error", "seconds", "start")}})
            print(f"{path.name:24} {n:5} {m:2} {r['auto'].rel_error:9.4f} {r['auto'].start:9} {r['auto'].seconds:5.1f} "
                  f"{r['lifted'].rel_error:9.4f} {r['lifted'].seconds:5.1f}", flush=True)
            out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=CASES, help="comma-separated N:M[:positive]")
    p.add_argument("--sweeps", type=int, default=10000)
    p.add_argument("--seconds", type=float, default=120.0, help="time limit of each case")
    p.add_argument("--beta", type=float, default=LIFTED_DEFAULTS["beta"], help="RAAR's relaxation (default: 0.99 up to 4 factors, 0.995 from 5)")
    p.add_argument("--window", type=int, default=LIFTED_DEFAULTS["window"], help="stall window, in checks")
    p.add_argument("--real", action="store_true", help="the real matrices: default start against the lifted start")
    p.add_argument("--json", default=str(ROOT / "docs" / "bench" / "lifted.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.real:
        return real(Path(a.json))
    rows = []
    print(f"{'N':>5} {'M':>2} {'kind':8} {'paths':>9} {'offsets':>8} {'sweeps':>6} {'seconds':>8} "
          f"{'residual':>9} {'error':>9} stop")
    for case in a.cases.split(","):
        parts = case.split(":")
        n, m = int(parts[0]), int(parts[1])
        kind = parts[2] if len(parts) > 2 else "signed"
        pat, vals = chord_factors(n, factors=m, kind=kind, seed=1)
        A = torch.as_tensor(SparseFactors.from_pattern(pat, vals).to_dense())
        t0 = time.perf_counter()
        _, info = lifted_start(A / torch.linalg.vector_norm(A), pat, sweeps=a.sweeps, time_limit=a.seconds,
                               beta=a.beta, window=a.window, max_paths=max(MAX_PATHS, path_count(pat)))
        row = {"n": n, "factors": m, "kind": kind, "beta": a.beta or (0.99 if m <= 4 else 0.995), "paths": path_count(pat), "offsets": covered(pat),
               "wall_seconds": time.perf_counter() - t0, **info}
        rows.append(row)
        print(f"{n:5} {m:2} {kind:8} {row['paths']:9,} {row['offsets']:8} {info['sweeps']:6} {info['seconds']:8.2f} "
              f"{info['residual']:9.2e} {info['rel_error']:9.2e} {info['stopped_because']}", flush=True)
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"command": " ".join(sys.argv), "platform": platform.platform(),
                                            "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
