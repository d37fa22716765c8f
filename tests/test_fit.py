"""The fitting engine through the library API."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sfa_cli.errors import SfaError
from sfa_cli.fit import DEFAULTS, default_max_iter, fit
from sfa_cli.metrics import relative_error


def _graph(n, degree=4.0, seed=0):
    rng = np.random.default_rng(seed)
    U = np.triu(rng.random((n, n)) < degree / (n - 1), 1)
    return (U | U.T).astype(np.float64)


def _tsvd_error(A, rank):
    s = np.linalg.svd(A, compute_uv=False)
    return np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2))


def test_fit_beats_equal_budget_tsvd_on_sparse_graph():
    A = _graph(128)
    r = fit(A, max_iter=300, seed=0, device="cpu")
    rank = r.approximation.params // (2 * 128)
    assert r.rel_error < _tsvd_error(A, rank)
    assert r.rel_error < r.initial_rel_error
    # the reported error is the error of the returned factors, scale included
    assert relative_error(A, r.approximation) == pytest.approx(r.rel_error, rel=1e-3)


def test_history_and_stopping_rules():
    A = np.random.default_rng(1).standard_normal((20, 20))
    r = fit(A, max_iter=15, device="cpu")
    assert r.stopped_because == "max_iter" and r.iterations == 15
    assert [h["evaluations"] for h in r.history] == list(range(1, r.evaluations + 1))
    assert min(h["rel_error"] for h in r.history) == pytest.approx(r.rel_error)
    seen = []
    r = fit(A, max_iter=500, device="cpu", callback=lambda step: seen.append(step) or step.evaluations >= 7)
    assert r.stopped_because == "callback" and r.evaluations == 7 and len(seen) == 7
    r = fit(A, max_iter=10_000, tol=0.5, window=3, device="cpu")
    assert r.stopped_because == "tol" and r.iterations < 50
    r = fit(A, max_iter=100_000, tol=0, time_limit=0.3, device="cpu")
    assert r.stopped_because == "time_limit" and r.seconds < 3


def test_adam_and_float64():
    A = _graph(32)
    r = fit(A, optimizer="adam", lr=0.02, max_iter=200, device="cpu", dtype="float64")
    assert r.rel_error < r.initial_rel_error and r.dtype == "float64"
    assert r.approximation.dtype == np.float64


def test_same_seed_same_factors_bitwise():
    A = _graph(40, seed=3)
    a = fit(A, max_iter=30, seed=5, device="cpu")
    b = fit(A, max_iter=30, seed=5, device="cpu")
    c = fit(A, max_iter=30, seed=6, device="cpu")
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.approximation.factors, b.approximation.factors))
    assert not all(np.array_equal(x.data, y.data) for x, y in zip(a.approximation.factors, c.approximation.factors))


def test_sparse_input_and_pattern_options():
    A = sp.random(50, 50, density=0.05, random_state=0, format="csr") + sp.eye(50)
    r = fit(A, max_iter=40, base=3, symmetric=True, permute=1, device="cpu")
    assert r.approximation.pattern == {"name": "chord", "base": 3, "symmetric": True, "self_link": True, "permute": 1}
    assert relative_error(A, r.approximation) == pytest.approx(r.rel_error, rel=1e-3)
    r = fit(np.eye(16) + _graph(16), pattern="butterfly", max_iter=40, device="cpu")
    assert r.approximation.num_factors == 4 and r.approximation.params == 4 * 16 * 2


def test_warm_start_continues():
    A = _graph(48, seed=2)
    first = fit(A, max_iter=40, device="cpu", dtype="float64")
    again = fit(A, max_iter=1, init=first.approximation, device="cpu", dtype="float64")
    assert again.initial_rel_error == pytest.approx(first.rel_error, rel=1e-6)


def test_bad_options():
    A = np.eye(8) + 1
    with pytest.raises(SfaError, match="optimizer"):
        fit(A, optimizer="sgd")
    with pytest.raises(SfaError, match="device"):
        fit(A, device="gpu")
    with pytest.raises(SfaError, match="all zeros"):
        fit(np.zeros((8, 8)))
    with pytest.raises(SfaError, match="power of two"):
        fit(np.eye(12), pattern="butterfly")


def test_documented_defaults():
    import inspect

    sig = inspect.signature(fit)
    assert sig.parameters["max_iter"].default is None and default_max_iter(64) == 5000
    assert default_max_iter(1024) == 1250 and default_max_iter(4096) == 312 and default_max_iter(10**6) == 300
    assert sig.parameters["tol"].default == DEFAULTS["tol"]
    assert sig.parameters["dtype"].default == "float32" and sig.parameters["device"].default == "auto"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    A = _graph(64)
    cpu = fit(A, max_iter=20, device="cpu", dtype="float64")
    gpu = fit(A, max_iter=20, device="cuda", dtype="float64")
    assert gpu.device.startswith("cuda")
    assert gpu.rel_error == pytest.approx(cpu.rel_error, rel=1e-6)


def test_runaway_line_search_restarts_from_the_best_point(monkeypatch):
    import sfa_cli.fit as fit_module

    A = _graph(32)
    normal = fit(A, max_iter=5, device="cpu")
    assert normal.initial_rel_error > 1.0  # the paper's start overshoots this matrix
    monkeypatch.setattr(fit_module, "RUNAWAY", 1.0)  # every evaluation above 1.0 counts as a runaway
    r = fit(A, max_iter=50, device="cpu")
    assert r.stopped_because == "diverged"
    assert r.evaluations == fit_module.MAX_RESTARTS + 1
    assert r.rel_error == pytest.approx(normal.initial_rel_error)  # the best (= start) point is returned


def test_auto_device_stays_on_cpu_for_small_n(monkeypatch):
    from sfa_cli.kernels import AUTO_CUDA_MIN_N, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", AUTO_CUDA_MIN_N - 1).type == "cpu"
    assert resolve_device("auto", AUTO_CUDA_MIN_N).type == "cuda"
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu", 10**6).type == "cpu"
