"""`sfa fit`, `sfa eval`, `sfa apply`, `sfa reconstruct` through the command line."""
import json
import os
import signal
import subprocess
import sys
import time
from functools import reduce
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp

from sfa_cli.approximations.base import load_approximation

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"path", "n", "factors", "params", "compression", "rel_error", "iterations", "evaluations", "seconds",
                "device", "dtype", "stopped_because", "tsvd_rel_error"}


@pytest.fixture
def graph_mtx(tmp_path):
    rng = np.random.default_rng(0)
    U = np.triu(rng.random((48, 48)) < 4 / 47, 1)
    A = sp.csr_matrix((U | U.T).astype(float))
    path = tmp_path / "graph.mtx"
    sio.mmwrite(path, A, symmetry="symmetric")
    return path, A.toarray()


def _fit_json(run_cli, *args):
    result = run_cli("fit", *args, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("ext", ["npz", "h5"])
def test_fit_writes_factors_that_scipy_alone_rebuilds(run_cli, graph_mtx, tmp_path, ext):
    path, A = graph_mtx
    out = tmp_path / f"F.{ext}"
    summary = _fit_json(run_cli, path, "-o", out, "--max-iter", "150")
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["n"] == 48 and summary["factors"] == 6 and summary["params"] == 6 * 48 * 6
    assert summary["rel_error"] < summary["tsvd_rel_error"]  # the paper's claim on a sparse graph
    if ext == "npz":
        z = np.load(out, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        Ws = [sp.csr_matrix((z[f"factor{m}.data"], z[f"factor{m}.indices"], z[f"factor{m}.indptr"]), shape=(48, 48))
              for m in range(meta["factors"])]
    else:
        import h5py

        with h5py.File(out) as f:
            meta = json.loads(f.attrs["meta"])
            Ws = [sp.csr_matrix((f[f"factors/{m}/data"][()], f[f"factors/{m}/indices"][()], f[f"factors/{m}/indptr"][()]),
                                shape=(48, 48)) for m in range(meta["factors"])]
    P = reduce(lambda a, b: a @ b, Ws).toarray()
    assert np.linalg.norm(A - P) / np.linalg.norm(A) == pytest.approx(summary["rel_error"], rel=1e-5)
    assert meta["rel_error"] == pytest.approx(summary["rel_error"]) and meta["input"] == str(path)
    assert meta["pattern"]["name"] == "chord" and meta["sfa_version"]


def test_report_history_and_options(run_cli, graph_mtx, tmp_path):
    path, _ = graph_mtx
    report = tmp_path / "fit.json"
    summary = _fit_json(run_cli, path, "-o", tmp_path / "F.npz", "--report", report, "--max-iter", "20", "--base", "3",
                        "--symmetric", "--permute", "4", "--dtype", "float64", "--no-baseline", "--optimizer", "adam")
    assert "tsvd_rel_error" not in summary and summary["dtype"] == "float64" and summary["optimizer"] == "adam"
    assert summary["pattern"] == {"name": "chord", "base": 3, "symmetric": True, "self_link": True, "permute": 4}
    rep = json.loads(report.read_text())
    assert rep["history"] and set(rep["history"][0]) == {"iteration", "evaluations", "seconds", "rel_error"}
    assert rep["iterations"] == 20 and rep["stopped_because"] == "max_iter"


def test_existing_output_needs_force(run_cli, cli_error, graph_mtx, tmp_path):
    path, _ = graph_mtx
    out = tmp_path / "F.npz"
    out.write_bytes(b"precious")
    line = cli_error("fit", path, "-o", out, "--max-iter", "2")
    assert str(out) in line and "--force" in line
    assert out.read_bytes() == b"precious"
    assert run_cli("fit", path, "-o", out, "--max-iter", "2", "--force", "-q").exit_code == 0
    assert load_approximation(out).n == 48


def test_fit_bad_input_and_usage_errors(run_cli, cli_error, tmp_path):
    bad = tmp_path / "rect.npy"
    np.save(bad, np.ones((3, 4)))
    line = cli_error("fit", bad, "-o", tmp_path / "F.npz")
    assert str(bad) in line and "3 x 4" in line
    assert not (tmp_path / "F.npz").exists()
    ok = tmp_path / "ok.npy"
    np.save(ok, np.eye(12) + 1)
    assert run_cli("fit", ok, "-o", tmp_path / "F.npz", "--device", "gpu").exit_code == 2
    assert run_cli("fit", ok, "-o", tmp_path / "F.npz", "--max-iter", "0").exit_code == 2
    assert "power of two" in cli_error("fit", ok, "-o", tmp_path / "F.npz", "--pattern", "butterfly")


def test_eval_apply_reconstruct(run_cli, cli_error, graph_mtx, tmp_path):
    path, A = graph_mtx
    F = tmp_path / "F.npz"
    summary = _fit_json(run_cli, path, "-o", F, "--max-iter", "30", "--no-baseline")
    result = run_cli("eval", F, path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rel_error"] == pytest.approx(summary["rel_error"], rel=1e-9)

    dense = tmp_path / "dense.npz"
    assert run_cli("reconstruct", F, "-o", dense).exit_code == 0
    P = np.load(dense)["A"]
    assert np.linalg.norm(A - P) / np.linalg.norm(A) == pytest.approx(summary["rel_error"], rel=1e-5)

    X = np.random.default_rng(0).standard_normal((48, 3))
    np.save(tmp_path / "X.npy", X)
    assert run_cli("apply", F, tmp_path / "X.npy", "-o", tmp_path / "Y.npy").exit_code == 0
    assert np.allclose(np.load(tmp_path / "Y.npy"), P @ X, atol=1e-5)
    assert run_cli("apply", F, tmp_path / "X.npy", "-o", tmp_path / "YT.npy", "--transpose").exit_code == 0
    assert np.allclose(np.load(tmp_path / "YT.npy"), P.T @ X, atol=1e-5)
    np.save(tmp_path / "x.npy", X[:, 0])
    assert run_cli("apply", F, tmp_path / "x.npy", "-o", tmp_path / "y.npy").exit_code == 0
    assert np.load(tmp_path / "y.npy").shape == (48,)

    np.save(tmp_path / "wrong.npy", np.ones(5))
    line = cli_error("apply", F, tmp_path / "wrong.npy", "-o", tmp_path / "z.npy")
    assert "wrong.npy: X has shape (5,)" in line and "X needs 48 rows" in line
    assert "limit" in cli_error("reconstruct", F, "-o", tmp_path / "d2.npz", "--max-n", "10")
    other = tmp_path / "other.npy"
    np.save(other, np.eye(10) + 1)
    assert "48 x 48" in cli_error("eval", F, other)


def test_sigint_writes_best_factors_and_exits_130(tmp_path):
    n = 256
    rng = np.random.default_rng(1)
    np.save(tmp_path / "A.npy", rng.standard_normal((n, n)))
    out, report = tmp_path / "F.npz", tmp_path / "fit.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfa_cli", "fit", str(tmp_path / "A.npy"), "-o", str(out), "--report", str(report),
         "--max-iter", "100000", "--tol", "0", "--patience", "0", "--no-baseline", "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    started = proc.stderr.readline()  # the "fitting ..." line comes right before the fit starts
    assert started.startswith("fitting"), started
    time.sleep(2)  # a few iterations
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    F = load_approximation(out)
    assert F.n == n and F.info["stopped_because"] == "interrupted"
    summary = json.loads(stdout)
    assert summary["stopped_because"] == "interrupted" and summary["interrupted"] is True
    assert json.loads(report.read_text())["interrupted"] is True
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_sampled_fit_through_the_cli(run_cli, tmp_path):
    from sfa_cli.synthetic import grid_laplacian

    path = tmp_path / "grid.mtx"
    sio.mmwrite(path, grid_laplacian(12))  # n = 144
    out = tmp_path / "F.npz"
    result = run_cli("fit", path, "-o", out, "--sampled", "--epochs", "3", "--batch-columns", "48", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sampled"] is True and summary["epochs"] == 3 and summary["batch_columns"] == 48
    low, high = summary["rel_error_ci"]
    assert low <= summary["rel_error_estimate"] <= high and summary["rel_error"] == summary["rel_error_estimate"]
    assert summary["tsvd_rel_error"] > 0 and "tsvd_rel_error_ci" in summary
    F = load_approximation(out)
    assert F.n == 144 and F.info["rel_error"] == summary["rel_error"]
    exact = run_cli("fit", path, "-o", tmp_path / "G.npz", "--sampled", "--epochs", "1", "--exact-error", "--json", "-q")
    assert exact.exit_code == 0, exact.output
    s = json.loads(exact.stdout)
    G = load_approximation(tmp_path / "G.npz")
    A = grid_laplacian(12).toarray()
    assert s["rel_error_is_estimate"] is False
    assert np.linalg.norm(A - G.to_dense()) / np.linalg.norm(A) == pytest.approx(s["rel_error"], rel=1e-4)


# -- sfa fit --method: every method of sfa compare ------------------------------------------------
@pytest.fixture
def kernel_mtx(tmp_path):
    """A dense 40 x 40 RBF kernel as a Matrix Market file (not sparse: no method is exact on it)."""
    X = np.random.default_rng(3).random((40, 2))
    A = np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / (2 * 0.15**2))
    path = tmp_path / "kernel.mtx"
    sio.mmwrite(path, A)
    return path, A


def test_fit_method_sparse_writes_a_file_that_eval_apply_reconstruct_read(run_cli, kernel_mtx, tmp_path):
    path, A = kernel_mtx
    out, report = tmp_path / "S.npz", tmp_path / "fit.json"
    summary = _fit_json(run_cli, path, "-o", out, "--method", "sparse", "--budget", "0.1", "--report", report)
    assert {"path", "output", "method", "n", "factors", "budget", "params", "compression", "rel_error", "seconds",
            "dtype", "pattern", "note", "tsvd_rank", "tsvd_rel_error", "peak_memory_bytes"} <= summary.keys()
    assert summary["peak_memory_bytes"] > 2**20
    assert summary["method"] == "sparse" and summary["n"] == 40 and summary["budget"] == 160
    assert summary["params"] <= 160 and summary["factors"] == 2 and summary["pattern"]["name"] == "learned"
    assert summary["pattern"]["order"] == "joint"
    assert 0 < summary["rel_error"] < summary["tsvd_rel_error"]
    F = load_approximation(out)
    assert F.method == "sparse" and F.info["rel_error"] == summary["rel_error"] and F.info["input"] == str(path)
    result = run_cli("eval", out, path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rel_error"] == pytest.approx(summary["rel_error"], abs=1e-5)
    assert run_cli("reconstruct", out, "-o", tmp_path / "dense.npy").exit_code == 0
    P = np.load(tmp_path / "dense.npy")
    assert np.linalg.norm(A - P) / np.linalg.norm(A) == pytest.approx(summary["rel_error"], abs=1e-5)
    X = np.random.default_rng(0).standard_normal((40, 2))
    np.save(tmp_path / "X.npy", X)
    assert run_cli("apply", out, tmp_path / "X.npy", "-o", tmp_path / "Y.npy").exit_code == 0
    assert np.allclose(np.load(tmp_path / "Y.npy"), P @ X, atol=1e-4)
    rep = json.loads(report.read_text())
    assert rep["rel_error"] == summary["rel_error"] and rep["details"]["rounds"] >= 1 and "history" not in rep


@pytest.mark.parametrize("method", ["tsvd", "rsvd", "topk", "monarch", "lowrank+sparse", "chord+sparse"])
def test_fit_method_baselines_round_trip_through_eval(run_cli, kernel_mtx, tmp_path, method):
    path, _ = kernel_mtx
    out = tmp_path / "F.h5"
    extra = ("--max-iter", "20") if method == "chord+sparse" else ()
    summary = _fit_json(run_cli, path, "-o", out, "--method", method, "--budget", "600", *extra)
    assert summary["method"] == method and summary["budget"] == 600 and summary["params"] <= 600
    assert ("tsvd_rel_error" in summary) == (method != "tsvd")
    assert load_approximation(out).method == method
    result = run_cli("eval", out, path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rel_error"] == pytest.approx(summary["rel_error"], abs=1e-5)


def test_fit_method_table_and_default_budget(run_cli, kernel_mtx, tmp_path):
    path, _ = kernel_mtx
    result = run_cli("fit", path, "-o", tmp_path / "T.npz", "--method", "tsvd", "--no-baseline")
    assert result.exit_code == 0, result.output
    assert "method" in result.stdout and "tsvd" in result.stdout and "budget" in result.stdout
    summary = _fit_json(run_cli, path, "-o", tmp_path / "T2.npz", "--method", "topk", "--no-baseline")
    assert summary["budget"] == 6 * 40 * 6 and "tsvd_rel_error" not in summary  # the Chord budget M N (L+1)


def test_fit_method_not_applicable_is_one_error_line(cli_error, kernel_mtx, tmp_path):
    path, _ = kernel_mtx
    line = cli_error("fit", path, "-o", tmp_path / "B.npz", "--method", "butterfly")
    assert str(path) in line and "butterfly" in line and "power of two" in line
    assert not (tmp_path / "B.npz").exists()
    line = cli_error("fit", path, "-o", tmp_path / "B.npz", "--method", "sparse", "--budget", "1")
    assert str(path) in line and "does not apply" in line



@pytest.mark.parametrize("command", ["fit", "compare"])
@pytest.mark.parametrize("budget", ["-3", "0", "nan", "1.5"])
def test_impossible_budgets_are_usage_errors(run_cli, kernel_mtx, tmp_path, command, budget):
    path, _ = kernel_mtx
    extra = ["-o", tmp_path / "B.npz", "--method", "topk"] if command == "fit" else []
    result = run_cli(command, path, *extra, "--budget", budget)
    assert result.exit_code == 2, result.output
    assert "--budget" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "B.npz").exists()


@pytest.mark.parametrize("args, message", [
    (("--method", "sparse", "--pattern", "butterfly"), "--pattern does not apply to --method sparse"),
    (("--method", "tsvd", "--sampled"), "--sampled does not apply to --method tsvd"),
    (("--method", "topk", "--max-iter", "5"), "--max-iter does not apply to --method topk"),
    (("--method", "butterfly", "--symmetric"), "--symmetric does not apply"),
    (("--method", "sparse", "--optimizer", "adam"), "--optimizer does not apply"),
    (("--order", "hierarchical"), "--order applies to --method sparse"),
    (("--budget", "0.1", "--factors", "3"), "give --budget or --factors/--base"),
    (("--budget", "0.1", "--pattern", "butterfly"), "--method butterfly"),
    (("--budget", "lots",), "expected a parameter count"),
    (("--method", "svd",), "Invalid value for '--method'"),
])
def test_fit_method_usage_errors(run_cli, kernel_mtx, tmp_path, args, message):
    path, _ = kernel_mtx
    result = run_cli("fit", path, "-o", tmp_path / "F.npz", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "F.npz").exists()


def test_fit_chord_at_a_budget(run_cli, kernel_mtx, tmp_path):
    path, _ = kernel_mtx
    summary = _fit_json(run_cli, path, "-o", tmp_path / "F.npz", "--budget", "0.2", "--max-iter", "20")
    assert summary["budget"] == 320 and summary["params"] <= 320
    assert summary["pattern"]["name"] == "chord" and summary["note"] and summary["method"] == "chord"
    full = _fit_json(run_cli, path, "-o", tmp_path / "G.npz", "--method", "chord", "--budget", "5000", "--max-iter", "5")
    assert full["budget"] == 5000 and full["factors"] == 6 and "note" not in full  # the paper's pattern fits


def test_fit_method_sparse_hierarchical_order(run_cli, tmp_path):
    rng = np.random.default_rng(0)  # rank 2: three learned factors beat the largest entries (the kernel's do not)
    path = tmp_path / "lowrank.mtx"
    sio.mmwrite(path, rng.standard_normal((40, 2)) @ rng.standard_normal((2, 40)))
    out = tmp_path / "H.npz"
    summary = _fit_json(run_cli, path, "-o", out, "--method", "sparse", "--budget", "0.15", "--factors", "3",
                        "--order", "hierarchical", "--no-baseline")
    assert summary["factors"] == 3 and summary["pattern"]["order"] == "hierarchical" and summary["params"] <= 240
    result = run_cli("eval", out, path, "--json")
    assert json.loads(result.stdout)["rel_error"] == pytest.approx(summary["rel_error"], abs=1e-5)
    result = run_cli("compare", path, "--methods", "sparse,topk", "--budget", "0.15", "--order", "hierarchical", "--json")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in json.loads(result.stdout)["results"]] == ["ok", "ok"]
