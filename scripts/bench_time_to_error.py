#!/usr/bin/env python
"""Error against wall seconds from the command's start: old and new `sfa fit`, cold and warm kernel cache.

Every run is a fresh `sfa fit MATRIX -o F.npz --report R.json` process. Its report's history
(seconds from the fit's start) is moved onto the clock of the command's start, so the curves and
"time to reach the old code's final error" include start-up, imports, reading and kernel compiles.

Cases: every matrix of ../shared/data/real (all have N <= 2048), the N = 64 anchors (graph, grid,
lowrank, gauss; --anchor-seeds seeds, the table shows medians) and seeded dense RBF kernels at
N = 2048 and 4096 (rbf_N2048, rbf_N4096; written once as .npy into --data-dir).

Caches: cold = fresh empty TORCHINDUCTOR_CACHE_DIR, XDG_CACHE_HOME, TRITON_CACHE_DIR and
CUDA_CACHE_PATH for that one process; warm = one persistent folder per code (--warm-dir), filled by
an untimed warm-up run of the same code, case and options when that folder has not seen them yet.
Old and new alternate (old, new / new, old ...) for each case.

Time from the command's start: a probe (a sitecustomize.py put first on the child's PYTHONPATH, on
when SFA_TTE_PROBE is set) wraps the CLI's progress callback and stamps CLOCK_MONOTONIC at the
first evaluation, together with that evaluation's history seconds; fit start = stamp - seconds,
against the launch stamp taken by this script on the same clock ("offset_method": "probe"). Without
the stamp (the callback renamed, say): process wall - report "seconds", all of it counted as start-up
("wall_minus_fit_seconds"; too late by the final error, the TSVD baseline and the save).

Usage:
    python scripts/bench_time_to_error.py                        # everything (long: do not run on a busy box)
    python scripts/bench_time_to_error.py --cases lesmis --cache warm --common-args "--max-iter 50"
    python scripts/bench_time_to_error.py --cases 'graph_*,grid_*' --max-n 512 --time-limit 60
    python scripts/bench_time_to_error.py --cases real --extra-args="--start identity" --resume
    python scripts/bench_time_to_error.py --summarize            # table and plot from --out only
    python scripts/bench_time_to_error.py --dry-run              # the cases and commands, nothing run
Write --common-args=... / --extra-args=... with "=" when the value is a single flag (--extra-args=--foo).
sfa compiles its CPU kernels only from N = 1024 (kernels.COMPILE_MIN_N): below that cold = warm.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ANCHORS = ("graph_N64", "grid_N64", "lowrank_N64", "gauss_N64")
DENSE_SIZES = (2048, 4096)
def NOW() -> float:
    """CLOCK_MONOTONIC: perf_counter's clock on Linux, one clock for every process of the machine."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)

PROBE = r'''
import os
if os.environ.get("SFA_TTE_PROBE"):  # bench_time_to_error.py: stamp the first evaluation, nothing else
    import json, sys, time
    from importlib.machinery import PathFinder
    _site, _done = time.clock_gettime(time.CLOCK_MONOTONIC), []

    def _patch(cls):
        call = cls.__call__
        def __call__(self, step):
            if not _done and getattr(step, "evaluations", 1):  # not the lifted start's sweeps (evaluations 0)
                _done.append(time.clock_gettime(time.CLOCK_MONOTONIC))
                with open(os.environ["SFA_TTE_PROBE"], "w") as f:
                    json.dump({"site": _site, "first_eval": _done[0], "step_seconds": step.seconds}, f)
            return call(self, step)
        cls.__call__ = __call__

    class _Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in ("sfa_cli.cli", "sfa_cli.cli.commands"):
                return None
            spec = PathFinder.find_spec(name, path, target)
            if spec is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module
                def exec_module(module):
                    run(module)
                    if isinstance(getattr(module, "_FitProgress", None), type):
                        _patch(module._FitProgress)
                spec.loader.exec_module = exec_module
            return spec
    sys.meta_path.insert(0, _Finder)
'''


# -- cases ------------------------------------------------------------------------------------
def matrix_n(path: Path) -> int:
    """N without reading the matrix: the .mtx size line, the .npy header, the .npz array's shape."""
    if path.suffix == ".mtx":
        with open(path) as f:
            return int(next(line for line in f if not line.startswith("%")).split()[0])
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r").shape[0]
    with np.load(path) as z:
        return z["A"].shape[0]


def rbf_matrix(n: int, folder: Path) -> Path:
    """exp(-|x_i - x_j|^2 / (2 * 0.1^2)) on n uniform points of the unit square (seed n), once."""
    path = folder / f"rbf_N{n}.npy"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        x = np.random.default_rng(n).random((n, 2))
        d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        np.save(path.with_suffix(".tmp.npy"), np.exp(-d2 / (2 * 0.1**2)))
        os.replace(path.with_suffix(".tmp.npy"), path)
    return path


def all_cases(data_dir: Path) -> list[dict]:
    stats = {s["file"]: s["N"] for s in json.loads((DATA / "real" / "stats.json").read_text())}
    cases = [{"name": p.name.split(".")[0], "group": "real", "path": str(p), "n": stats.get(p.name) or matrix_n(p)}
             for p in sorted((DATA / "real").iterdir()) if p.suffix in (".mtx", ".npz")]
    cases = [c for c in cases if c["n"] <= 2048]
    cases += [{"name": a, "group": "anchors", "path": str(DATA / "anchors" / f"{a}.npz"), "n": 64} for a in ANCHORS]
    cases += [{"name": f"rbf_N{n}", "group": "dense", "path": str(data_dir / f"rbf_N{n}.npy"), "n": n}
              for n in DENSE_SIZES]
    return cases


def pick(cases, patterns: str | None, max_n: int | None) -> list[dict]:
    """Cases whose name or group matches one of the comma-separated globs, with N <= max_n."""
    pats = [p.strip() for p in patterns.split(",") if p.strip()] if patterns else ["*"]
    chosen = [c for c in cases if any(fnmatch.fnmatch(c["name"], p) or p == c["group"] for p in pats)]
    return [c for c in chosen if max_n is None or c["n"] <= max_n]


# -- one run ----------------------------------------------------------------------------------
def cache_env(folder: Path) -> dict:
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "XDG_CACHE_HOME": str(folder / "xdg"),
            "TRITON_CACHE_DIR": str(folder / "triton"), "CUDA_CACHE_PATH": str(folder / "nv")}


def run_fit(sfa: str, case: dict, seed: int, options: list[str], cache_dir: Path, probe_dir: Path,
            timeout_s: float) -> tuple[dict, list]:
    """One `sfa fit` process: its row (no history) and its history as [seconds from launch, error]."""
    work = Path(tempfile.mkdtemp(prefix="sfa_tte_run_"))
    report, probe = work / "R.json", work / "probe.json"
    argv = [sfa, "fit", case["path"], "-o", str(work / "F.npz"), "--report", str(report), "--force", "-q",
            "--seed", str(seed), *options]
    env = {**os.environ, **cache_env(cache_dir), "SFA_TTE_PROBE": str(probe),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")]))}
    row = {"argv": [a if a not in (str(report), str(work / "F.npz")) else Path(a).name for a in argv]}
    t0 = NOW()  # SIGINT at the limit: sfa stops the fit and still writes its report (exit 130; timeout says 124)
    try:
        proc = subprocess.run(["timeout", "-s", "INT", "-k", "30", str(timeout_s), *argv], env=env,
                              capture_output=True, text=True, timeout=timeout_s + 60)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "killed"
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    row.update(wall_s=NOW() - t0, returncode=rc, timed_out=rc in (124, 137, "killed"))
    history = []
    try:
        rep = json.loads(report.read_text())
    except (OSError, ValueError):
        rep = None
    if rc != 0 or rep is None:
        row["stderr_tail"] = err[-2000:]
    if rep is not None:
        stamp = json.loads(probe.read_text()) if probe.exists() else None
        offset = stamp["first_eval"] - stamp["step_seconds"] - t0 if stamp else None
        if offset is not None and 0 <= offset <= row["wall_s"]:
            row.update(offset_method="probe", python_start_s=stamp["site"] - t0)
        else:
            offset = row["wall_s"] - rep.get("seconds", 0.0)
            row["offset_method"] = "wall_minus_fit_seconds"
        history = [[offset + h["seconds"], h["rel_error"]] for h in rep.get("history", [])]
        row.update(fit_start_s=offset, first_eval_s=history[0][0] if history else None,
                   fit_seconds=rep.get("seconds"), final_error=rep.get("rel_error"),
                   **{k: rep.get(k) for k in ("iterations", "evaluations", "stopped_because", "start", "optimizer",
                                              "device", "dtype")},
                   history_len=len(history), curve=thin(history))
    shutil.rmtree(work, ignore_errors=True)
    return row, history


def thin(history: list, rel_step: float = 1e-2, time_step: float = 1.05) -> list:
    """Best-so-far error against seconds, kept where it fell by rel_step or time grew by time_step."""
    out, best = [], float("inf")
    for i, (t, e) in enumerate(history):
        best = min(best, e)
        if not out or best <= out[-1][1] * (1 - rel_step) or t >= out[-1][0] * time_step or i == len(history) - 1:
            out.append([round(t, 4), float(f"{best:.6g}")])
    return out


def time_to(points: list, target: float) -> float | None:
    return next((t for t, e in points if e <= target), None)


def attach_tte(rows: list, histories: dict, rtol: float) -> None:
    """On each new-code row: seconds (from its command's start) to the paired old run's final error."""
    old = {(r["case"], r["cache"], r["seed"], r.get("pair")): r for r in rows
           if r["code"] == "old" and r.get("final_error") is not None}
    for r in rows:
        o = old.get((r["case"], r["cache"], r["seed"], r.get("pair")))
        if r["code"] != "new" or o is None or r.get("final_error") is None:
            continue
        full = histories.get(r["key"])
        tte = time_to(full if full is not None else r["curve"], o["final_error"] * (1 + rtol))
        r.update(old_error_target=o["final_error"], time_to_old_error_s=tte, old_wall_s=o["wall_s"],
                 tte_from="history" if full is not None else "thinned curve",
                 old_wall_over_tte=o["wall_s"] / tte if tte is not None and tte > 0 else None)


# -- results ----------------------------------------------------------------------------------
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rows: list) -> list[dict]:
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r.get("pair"), r["cache"], r["code"]), []).append(r)
    out = []
    for (case, _, cache, code), rs in sorted(groups.items(), key=lambda kv: (*map(str, kv[0][:3]), kv[0][3] != "old")):
        done = [r for r in rs if r.get("final_error") is not None]
        paired = [r for r in done if "old_error_target" in r]
        out.append({"case": case, "n": rs[0]["n"], "cache": cache, "code": code, "options": shlex.join(rs[0]["options"]),
                    "runs": len(rs), "ok": len(done), "failed_rc": sorted({str(r["returncode"]) for r in rs} - {"0"}),
                    **{k: median(r.get(k) for r in done) for k in ("wall_s", "fit_start_s", "first_eval_s",
                                                                   "final_error", "iterations")},
                    "stopped_because": ",".join(sorted({str(r.get("stopped_because")) for r in done})) or None,
                    "reached": f"{sum(r['time_to_old_error_s'] is not None for r in paired)}/{len(paired)}"
                    if paired else None,
                    "time_to_old_error_s": median(r["time_to_old_error_s"] for r in paired),
                    "old_wall_over_tte": median(r["old_wall_over_tte"] for r in paired)})
    return out


def show_table(summary: list) -> None:
    cols = [("case", "case"), ("N", "n"), ("cache", "cache"), ("code", "code"), ("ok", "ok"), ("wall s", "wall_s"),
            ("fit start s", "fit_start_s"), ("1st eval s", "first_eval_s"), ("final err", "final_error"),
            ("iters", "iterations"), ("stopped", "stopped_because"), ("reached", "reached"),
            ("t to old err s", "time_to_old_error_s"), ("old wall / t", "old_wall_over_tte")]
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    if any(s["options"] for s in summary):
        cols.insert(4, ("options", "options"))
    ok = lambda s: f"{s['ok']}/{s['runs']}" + (f" (rc {','.join(s['failed_rc'])})" if s["failed_rc"] else "")  # noqa: E731
    cells = [[fmt(s[k]) if k != "ok" else ok(s) for _, k in cols] for s in summary]
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sfa fit: time from the command's start (medians over seeds)", title_justify="left")
    for h, _ in cols:
        table.add_column(h, justify="left" if h in ("case", "cache", "code", "options", "stopped") else "right")
    for c in cells:
        table.add_row(*c)
    Console(width=200).print(table)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows if r.get("curve")))
    if not cases:
        return
    ncol = min(4, len(cases))
    fig, axes = plt.subplots(-(-len(cases) // ncol), ncol, figsize=(4 * ncol, 3.2 * -(-len(cases) // ncol)),
                             squeeze=False)
    for ax, case in zip(axes.flat, cases):
        labelled = set()
        for r in (r for r in rows if r["case"] == case and r.get("curve")):
            label = f"{r['code']} {r['cache']}"
            t, e = zip(*[(t, max(e, 1e-16)) for t, e in r["curve"]])
            ax.plot(t, e, color={"old": "tab:blue", "new": "tab:orange"}[r["code"]],
                    linestyle={"cold": "-", "warm": "--"}[r["cache"]], lw=1.2,
                    label=None if label in labelled else label)
            labelled.add(label)
        ax.set(xscale="log", yscale="log", title=f"{case} (N={next(r['n'] for r in rows if r['case'] == case)})",
               xlabel="seconds from the command's start", ylabel="relative error (best so far)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def warm_folder(root: Path, code: str, sfa: str, case: dict, opts: list, probe_dir: Path, timeout_s: float) -> Path:
    """The code's persistent cache folder, after an untimed run of this case and options if it had none."""
    folder, what = root / code, f"{case['name']}|{shlex.join(opts)}"
    marks = folder / "warmed.json"
    warmed = json.loads(marks.read_text()) if marks.exists() else []
    if what not in warmed:
        print(f"  warm-up (untimed): {case['name']} {code}", flush=True)
        if run_fit(sfa, case, 0, opts, folder, probe_dir, timeout_s)[0]["returncode"] == 0:
            marks.write_text(json.dumps(warmed + [what]))
    return folder


def code_info(sfa: str) -> dict:
    tree = Path(sfa).resolve().parents[2]
    rev = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {"sfa": sfa, "tree": str(tree), "git": rev.stdout.strip() or None}


# -- main -------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Usage:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", help="comma-separated names or globs, or groups real, anchors, dense [default: all]")
    p.add_argument("--max-n", type=int, help="only cases with N <= this")
    p.add_argument("--seeds", type=int, default=1, help="start seeds 0..K-1 per case (default 1)")
    p.add_argument("--anchor-seeds", type=int, default=3, help="seeds for the N = 64 anchors (default 3)")
    p.add_argument("--time-limit", type=float, help="passed to both codes as --time-limit")
    p.add_argument("--common-args", default="", help="more sfa fit options for both codes (one string)")
    p.add_argument("--extra-args", default="", help="more sfa fit options for the new code only")
    p.add_argument("--old", default=str(ROOT.parent / "old" / ".venv" / "bin" / "sfa"), help="the old code's sfa")
    p.add_argument("--new", default=".venv/bin/sfa", help="the new code's sfa; relative to the repository")
    p.add_argument("--cache", default="cold,warm", help="cold, warm or cold,warm (default)")
    p.add_argument("--process-timeout", type=float, default=900.0, help="seconds per process (default 900)")
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="the new code reaches the old error e at e*(1+rtol) (history vs final error rounding)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "time_to_error.json", help="JSON results")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "bench" / "time_to_error.png", help="log-log plot")
    p.add_argument("--data-dir", type=Path, help="where the dense RBF .npy go [default: bench_out/, ignored by git]")
    p.add_argument("--warm-dir", type=Path, default=Path(tempfile.gettempdir()) / "sfa_tte_warm",
                   help="persistent warm caches, one subfolder per code")
    p.add_argument("--resume", action="store_true", help="keep the rows of --out and skip those done")
    p.add_argument("--summarize", action="store_true", help="only print the table and draw the plot from --out")
    p.add_argument("--dry-run", action="store_true", help="print the cases and commands; run nothing")
    args = p.parse_args(argv)
    new = args.new if Path(args.new).is_absolute() else str(ROOT / args.new)
    codes = {"old": (args.old, shlex.split(args.common_args)),
             "new": (new, shlex.split(args.common_args) + shlex.split(args.extra_args))}
    limit = ["--time-limit", str(args.time_limit)] if args.time_limit else []
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    if not caches or set(caches) - {"cold", "warm"}:
        p.error("--cache takes cold, warm or cold,warm")
    doc = json.loads(args.out.read_text()) if (args.resume or args.summarize) and args.out.exists() else {"rows": []}
    rows = doc["rows"]
    if args.summarize:
        show_table(summarize(rows))
        plot(rows, args.plot)
        return
    data_dir = args.data_dir or ROOT / "bench_out"
    cases = pick(all_cases(data_dir), args.cases, args.max_n)
    if not cases:
        p.error(f"no case matches {args.cases!r} (max N {args.max_n})")
    doc.update(schema="sfa-bench-time-to-error/1", clock="CLOCK_MONOTONIC",
               host={"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
               settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               codes={c: code_info(s) for c, (s, _) in codes.items()} if not args.dry_run else {},
               cases={c["name"]: c for c in cases},
               offset_methods={"probe": "fit start = first-evaluation stamp (child, CLOCK_MONOTONIC) - its history "
                                        "seconds - launch stamp (this script, same clock)",
                               "wall_minus_fit_seconds": "process wall - report seconds, all counted as start-up"})
    done = {r["key"] for r in rows if r.get("final_error") is not None}
    rows[:] = [r for r in rows if r["key"] in done]  # failed rows are run again
    plan = []
    for case in cases:
        seeds = args.anchor_seeds if case["group"] == "anchors" else args.seeds
        for cache in caches:
            for seed in range(seeds):
                order = ["old", "new"] if len(plan) % 2 == 0 else ["new", "old"]
                plan.append((case, cache, seed, order))
    histories, probe_dir = {}, Path(tempfile.mkdtemp(prefix="sfa_tte_probe_"))
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    try:
        for i, (case, cache, seed, order) in enumerate(plan, 1):
            if case["group"] == "dense" and not args.dry_run:
                rbf_matrix(case["n"], data_dir)
            for code in order:
                sfa, opts = codes[code]
                opts = [*limit, *opts]
                key = f"{case['name']}|{code}|{cache}|seed{seed}|{shlex.join(opts)}"
                if key in done:
                    continue
                if args.dry_run:
                    print(f"[{i}/{len(plan)}] {key}: {sfa} fit {case['path']} ... --seed {seed} {shlex.join(opts)}")
                    continue
                folder = warm_folder(args.warm_dir, code, sfa, case, opts, probe_dir, args.process_timeout) \
                    if cache == "warm" else Path(tempfile.mkdtemp(prefix="sfa_tte_cold_"))
                row, history = run_fit(sfa, case, seed, opts, folder, probe_dir, args.process_timeout)
                if cache == "cold":
                    shutil.rmtree(folder, ignore_errors=True)
                row = {"key": key, "case": case["name"], "n": case["n"], "group": case["group"], "code": code,
                       "cache": cache, "seed": seed, "position": order.index(code), "options": opts,
                       "pair": shlex.join([*limit, *codes["old"][1]]), **row}
                rows.append(row)
                histories[key] = history
                attach_tte(rows, histories, args.rtol)
                save(args.out, doc)
                fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
                mate = next((r for r in rows if r["code"] == "new" and r["case"] == case["name"] and r["cache"] == cache
                             and r["seed"] == seed and r.get("pair") == row["pair"]), {})
                print(f"[{i}/{len(plan)}] {case['name']} {cache} {code} seed {seed}: rc {row['returncode']}, "
                      f"wall {row['wall_s']:.2f} s, fit start {fmt(row.get('fit_start_s'))} s, "
                      f"error {fmt(row.get('final_error'))}, new to old error {fmt(mate.get('time_to_old_error_s'))} s",
                      flush=True)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if not args.dry_run:
        doc["summary"] = summarize(rows)
        save(args.out, doc)
        show_table(doc["summary"])
        plot(rows, args.plot)
        print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
