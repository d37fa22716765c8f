"""The fitting engine through the library API."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sfa_cli.errors import SfaError
from sfa_cli.engine.fit import DEFAULTS, default_max_iter, fit
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

    from sfa_cli.engine.options import OptimizerSpec, Placement, StopRules

    sig = inspect.signature(fit)
    # the loose keywords default to None: "the typed option's default", pinned here and in the docstring
    assert all(sig.parameters[k].default is None for k in ("max_iter", "tol", "window", "seed", "device", "dtype"))
    assert default_max_iter(64) == 5000
    assert default_max_iter(1024) == 1250 and default_max_iter(4096) == 312 and default_max_iter(10**6) == 300
    assert StopRules().tol == DEFAULTS["tol"] == 1e-5 and StopRules().window == DEFAULTS["window"] == 50
    assert Placement() == Placement(device="auto", dtype="float32", seed=0)
    assert OptimizerSpec().optimizer == sig.parameters["optimizer"].default == "lbfgs"
    assert "tol 1e-5 over a window of 50" in fit.__doc__


def test_typed_options_and_loose_keywords_give_the_same_fit():
    from sfa_cli.engine.options import OptimizerSpec, PatternSpec, Placement, StopRules

    A = _graph(32)
    loose = fit(A, factors=3, max_iter=15, tol=0, optimizer="adam", lr=0.02, seed=2, device="cpu", dtype="float64")
    typed = fit(A, pattern=PatternSpec("chord", factors=3), stop=StopRules(max_iter=15, tol=0),
                optimizer=OptimizerSpec("adam", lr=0.02), placement=Placement("cpu", "float64", 2))
    assert typed.rel_error == loose.rel_error and typed.iterations == loose.iterations == 15
    assert typed.approximation.num_factors == 3 and typed.dtype == "float64"
    with pytest.raises(SfaError, match="not both"):
        fit(A, stop=StopRules(max_iter=5), max_iter=6)
    with pytest.raises(SfaError, match="StopRules"):
        fit(A, stop={"max_iter": 5})


@pytest.mark.parametrize("bad, message", [
    (np.full((8, 8), np.nan), "NaN"),
    (np.ones((8, 6)), "8 x 6; sfa needs a square matrix"),
    (np.ones((8, 8)) + 1j, "complex"),
    (np.zeros((0, 0)), "empty"),
])
def test_fit_validates_the_matrix_on_entry(bad, message):
    with pytest.raises(SfaError, match=message) as info:
        fit(bad, max_iter=2)
    assert str(info.value).startswith("A: ")


def test_time_limit_is_honoured_within_an_evaluation(monkeypatch):
    """A slow evaluation stops at the next column block once the limit has passed."""
    import sfa_cli.engine.objective as objective

    A = _graph(64)
    real = objective.BlockObjective._residual
    pause = {"s": 0.0}

    def slow(self, values, cols, work):  # every block takes 20 ms from the second evaluation on
        import time

        time.sleep(pause["s"])
        return real(self, values, cols, work)

    monkeypatch.setattr(objective.BlockObjective, "_residual", slow)
    monkeypatch.setattr(objective, "block_columns", lambda n: 4)  # 16 blocks: 0.32 s per slow evaluation
    monkeypatch.setattr("sfa_cli.engine.fit.DENSE_CHAIN_MAX_N", 0)  # the column-block objective at n = 64

    def after_first(step):
        pause["s"] = 0.02

    r = fit(A, max_iter=100, time_limit=0.1, tol=0, device="cpu", callback=after_first)
    assert r.stopped_because == "time_limit_before_first_step"  # the second evaluation was abandoned
    assert r.seconds < 0.1 + 0.1  # at most a few blocks past the limit, not a whole 0.32 s evaluation


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    A = _graph(64)
    cpu = fit(A, max_iter=20, device="cpu", dtype="float64")
    gpu = fit(A, max_iter=20, device="cuda", dtype="float64")
    assert gpu.device.startswith("cuda")
    assert gpu.rel_error == pytest.approx(cpu.rel_error, rel=1e-6)


def test_runaway_line_search_restarts_from_the_best_point(monkeypatch):
    import sfa_cli.engine.optimize as optimize

    A = _graph(32)
    normal = fit(A, max_iter=5, device="cpu")
    assert normal.initial_rel_error > 1.0  # the paper's start overshoots this matrix
    monkeypatch.setattr(optimize, "RUNAWAY", 1.0)  # every evaluation above 1.0 counts as a runaway
    r = fit(A, max_iter=50, device="cpu")
    assert r.stopped_because == "diverged"
    assert r.evaluations == optimize.MAX_RESTARTS + 1
    assert r.rel_error == pytest.approx(normal.initial_rel_error)  # the best (= start) point is returned


def test_auto_device_stays_on_cpu_for_small_n(monkeypatch):
    from sfa_cli.approximations.kernels import AUTO_CUDA_MIN_N, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", AUTO_CUDA_MIN_N - 1).type == "cpu"
    assert resolve_device("auto", AUTO_CUDA_MIN_N).type == "cuda"
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu", 10**6).type == "cpu"
