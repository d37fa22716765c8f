"""Products with every kind against the dense product: A_hat @ X, A_hat.T @ X, x @ A_hat, columns.

Also the chain's product without autograd (kernels.chain_apply) against the fit's (chain_matmul), and
the cost model's choice of the materialized matrix, which must never change a result beyond rounding.
No timings here: they are in scripts/bench_apply.py.
"""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sfa_cli.approximations import base
from sfa_cli.approximations.kernels import FactorStructure, apply_width, chain_apply, chain_matmul
from sfa_cli.approximations.kinds import LowRank, Monarch, SparseMatrix, SumApproximation
from sfa_cli.approximations.patterns import butterfly_pattern, chord_pattern
from sfa_cli.approximations.sparse_factors import SparseFactors

N = 256  # above the widest chain_apply pass at float64 (64 columns) and large enough to use every path


def _sparse(n, density, seed, dtype):
    return SparseMatrix(sp.random(n, n, density=density, random_state=seed, format="csr", dtype=dtype), method="topk")


def _random_factors(pattern, seed, dtype):
    F = SparseFactors.from_pattern(pattern, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    return SparseFactors([W.multiply(rng.standard_normal(W.shape)).tocsr().astype(dtype) for W in F.factors],
                         method=F.method, pattern=F.pattern)


def _learned(n, seed, dtype):  # not circulant: the CSR path
    mats = [sp.random(n, n, density=0.02, random_state=seed + m, format="csr", dtype=dtype) + sp.eye(n, dtype=dtype)
            for m in range(3)]
    return SparseFactors(mats, method="sparse")


def _kind(name, dtype, n=N):
    rng = np.random.default_rng(3)
    s = int(np.sqrt(n))
    return {
        "chord": lambda: _random_factors(chord_pattern(n), 0, dtype),
        "chord-symmetric-permuted": lambda: _random_factors(chord_pattern(n, symmetric=True, permute=2), 1, dtype),
        "butterfly": lambda: _random_factors(butterfly_pattern(n), 2, dtype),
        "learned": lambda: _learned(n, 4, dtype),
        "lowrank": lambda: LowRank(rng.standard_normal((n, 7)).astype(dtype), rng.standard_normal((7, n)).astype(dtype),
                                   method="tsvd"),
        "sparse": lambda: _sparse(n, 0.05, 5, dtype),
        "monarch": lambda: Monarch(rng.standard_normal((s, s, s)).astype(dtype), rng.standard_normal((s, s, s)).astype(dtype)),
        "lowrank+sparse": lambda: SumApproximation([_kind("lowrank", dtype, n), _sparse(n, 0.02, 6, dtype)],
                                                   method="lowrank+sparse"),
        "chord+sparse": lambda: SumApproximation([_kind("chord", dtype, n), _sparse(n, 0.02, 7, dtype)],
                                                 method="chord+sparse"),
    }[name]()


KIND_NAMES = ["chord", "chord-symmetric-permuted", "butterfly", "learned", "lowrank", "sparse", "monarch",
              "lowrank+sparse", "chord+sparse"]


def _tolerance(dtype):
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}


def _close(got, want, dtype):
    scale = max(np.abs(want).max(), 1.0)
    np.testing.assert_allclose(got / scale, want / scale, **_tolerance(dtype))


@pytest.fixture(params=["own product", "materialized"])
def path(request, monkeypatch):
    """Both paths of `@`: the kind's own product, and the materialized matrix wherever it fits."""
    dense = request.param == "materialized"
    monkeypatch.setattr(base.Approximation, "prefers_dense", lambda self, b: dense)
    return request.param


@pytest.mark.parametrize("name", KIND_NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_products_match_the_dense_product(name, dtype, path):
    A = _kind(name, dtype)
    P = A.to_dense().astype(np.float64)
    assert P.dtype == np.float64 and A.dtype == dtype
    rng = np.random.default_rng(0)
    for b in (1, 5, 70):  # one column, a narrow block, more than one pass of chain_apply
        X = rng.standard_normal((N, b)).astype(dtype)
        Y, Yt = A @ X, A.T @ X
        assert Y.shape == Yt.shape == (N, b) and Y.dtype == Yt.dtype == dtype
        _close(Y, P @ X, dtype)
        _close(Yt, P.T @ X, dtype)
        _close(X.T @ A, X.T @ P, dtype)  # x @ A_hat goes through the transposed product
    x = rng.standard_normal(N).astype(dtype)
    y = A @ x
    assert y.shape == (N,) and y.dtype == dtype
    _close(y, P @ x, dtype)
    _close(A.T @ x, P.T @ x, dtype)
    _close(x @ A, x @ P, dtype)
    cols = [3, 0, N - 1, 3]
    _close(A.columns(cols), P[:, cols], dtype)
    _close(A.T.columns(cols), P.T[:, cols], dtype)


@pytest.mark.parametrize("name", ["chord", "learned", "sparse", "monarch", "lowrank+sparse"])
def test_the_materialized_path_gives_the_same_products(name, monkeypatch):
    A = _kind(name, np.float64)
    X = np.random.default_rng(1).standard_normal((N, 9))
    monkeypatch.setattr(base.Approximation, "prefers_dense", lambda self, b: False)
    own = (A @ X, A.T @ X, A.columns([5, 1]))
    assert getattr(A, "_dense_cache", None) is None
    monkeypatch.setattr(base.Approximation, "prefers_dense", lambda self, b: True)
    dense = (A @ X, A.T @ X, A.columns([5, 1]))
    assert A._dense_cache is not None  # formed once, kept
    for a, d in zip(own, dense):
        np.testing.assert_allclose(a, d, rtol=1e-12, atol=1e-12)


def test_the_materialized_matrix_is_used_only_where_it_fits_and_keeps_the_dtype(monkeypatch):
    A = _kind("chord", np.float32)
    monkeypatch.setattr(base.Approximation, "prefers_dense", lambda self, b: True)
    Y = A @ np.ones((N, 3))  # float64 X: no float32 matrix for it
    assert Y.dtype == np.float64 and getattr(A, "_dense_cache", None) is None
    monkeypatch.undo()
    monkeypatch.setattr(base, "MATERIALIZE_MAX_BYTES", 0)
    assert not any(_kind(name, np.float64, 64).prefers_dense(b) for name in KIND_NAMES for b in (1, 64))


def test_inputs_of_any_layout_and_integer_inputs():
    A = _kind("chord", np.float64, 1024)  # no materialized matrix at this size
    assert not A.prefers_dense(8)
    P = A.to_dense()
    rng = np.random.default_rng(2)
    X = rng.standard_normal((40, 1024)).T  # Fortran order
    _close(A @ X, P @ X, np.float64)
    _close(A @ X[:, ::-2], P @ X[:, ::-2], np.float64)  # negative strides
    R = np.ascontiguousarray(X)
    R.setflags(write=False)
    _close(A.T @ R, P.T @ R, np.float64)
    Xi = rng.integers(-3, 4, size=(1024, 6))
    _close(A @ Xi, P @ Xi, np.float64)
    F32 = _kind("chord", np.float32, 1024)
    assert (F32 @ X.astype(np.float32)).dtype == np.float32 and (F32 @ X).dtype == np.float64


# -- the kernel ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [chord_pattern(96), chord_pattern(50, symmetric=True, permute=1), butterfly_pattern(64)])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("b", [1, 16, 64, 150])
def test_chain_apply_matches_chain_matmul(pattern, transpose, b):
    gen = torch.Generator().manual_seed(0)
    structs = [FactorStructure.from_table(t)[0] for t in pattern.tables]
    values = [torch.randn(s.nnz, dtype=torch.float64, generator=gen) for s in structs]
    X = torch.randn(pattern.n, b, dtype=torch.float64, generator=gen)
    want = chain_matmul(structs, values, X, transpose=transpose)
    cache = {}
    for _ in range(2):  # the second call from the prepared operands
        got = chain_apply(structs, values, X, transpose, cache=cache)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert cache
    out = torch.empty_like(X)
    assert chain_apply(structs, values, X, transpose, out=out) is out and torch.allclose(out, want, rtol=1e-12, atol=1e-12)
    vec = chain_apply(structs, values, X[:, 0], transpose)
    assert vec.shape == (pattern.n,) and torch.allclose(vec, want[:, 0], rtol=1e-12, atol=1e-12)
    # float32 values, float64 block: promoted
    low = chain_apply(structs, [v.float() for v in values], X, transpose)
    scale = want.abs().max()
    assert low.dtype == torch.float64 and torch.allclose(low / scale, want / scale, rtol=1e-5, atol=1e-5)


def test_chain_apply_widths_keep_two_blocks_in_cache():
    assert apply_width(1024, 4) == apply_width(4096, 8) == 32 and apply_width(16384, 4) == 16
    assert apply_width(10**6, 8) == 16 and apply_width(10**6, 8, compiled=True) == 64


def test_chain_apply_on_the_compiled_path(compiled_path):
    kernels = compiled_path
    pattern = chord_pattern(40)
    structs = [FactorStructure.from_table(t)[0] for t in pattern.tables]
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(s.nnz, dtype=torch.float64, generator=gen) for s in structs]
    X = torch.randn(40, 6, dtype=torch.float64, generator=gen)
    got = [chain_apply(structs, values, X, t) for t in (False, True)]
    if not kernels.compiled_kernels_usable():
        pytest.skip("torch.compile is not usable here (no C++ compiler?); the CSR fallback ran")
    assert kernels._compiled, "the compiled path was not taken"
    for g, t in zip(got, (False, True)):
        assert torch.allclose(g, chain_matmul(structs, values, X, transpose=t), rtol=1e-10, atol=1e-12)


# -- the cost model ------------------------------------------------------------------------------
def test_the_cost_model_says_where_the_factorization_pays():
    big = SparseFactors.from_pattern(chord_pattern(4096), seed=0, dtype=np.float32)
    small = SparseFactors.from_pattern(chord_pattern(64), seed=0)
    assert big.pays_from() == 1 and not any(big.prefers_dense(b) for b in (1, 16, 64, 256))
    assert small.pays_from() is None and all(small.prefers_dense(b) for b in (1, 64))
    profile = big.apply_profile()
    assert profile["pays_from"] == 1 and profile["materialized_at"] == []
    assert profile["flop_ratio"] == pytest.approx(4096**2 / big.params)
    assert all(s > 1 for s in profile["modelled_speedup"].values())
    # a low rank beyond n / 2 does more multiply-adds than the dense product: it never pays
    rng = np.random.default_rng(0)
    wide = LowRank(rng.standard_normal((128, 100)), rng.standard_normal((100, 128)), method="tsvd")
    assert wide.pays_from() is None and wide.prefers_dense(64)
    parts = [_kind("lowrank", np.float64), _kind("sparse", np.float64)]
    total = SumApproximation(parts, method="lowrank+sparse")
    assert total.product_seconds(64) == pytest.approx(sum(p.product_seconds(64) for p in parts))


def test_products_ask_the_compile_policy_once_they_have_spent_enough(compiled_path, monkeypatch):
    kernels = compiled_path
    monkeypatch.setattr(kernels.compile_settings, "enabled", None)  # auto: compile only where approved
    asked = []
    monkeypatch.setattr(kernels, "compiling_pays", lambda structs, widths, dtype, device, seconds: asked.append(seconds) or True)
    F = _random_factors(chord_pattern(40), 3, np.float64)
    monkeypatch.setattr(base.Approximation, "prefers_dense", lambda self, b: False)
    X = np.random.default_rng(0).standard_normal((40, 6))
    want = F.to_dense() @ X
    np.testing.assert_allclose(F @ X, want, rtol=1e-12, atol=1e-12)
    assert not asked and not kernels._compiled  # too little spent to ask
    F._block_seconds[torch.float64] = 1e6  # as if it had run for long
    np.testing.assert_allclose(F @ X, want, rtol=1e-10, atol=1e-12)
    assert asked == [1e6] and F._compile_approved == {torch.float64}
    if kernels._compile_failed:
        pytest.skip("torch.compile is not usable here")
    assert kernels._compiled, "the approved product did not take the compiled path"
    np.testing.assert_allclose(F.T @ X, F.to_dense().T @ X, rtol=1e-10, atol=1e-12)
    assert asked == [1e6]  # approved once for good
