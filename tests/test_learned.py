"""Learned-support sparse factors and Chord + sparse: budgets, progress, files, seeds."""
import numpy as np
import pytest
import scipy.sparse as sp

from sfa_cli.approximations.base import load_approximation
from sfa_cli.approximations.kinds import SumApproximation
from sfa_cli.errors import NotApplicable
from sfa_cli.methods.sparse import lowrank_plus_sparse, top_k
from sfa_cli.methods.compare import METHODS, chord_at_budget
from sfa_cli.errors import SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.methods.chord_sparse import chord_plus_sparse
from sfa_cli.methods.learned import learned_sparse
from sfa_cli.metrics import relative_error
from sfa_cli.approximations.patterns import chord_budget

FAST = {"max_iter": 30}


def _graph(n, seed=0):
    rng = np.random.default_rng(seed)
    U = np.triu(rng.random((n, n)) < 4 / (n - 1), 1)
    return (U | U.T).astype(float)


def _rbf(n, seed=0, bandwidth=0.15):
    X = np.random.default_rng(seed).random((n, 2))
    d2 = ((X[:, None] - X[None]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * bandwidth**2))


def _lowrank(n, r=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, r)) @ rng.standard_normal((r, n)) + 0.01 * rng.standard_normal((n, n))


@pytest.mark.parametrize("projection", ["total", "factor", "row", "column"])
@pytest.mark.parametrize("budget", [0.03, 0.1, 0.3])
def test_learned_respects_the_budget_and_its_projection(projection, budget):
    n = 40
    A = _rbf(n)
    B = int(budget * n * n)
    if projection in ("row", "column") and B < 2 * n:
        with pytest.raises(NotApplicable, match="budget"):
            learned_sparse(A, B, projection=projection, rounds=2)
        return
    F = learned_sparse(A, B, projection=projection, rounds=3)
    assert isinstance(F, SparseFactors) and F.num_factors == 2
    assert F.params <= B
    assert F.method == "sparse" and F.pattern["name"] == "learned" and F.pattern["projection"] == projection
    if projection == "factor":
        assert all(W.nnz <= -(-B // 2) for W in F.factors)
    if projection in ("row", "column"):
        per = B // (2 * n)
        for W in F.factors:
            counts = np.diff(W.indptr) if projection == "row" else np.bincount(W.indices, minlength=n)
            assert counts.max() <= per
    assert relative_error(A, F) == pytest.approx(F.info["rel_error"], abs=1e-4)


def test_learned_error_decreases_from_its_start_and_beats_the_low_rank_plus_sparse_baseline():
    n = 48
    A = _lowrank(n, r=6, seed=1)
    B = int(0.1 * n * n)
    F = learned_sparse(A, B)
    assert F.info["rel_error"] < F.info["start_rel_error"]
    assert F.info["rounds"] >= 2
    assert relative_error(A, F) < 0.9 * relative_error(A, lowrank_plus_sparse(A, B))


def test_learned_beats_fixed_chord_on_a_sparse_graph_at_the_chord_budget():
    n = 64
    A = _graph(n) + np.eye(n)
    B = chord_budget(n)["params"]
    chord, _ = METHODS["chord"](A, B, fit_options={"max_iter": 300})
    F = learned_sparse(A, B)
    assert F.params <= B
    assert relative_error(A, F) < 0.5 * relative_error(A, chord)


def test_learned_accepts_sparse_input_and_more_factors():
    n = 40
    A = sp.csr_matrix(_graph(n) + 2 * np.eye(n))
    F = learned_sparse(A, 4 * n + n // 2, factors=3, rounds=3)
    assert F.num_factors == 3 and F.params <= 4 * n + n // 2
    assert F.pattern["factors"] == 3
    assert relative_error(A, F) < 1.0


def test_chord_warm_start():
    n = 32
    A = _lowrank(n)
    B = chord_budget(n)["params"]
    options, _ = chord_at_budget(n, B)
    F = learned_sparse(A, B, init="chord", fit_options=FAST, rounds=3)
    assert F.num_factors == options["factors"] and F.params <= B
    assert F.pattern["init"] == "chord"
    assert F.info["rel_error"] <= F.info["start_rel_error"]


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_learned_and_chord_plus_sparse_files_round_trip(tmp_path, suffix):
    n = 32
    A = _rbf(n)
    F = learned_sparse(A, 200, rounds=3)
    S = chord_plus_sparse(A, chord_budget(n)["params"] // 2, fit_options=FAST)
    for approx, name in ((F, "learned"), (S, "hybrid")):
        path = tmp_path / f"{name}{suffix}"
        approx.save(path)
        back = load_approximation(path)
        assert type(back) is type(approx) and back.method == approx.method and back.params == approx.params
        assert relative_error(A, back) == pytest.approx(relative_error(A, approx), rel=1e-6)
    back = load_approximation(tmp_path / f"learned{suffix}")
    assert back.pattern["name"] == "learned" and back.num_factors == 2
    assert all(sp.isspmatrix_csr(W) for W in back.to_scipy())


def test_learned_is_deterministic_for_a_seed():
    n = 40
    A = _lowrank(n, seed=3)
    F1 = learned_sparse(A, 300, seed=5, rounds=4)
    F2 = learned_sparse(A, 300, seed=5, rounds=4)
    for W1, W2 in zip(F1.factors, F2.factors):
        assert np.array_equal(W1.indptr, W2.indptr) and np.array_equal(W1.indices, W2.indices)
        assert np.array_equal(W1.data, W2.data)


def test_learned_time_limit_and_callback_stop_early():
    n = 48
    A = _rbf(n, seed=2)
    seen = []
    F = learned_sparse(A, 300, callback=lambda r, e: seen.append((r, e)) or len(seen) >= 2)
    assert len(seen) == 2 and F.info["rounds"] == 2
    assert [e for _, e in seen] == sorted((e for _, e in seen), reverse=True)
    F = learned_sparse(A, 300, fit_options={"time_limit": 1e-3})
    assert F.params <= 300


def test_learned_validates_its_options():
    A = _rbf(16)
    with pytest.raises(SfaError, match="unknown init 'svd'; choose from"):
        learned_sparse(A, 50, init="svd")
    with pytest.raises(SfaError, match="unknown projection"):
        learned_sparse(A, 50, projection="block")
    with pytest.raises(SfaError, match="factors must be an integer >= 2"):
        learned_sparse(A, 50, factors=1)
    with pytest.raises(NotApplicable):
        learned_sparse(A, 1)
    with pytest.raises(NotApplicable, match="identity factors"):
        learned_sparse(A, 20, factors=4)
    with pytest.raises(SfaError, match="all zeros"):
        learned_sparse(np.zeros((8, 8)), 10)
    with pytest.raises(SfaError, match="unknown option.*max_iters"):
        learned_sparse(A, 50, fit_options={"max_iters": 5})
    with pytest.raises(SfaError, match="inner_iter must be an integer >= 0"):
        learned_sparse(A, 50, inner_iter=-1)


@pytest.mark.parametrize("method", [learned_sparse, chord_plus_sparse])
@pytest.mark.parametrize("bad, message", [(np.full((8, 8), np.nan), "A: matrix has 64 NaN"),
                                          (np.ones((8, 6)), "A: matrix is 8 x 6; sfa needs a square matrix")])
def test_learned_and_hybrid_validate_the_matrix_on_entry(method, bad, message):
    with pytest.raises(SfaError, match=message):
        method(bad, 20)


def test_learned_options_are_checked_when_built():
    from sfa_cli.methods.learned import LearnedOptions

    assert LearnedOptions().M == 2 and not LearnedOptions(factors=3).hierarchical
    assert LearnedOptions(factors=3, order="hierarchical").hierarchical
    with pytest.raises(SfaError, match="unknown refit 'sgd'"):
        LearnedOptions(refit="sgd")
    with pytest.raises(SfaError, match="splits must be fractions"):
        LearnedOptions(splits=(0.5, 1.5))
    with pytest.raises(SfaError, match="factor_budgets"):
        LearnedOptions(projection="factor", factor_budgets=(10, 10)).check(16, 15)


def test_chord_plus_sparse_never_worse_than_top_k_and_respects_the_budget():
    n = 64
    for A in (_graph(n) + np.eye(n), _lowrank(n)):
        for B in (chord_budget(n)["params"], int(0.1 * n * n)):
            S = chord_plus_sparse(A, B, fit_options=FAST)
            assert isinstance(S, SumApproximation) and S.method == "chord+sparse"
            assert S.params <= B
            assert relative_error(A, S) <= relative_error(A, top_k(A, B)) + 1e-12
            assert relative_error(A, S) == pytest.approx(S.info["rel_error"], rel=1e-6, abs=1e-9)


def test_chord_plus_sparse_uses_the_chord_part_when_it_helps():
    n = 64
    A = _lowrank(n, r=8)
    S = chord_plus_sparse(A, chord_budget(n)["params"], fit_options={"max_iter": 300})
    assert S.info["chord_params"] > 0 and S.info["split"] > 0
    assert relative_error(A, S) < relative_error(A, top_k(A, chord_budget(n)["params"]))


# -- order: joint or hierarchical; per-factor budgets ------------------------------------------------------
def test_hierarchical_order_holds_each_split_to_its_share_and_records_it():
    n = 40
    A = _rbf(n)
    B = int(0.15 * n * n)
    F = learned_sparse(A, B, factors=3, order="hierarchical", rounds=3)
    assert F.num_factors == 3 and F.params <= B
    assert all(W.nnz <= B // 3 for W in F.factors[:2])  # S(1), S(2) at budget / M; R(2) the rest
    assert F.pattern["order"] == "hierarchical" and F.pattern["levels"] == 2
    assert relative_error(A, F) == pytest.approx(F.info["rel_error"], abs=1e-4)
    assert relative_error(A, F) < 0.5
    joint = learned_sparse(A, B, factors=3, rounds=3)
    assert joint.pattern["order"] == "joint"


def test_hierarchical_order_with_two_factors_is_the_joint_fit():
    A = _lowrank(32, seed=2)
    F = learned_sparse(A, 200, order="hierarchical", rounds=2)
    G = learned_sparse(A, 200, order="joint", rounds=2)
    assert F.pattern == G.pattern and F.pattern["order"] == "joint"
    for W1, W2 in zip(F.factors, G.factors):
        assert (W1 != W2).nnz == 0


def test_factor_budgets_and_order_validation():
    A = _rbf(32)
    F = learned_sparse(A, 200, projection="factor", factor_budgets=(60, 140), rounds=3)
    assert F.factors[0].nnz <= 60 and F.factors[1].nnz <= 140
    with pytest.raises(SfaError, match="unknown order"):
        learned_sparse(A, 200, order="random")
    with pytest.raises(SfaError, match="factor_budgets"):
        learned_sparse(A, 200, projection="factor", factor_budgets=(150, 150))
    with pytest.raises(SfaError, match="factor_budgets"):
        learned_sparse(A, 200, factor_budgets=(50, 50))  # needs projection="factor"
    with pytest.raises(SfaError, match="hierarchical"):
        learned_sparse(A, 200, factors=3, order="hierarchical", init="chord")
    with pytest.raises(SfaError, match="hierarchical"):
        learned_sparse(A, 200, factors=3, order="hierarchical", projection="row")
    with pytest.raises(NotApplicable, match="hierarchical"):
        learned_sparse(A, 3, factors=4, order="hierarchical")
