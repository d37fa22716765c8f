#!/usr/bin/env python
"""Recovery benchmark: does each fit reach its model's optimum on matrices the model holds exactly?

One table, old default and new method side by side in the same run. Each row is one
case (a matrix whose structure is known, exact or with Gaussian noise of a given relative
size) and one method; it records the relative error reached (float64, from the factors
returned), the seconds taken and, for noisy cases, the error over the noise level
||N|| / ||A|| (1.0 = the noise level; below 1 is possible: the model absorbs a little noise).

Families (``--families``):

  butterfly  the Walsh-Hadamard matrix and random products on sfa's butterfly pattern
             (Gaussian values), N = 256 ... 4096, exact and with 1% noise; methods: the
             closed form (:func:`sfa_cli.methods.butterfly.butterfly_closed_form`), the closed form
             with an L-BFGS polish (noisy cases), the gradient fit as ``compare`` ran it before
             (``fit(A, pattern="butterfly", time_limit=...)``, the old default) and, when
             available, pyfaust's hierarchical butterfly (Hadamard N = 1024).

A new family (Chord products, grid Laplacians, the N = 64 anchors) is one generator of
``Case`` objects and a list of ``Method`` entries in ``FAMILIES``; the table, the JSON and the
targets read nothing else.

``--tree-study`` adds a small table: the closed form's error over the noise level on noisy random
butterfly products when each split is balanced (the default) or peels one factor off the left
or the right, without the best-scalar step.

Prints the table and writes JSON (default docs/bench/recovery.json).

Usage:
    python scripts/bench_recovery.py                               # every family, default sizes
    python scripts/bench_recovery.py --sizes 256,1024 --time-limit 5   # quick
    python scripts/bench_recovery.py --pyfaust-python /tmp/faust/bin/python   # pyfaust in its own venv
    python scripts/bench_recovery.py --families none --tree-study        # the split-tree study alone
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import scipy.linalg
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfa_cli.methods import butterfly as _butterfly  # noqa: E402
from sfa_cli.methods.butterfly import butterfly_closed_form  # noqa: E402
from sfa_cli.approximations.sparse_factors import SparseFactors  # noqa: E402
from sfa_cli.engine.fit import fit  # noqa: E402
from sfa_cli.metrics import relative_error  # noqa: E402
from sfa_cli.approximations.patterns import butterfly_pattern  # noqa: E402

OUTPUT = ROOT / "docs" / "bench" / "recovery.json"


@dataclass
class Case:
    """A matrix with known structure: ``noise_level`` = ||N|| / ||A|| (0 for an exact case)."""

    family: str
    name: str
    n: int
    noise: float
    A: np.ndarray = field(repr=False)
    noise_level: float = 0.0


@dataclass
class Method:
    """A way to fit a case: ``run(case, options) -> (approximation or None, extra facts)``."""

    name: str
    run: Callable
    applies: Callable = lambda case, options: True


# -- cases ------------------------------------------------------------------------------------
def add_noise(B: np.ndarray, noise: float, seed: int) -> tuple[np.ndarray, float]:
    """B + N with ||N||_F = noise ||B||_F (Gaussian); returns A and ||N|| / ||A||."""
    if noise == 0:
        return B, 0.0
    N = np.random.default_rng(seed).standard_normal(B.shape)
    N *= noise * np.linalg.norm(B) / np.linalg.norm(N)
    A = B + N
    return A, float(np.linalg.norm(N) / np.linalg.norm(A))


def random_butterfly(n: int, seed: int) -> np.ndarray:
    """The product of Gaussian values on sfa's butterfly pattern (log2 n factors), dense."""
    rng = np.random.default_rng(seed)
    pattern = butterfly_pattern(n)
    values = [rng.standard_normal(t.size) for t in pattern.tables]
    return SparseFactors.from_pattern(pattern, values).to_dense()


def butterfly_cases(sizes, noises, seed: int) -> Iterator[Case]:
    for n in sizes:
        for name, make in (("hadamard", lambda: scipy.linalg.hadamard(n).astype(np.float64)),
                           ("random butterfly", lambda: random_butterfly(n, seed + n))):
            B = make()
            for noise in noises:
                A, level = add_noise(B, noise, seed + 1 + n)
                yield Case("butterfly", name, n, noise, A, level)


# -- methods ----------------------------------------------------------------------------------
def closed_form(case, options):
    return butterfly_closed_form(case.A), {}


def closed_form_polished(case, options):
    F = butterfly_closed_form(case.A, polish_iter=options["polish_iter"], time_limit=options["time_limit"],
                              device="cpu")
    return F, {"polish_iterations": F.info.get("polish_iterations"),
               "closed_form_rel_error": F.info["closed_form_rel_error"]}


def gradient_fit(case, options):
    """``compare``'s butterfly before the closed form: L-BFGS from the generic start, float32."""
    result = fit(case.A, pattern="butterfly", time_limit=options["time_limit"], seed=0, device="cpu")
    return result.approximation, {"iterations": result.iterations, "stopped_because": result.stopped_because}


PYFAUST_SCRIPT = """
import json, sys, time, numpy as np, pyfaust, pyfaust.fact
A = np.load(sys.argv[1])
pyfaust.fact.butterfly(A[:8, :8].copy(), type="bbtree")  # load its libraries outside the timing
t = time.perf_counter()
F = pyfaust.fact.butterfly(A, type="bbtree")
seconds = time.perf_counter() - t
rel = float(np.linalg.norm(A - F.toarray()) / np.linalg.norm(A))
print(json.dumps({"rel_error": rel, "seconds": seconds, "version": pyfaust.version()}))
"""


def pyfaust_butterfly(case, options):
    """pyfaust.fact.butterfly (balanced tree), in this interpreter or in ``--pyfaust-python``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "A.npy"
        np.save(path, case.A)
        done = subprocess.run([options["pyfaust_python"], "-c", PYFAUST_SCRIPT, str(path)], capture_output=True,
                              text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    return None, facts


def pyfaust_applies(case, options):
    return options["pyfaust_python"] is not None and case.name == "hadamard" and case.n == 1024 and case.noise == 0


FAMILIES = {
    "butterfly": (butterfly_cases, [
        Method("closed form", closed_form),
        Method("closed form + polish", closed_form_polished, lambda case, options: case.noise > 0),
        Method("gradient fit (old default)", gradient_fit),
        Method("pyfaust butterfly", pyfaust_butterfly, pyfaust_applies),
    ]),
}

#: (family, case name, n, noise, method, what the row must reach): the issue's targets.
TARGETS = [
    ("butterfly", "hadamard", 1024, 0.0, "closed form", "rel_error <= 1e-6 within 10 s"),
    ("butterfly", "random butterfly", 1024, 0.01, "closed form", "rel_error <= 1.05 x noise"),
    ("butterfly", "random butterfly", 1024, 0.01, "closed form + polish", "rel_error <= 1.05 x noise"),
]


def target_met(row: dict, text: str) -> bool:
    if "1e-6" in text:
        return row["rel_error"] <= 1e-6 and row["seconds"] <= 10
    return row["rel_error"] <= 1.05 * row["noise_level"]


# -- the split tree of the closed form ----------------------------------------------------------
TREES = {"balanced": lambda bits: bits // 2, "peel left": lambda bits: 1, "peel right": lambda bits: bits - 1}


def tree_study(sizes, noises, seed: int) -> list[dict]:
    """Error over noise of the raw hierarchical factors (no best scalar) for each split tree."""
    rows = []
    for n in sizes:
        L = n.bit_length() - 1
        for noise in noises:
            A, level = add_noise(random_butterfly(n, seed + n), noise, seed + 1 + n)
            target = _butterfly._support(A, L)
            norm_sq = float(np.sum(A * A))
            row = {"n": n, "noise": noise, "noise_level": level}
            for name, tree in TREES.items():
                t = time.perf_counter()
                leaves = _butterfly._factor_segment(target, L, tree)
                row[name] = {"error_over_noise": _butterfly._error(target, norm_sq, leaves) / level,
                             "seconds": time.perf_counter() - t}
            rows.append(row)
            print(f"tree study n={n:>5} noise={noise:>5.1%}: " + ", ".join(
                f"{name} {row[name]['error_over_noise']:.3f} ({row[name]['seconds']:.2f} s)" for name in TREES), flush=True)
    return rows


# -- running ----------------------------------------------------------------------------------
def run_row(case: Case, method: Method, options: dict) -> dict:
    row = {"family": case.family, "case": case.name, "n": case.n, "noise": case.noise,
           "noise_level": case.noise_level, "method": method.name}
    t = time.perf_counter()
    try:
        approx, facts = method.run(case, options)
    except Exception as exc:  # a failing method is a row of the table, not the end of the run
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    seconds = facts.pop("seconds", time.perf_counter() - t)
    rel = facts.pop("rel_error") if approx is None else relative_error(case.A, approx)
    row.update(rel_error=float(rel), seconds=float(seconds), **facts)
    if case.noise_level:
        row["error_over_noise"] = row["rel_error"] / case.noise_level
    return row


def format_row(row: dict) -> str:
    head = f"{row['case']:<17} {row['n']:>5} {row['noise']:>6.1%}  {row['method']:<27}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    ratio = f"{row['error_over_noise']:7.3f}" if "error_over_noise" in row else "      -"
    return f"{head} {row['rel_error']:10.3e} {ratio} {row['seconds']:9.2f}"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (for docs/)."""
    lines = ["| case | n | noise | method | rel. error | error / noise | seconds |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['n']} | {r['noise']:.0%} | {r['method']} | failed: {r['error']} | | |")
            continue
        ratio = f"{r['error_over_noise']:.3f}" if "error_over_noise" in r else ""
        lines.append(f"| {r['case']} | {r['n']} | {r['noise']:.0%} | {r['method']} | {r['rel_error']:.3g} | {ratio} "
                     f"| {r['seconds']:.2f} |")
    return "\n".join(lines)


def machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "load_average_at_start": load, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "niceness": os.nice(0)}


def pyfaust_python(requested: str | None) -> str | None:
    """The interpreter that runs pyfaust: the one named, this one when it imports pyfaust, else None."""
    if requested:
        return requested
    try:
        import pyfaust  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated: {', '.join(FAMILIES)} (or none)")
    p.add_argument("--sizes", default="256,1024,2048,4096", help="N of the butterfly cases")
    p.add_argument("--noises", default="0,0.01", help="relative noise ||N|| / ||B|| of the cases")
    p.add_argument("--time-limit", type=float, default=20.0, help="seconds for each gradient fit and polish")
    p.add_argument("--polish-iter", type=int, default=500, help="L-BFGS iterations of the polish")
    p.add_argument("--pyfaust-python", default=None, help="a Python with pyfaust installed (a separate venv)")
    p.add_argument("--tree-study", action="store_true", help="compare split trees of the closed form")
    p.add_argument("--tree-sizes", default="256,1024", help="N of the tree study")
    p.add_argument("--tree-noises", default="0.01,0.1", help="noises of the tree study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(OUTPUT), help="JSON file")
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    args = p.parse_args(argv)

    options = {"time_limit": args.time_limit, "polish_iter": args.polish_iter,
               "pyfaust_python": pyfaust_python(args.pyfaust_python)}
    sizes = [int(s) for s in args.sizes.split(",")]
    noises = [float(s) for s in args.noises.split(",")]
    info = machine()
    rows = []
    print(f"{'case':<17} {'n':>5} {'noise':>6}  {'method':<27} {'rel_error':>10} {'/noise':>7} {'seconds':>9}")
    for family in args.families.split(","):
        if family == "none":
            continue
        make_cases, methods = FAMILIES[family]
        for case in make_cases(sizes, noises, args.seed):
            for method in methods:
                if method.applies(case, options):
                    rows.append(run_row(case, method, options))
                    print(format_row(rows[-1]), flush=True)

    trees = []
    if args.tree_study:
        trees = tree_study([int(s) for s in args.tree_sizes.split(",")],
                           [float(s) for s in args.tree_noises.split(",")], args.seed)

    targets = []
    for family, name, n, noise, method, text in TARGETS:
        found = [r for r in rows if (r["family"], r["case"], r["n"], r["noise"], r["method"]) == (family, name, n, noise, method)
                 and "error" not in r]
        if found:
            met = target_met(found[0], text)
            targets.append({"case": f"{name} n={n} noise={noise:g}", "method": method, "target": text, "met": met})
            print(f"target {name} n={n} noise={noise:g} {method}: {text}: {'met' if met else 'NOT met'}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "options": {**options, "seed": args.seed}, "rows": rows,
                               "targets": targets, "tree_study": trees}, indent=1) + "\n")
    print(f"wrote {out}")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows) + "\n")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
