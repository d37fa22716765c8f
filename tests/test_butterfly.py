"""The closed-form butterfly: exact on butterfly products, at the noise level on noisy ones, never above 1."""
import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp

from sfa_cli.approximations.base import load_approximation
from sfa_cli.methods.butterfly import butterfly_closed_form
from sfa_cli.errors import NotApplicable, SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.metrics import relative_error
from sfa_cli.approximations.patterns import butterfly_pattern


def random_butterfly(n, factors=None, seed=0):
    """A product of random Gaussian values on sfa's butterfly pattern, multiplied out (dense)."""
    rng = np.random.default_rng(seed)
    pattern = butterfly_pattern(n, factors=factors)
    values = [rng.standard_normal(t.size) for t in pattern.tables]
    return SparseFactors.from_pattern(pattern, values).to_dense()


def with_noise(B, level, seed=1):
    """B plus Gaussian noise N with ||N|| = level ||B||; returns A and ||N|| / ||A||."""
    N = np.random.default_rng(seed).standard_normal(B.shape)
    N *= level * np.linalg.norm(B) / np.linalg.norm(N)
    A = B + N
    return A, np.linalg.norm(N) / np.linalg.norm(A)


def same_pattern(F, pattern):
    """True when every factor of F stores exactly the pattern's positions."""
    for W, table in zip(F.factors, pattern.tables):
        rows = np.repeat(np.arange(F.n), np.diff(W.indptr))
        expected = sp.csr_matrix((np.ones(table.size), (np.repeat(np.arange(F.n), table.shape[1]), table.ravel())),
                                 shape=W.shape)
        got = sp.csr_matrix((np.ones(W.nnz), (rows, W.indices)), shape=W.shape)
        if (expected != got).nnz:
            return False
    return F.num_factors == pattern.factors


@pytest.mark.parametrize("n", [8, 16, 32, 64, 128, 256])
def test_exact_on_hadamard(n):
    H = scipy.linalg.hadamard(n).astype(np.float64)
    F = butterfly_closed_form(H)
    assert relative_error(H, F) <= 1e-10
    assert F.info["rel_error"] <= 1e-10
    assert same_pattern(F, butterfly_pattern(n))


@pytest.mark.parametrize("n, factors", [(4, None), (64, None), (128, None), (64, 1), (64, 2), (64, 3), (128, 5)])
def test_exact_on_random_butterfly_products(n, factors):
    B = random_butterfly(n, factors, seed=n)
    F = butterfly_closed_form(B, factors=factors)
    assert relative_error(B, F) <= 1e-10
    assert same_pattern(F, butterfly_pattern(n, factors=factors))
    assert F.method == "butterfly" and F.dtype == np.float64


def test_the_index_order_matters():
    """A product in the reversed factor order is not a butterfly of sfa's order: the mapping is not symmetric."""
    n = 64
    pattern = butterfly_pattern(n)
    rng = np.random.default_rng(3)
    W = SparseFactors.from_pattern(pattern, [rng.standard_normal(2 * n) for _ in range(6)]).to_scipy()
    reversed_product = np.linalg.multi_dot([w.toarray() for w in reversed(W)])
    assert relative_error(reversed_product, butterfly_closed_form(reversed_product)) > 0.1


def test_survives_save_and_load(tmp_path):
    B = random_butterfly(32, seed=5)
    F = butterfly_closed_form(B)
    path = tmp_path / "bfly.npz"
    F.save(path)
    G = load_approximation(path)
    assert isinstance(G, SparseFactors) and G.method == "butterfly"
    assert G.pattern["name"] == "butterfly" and G.num_factors == 5
    assert same_pattern(G, butterfly_pattern(32))
    assert relative_error(B, G) <= 1e-10
    assert G.info["rel_error"] == pytest.approx(F.info["rel_error"])


@pytest.mark.parametrize("n", [64, 256])
def test_noisy_products_reach_the_noise_level(n):
    A, noise = with_noise(random_butterfly(n, seed=7), 0.01)
    F = butterfly_closed_form(A)
    rel = relative_error(A, F)
    assert rel <= 1.05 * noise
    assert rel == pytest.approx(F.info["rel_error"], rel=1e-9)


def test_polish_keeps_the_better_and_helps_on_noise():
    A, noise = with_noise(random_butterfly(64, seed=9), 0.05)
    plain = butterfly_closed_form(A)
    polished = butterfly_closed_form(A, polish_iter=30, device="cpu")
    assert polished.info["closed_form_rel_error"] == pytest.approx(plain.info["rel_error"])
    assert relative_error(A, polished) == pytest.approx(polished.info["rel_error"], rel=1e-6)
    assert polished.info["rel_error"] == min(polished.info["closed_form_rel_error"], polished.info["polish_rel_error"])
    assert polished.info["rel_error"] < plain.info["rel_error"]
    assert polished.info["polish_iterations"] <= 30
    assert same_pattern(polished, butterfly_pattern(64))


@pytest.mark.parametrize("factors", [None, 2, 4])
def test_never_above_one_far_from_any_butterfly(factors):
    G = np.random.default_rng(11).standard_normal((128, 128))
    F = butterfly_closed_form(G, factors=factors)
    assert relative_error(G, F) <= 1.0
    assert 0.0 < F.info["scale"]


def test_best_scalar_is_applied():
    """A matrix whose butterfly part is anti-correlated with the rest: the scalar keeps the error below 1."""
    n = 32
    B = random_butterfly(n, seed=13)
    A = B - 1.5 * np.random.default_rng(14).standard_normal((n, n)) * np.linalg.norm(B) / n
    F = butterfly_closed_form(A)
    rel = relative_error(A, F)
    assert rel <= 1.0
    assert rel == pytest.approx(F.info["rel_error"], rel=1e-9)


def test_sparse_and_float32_inputs_and_output_dtype():
    B = random_butterfly(64, seed=15)
    F = butterfly_closed_form(sp.csr_matrix(B), dtype=np.float32)
    assert F.dtype == np.float32
    assert relative_error(B, F) <= 1e-6
    G = butterfly_closed_form(B.astype(np.float32), dtype="float64")
    assert G.dtype == np.float64 and relative_error(B, G) <= 1e-6


@pytest.mark.parametrize("n", [3, 12, 100])
def test_non_power_of_two_is_not_applicable(n):
    with pytest.raises(NotApplicable, match=f"power of two; n={n}"):
        butterfly_closed_form(np.eye(n))


@pytest.mark.parametrize("A, options, message", [
    (np.ones((4, 8)), {}, "A: matrix is 4 x 8; sfa needs a square matrix"),
    (np.full((4, 4), np.nan), {}, "A: matrix has 16 NaN"),
    (np.zeros((8, 8)), {}, "all zeros"),
    (np.eye(8), {"factors": 4}, "factors must be an integer 1 to 3; got 4"),
    (np.eye(8), {"factors": 0}, "factors must be an integer 1 to 3; got 0"),
    (np.eye(8), {"dtype": np.int32}, "dtype must be float32 or float64"),
    (np.eye(8), {"polish_iter": -1}, "polish_iter must be an integer >= 0"),
    (np.eye(8), {"time_limit": 0}, "time_limit must be positive"),
])
def test_bad_input_raises_sfa_error(A, options, message):
    with pytest.raises(SfaError, match=message):
        butterfly_closed_form(A, **options)


def test_memory_guard_names_the_work_and_the_way_out(monkeypatch):
    import sfa_cli.memory

    monkeypatch.setattr(sfa_cli.memory, "available_bytes", lambda device="cpu": 1000)
    with pytest.raises(SfaError, match=r"closed-form butterfly of the 64 x 64 matrix needs .* available; use the gradient"):
        butterfly_closed_form(sp.identity(64, format="csr"))


def test_compare_polishes_the_closed_form_by_default():
    """Far from any butterfly the closed form is only a start: `compare` polishes it unasked."""
    from sfa_cli.methods.compare import compare

    pts = np.random.default_rng(4).random((64, 2))
    A = np.exp(-((pts[:, None] - pts[None]) ** 2).sum(-1) / 0.02)  # an RBF kernel
    closed = butterfly_closed_form(A).info["rel_error"]
    result = compare(A, methods=["butterfly"]).results[0]
    assert "polished" in result.note
    assert result.rel_error < 0.98 * closed


def test_an_exact_closed_form_is_not_polished():
    H = scipy.linalg.hadamard(64).astype(float)
    F = butterfly_closed_form(H, polish_iter=50, device="cpu")
    assert F.info["rel_error"] < 1e-12
    assert "polish_iterations" not in F.info
