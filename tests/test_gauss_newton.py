"""Levenberg-Marquardt for fixed patterns (sfa_cli.engine.gauss_newton): products, steps, rules, starts."""
import math
import time

import numpy as np
import pytest
import torch

from sfa_cli.errors import SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors, pattern_structures
from sfa_cli.engine.gauss_newton import ChainLeastSquares, chord_factors, chord_product, fit_lm, lm_fit, start_values
from sfa_cli.metrics import relative_error
from sfa_cli.approximations.patterns import butterfly_pattern, chord_pattern


def _dense_chain(structs, values, n):
    P = torch.eye(n, dtype=torch.float64)
    for s, v in zip(structs, values):
        P = P @ torch.zeros(n, n, dtype=torch.float64).index_put((s.rows, s.col), v)
    return P


@pytest.mark.parametrize("pattern, blocks, cache", [(chord_pattern(8), None, True),
                                                    (chord_pattern(8), [slice(0, 3), slice(3, 8)], False),
                                                    (butterfly_pattern(8), [slice(0, 5), slice(5, 8)], True)])
def test_products_match_autograd_through_dense_factors(pattern, blocks, cache):
    n = 8
    structs, _ = pattern_structures(pattern)
    gen = torch.Generator().manual_seed(0)
    T = torch.randn(n, n, generator=gen, dtype=torch.float64)
    values = [torch.randn(s.nnz, generator=gen, dtype=torch.float64) for s in structs]
    direction = [torch.randn(s.nnz, generator=gen, dtype=torch.float64) for s in structs]
    problem = ChainLeastSquares(structs, T, blocks=blocks, cache_bytes=1 << 30 if cache else 0)
    assert problem.cache is cache
    lin = problem.linearize(values)

    leaves = [v.clone().requires_grad_(True) for v in values]
    loss = 0.5 * ((_dense_chain(structs, leaves, n) - T) ** 2).sum()
    loss.backward()
    assert lin.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    assert problem.loss(values) == pytest.approx(float(loss.detach()), rel=1e-12)
    for g, leaf in zip(lin.grad, leaves):
        torch.testing.assert_close(g, leaf.grad, rtol=1e-10, atol=1e-12)

    _, jv = torch.func.jvp(lambda *v: _dense_chain(structs, v, n), tuple(values), tuple(direction))
    torch.testing.assert_close(lin.jvp(direction), jv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lin.jvp(direction, slice(2, 5)), jv[:, 2:5], rtol=1e-10, atol=1e-12)

    J = torch.cat(torch.autograd.functional.jacobian(lambda *v: _dense_chain(structs, v, n).reshape(-1),
                                                     tuple(values)), dim=1)
    JtJv = J.T @ (J @ torch.cat(direction))
    torch.testing.assert_close(torch.cat(lin.gauss_newton_product(direction)), JtJv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat(lin.gauss_newton_diagonal()), (J**2).sum(0), rtol=1e-10, atol=1e-12)


def test_a_linear_problem_is_solved_in_a_few_steps():
    # one factor: the residual is linear in the values and a Gauss-Newton step is exact
    A = chord_product(16, factors=1, seed=3)
    r = fit_lm(A, factors=1, max_iter=20, device="cpu")
    assert r.stopped_because == "exact" and r.iterations <= 4
    assert relative_error(A, r.approximation) < 1e-7


def test_noisy_product_is_fitted_to_the_noise_level():
    n, noise = 16, 0.01
    A = chord_product(n, kind="positive", noise=noise, seed=1)
    r = fit_lm(A, max_iter=80, tol=0, device="cpu")
    level = noise / math.sqrt(1 + noise**2)  # ||E|| / ||P + E|| with E orthogonal to P on average
    assert r.rel_error <= 1.05 * level
    # the reported error is the returned factors' (the scale of A spread over them)
    assert relative_error(A, r.approximation) == pytest.approx(r.rel_error, rel=1e-6)
    assert r.optimizer == "lm" and r.approximation.num_factors == 4


def test_loss_never_increases_across_accepted_steps():
    A = chord_product(16, kind="signed", seed=2)
    r = fit_lm(A, max_iter=40, tol=0, device="cpu", start="random", seed=1)
    accepted = [r.history[0]["rel_error"]] + [h["rel_error"] for h in r.history if h.get("accepted")]
    rejected = [h for h in r.history if h.get("accepted") is False]
    assert len(accepted) > 10
    assert all(b <= a for a, b in zip(accepted, accepted[1:]))
    assert r.rel_error == min(accepted)
    assert all(h["rel_error"] >= r.rel_error for h in rejected)
    assert r.rel_error < 0.1 * r.initial_rel_error


def test_no_decrease_left_stops_instead_of_overflowing_the_damping():
    # float32, never stopped by the window (tol=0): once no step lowers the loss, lambda grew by
    # nu = 2, 4, 8, ... per rejection and overflowed float32 (RuntimeError) a few dozen steps later
    A = np.random.default_rng(0).standard_normal((16, 16))
    r = fit_lm(A, factors=1, dtype="float32", tol=0, max_iter=300, device="cpu")
    assert r.stopped_because == "tol" and r.iterations < 300
    assert r.history[-1]["lambda"] > 1e16 and 0 < r.rel_error < 1


def test_time_limit_is_honoured_inside_a_step():
    A = chord_product(64, seed=0)
    t0 = time.perf_counter()
    r = fit_lm(A, time_limit=0.3, max_iter=10**6, tol=0, cg_iter=10**6, cg_tol=0.0, device="cpu")
    assert r.stopped_because == "time_limit"
    assert time.perf_counter() - t0 < 3.0  # the CG loop checks the clock between products


def test_callback_stops_and_best_values_are_returned():
    structs, _ = pattern_structures(chord_pattern(16))
    T = torch.as_tensor(chord_product(16, seed=4))
    T = T / torch.linalg.norm(T)
    seen = []
    values, history, stopped = lm_fit(structs, start_values(structs, seed=0), T, max_iter=100,
                                      callback=lambda step: seen.append(step) or step.evaluations >= 6)
    assert stopped == "callback" and len(history) == 6 == len(seen)
    best = min(h["rel_error"] for h in history)
    assert math.sqrt(2 * ChainLeastSquares(structs, T).loss(values)) == pytest.approx(best, rel=1e-9)


def test_starts_and_option_errors():
    structs, _ = pattern_structures(chord_pattern(32))
    for start in ("identity", "paper", "random"):
        x = start_values(structs, start, seed=1)
        P = _dense_chain(structs, x, 32)
        assert float(torch.linalg.norm(P)) == pytest.approx(1.0, rel=1e-9)
    x = start_values(structs, "identity", seed=1)
    P = _dense_chain(structs, x, 32)
    # near a multiple of the identity: the diagonal holds most of the mass
    assert float(torch.linalg.norm(torch.diag(P))) > 0.9
    assert not torch.equal(start_values(structs, "identity", seed=1)[0], start_values(structs, "identity", seed=2)[0])
    with pytest.raises(SfaError, match="unknown start 'spectral'"):
        start_values(structs, "spectral")
    no_self, _ = pattern_structures(chord_pattern(16, self_link=False))
    with pytest.raises(SfaError, match="self link"):
        start_values(no_self, "identity")
    with pytest.raises(SfaError, match="all zeros"):
        fit_lm(np.zeros((8, 8)), device="cpu")
    with pytest.raises(SfaError, match="damping must be one of"):
        fit_lm(np.eye(8), damping="trust", device="cpu")
    with pytest.raises(SfaError, match="kind must be one of"):
        chord_product(8, kind="complex")


@pytest.mark.parametrize("kind", ["signed", "positive"])
def test_chord_factors_are_the_factors_of_chord_product(kind):
    pat, values = chord_factors(16, kind=kind, seed=5)
    assert [v.size for v in values] == [t.size for t in pat.tables]
    product = SparseFactors.from_pattern(pat, values).to_dense()
    np.testing.assert_allclose(product, chord_product(16, kind=kind, seed=5))
    noisy = chord_product(16, kind=kind, seed=5, noise=0.01)
    assert np.linalg.norm(noisy - product) == pytest.approx(0.01 * np.linalg.norm(product))
