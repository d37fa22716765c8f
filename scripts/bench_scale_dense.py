#!/usr/bin/env python
"""Dense matrices at scale (issue 15): every method of `sfa compare` on N = 8192-32768 dense `.npy` files.

For each kind and N a float32 `.npy` is written once (by row blocks, into --data-dir), then
every method runs in its own `sfa compare FILE --methods M --json` process, as a user would
run it, so that each has its own peak resident memory (os.wait4's ru_maxrss of that child),
wall time (reading, fitting and measuring included) and error. Above N = 8192 `compare`
works at scale: errors are estimated from the same seeded column sample for every method,
with a 95% interval; the learned method (`sparse`) reports its exact error in the note.

Kinds:
  rbf        a smooth kernel exp(-|x - y|^2 / (2 l^2)), x uniform in the unit cube, l = 0.2
             (numerically low rank: the truncated SVD should win);
  attention  softmax(Q K^T / sqrt(d)) row by row, Q, K standard normal times 2, d = 64
             (a dense, high-rank attention map with a few large entries per row).

Usage:
    python scripts/bench_scale_dense.py                                  # N = 8192, 16384; both kinds
    python scripts/bench_scale_dense.py --sizes 32768 --methods tsvd,topk,chord,sparse
    python scripts/bench_scale_dense.py --sizes 4096 --kinds rbf --methods tsvd,sparse   # quick look
Writes docs/bench/bench_scale_dense.json (merged with earlier runs: a row per kind, N, method)
and prints a table; --markdown prints it for docs/scale.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("rbf", "attention")
METHODS = ("tsvd", "rsvd", "topk", "chord", "butterfly", "sparse")


def make_matrix(kind: str, n: int, path: Path, seed: int = 0) -> None:
    """Write the n x n float32 matrix of a kind to path (row blocks; never n x n in memory)."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path.with_suffix(".part.npy"), mode="w+", dtype=np.float32, shape=(n, n))
    rows = max(1, (1 << 22) // n)
    if kind == "rbf":
        x = rng.uniform(size=(n, 3))
        for i in range(0, n, rows):
            d = ((x[i:i + rows, None, :] - x[None, :, :]) ** 2).sum(-1)
            out[i:i + rows] = np.exp(-d / (2 * 0.2 ** 2))
    elif kind == "attention":
        d = 64
        Q, K = 2 * rng.standard_normal((n, d)), 2 * rng.standard_normal((n, d))
        for i in range(0, n, rows):
            S = Q[i:i + rows] @ K.T / np.sqrt(d)
            S = np.exp(S - S.max(1, keepdims=True))
            out[i:i + rows] = S / S.sum(1, keepdims=True)
    else:
        raise SystemExit(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    out.flush()
    del out
    os.replace(path.with_suffix(".part.npy"), path)


def run_method(path: Path, method: str, budget: float, time_limit: float | None, timeout: float,
               sparse_time_limit: float | None = None) -> dict:
    """One `sfa compare` process: its result row, wall seconds and peak RSS (os.wait4 on that child)."""
    import tempfile

    cmd = [sys.executable, "-m", "sfa_cli", "compare", str(path), "--methods", method, "--budget", str(budget),
           "--json", "--quiet"]
    limit = sparse_time_limit if method == "sparse" else time_limit
    if limit and method in ("chord", "butterfly", "sparse"):
        cmd += ["--time-limit", str(limit)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                return {"status": "timeout", "wall_s": time.perf_counter() - t0, "command": " ".join(cmd[2:])}
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    row = {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20, "command": " ".join(cmd[2:])}
    if os.waitstatus_to_exitcode(status) != 0:
        row.update(status="failed", error=(stderr.strip().splitlines() or [""])[-1])
        return row
    r = json.loads(stdout)["results"][0]
    row.update(status=r["status"], rel_error=r.get("rel_error"), rel_error_ci=r.get("rel_error_ci"),
               estimate=r.get("rel_error_is_estimate"), params=r.get("params"), seconds=r.get("seconds"),
               note=r.get("note"))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="8192,16384")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget", type=float, default=0.01, help="share of N^2 (default 1%%)")
    p.add_argument("--time-limit", type=float, default=120.0, help="--time-limit of chord and butterfly")
    p.add_argument("--sparse-time-limit", type=float, default=480.0,
                   help="--time-limit of the learned method (its starts always complete)")
    p.add_argument("--timeout", type=float, default=1200.0, help="kill a method after this many seconds")
    p.add_argument("--data-dir", default="/tmp/sfa_bench_dense")
    p.add_argument("--out", default="docs/bench/bench_scale_dense.json")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args()
    data = Path(a.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {"rows": []}
    results["machine"] = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    for n in (int(s) for s in a.sizes.split(",")):
        for kind in a.kinds.split(","):
            path = data / f"{kind}{n}.npy"
            if not path.exists():  # written by a spawned process: a child forked from a parent that wrote
                t0 = time.perf_counter()  # the file inherits its resident pages, and ru_maxrss counts them
                writer = multiprocessing.get_context("spawn").Process(target=make_matrix, args=(kind, n, path))
                writer.start()
                writer.join()
                if writer.exitcode:
                    raise SystemExit(f"writing {path} failed (exit {writer.exitcode})")
                print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
            for method in a.methods.split(","):
                row = run_method(path, method, a.budget, a.time_limit, a.timeout, a.sparse_time_limit)
                row.update(kind=kind, n=n, method=method, budget=a.budget,
                           time_limit=a.sparse_time_limit if method == "sparse" else a.time_limit)
                results["rows"] = [r for r in results["rows"]
                                   if (r["kind"], r["n"], r["method"], r["budget"]) != (kind, n, method, a.budget)]
                results["rows"].append(row)
                out.write_text(json.dumps(results, indent=1))
                print(_line(row), flush=True)
    if a.markdown:
        print(markdown(results["rows"]))
    return 0


def _line(r: dict) -> str:
    err = r.get("rel_error")
    err = "-" if err is None else f"{err:.4g}" + (" (est.)" if r.get("estimate") else "")
    peak = r.get("peak_rss_gib")
    return (f"{r['kind']:10s} N={r['n']:6d} {r['method']:10s} {r.get('status', ''):15s} error {err:18s} "
            f"wall {r.get('wall_s', 0):7.1f} s  peak {peak if peak is None else round(peak, 2)} GiB")


def markdown(rows) -> str:
    lines = ["| kind | N | method | status | rel. error | wall (s) | peak RSS (GiB) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kind"], r["n"], METHODS.index(r["method"]) if r["method"] in METHODS else 99)):
        err = r.get("rel_error")
        err = "-" if err is None else f"{err:.3g}" + (" (est.)" if r.get("estimate") else "")
        peak = r.get("peak_rss_gib")
        lines.append(f"| {r['kind']} | {r['n']} | {r['method']} | {r.get('status')} | {err} | "
                     f"{r.get('wall_s', 0):.0f} | {'-' if peak is None else f'{peak:.2f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
