#!/usr/bin/env python
"""Benchmark the Chord fit: kernel speed, time to the authors' errors, products, memory.

Prints tables and writes JSON (and optionally a markdown report):

  (a) seconds per objective+gradient evaluation, sfa's structured kernel against a
      plain autograd reference (dense chain of shifted multiply-adds), same run, in
      interleaved rounds (the speedup is the median of the rounds' ratios);
  (b) time to reach the authors' 1000-iteration errors on the N = 64 anchors;
  (c) optimiser study: time to those errors for several optimiser settings;
  (d) matrix-vector and 64-column block products of fitted factors against the
      dense reconstructed matrix at N = 4096;
  (e) `sfa fit` on an N = 4096 grid Laplacian in a subprocess: time, stopping
      rule, peak resident memory.

Usage:
    python scripts/bench_fit.py                       # everything, CPU, float32
    python scripts/bench_fit.py --sizes 256,512 --skip-large
    python scripts/bench_fit.py --device cuda --sizes 1024,4096,16384
    python scripts/bench_fit.py --markdown docs/performance.md
    python scripts/bench_fit.py --against ../old-checkout --rounds 4   # (a)-(b): this tree vs another

``--against TREE`` runs sections (a) and (b) of this tree and of another checkout (its own
scripts/bench_fit.py) in alternating subprocesses, ``--rounds`` times each, and reports the
new / old time ratios per round (median and range): drift on a shared machine then hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfa_cli.approximations.sparse_factors import SparseFactors, initial_values, pattern_structures  # noqa: E402
from sfa_cli.approximations import kernels  # noqa: E402
from sfa_cli.engine.fit import fit  # noqa: E402
from sfa_cli.engine.objective import BlockObjective  # noqa: E402
from sfa_cli.approximations.kernels import resolve_device  # noqa: E402
from sfa_cli.approximations.patterns import chord_pattern  # noqa: E402
from sfa_cli.synthetic import grid_laplacian  # noqa: E402

ANCHORS = ROOT.parent / "shared" / "data" / "anchors"
#: The authors' MATLAB/Octave results at N = 64 (anchors/README.md): error after 1000 BFGS iterations, seconds.
AUTHORS_N64 = {"graph": (0.2675, 149.5), "grid": (0.2769, 140.1), "gauss": (0.3583, 133.5), "lowrank": (0.0257, 113.7)}


def median_time(f, repeats: int, sync=lambda: None, warm: bool = True) -> float:
    if warm:
        f()
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def interleaved_times(funcs, rounds: int, inner, sync=lambda: None) -> list[list[float]]:
    """Per round, the median of inner[i] calls of each function in turn: drift on a shared machine
    (other tenants, clock changes) then hits every function alike. Returns times[i][round]."""
    for f in funcs:
        f()
        sync()
    times = [[] for _ in funcs]
    for _ in range(rounds):
        for i, f in enumerate(funcs):
            times[i].append(median_time(f, inner[i], sync, warm=False))
    return times


# -- (a) evaluation speed ------------------------------------------------------------
def reference_objective(values, offsets, target):
    """The plain implementation: dense chain by shifted multiply-adds, autograd backward."""
    X = torch.eye(target.shape[0], dtype=target.dtype, device=target.device)
    for V in reversed(values):
        Y = torch.zeros_like(X)
        for k, o in enumerate(offsets):
            Y = Y + V[:, k : k + 1] * torch.roll(X, shifts=-int(o), dims=0)
        X = Y
    R = X - target
    return 0.5 * (R * R).sum()


def bench_evaluation(sizes, repeats, device, reference_max):
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for n in sizes:
        pattern = chord_pattern(n)
        structs, orders = pattern_structures(pattern, device)
        start = initial_values(structs, seed=0, dtype=torch.float32)
        target = torch.randn(n, n, generator=torch.Generator().manual_seed(n)).div_(n**0.5).to(device)
        values = [v.clone().to(device).requires_grad_() for v in start]
        # exactly what `sfa fit` evaluates: the objective over column blocks (objective.py)
        loss_and_grad = BlockObjective(structs, target)

        def sfa_eval():
            for v in values:
                v.grad = None
            loss_and_grad(values)

        t0 = time.perf_counter()
        sfa_eval()  # the first call includes compiling the kernels where sfa compiles them
        sync()
        first = time.perf_counter() - t0
        row = {"n": n, "factors": pattern.factors, "nnz_per_row": pattern.nnz_per_row,
               "sfa_s": median_time(sfa_eval, repeats, sync), "sfa_first_call_s": first,
               "compiled": bool(kernels._compiled_kernels(structs[0], target[:, :1]))}
        if row["compiled"]:  # the same evaluation on the CSR kernels alone, for the ratio

            def csr_eval():
                with kernels.csr_only():
                    sfa_eval()

            sfa_t, csr_t = interleaved_times([sfa_eval, csr_eval], repeats, [3, 3], sync)
            row["sfa_csr_s"] = float(np.median(csr_t))
            row["compiled_speedup"] = float(np.median(np.divide(csr_t, sfa_t)))
        if n <= reference_max:
            # table order values for the reference, same numbers as sfa's CSR order
            ref_values = []
            for v, order in zip(start, orders):
                table = torch.empty_like(v)
                table[torch.from_numpy(order)] = v
                ref_values.append(table.reshape(n, -1).to(device).requires_grad_())
            offsets = (pattern.tables[0][0] - 0) % n

            def ref_eval():
                for v in ref_values:
                    v.grad = None
                reference_objective(ref_values, offsets, target).backward()

            # rounds of 3 sfa evaluations and 1 reference evaluation: the ratio of each round, then
            # the median (this VM drifts by 15% within minutes, in both directions)
            sfa_t, ref_t = interleaved_times([sfa_eval, ref_eval], repeats, [3, 1], sync)
            ratios = np.divide(ref_t, sfa_t)
            row.update(sfa_s=float(np.median(sfa_t)), reference_s=float(np.median(ref_t)),
                       speedup=float(np.median(ratios)), speedup_min=float(ratios.min()),
                       speedup_max=float(ratios.max()), rounds=repeats)
            # the two must compute the same gradient
            sfa_eval()
            ref_eval()
            g_sfa = values[0].grad.cpu()
            g_ref = ref_values[0].grad.reshape(-1)[torch.from_numpy(orders[0])].cpu()
            row["grad_max_rel_diff"] = float((g_sfa - g_ref).abs().max() / g_ref.abs().max())
        rows.append(row)
        print_row("eval", row)
    return rows


# -- (b, c) time to the authors' errors ---------------------------------------------------
def time_to_target(A, target, seeds, **options):
    """Wall seconds (setup included) until the best error <= target, one fit per start seed.

    The trajectory of a fit depends on its start, so the figure is over seeds: the median, the
    slowest and each seed's; ``seconds`` is None unless every seed gets there.
    """
    runs = []
    for seed in seeds:
        hit = {}
        t0 = time.perf_counter()

        def stop(step):
            if step.best_rel_error <= target:
                hit.update(seconds=time.perf_counter() - t0, evaluations=step.evaluations, iteration=step.iteration)
                return True
            return False

        result = fit(A, callback=stop, seed=seed, **options)
        runs.append({**hit, "final": result.rel_error, "wall": time.perf_counter() - t0})
    reached = [r for r in runs if "seconds" in r]
    out = {"seeds": len(runs), "reached": len(reached), "seconds_by_seed": [r.get("seconds") for r in runs]}
    if len(reached) < len(runs):
        return {**out, "seconds": None, "final": float(np.median([r["final"] for r in runs])),
                "wall": float(np.median([r["wall"] for r in runs]))}
    return {**out, "seconds": float(np.median([r["seconds"] for r in reached])),
            "seconds_max": float(max(r["seconds"] for r in reached)),
            "evaluations": int(np.median([r["evaluations"] for r in reached])),
            "iterations": int(np.median([r["iteration"] for r in reached]))}


def bench_anchors(seeds, device):
    rows = []
    first = np.load(ANCHORS / "graph_N64.npz")["A"]
    fit(first, device=device, max_iter=2)  # warm up the process (lazy imports, first calls)
    for name, (target, authors_s) in AUTHORS_N64.items():
        A = np.load(ANCHORS / f"{name}_N64.npz")["A"]
        res = time_to_target(A, target, range(seeds), device=device, max_iter=5000, tol=0)
        row = {"matrix": f"{name}_N64", "target": target, "authors_s": authors_s, **res}
        if res.get("seconds"):
            row["speedup"] = authors_s / res["seconds"]
        rows.append(row)
        print_row("anchor", row)
    return rows


OPTIMISER_CONFIGS = [
    ("lbfgs h=10", {"optimizer": "lbfgs", "history_size": 10}),
    ("lbfgs h=20", {"optimizer": "lbfgs", "history_size": 20}),
    ("lbfgs h=50", {"optimizer": "lbfgs", "history_size": 50}),
    ("lbfgs h=100", {"optimizer": "lbfgs", "history_size": 100}),
    ("lbfgs h=50 float64", {"optimizer": "lbfgs", "history_size": 50, "dtype": "float64"}),
    ("adam lr=0.01", {"optimizer": "adam", "lr": 0.01}),
    ("adam lr=0.003", {"optimizer": "adam", "lr": 0.003}),
]


def bench_optimisers(repeats, device, names=("graph", "grid", "gauss")):
    rows = []
    for label, options in OPTIMISER_CONFIGS:
        row = {"config": label}
        for name in names:
            target = AUTHORS_N64[name][0]
            A = np.load(ANCHORS / f"{name}_N64.npz")["A"]
            res = time_to_target(A, target, range(repeats), device=device, max_iter=5000, tol=0, time_limit=20, **options)
            row[name] = res["seconds"]
        rows.append(row)
        print_row("optimiser", row)
    return rows


# -- (d) products -------------------------------------------------------------------
def bench_products(n, repeats):
    pattern = chord_pattern(n)
    F = SparseFactors.from_pattern(pattern, seed=0, dtype=np.float32)
    D = F.to_dense()
    rng = np.random.default_rng(0)
    rows = []
    for cols in (1, 64):
        X = rng.standard_normal((n, cols) if cols > 1 else n).astype(np.float32)
        assert np.allclose(F.matmul(X), D @ X, rtol=1e-3, atol=1e-4 * np.abs(D @ X).max())
        # back to back, not interleaved: repeated application (an iterative solver, say) keeps the
        # 5 MB of factors in cache; a dense product between calls evicts them (3x slower then)
        sparse_s = median_time(lambda: F.matmul(X), repeats)
        dense_s = median_time(lambda: D @ X, repeats)
        row = {"n": n, "columns": cols, "sfa_s": sparse_s, "dense_s": dense_s, "speedup": dense_s / sparse_s}
        rows.append(row)
        print_row("product", row)
    return rows


# -- (e) a full `sfa fit` at N = 4096 ---------------------------------------------------------
def bench_large_fit(side: int, extra_args):
    n = side * side
    with tempfile.TemporaryDirectory() as tmp:
        matrix = Path(tmp) / f"grid_{side}x{side}.mtx"
        scipy.io.mmwrite(matrix, grid_laplacian(side))
        cmd = [sys.executable, "-m", "sfa_cli", "fit", str(matrix), "-o", str(Path(tmp) / "F.npz"), "--json", "--quiet",
               *extra_args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    if proc.returncode != 0:
        raise RuntimeError(f"sfa fit failed: {proc.stderr.strip()}")
    summary = json.loads(proc.stdout)
    row = {"n": n, "matrix": f"grid Laplacian {side}x{side}", "wall_s": wall, "peak_rss_gib": peak / 2**30,
           **{k: summary[k] for k in ("rel_error", "tsvd_rel_error", "iterations", "evaluations", "stopped_because",
                                      "seconds", "params")}}
    print_row("large fit", row)
    return row


# -- output ---------------------------------------------------------------------------
def print_row(kind, row):
    cells = []
    for k, v in row.items():
        if isinstance(v, list):
            v = "[" + ",".join("-" if x is None else f"{x:.3g}" for x in v) + "]"
        cells.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    print(f"[{kind}] " + "  ".join(cells), flush=True)


def markdown_table(rows, columns, headers=None):
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- old against new, interleaved ----------------------------------------------------------
def _section_times(tree: Path, args, out: Path) -> dict:
    """Run sections (a)-(b) of the bench_fit.py in ``tree`` in a subprocess; {label: seconds}."""
    cmd = [sys.executable, str(tree / "scripts" / "bench_fit.py"), "--sizes", args.sizes, "--repeats", str(args.repeats),
           "--reference-max", "0", "--skip-optimisers", "--skip-large", "--product-n", "256",
           "--anchor-seeds", str(args.anchor_seeds), "--device", args.device, "--out", str(out)]
    if args.skip_anchors:
        cmd.append("--skip-anchors")
    # one thread each: on a shared machine extra threads measure the neighbours, not the code
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    times = {f"(a) eval n={r['n']}": r["sfa_s"] for r in report["evaluation"]}
    times.update({f"(b) {r['matrix']}": r.get("seconds") for r in report.get("anchors", [])})
    return times


def _old_objective_class(old_tree: Path):
    """The other checkout's objective class (fit.BlockObjective before session 4, else
    objective.BlockObjective), built on this tree's kernels: the two differ in the objective's code only."""
    import ast

    from sfa_cli.approximations import kernels as k

    for rel in ("sfa_cli/engine/objective.py", "sfa_cli/objective.py", "sfa_cli/fit.py"):
        path = old_tree / rel
        if not path.exists():
            continue
        source = path.read_text()
        tree = ast.parse(source)
        nodes = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                 and n.name in ("BlockObjective", "block_columns", "column_blocks", "DenseColumns")]
        if not any(n.name == "BlockObjective" for n in nodes):
            continue
        namespace = {"torch": torch, "np": np, **{name: getattr(k, name) for name in
                                                   ("chain_forward", "chain_backward", "column_entries", "factor_columns")}}
        exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
        return namespace["BlockObjective"]
    raise RuntimeError(f"no BlockObjective in {old_tree}")


def bench_objective_against(old_tree: Path, sizes, rounds: int) -> list[dict]:
    """This tree's BlockObjective against the other checkout's, in one process, calls alternating."""
    Old = _old_objective_class(old_tree)
    rows = []
    for n in sizes:
        structs, _ = pattern_structures(chord_pattern(n), "cpu")
        start = initial_values(structs, seed=0, dtype=torch.float32)
        target = torch.randn(n, n, generator=torch.Generator().manual_seed(n)).div_(n**0.5)
        pairs = []
        for cls in (Old, BlockObjective):
            objective = cls(structs, target)
            values = [v.clone().requires_grad_() for v in start]

            def call(objective=objective, values=values):
                for v in values:
                    v.grad = None
                return objective(values)

            pairs.append(call)
        assert pairs[0]() == pairs[1](), "the two objectives disagree"
        old_t, new_t = interleaved_times(pairs, rounds, [3, 3])
        ratios = np.divide(new_t, old_t)
        rows.append({"section": f"(a) objective n={n}, one process", "old_s": float(np.median(old_t)),
                     "new_s": float(np.median(new_t)), "ratio": float(np.median(ratios)),
                     "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max()), "rounds": rounds})
        print_row("against", rows[-1])
    return rows


def bench_against(old_tree: Path, args) -> list[dict]:
    """Old and new sections (a)-(b) in alternating subprocesses; the new/old ratio of each round."""
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            # alternate which goes first, so that a drift within a round favours neither
            order = [("old", old_tree), ("new", ROOT)] if k % 2 == 0 else [("new", ROOT), ("old", old_tree)]
            got = {name: _section_times(tree, args, Path(tmp) / f"{name}{k}.json") for name, tree in order}
            rounds.append(got)
            print(f"[against] round {k + 1}: " + "  ".join(
                f"{label}={got['new'][label] / got['old'][label]:.3f}" for label in got["new"]
                if got["new"].get(label) and got["old"].get(label)), flush=True)
    rows = []
    for label in rounds[0]["new"]:
        pairs = [(r["old"].get(label), r["new"].get(label)) for r in rounds]
        ratios = [b / a for a, b in pairs if a and b]
        rows.append({"section": label, "old_s": float(np.median([a for a, _ in pairs if a])) if ratios else None,
                     "new_s": float(np.median([b for _, b in pairs if b])) if ratios else None,
                     "ratio": float(np.median(ratios)) if ratios else None,
                     "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
                     "rounds": len(ratios)})
        print_row("against", rows[-1])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,512,1024,2048,4096", help="N for the evaluation benchmark")
    p.add_argument("--reference-max", type=int, default=2048, help="largest N for the slow reference")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--product-n", type=int, default=4096)
    p.add_argument("--large-side", type=int, default=64, help="grid side for the full fit (N = side^2)")
    p.add_argument("--large-args", default="", help="extra options for the large `sfa fit`")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--skip-optimisers", action="store_true")
    p.add_argument("--skip-anchors", action="store_true")
    p.add_argument("--anchor-seeds", type=int, default=7, help="start seeds per N = 64 anchor (section b)")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "bench_fit.json"))
    p.add_argument("--markdown", default=None, help="write the tables as markdown to this file")
    p.add_argument("--against", default=None, help="another checkout: compare its sections (a)-(b) with this one's")
    p.add_argument("--rounds", type=int, default=4, help="alternating old/new runs with --against")
    p.add_argument("--objective-only", action="store_true",
                   help="with --against: the two objectives in this process, calls alternating (section a only)")
    args = p.parse_args(argv)
    if args.against:
        old = Path(args.against).resolve()
        if args.objective_only:
            rows = bench_objective_against(old, [int(s) for s in args.sizes.split(",")], args.rounds)
        else:
            rows = bench_against(old, args)
        print("\n" + markdown_table(rows, ["section", "old_s", "new_s", "ratio", "ratio_min", "ratio_max", "rounds"],
                                    ["section", "old s", "new s", "new/old (median)", "min", "max", "rounds"]))
        return
    device = resolve_device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")]

    report = {"machine": machine(), "device": str(device), "dtype": "float32"}
    report["evaluation"] = bench_evaluation(sizes, args.repeats, device, args.reference_max)
    if not args.skip_anchors:
        report["anchors"] = bench_anchors(args.anchor_seeds, str(device))
    if not args.skip_optimisers:
        report["optimisers"] = bench_optimisers(3, str(device))
    report["products"] = bench_products(args.product_n, max(args.repeats, 20))
    if not args.skip_large:
        extra = args.large_args.split() + (["--device", str(device)] if device.type == "cuda" else [])
        report["large_fit"] = bench_large_fit(args.large_side, extra)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = render_markdown(report)
    print("\n" + md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    print(f"\nwrote {out}")


def render_markdown(report) -> str:
    parts = [f"Machine: {report['machine']}; device {report['device']}, float32.", "",
             "**(a) Objective + gradient, seconds per evaluation (median)**", "",
             markdown_table(report["evaluation"], ["n", "factors", "nnz_per_row", "sfa_s", "reference_s", "speedup",
                                                   "speedup_min", "speedup_max", "grad_max_rel_diff", "sfa_csr_s",
                                                   "compiled_speedup", "sfa_first_call_s"])]
    if "anchors" in report:
        parts += ["", "**(b) Time to the authors' 1000-iteration errors, N = 64 (median and slowest over start seeds, setup included)**", "",
                  markdown_table(report["anchors"], ["matrix", "target", "authors_s", "seconds", "seconds_max", "reached",
                                                     "seeds", "speedup", "iterations", "evaluations"])]
    if "optimisers" in report:
        parts += ["", "**(c) Optimiser study: seconds to the authors' error (median of 3; - = not within 20 s)**", "",
                  markdown_table(report["optimisers"], ["config", "graph", "grid", "gauss"])]
    parts += ["", "**(d) Products with fitted factors against the dense reconstructed matrix**", "",
              markdown_table(report["products"], ["n", "columns", "sfa_s", "dense_s", "speedup"])]
    if "large_fit" in report:
        parts += ["", "**(e) `sfa fit` on a dense-size N = 4096 input, default options**", "",
                  markdown_table([report["large_fit"]], ["matrix", "n", "wall_s", "peak_rss_gib", "rel_error",
                                                         "tsvd_rel_error", "iterations", "stopped_because"])]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
