#!/usr/bin/env python
"""Benchmark the sampled fit at scale: epoch time, peak memory and error estimates against N.

Prints tables and writes JSON:

  (a) scale: for sparse random graphs (average degree 5) and 2-D grid Laplacians at
      N = 2^12 .. 2^16: seconds per epoch, peak resident memory (each configuration in
      its own process, so peaks are separate), and the error estimate with its 95% CI
      after each epoch. Sizes from --large-from on run --max-epochs-large epochs under
      --time-limit-large seconds; a partial epoch is reported as the fraction done and
      the epoch time it projects to;
  (b) distributed: at a moderate N, one epoch with 1 process, 1 process with 2 threads,
      and 2 processes (torchrun, gloo), each thread count given per process;
  (c) chain: seconds for one block of columns (forward and backward) at the largest N,
      with and without the compact start of sfa_cli.approximations.kernels.ColumnChain;
  (d) --coverage: at N = 8192, for 20 seeds, whether the fit's reported 95% CI covers
      the exact error of its factors, and, for one fit, whether the CI of
      estimate_relative_error covers it for 20 sample seeds.

Usage:
    python scripts/bench_scale.py                                  # (a)-(c), about 25 min on 2 cores
    python scripts/bench_scale.py --sizes 4096,8192 --kinds grid   # quick look
    python scripts/bench_scale.py --sizes 65536 --kinds grid --max-epochs-large 2 --time-limit-large 0 \
        --processes 2 --dist-n 0 --no-chain --out bench_out/bench_scale_65536.json
    python scripts/bench_scale.py --coverage                        # (d), about 15 min
    python scripts/bench_scale.py --markdown                        # also print markdown tables
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfa_cli.engine.fit import make_pattern  # noqa: E402
from sfa_cli.approximations.sparse_factors import initial_values, pattern_structures  # noqa: E402
from sfa_cli.metrics import relative_error  # noqa: E402
from sfa_cli.synthetic import grid_laplacian, random_graph  # noqa: E402
from sfa_cli.approximations.kernels import SPARSE_START_FRACTION, ColumnChain as _ColumnChain  # noqa: E402
from sfa_cli.engine.sampled import estimate_relative_error, fit_sampled, init_distributed  # noqa: E402

KINDS = ("grid", "graph")


# -- matrices ------------------------------------------------------------------------
def make_matrix(kind: str, n: int) -> tuple[sp.csr_matrix, str]:
    if kind == "grid":
        k = n.bit_length() - 1
        if 1 << k != n:
            raise SystemExit(f"grid sizes must be powers of two; got {n}")
        rows, cols = 1 << (k // 2), 1 << (k - k // 2)
        return grid_laplacian(rows, cols), f"grid Laplacian {rows}x{cols}"
    return random_graph(n), "random graph, degree 5"


# -- one configuration in its own process ------------------------------------------------
def worker(spec: dict) -> None:
    device = spec.get("device", "cpu")
    rank, world = init_distributed(device)
    A, label = make_matrix(spec["kind"], spec["n"])
    t0 = time.perf_counter()
    r = fit_sampled(A, epochs=spec["epochs"], batch_columns=spec["batch_columns"], time_limit=spec.get("time_limit"),
                    seed=spec.get("seed", 0), device=device, exact_error=spec.get("exact_error", False))
    wall = time.perf_counter() - t0
    if rank != 0:
        return
    n = spec["n"]
    epochs = []
    for prev, h in zip(r.history, r.history[1:]):
        done = h["epoch"] - prev["epoch"]
        seconds = h["seconds"] - prev["seconds"]
        epochs.append({"epoch": h["epoch"], "seconds": seconds, "seconds_per_epoch": seconds / done if done else None,
                       "rel_error": h["rel_error"], "ci": h["rel_error_ci"]})
    row = {
        "kind": spec["kind"], "matrix": label, "n": n, "nnz": int(A.nnz), "factors": r.approximation.num_factors,
        "params": r.approximation.params, "batch_columns": r.batch_columns, "lr": r.lr, "processes": world,
        "threads": torch.get_num_threads(), "setup_s": r.history[0]["seconds"], "wall_s": wall,
        "epochs_done": r.epochs, "epoch_fraction": r.history[-1]["epoch"], "stopped_because": r.stopped_because,
        "initial_rel_error": r.initial_rel_error, "rel_error_estimate": r.rel_error_estimate,
        "rel_error_ci": list(r.rel_error_ci), "exact_rel_error": r.exact_rel_error,
        "peak_rss_bytes": r.peak_memory_bytes, "peak_device_bytes": r.peak_device_memory_bytes,
        "device": device if device == "cpu" else torch.cuda.get_device_name(0), "epochs": epochs,
    }
    Path(spec["out"]).write_text(json.dumps(row))


def run_config(spec: dict, processes: int = 1, threads: int = 1) -> dict:
    out = Path(spec["out"])
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    script = [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-port", str(port), *script]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


# -- (a) scale --------------------------------------------------------------------------
def bench_scale(args, tmp: Path) -> list[dict]:
    rows = []
    for n in args.sizes:
        large = n >= args.large_from
        for kind in args.kinds:
            spec = {"kind": kind, "n": n, "batch_columns": args.batch_columns, "out": str(tmp / "row.json"),
                    "device": args.device,
                    "epochs": args.max_epochs_large if large else args.epochs,
                    "time_limit": (args.time_limit_large or None) if large else None}
            row = run_config(spec, processes=args.processes)
            rows.append(row)
            print_scale_row(row)
    return rows


def epoch_seconds(row: dict) -> float:
    """Seconds per epoch: the mean over full epochs, or projected from a partial one."""
    full = [e["seconds"] for e in row["epochs"] if e["seconds_per_epoch"] is not None and float(e["epoch"]).is_integer()]
    if full:
        return float(np.mean(full))
    return row["epochs"][-1]["seconds_per_epoch"] if row["epochs"] else float("nan")


def print_scale_row(row: dict) -> None:
    errs = "  ".join(f"e{e['epoch']:.3g}: {e['rel_error']:.4f} [{e['ci'][0]:.4f}, {e['ci'][1]:.4f}]" for e in row["epochs"])
    print(f"[scale] {row['kind']:5s} n={row['n']:6d} nnz={row['nnz']:7d} epoch_s={epoch_seconds(row):8.1f} "
          f"done={row['epoch_fraction']:.3g} peak={row['peak_rss_bytes'] / 2**30:.2f} GiB "
          + (f"gpu_peak={row['peak_device_bytes'] / 2**30:.2f} GiB " if row.get("peak_device_bytes") else "")
          + f"start={row['initial_rel_error']:.4f}  {errs}", flush=True)


# -- (b) processes ------------------------------------------------------------------------
def bench_distributed(args, tmp: Path) -> list[dict]:
    rows = []
    for processes, threads in ((1, 1), (1, 2), (2, 1)):
        spec = {"kind": "grid", "n": args.dist_n, "batch_columns": args.batch_columns, "epochs": args.dist_epochs,
                "out": str(tmp / "dist.json")}
        row = run_config(spec, processes=processes, threads=threads)
        row["epoch_s"] = epoch_seconds(row)
        rows.append(row)
        print(f"[distributed] n={row['n']} processes={processes} threads/process={threads} "
              f"epoch_s={row['epoch_s']:.1f} rel_error={row['rel_error_estimate']:.6f} "
              f"peak/process={row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return rows


# -- (c) chain kernel -----------------------------------------------------------------------
def bench_chain(n: int, columns: int = 64, repeats: int = 3) -> list[dict]:
    pat = make_pattern(n, "chord")
    structs, _ = pattern_structures(pat)
    values = [v.requires_grad_(True) for v in initial_values(structs, seed=0, dtype=torch.float32)]
    J = torch.from_numpy(np.random.default_rng(0).choice(n, columns, replace=False))
    rows = []
    for fraction in sorted({0.0, 0.02, 0.05, 0.1, SPARSE_START_FRACTION, 0.3}):
        chain = _ColumnChain(structs, n, "cpu", max_fraction=fraction)
        times = []
        for _ in range(repeats + 1):
            t0 = time.process_time()
            P = chain(values, J)
            (0.5 * (P * P).sum()).backward()
            times.append(time.process_time() - t0)
        best = min(times[1:])
        row = {"n": n, "columns": columns, "max_fraction": fraction, "compact_factors": len(chain.levels),
               "cpu_s_per_block": best, "projected_epoch_s": best * n / columns}
        rows.append(row)
        print(f"[chain] n={n} fraction={fraction:.2f} compact factors={len(chain.levels)} "
              f"cpu s/block={best:.3f} projected epoch s={row['projected_epoch_s']:.0f}", flush=True)
    return rows


# -- (d) coverage --------------------------------------------------------------------------
def bench_coverage(args) -> dict:
    out = {}
    for kind in args.coverage_kinds:
        A, label = make_matrix(kind, args.coverage_n)
        fits = []
        for seed in range(args.coverage_seeds):
            r = fit_sampled(A, epochs=1, batch_columns=args.batch_columns, seed=seed, device="cpu", exact_error=True)
            low, high = r.rel_error_ci
            fits.append({"seed": seed, "estimate": r.rel_error_estimate, "ci": [low, high], "exact": r.exact_rel_error,
                         "covered": bool(low <= r.exact_rel_error <= high)})
            print(f"[coverage fit] {kind} n={args.coverage_n} seed={seed:2d} estimate={r.rel_error_estimate:.5f} "
                  f"ci=[{low:.5f}, {high:.5f}] exact={r.exact_rel_error:.5f} covered={fits[-1]['covered']}", flush=True)
            if seed == 0:
                first = r
        exact = relative_error(A, first.approximation)
        samples = []
        for seed in range(args.coverage_seeds):
            est = estimate_relative_error(A, first.approximation, seed=seed)
            low, high = est["rel_error_ci"]
            samples.append({"seed": seed, "estimate": est["rel_error_estimate"], "ci": [low, high],
                            "covered": bool(low <= exact <= high)})
        out[kind] = {
            "matrix": label, "n": args.coverage_n, "sample": 1024,
            "fit_covered": sum(f["covered"] for f in fits), "fits": fits,
            "estimator_exact": exact, "estimator_covered": sum(s["covered"] for s in samples), "estimates": samples,
            "mean_ci_half_width": float(np.mean([(f["ci"][1] - f["ci"][0]) / 2 for f in fits])),
        }
        print(f"[coverage] {kind}: fit CI covered the exact error in {out[kind]['fit_covered']}/{len(fits)} seeds; "
              f"estimator CI in {out[kind]['estimator_covered']}/{len(samples)} sample seeds "
              f"(mean CI half-width {out[kind]['mean_ci_half_width']:.2g})", flush=True)
    return out


# -- output -------------------------------------------------------------------------------
def machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform(), "load_average_at_start": load}


def markdown(results: dict) -> str:
    lines = []
    if results.get("scale"):
        lines += ["| matrix | N | nnz | s / epoch | epochs run | peak RSS | error estimate [95% CI] by epoch |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["scale"]:
            errs = "; ".join([f"0: {r['initial_rel_error']:.4f}"] + [
                f"{e['epoch']:.3g}: {e['rel_error']:.4f} [{e['ci'][0]:.4f}, {e['ci'][1]:.4f}]" for e in r["epochs"]])
            lines.append(f"| {r['matrix']} | {r['n']} | {r['nnz']} | {epoch_seconds(r):.1f} | {r['epoch_fraction']:.3g} "
                         f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB | {errs} |")
    if results.get("distributed"):
        lines += ["", "| processes x threads | s / epoch | error estimate | peak RSS per process |", "|---|---|---|---|"]
        for r in results["distributed"]:
            lines.append(f"| {r['processes']} x {r['threads']} | {r['epoch_s']:.1f} | {r['rel_error_estimate']:.6f} "
                         f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    if results.get("chain"):
        lines += ["", "| compact start up to | factors in compact form | CPU s / 64-column block | projected s / epoch |",
                  "|---|---|---|---|"]
        for r in results["chain"]:
            lines.append(f"| {r['max_fraction']:.2f} n | {r['compact_factors']} | {r['cpu_s_per_block']:.3f} "
                         f"| {r['projected_epoch_s']:.0f} |")
    if results.get("coverage"):
        lines += ["", "| matrix | N | fits whose CI covers the exact error | sample seeds whose CI covers it | mean CI half-width |",
                  "|---|---|---|---|---|"]
        for c in results["coverage"].values():
            lines.append(f"| {c['matrix']} | {c['n']} | {c['fit_covered']} / {len(c['fits'])} "
                         f"| {c['estimator_covered']} / {len(c['estimates'])} | {c['mean_ci_half_width']:.2g} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4096,8192,16384,32768,65536", help="comma-separated N (default 2^12..2^16)")
    p.add_argument("--kinds", default="grid,graph", help="grid, graph or both")
    p.add_argument("--epochs", type=int, default=3, help="epochs below --large-from (default 3)")
    p.add_argument("--large-from", type=int, default=16384, help="N from which the large settings apply")
    p.add_argument("--max-epochs-large", type=int, default=1, help="epochs at large N (default 1)")
    p.add_argument("--time-limit-large", type=float, default=300.0,
                   help="seconds per run at large N; 0 for none (default 300: the 5-minute epoch target)")
    p.add_argument("--batch-columns", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the scale runs; default cpu)")
    p.add_argument("--processes", type=int, default=1, help="processes per scale run (torchrun when > 1)")
    p.add_argument("--dist-n", type=int, default=4096, help="N of the 1 vs 2 process comparison (0 skips it)")
    p.add_argument("--dist-epochs", type=int, default=2)
    p.add_argument("--no-chain", action="store_true", help="skip the chain kernel timing")
    p.add_argument("--coverage", action="store_true", help="run the CI coverage check instead")
    p.add_argument("--coverage-n", type=int, default=8192)
    p.add_argument("--coverage-seeds", type=int, default=20)
    p.add_argument("--coverage-kinds", default="grid,graph")
    p.add_argument("--out", default=None, help="JSON file (default bench_out/bench_scale[_coverage].json)")
    p.add_argument("--markdown", action="store_true", help="print markdown tables at the end")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.coverage_kinds = [k for k in args.coverage_kinds.split(",") if k]
    for k in args.kinds + args.coverage_kinds:
        if k not in KINDS:
            p.error(f"unknown kind {k!r}; choose from {', '.join(KINDS)}")
    out = Path(args.out or ROOT / "bench_out" / ("bench_scale_coverage.json" if args.coverage else "bench_scale.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args)}
    t0 = time.perf_counter()
    if args.coverage:
        results["coverage"] = bench_coverage(args)
    else:
        tmp = out.parent / "bench_scale_tmp"
        tmp.mkdir(exist_ok=True)
        results["scale"] = bench_scale(args, tmp)
        if args.dist_n:
            results["distributed"] = bench_distributed(args, tmp)
        if not args.no_chain:
            results["chain"] = bench_chain(max(args.sizes))
    results["total_seconds"] = time.perf_counter() - t0
    results["load_average_at_end"] = os.getloadavg()
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out} ({results['total_seconds']:.0f} s)")
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()
