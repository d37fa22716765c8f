"""The lifted start (sfa_cli.engine.lifted): exact recovery of shallow products, its limits and its errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from sfa_cli.approximations.base import load_approximation
from sfa_cli.errors import SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.engine.fit import fit
from sfa_cli.engine.gauss_newton import chord_factors, chord_product
from sfa_cli.engine.lifted import CHECK_EVERY, MAX_PATHS, lifted_start, path_count
from sfa_cli.metrics import relative_error
from sfa_cli.approximations.patterns import Pattern, butterfly_pattern, chord_pattern

ROOT = Path(__file__).resolve().parent.parent


def _target(pat, vals):
    A = torch.as_tensor(SparseFactors.from_pattern(pat, vals).to_dense())
    return A / torch.linalg.vector_norm(A)


@pytest.mark.parametrize("n, factors, kind", [(64, 2, "signed"), (64, 2, "positive"), (64, 3, "signed")])
def test_shallow_chord_products_are_recovered_exactly(n, factors, kind):
    pat, vals = chord_factors(n, factors=factors, kind=kind, seed=1)
    A = _target(pat, vals)
    values, info = lifted_start(A, pat, sweeps=5000, tol=1e-7)
    assert info["rel_error"] < 1e-6 and info["stopped_because"] == "tol", info  # gradient fits: 0.02-0.15
    assert info["paths"] == path_count(pat) == n * pat.nnz_per_row ** factors
    # the reported error is the returned factors' product's, in CSR order
    P = SparseFactors.from_pattern(pat, [v.numpy() for v in values]).to_dense()
    assert np.linalg.norm(A.numpy() - P) == pytest.approx(info["rel_error"], rel=1e-3, abs=1e-12)


def test_a_butterfly_product_is_recovered():
    pat = butterfly_pattern(16)
    rng = np.random.default_rng(0)
    vals = [rng.standard_normal(t.size) for t in pat.tables]
    values, info = lifted_start(_target(pat, vals), pat, sweeps=3000)
    assert info["rel_error"] < 1e-8, info


def test_a_matrix_that_is_no_product_gets_a_finite_best_effort():
    pat = chord_pattern(32, factors=2)
    A = torch.as_tensor(np.random.default_rng(0).standard_normal((32, 32)))
    values, info = lifted_start(A, pat, sweeps=300)
    assert info["stopped_because"] in ("sweeps", "stalled")
    assert 0 < info["rel_error"] < 1 and all(bool(torch.isfinite(v).all()) for v in values)


def test_sweeps_time_limit_and_refusals():
    pat, vals = chord_factors(64, factors=3, seed=0)
    A = _target(pat, vals)
    _, info = lifted_start(A, pat, sweeps=3)
    assert info["sweeps"] == 3 and info["stopped_because"] == "sweeps"
    _, info = lifted_start(A, pat, time_limit=1e-6)  # the clock is read at each check
    assert info["sweeps"] == CHECK_EVERY and info["stopped_because"] == "time_limit"
    with pytest.raises(SfaError, match="one unknown per path"):
        lifted_start(A, pat, max_paths=1000)
    full = chord_pattern(1024)  # 1024 x 11^10 paths
    assert path_count(full) > MAX_PATHS
    with pytest.raises(SfaError, match="fewer factors"):
        lifted_start(torch.eye(1024, dtype=torch.float64), full)
    uneven = Pattern("learned", 4, (np.array([[0, 1], [0, 1], [0, 2], [0, 3]]), np.array([[0, 1], [1, 2], [2, 3], [3, 0]])))
    with pytest.raises(SfaError, match="as many paths"):
        lifted_start(torch.eye(4, dtype=torch.float64), uneven)
    with pytest.raises(SfaError, match="all zeros"):
        lifted_start(torch.zeros(64, 64, dtype=torch.float64), pat)


def test_fit_start_lifted_through_the_api():
    A = chord_product(64, factors=2, seed=1)
    r = fit(A, factors=2, start="lifted", optimizer="lm", device="cpu", time_limit=30)
    assert r.start == "lifted" and r.initial_rel_error < 1e-6
    assert relative_error(A, r.approximation) == pytest.approx(r.rel_error, rel=1e-3, abs=1e-7)
    assert r.rel_error < 1e-6


def test_the_fit_callback_sees_the_sweeps_and_can_stop_them():
    A = chord_product(64, factors=3, seed=1)
    seen = []
    r = fit(A, factors=3, start="lifted", device="cpu", callback=lambda step: seen.append(step) or len(seen) == 2)
    assert seen[0].iteration == 0 and 0 < seen[0].rel_error < 1 and seen[1].seconds >= seen[0].seconds
    assert r.stopped_because == "callback" and r.start == "lifted" and r.iterations <= 1
    assert relative_error(A, r.approximation) == pytest.approx(r.rel_error, rel=1e-3)


def test_fit_start_lifted_through_the_cli(run_cli, cli_error, tmp_path):
    path = tmp_path / "chord2.mtx"
    A = chord_product(64, factors=2, seed=2)
    scipy.io.mmwrite(path, A)
    result = run_cli("fit", path, "-o", tmp_path / "F.npz", "--factors", "2", "--start", "lifted", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["start"] == "lifted" and summary["rel_error"] < 1e-5
    result = run_cli("eval", tmp_path / "F.npz", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rel_error"] < 1e-5
    line = cli_error("fit", path, "-o", tmp_path / "G.npz", "--start", "lifted")  # six factors: 64 x 7^6 paths
    assert "fewer factors" in line and not (tmp_path / "G.npz").exists()
    usage = run_cli("fit", path, "-o", tmp_path / "G.npz", "--sampled", "--start", "lifted", "--factors", "2")
    assert usage.exit_code == 2 and "--sampled takes identity or paper" in usage.stderr


def test_sigint_in_the_lifted_start_keeps_its_factors_and_exits_130(tmp_path):
    # three factors at N = 256: the sweeps converge in about 2,500 (some 20 s), so Ctrl-C lands in them
    np.save(tmp_path / "A.npy", chord_product(256, factors=3, seed=1))
    out = tmp_path / "F.npz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfa_cli", "fit", str(tmp_path / "A.npy"), "-o", str(out), "--factors", "3",
         "--start", "lifted", "--no-baseline", "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    started = proc.stderr.readline()  # printed 2 s into the run (the start gives no evaluation before)
    assert started.startswith("fitting"), started
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout)
    assert summary["stopped_because"] == "interrupted" and summary["start"] == "lifted"
    assert summary["iterations"] <= 1 and 0 < summary["rel_error"] < 1
    assert load_approximation(out).info["stopped_because"] == "interrupted"
