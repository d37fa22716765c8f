"""Baselines: errors against independent numpy computations, budgets, Monarch exactness, files."""
import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
import torch

from sfa_cli.methods import low_rank
from sfa_cli.methods import monarch as monarch_module
from sfa_cli.methods import sparse as sparse_module
from sfa_cli.approximations.base import load_approximation
from sfa_cli.approximations.kinds import LowRank, Monarch, SparseMatrix, SumApproximation
from sfa_cli.methods.low_rank import randomized_svd, truncated_svd, tsvd_at_rank
from sfa_cli.methods.monarch import monarch, monarch_blocks
from sfa_cli.methods.sparse import lowrank_plus_sparse, top_k
from sfa_cli.errors import NotApplicable, SfaError
from sfa_cli.metrics import relative_error
from sfa_cli.approximations.patterns import chord_budget

METHODS = [truncated_svd, randomized_svd, top_k, monarch, lowrank_plus_sparse]


def _random(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, n))


def _low_rank_plus_spikes(n, rank=3, spikes=40, seed=0):
    """A smooth low-rank matrix plus a few large isolated entries and faint noise."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, n))
    A[rng.integers(0, n, spikes), rng.integers(0, n, spikes)] += 10 * rng.standard_normal(spikes)
    return A + 0.01 * rng.standard_normal((n, n))


def _monarch_product(s0, s1, seed=0):
    """P^T L P R with R = s0 blocks of s1 x s1, L = s1 blocks of s0 x s0 (Dao et al. 2022), built densely."""
    rng = np.random.default_rng(seed)
    n = s0 * s1
    R = scipy.linalg.block_diag(*[rng.standard_normal((s1, s1)) for _ in range(s0)])
    L = scipy.linalg.block_diag(*[rng.standard_normal((s0, s0)) for _ in range(s1)])
    # P takes position j0*s1 + i1 to position i1*s0 + j0 (a transpose of the s0 x s1 grid)
    perm = np.arange(n).reshape(s0, s1).T.ravel()
    P = np.eye(n)[perm]
    return P.T @ L @ P @ R


def _tsvd_error(A, r):
    s = np.linalg.svd(A, compute_uv=False)
    return np.sqrt(np.sum(s[r:] ** 2)) / np.linalg.norm(A)


# -- truncated SVD, randomized SVD, top-k ------------------------------------------------
@pytest.mark.parametrize("n,budget", [(30, 200), (64, 1000), (64, 64 * 64 * 2)])
def test_truncated_svd_error_is_the_eckart_young_tail(n, budget):
    A = _random(n, seed=n)
    approx = truncated_svd(A, budget)
    r = min(budget // (2 * n), n)
    assert approx.rank == r and approx.params == 2 * n * r <= budget
    assert relative_error(A, approx) == pytest.approx(_tsvd_error(A, r), rel=1e-9, abs=1e-12)


def test_tsvd_at_rank_matches_truncated_svd():
    A = _random(30)
    assert np.allclose(tsvd_at_rank(A, 4).to_dense(), truncated_svd(A, 8 * 30 + 59).to_dense())


def test_tsvd_above_the_exact_limit_uses_arpack(monkeypatch):
    monkeypatch.setattr(low_rank, "EXACT_SVD_LIMIT", 10)
    A = _random(40)
    approx = tsvd_at_rank(sp.csr_matrix(A), 5)
    assert relative_error(A, approx) == pytest.approx(_tsvd_error(A, 5), rel=1e-8)


@pytest.mark.parametrize("n,budget", [(30, 100), (64, 1000), (100, 4321)])
def test_top_k_error_is_the_sum_of_the_smallest_squares(n, budget):
    A = _random(n, seed=n)
    approx = top_k(A, budget)
    assert approx.params == budget
    dropped = np.sort(np.abs(A).ravel())[: n * n - budget]
    assert relative_error(A, approx) == pytest.approx(np.sqrt(np.sum(dropped**2)) / np.linalg.norm(A), rel=1e-12)


def test_top_k_is_exact_when_nnz_fits():
    A = sp.random(50, 50, density=0.05, format="csr", random_state=0)
    approx = top_k(A, A.nnz + 3)
    assert approx.params == A.nnz and relative_error(A, approx) == 0.0
    assert approx.info["note"] == "exact: nnz <= budget"
    assert top_k(A.toarray(), A.nnz).info["note"] == "exact: nnz <= budget"


@pytest.mark.parametrize("method", [truncated_svd, top_k, randomized_svd, monarch])
def test_sparse_input_gives_the_dense_errors(method):
    A = sp.random(64, 64, density=0.2, format="csr", random_state=1)
    budget = 1500
    dense_err = relative_error(A.toarray(), method(A.toarray(), budget))
    assert relative_error(A, method(A, budget)) == pytest.approx(dense_err, rel=1e-9)


def test_randomized_svd_is_close_to_tsvd_seeded_and_leaves_torch_state_alone():
    A = _low_rank_plus_spikes(100, rank=8, spikes=0) + 0.3 * _random(100, seed=5)
    budget = 2 * 100 * 6
    state = torch.get_rng_state()
    first = randomized_svd(A, budget, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    again = randomized_svd(A, budget, seed=3)
    assert np.array_equal(first.left, again.left) and np.array_equal(first.right, again.right)
    assert first.params == budget
    err, best = relative_error(A, first), _tsvd_error(A, 6)
    assert best <= err <= 1.05 * best


def test_randomized_svd_on_a_torch_sparse_tensor(monkeypatch):
    monkeypatch.setattr(low_rank, "ALTERNATION_EXACT_LIMIT", 10)  # forces the sparse-tensor path
    A = sp.random(60, 60, density=0.1, format="csr", random_state=2)
    err = relative_error(A, randomized_svd(A, 2 * 60 * 5))
    assert err <= 1.1 * _tsvd_error(A.toarray(), 5)


def test_a_budget_below_rank_one_is_not_applicable():
    with pytest.raises(NotApplicable, match="needs 2n = 60 parameters > budget 59"):
        truncated_svd(_random(30), 59)
    assert issubclass(NotApplicable, SfaError)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(SfaError, match="budget must be a positive integer"):
        top_k(_random(8), bad)


def test_non_square_input_is_refused():
    with pytest.raises(SfaError, match="square"):
        truncated_svd(np.ones((3, 4)), 100)


# -- every method -----------------------------------------------------------------------
@pytest.mark.parametrize("n", [30, 64, 100])
@pytest.mark.parametrize("fraction", [0.05, 0.3, None])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_stays_within_the_budget(method, n, fraction):
    A = _random(n, seed=1)
    budget = chord_budget(n)["params"] if fraction is None else int(fraction * n * n) + 7
    try:
        approx = method(A, budget)
    except NotApplicable:
        return
    assert 0 < approx.params <= budget
    assert 0.0 <= relative_error(A, approx) < 1.0


# -- Monarch ----------------------------------------------------------------------------
@pytest.mark.parametrize("s0,s1", [(6, 4), (8, 8), (5, 2)])
def test_monarch_is_exact_on_a_monarch_product(s0, s1):
    A = _monarch_product(s0, s1)
    n = s0 * s1
    assert monarch_blocks(n) == (s0, s1)
    approx = monarch(A, n * (s0 + s1))
    assert approx.params == n * (s0 + s1)
    assert relative_error(A, approx) < 1e-10


def test_monarch_error_matches_an_independent_projection():
    n, s0, s1 = 48, 8, 6
    A = _random(n, seed=7)
    A4 = A.reshape(s0, s1, s0, s1)
    D4 = np.zeros_like(A4)
    for i1 in range(s1):
        for j0 in range(s0):
            U, s, Vt = np.linalg.svd(A4[:, i1, j0, :])
            D4[:, i1, j0, :] = s[0] * np.outer(U[:, 0], Vt[0])
    expected = np.linalg.norm(A - D4.reshape(n, n)) / np.linalg.norm(A)
    approx = monarch(A, 10_000)
    assert relative_error(A, approx) == pytest.approx(expected, rel=1e-10)
    assert np.allclose(approx.to_dense(), D4.reshape(n, n), atol=1e-12)


def test_monarch_projection_is_blocked_for_large_inputs(monkeypatch):
    monkeypatch.setattr(monarch_module, "_BLOCK_ENTRIES", 100)  # one j0 per batch
    A = _random(48, seed=7)
    assert np.allclose(monarch(A, 10_000).to_dense(), _monarch_unblocked(A), atol=1e-12)


def _monarch_unblocked(A):
    n = A.shape[0]
    s0, s1 = monarch_blocks(n)
    slices = A.reshape(s0, s1, s0, s1).transpose(1, 2, 0, 3)
    U, s, Vt = np.linalg.svd(slices)
    return Monarch(U[..., :, 0] * s[..., :1], Vt[..., 0, :]).to_dense()


@pytest.mark.parametrize("n", [31, 127])
def test_monarch_is_not_applicable_for_prime_n(n):
    with pytest.raises(NotApplicable, match="prime"):
        monarch(_random(n), 10**6)


def test_monarch_is_not_applicable_below_its_size():
    with pytest.raises(NotApplicable, match=r"needs n\*\(s0\+s1\) = 1024 parameters > budget 1000"):
        monarch(_random(64), 1000)


# -- low rank plus sparse -----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_lowrank_plus_sparse_structure_and_recorded_error(seed):
    n = 64
    A = _low_rank_plus_spikes(n, seed=seed)
    budget = chord_budget(n)["params"]
    approx = lowrank_plus_sparse(A, budget)
    assert isinstance(approx, SumApproximation) and approx.params <= budget
    low, sparse = approx.parts
    assert isinstance(low, LowRank) and isinstance(sparse, SparseMatrix)
    assert approx.info["rank"] == low.rank > 0 and 2 * n * low.rank <= approx.info["split"] * budget
    err = relative_error(A, approx)
    assert err == pytest.approx(approx.info["rel_error"], rel=1e-9)
    assert err < 0.5 * min(relative_error(A, truncated_svd(A, budget)), relative_error(A, top_k(A, budget)))


@pytest.mark.parametrize(
    "A",
    [_random(16).astype(np.float32), _random(30), _low_rank_plus_spikes(40, rank=2), _monarch_product(6, 5)],
    ids=["gaussian16-f32", "gaussian30", "lowrank+spikes40", "monarch30"],
)
@pytest.mark.parametrize("fraction", [0.15, 0.4, 0.8])
def test_lowrank_plus_sparse_is_no_worse_than_either_part_alone(A, fraction):
    n = A.shape[0]
    budget = int(fraction * n * n)
    err = relative_error(A, lowrank_plus_sparse(A, budget))
    assert err <= relative_error(A, top_k(A, budget)) * (1 + 1e-6)
    assert err <= relative_error(A, truncated_svd(A, budget)) * (1 + 1e-6)


def test_lowrank_plus_sparse_alternations_never_hurt():
    A = _random(40, seed=3)
    budget = 1200
    errors = [lowrank_plus_sparse(A, budget, splits=(0.5,), alternations=a).info["rel_error"] for a in (1, 3, 6)]
    assert errors[0] >= errors[1] >= errors[2]


@pytest.mark.parametrize("as_input", [np.asarray, sp.csr_matrix], ids=["dense", "sparse"])
def test_lowrank_plus_sparse_large_path_agrees_with_the_exact_one(monkeypatch, as_input):
    A = _low_rank_plus_spikes(48, seed=2)
    exact = lowrank_plus_sparse(A, 2000, splits=(0.5,))
    monkeypatch.setattr(sparse_module, "ALTERNATION_EXACT_LIMIT", 10)  # randomized SVD, blocked top-k
    monkeypatch.setattr(low_rank, "ALTERNATION_EXACT_LIMIT", 10)  # a sparse A goes to torch as a sparse tensor
    monkeypatch.setattr(sparse_module, "_BLOCK_ENTRIES", 48 * 7)
    approx = lowrank_plus_sparse(as_input(A), 2000, splits=(0.5,))
    assert approx.params <= 2000
    assert relative_error(A, approx) == pytest.approx(approx.info["rel_error"], rel=1e-6)
    assert relative_error(A, approx) == pytest.approx(relative_error(A, exact), rel=0.05)


def test_lowrank_plus_sparse_below_rank_one_is_top_k():
    A = _random(30)
    approx = lowrank_plus_sparse(A, 59)
    assert approx.info["rank"] == 0 and approx.parts[0].params == 0
    assert relative_error(A, approx) == pytest.approx(relative_error(A, top_k(A, 59)), rel=1e-12)


# -- the approximation classes ------------------------------------------------------------
def _examples():
    rng = np.random.default_rng(4)
    n = 24
    low = LowRank(rng.standard_normal((n, 3)), rng.standard_normal((3, n)), method="tsvd", info={"note": "x"})
    sparse = SparseMatrix(sp.random(n, n, density=0.1, random_state=4), method="topk")
    mon = Monarch(rng.standard_normal((4, 6, 6)), rng.standard_normal((4, 6, 4)))
    total = SumApproximation([low, sparse, mon], method="lowrank+sparse", info={"split": 0.5})
    rank0 = lowrank_plus_sparse(_random(n), 40)  # below 2n: a rank-0 low-rank part
    return [low, sparse, mon, total, lowrank_plus_sparse(_random(n), 600), rank0]


@pytest.mark.parametrize("approx", _examples(), ids=lambda a: type(a).__name__)
def test_matmul_and_rmatmul_agree_with_to_dense(approx):
    D = approx.to_dense()
    rng = np.random.default_rng(0)
    x, X = rng.standard_normal(approx.n), rng.standard_normal((approx.n, 5))
    assert np.allclose(approx.matmul(x), D @ x) and approx.matmul(x).shape == (approx.n,)
    assert np.allclose(approx.matmul(X), D @ X)
    assert np.allclose(approx.rmatmul(x), D.T @ x)
    assert np.allclose(approx.rmatmul(X), D.T @ X)
    assert np.allclose(approx.as_linear_operator() @ X, D @ X)


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
@pytest.mark.parametrize("approx", _examples(), ids=lambda a: type(a).__name__)
def test_save_and_load_round_trip(approx, suffix, tmp_path):
    path = tmp_path / f"approx{suffix}"
    approx.save(path)
    back = load_approximation(path)
    assert type(back) is type(approx)
    assert (back.n, back.params, back.method, back.info) == (approx.n, approx.params, approx.method, approx.info)
    X = np.random.default_rng(1).standard_normal((approx.n, 3))
    assert np.array_equal(back.matmul(X), approx.matmul(X))
    assert np.array_equal(back.rmatmul(X), approx.rmatmul(X))
    if isinstance(approx, SumApproximation):
        assert [type(p) for p in back.parts] == [type(p) for p in approx.parts]


def test_top_k_of_a_memory_map_streams_rows_and_matches(tmp_path, monkeypatch):
    """A read-only .npy map: top-k by blocks of rows (a running top-k), the same entries as in memory."""
    rng = np.random.default_rng(5)
    A = rng.standard_normal((1100, 1100)).astype(np.float32)
    np.save(tmp_path / "a.npy", A)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    monkeypatch.setattr(sparse_module, "_BLOCK_ENTRIES", 1100 * 7)  # 7 rows per block
    for k in (1, 5000, 200_000):
        got, want = sparse_module.top_k(mapped, k).matrix, sparse_module.top_k(A, k).matrix
        assert got.nnz == want.nnz == k
        assert abs(got - want).max() == 0
    B = np.zeros((1100, 1100), dtype=np.float32)
    B[rng.integers(0, 1100, 300), rng.integers(0, 1100, 300)] = 1.0
    np.save(tmp_path / "b.npy", B)
    nnz = np.count_nonzero(B)
    for k, exact in ((nnz + 5, True), (nnz, True), (nnz - 1, False)):
        got = sparse_module.top_k(np.load(tmp_path / "b.npy", mmap_mode="r"), k)
        assert got.matrix.nnz == min(k, nnz)
        assert (got.info.get("note") == "exact: nnz <= budget") == exact
