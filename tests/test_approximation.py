"""Approximations as operators (@, .T, columns, LinearOperator), kinds known on import, validation on entry."""
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from sfa_cli.methods.low_rank import randomized_svd, truncated_svd, tsvd_at_rank
from sfa_cli.methods.monarch import monarch
from sfa_cli.methods.sparse import lowrank_plus_sparse, top_k
from sfa_cli.approximations.base import KINDS, load_approximation
from sfa_cli.approximations.kinds import LowRank, Monarch, SparseMatrix, SumApproximation
from sfa_cli.errors import SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.metrics import relative_error, residual_blocks, residual_columns
from sfa_cli.approximations.patterns import butterfly_pattern, chord_pattern
from sfa_cli.validation import as_square_matrix, check_budget

N = 16


def _examples() -> dict:
    """One approximation of every kind at n = 16 (and the two patterns of the factor chain)."""
    rng = np.random.default_rng(7)
    chord = SparseFactors.from_pattern(chord_pattern(N), seed=0)
    butterfly = SparseFactors.from_pattern(
        butterfly_pattern(N), [rng.standard_normal(2 * N) for _ in range(4)], seed=0)
    low = LowRank(rng.standard_normal((N, 3)), rng.standard_normal((3, N)), method="tsvd")
    sparse = SparseMatrix(sp.random(N, N, density=0.2, random_state=3), method="topk")
    mon = Monarch(rng.standard_normal((4, 4, 4)), rng.standard_normal((4, 4, 4)))
    total = SumApproximation([low, sparse, chord], method="lowrank+sparse")
    chord32 = SparseFactors([W.astype(np.float32) for W in chord.factors], method="chord")
    return {"chord": chord, "butterfly": butterfly, "low_rank": low, "sparse": sparse, "monarch": mon,
            "sum": total, "chord_float32": chord32}


EXAMPLES = _examples()


@pytest.fixture(params=sorted(EXAMPLES), ids=str)
def approx(request):
    return EXAMPLES[request.param]


def _close(a, b, dtype):
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    return np.allclose(a, b, rtol=tol, atol=tol)


def test_scaled_is_the_same_kind_times_c(approx, tmp_path):
    from sfa_cli.approximations.base import load_approximation

    twice = approx.scaled(-2.5)
    assert type(twice) is type(approx) and twice.params == approx.params
    assert _close(twice.to_dense(), -2.5 * approx.to_dense(), approx.dtype)
    twice.save(tmp_path / "s.npz")
    assert _close(load_approximation(tmp_path / "s.npz").to_dense(), twice.to_dense(), approx.dtype)


def test_every_kind_is_an_example():
    assert {a.kind for a in EXAMPLES.values()} == set(KINDS)


def test_shape_dtype_ndim(approx):
    assert approx.shape == (N, N) and approx.ndim == 2
    assert approx.dtype == approx.to_dense().dtype
    assert approx.T.shape == (N, N) and approx.T.dtype == approx.dtype and approx.T.ndim == 2


def test_matmul_operators_agree_with_the_dense_product(approx):
    D = approx.to_dense()
    rng = np.random.default_rng(1)
    x, X, Xr = rng.standard_normal(N), rng.standard_normal((N, 5)), rng.standard_normal((3, N))
    checks = {
        "A @ x": (approx @ x, D @ x),
        "A @ X": (approx @ X, D @ X),
        "x @ A": (x @ approx, x @ D),
        "Xr @ A": (Xr @ approx, Xr @ D),
        "A.T @ x": (approx.T @ x, D.T @ x),
        "A.T @ X": (approx.T @ X, D.T @ X),
        "x @ A.T": (x @ approx.T, x @ D.T),
        "Xr @ A.T": (Xr @ approx.T, Xr @ D.T),
        "A @ sparse": (approx @ sp.csr_matrix(X), D @ X),
        "sparse @ A": (sp.csr_matrix(Xr) @ approx, Xr @ D),
        "matvec": (approx.matvec(x), D @ x),
        "rmatvec": (approx.rmatvec(x), D.T @ x),
        "matmat": (approx.matmat(X), D @ X),
        "rmatmat": (approx.rmatmat(X), D.T @ X),
        "A.T.to_dense": (approx.T.to_dense(), D.T),
    }
    for what, (got, want) in checks.items():
        assert got.shape == want.shape, what
        assert _close(got, want, approx.dtype), what
    assert approx.T.T is approx


def test_aslinearoperator_takes_it_directly(approx):
    D = approx.to_dense()
    op = sla.aslinearoperator(approx)
    assert op.shape == (N, N) and op.dtype == approx.dtype
    x, X = np.arange(N, dtype=float), np.random.default_rng(2).standard_normal((N, 4))
    assert _close(op.matvec(x), D @ x, approx.dtype)
    assert _close(op.rmatvec(x), D.T @ x, approx.dtype)
    assert _close(op.matmat(X), D @ X, approx.dtype)
    assert _close(op.H @ X, D.T @ X, approx.dtype)
    assert _close(sla.aslinearoperator(approx.T).matvec(x), D.T @ x, approx.dtype)
    # an iterative solver that only knows LinearOperators: the top singular values
    s = sla.svds(approx, k=2, return_singular_vectors=False, rng=np.random.default_rng(0))
    assert _close(np.sort(s), np.sort(np.linalg.svd(D.astype(np.float64), compute_uv=False))[-2:], approx.dtype)


def test_columns_are_the_dense_columns(approx):
    D = approx.to_dense()
    cols = [3, 0, 15, 3]
    got = approx.columns(cols)
    assert got.shape == (N, 4) and got.dtype == approx.dtype
    assert _close(got, D[:, cols], approx.dtype)
    assert _close(approx.columns(slice(2, 9, 3)), D[:, 2:9:3], approx.dtype)
    assert _close(approx.columns(np.arange(N)), D, approx.dtype)
    assert _close(approx.columns(np.array([5], dtype=np.uint8)), D[:, [5]], approx.dtype)
    assert _close(approx.T.columns([1, 2]), D.T[:, [1, 2]], approx.dtype)


@pytest.mark.parametrize("bad, message", [
    ([N], r"columns has entries outside \[0, 16\)"),
    ([-1], r"outside \[0, 16\)"),
    ([1.5], "must hold integers"),
    ([True, False], "1-D array of column indices"),
    ([[1, 2]], "1-D array of column indices"),
])
def test_bad_columns_are_refused(bad, message):
    with pytest.raises(SfaError, match=message):
        EXAMPLES["low_rank"].columns(bad)


@pytest.mark.parametrize("operand", [np.ones(N + 1), np.ones((N + 1, 2)), np.ones((2, 2, N))])
def test_dimension_mismatch_is_an_sfa_error(approx, operand):
    with pytest.raises(SfaError, match="dimension mismatch"):
        approx @ operand
    with pytest.raises(SfaError, match="dimension mismatch"):
        operand @ approx


def test_relative_error_and_residuals_use_the_columns(approx):
    A = np.random.default_rng(5).standard_normal((N, N))
    D = approx.to_dense().astype(np.float64)
    want = np.linalg.norm(A - D) / np.linalg.norm(A)
    tol = 1e-5 if approx.dtype == np.float32 else 1e-12
    assert relative_error(A, approx) == pytest.approx(want, rel=tol)
    assert relative_error(sp.csr_matrix(A), approx, block=3) == pytest.approx(want, rel=tol)
    cols = np.array([9, 1, 4])
    assert np.allclose(residual_columns(A, approx, cols), (A - D)[:, cols], atol=tol)
    blocks = list(residual_blocks(A, approx, cols, block=2))
    assert [J.tolist() for J, _ in blocks] == [[9, 1], [4]]
    assert np.allclose(np.hstack([R for _, R in blocks]), (A - D)[:, cols], atol=tol)
    assert all(R.dtype == np.float64 for _, R in blocks)


def test_save_with_info_records_it_without_changing_the_object(tmp_path):
    approx = EXAMPLES["low_rank"]
    approx.save(tmp_path / "L.npz", info={"rel_error": 0.25, "input": "m.mtx"})
    back = load_approximation(tmp_path / "L.npz")
    assert back.info == {"rel_error": 0.25, "input": "m.mtx"}
    assert "rel_error" not in approx.info


# -- every kind loads in a fresh process --------------------------------------------------
def test_a_fresh_process_loads_every_kind_without_torch(tmp_path):
    expected = {}
    for name, approx in EXAMPLES.items():
        for ext in (".npz", ".h5"):
            path = tmp_path / f"{name}{ext}"
            approx.save(path)
            expected[str(path)] = approx.to_dense().tolist()
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "import sfa_cli\n"
        "assert 'torch' not in sys.modules, 'import sfa_cli imported torch'\n"
        "out = {}\n"
        "for p in json.loads(sys.argv[1]):\n"
        "    A = sfa_cli.load_approximation(p)\n"
        "    out[p] = [A.kind, (A @ np.eye(A.n)[:, 0]).tolist(), A.to_dense().tolist()]\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'out': out}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code, json.dumps(list(expected))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    for path, (kind, first_column, dense) in result["out"].items():
        want = np.array(expected[path])
        assert np.allclose(dense, want, atol=1e-6), path
        assert np.allclose(first_column, want[:, 0], atol=1e-6), path
    assert {kind for kind, _, _ in result["out"].values()} == set(KINDS)


# -- validation on entry --------------------------------------------------------------------
NAN = np.full((8, 8), np.nan)


@pytest.mark.parametrize("method", [truncated_svd, randomized_svd, top_k, monarch, lowrank_plus_sparse])
def test_baselines_refuse_nan_and_non_square_input(method):
    with pytest.raises(SfaError, match=r"A: matrix has 64 NaN and 0 Inf entries"):
        method(NAN, 40)
    with pytest.raises(SfaError, match=r"A: matrix is 8 x 6; sfa needs a square matrix"):
        method(np.ones((8, 6)), 40)
    with pytest.raises(SfaError, match="complex"):
        method(np.ones((8, 8), dtype=complex), 40)


def test_tsvd_at_rank_refuses_inf():
    A = np.eye(8)
    A[2, 5] = np.inf
    with pytest.raises(SfaError, match=r"0 NaN and 1 Inf entries; the first is at \(row 2, col 5\)"):
        tsvd_at_rank(A, 2)


def test_metrics_refuse_bad_matrices():
    approx = LowRank(np.ones((8, 1)), np.ones((1, 8)), method="tsvd")
    with pytest.raises(SfaError, match="NaN"):
        relative_error(NAN, approx)
    with pytest.raises(SfaError, match="NaN"):
        residual_blocks(NAN, approx)
    with pytest.raises(SfaError, match="sfa needs a square matrix"):
        relative_error(np.ones((8, 6)), approx)
    with pytest.raises(SfaError, match="empty"):
        relative_error(np.ones((0, 0)), approx)
    with pytest.raises(SfaError, match="all zeros"):
        relative_error(np.zeros((8, 8)), approx)
    with pytest.raises(SfaError, match="n=8 but the matrix has n=9"):
        relative_error(np.ones((9, 9)), approx)
    with pytest.raises(SfaError, match="must be an sfa Approximation"):
        relative_error(np.ones((8, 8)), np.ones((8, 8)))
    with pytest.raises(SfaError, match="block must be a positive"):
        relative_error(np.ones((8, 8)), approx, block=0)
    with pytest.raises(SfaError, match="dtype object"):
        relative_error(np.array([[object()] * 2] * 2), approx)


@pytest.mark.parametrize("factors, message", [
    ([], "at least one factor"),
    ([np.full((4, 4), np.nan)], "factor 0: 16 NaN and 0 Inf values"),
    ([np.eye(4), np.diag([np.inf] * 4)], "factor 1: 0 NaN and 4 Inf values"),
    ([np.eye(4, dtype=complex)], "factor 0: complex"),
    ([np.eye(4), np.eye(3)], "all factors must be 4 x 4"),
    ([np.ones(4)], "expected a 2-D matrix"),
    ([sp.csr_matrix((np.ones(1), np.array([7]), np.array([0, 1, 1, 1, 1])), shape=(4, 4))],
     "invalid sparse matrix"),
])
def test_sparse_factors_construction_is_validated(factors, message):
    with pytest.raises(SfaError, match=message):
        SparseFactors(factors)


def test_approximation_classes_refuse_non_finite_values():
    with pytest.raises(SfaError, match="left: 1 NaN"):
        LowRank(np.array([[np.nan], [1.0]]), np.ones((1, 2)), method="tsvd")
    v = np.ones((2, 2, 2))
    v[1, 0, 1] = -np.inf
    with pytest.raises(SfaError, match="v: 0 NaN and 1 Inf"):
        Monarch(np.ones((2, 2, 2)), v)
    with pytest.raises(SfaError, match="the sparse matrix: complex"):
        SparseMatrix(sp.eye(3, dtype=complex), method="topk")
    with pytest.raises(SfaError, match="not an Approximation"):
        SumApproximation([np.eye(3)], method="sum")


def test_integer_factors_become_float64():
    F = SparseFactors([np.eye(3, dtype=int), sp.eye(3, dtype=bool)])
    assert F.dtype == np.float64 and np.array_equal(F.to_dense(), np.eye(3))


def test_as_square_matrix_takes_a_memory_map_without_copying_and_checks_it_in_slices(tmp_path, monkeypatch):
    from sfa_cli import validation

    monkeypatch.setattr(validation, "FINITE_CHECK_ENTRIES", 7)  # many slices at n = 12
    A = np.memmap(tmp_path / "A.dat", dtype=np.float32, mode="w+", shape=(12, 12))
    A[:] = 1.0
    A.flush()
    M = np.memmap(tmp_path / "A.dat", dtype=np.float32, mode="r", shape=(12, 12))
    out = as_square_matrix(M)
    assert np.shares_memory(out, M)
    A[11, 10] = np.nan
    A.flush()
    with pytest.raises(SfaError, match=r"1 NaN and 0 Inf entries; the first is at \(row 11, col 10\)"):
        as_square_matrix(np.memmap(tmp_path / "A.dat", dtype=np.float32, mode="r", shape=(12, 12)), name="A.dat")
    with pytest.raises(SfaError, match="NaN"):  # a strided view goes slice by slice along rows
        as_square_matrix(np.asarray(A)[::-1, ::-1])


def test_as_square_matrix_accepts_the_documented_inputs():
    torch = pytest.importorskip("torch")
    assert as_square_matrix([[1, 2], [3, 4]]).dtype == np.float64
    assert as_square_matrix(torch.eye(3)).dtype == np.float32
    assert as_square_matrix(sp.coo_matrix(np.eye(3))).format == "csr"
    with pytest.raises(SfaError, match="M: matrix has 1 NaN"):
        as_square_matrix(sp.csr_matrix(np.diag([1.0, np.nan, 2.0])), name="M")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10", None])
def test_check_budget_refuses(bad):
    with pytest.raises(SfaError, match="budget must be a positive integer"):
        check_budget(bad)


def test_io_keeps_the_converter_under_its_old_name():
    from sfa_cli import io, validation

    assert io.as_square_matrix is validation.as_square_matrix
