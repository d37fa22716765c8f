"""SparseFactors: products, dense form, files."""
import json
from functools import reduce

import numpy as np
import pytest
import scipy.sparse as sp

from sfa_cli.approximations.base import load_approximation
from sfa_cli.errors import SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.approximations.patterns import chord_pattern


@pytest.fixture
def factors():
    F = SparseFactors.from_pattern(chord_pattern(37, permute=1), seed=3)
    # distinct, non-averaging values so that products are not trivially alike
    rng = np.random.default_rng(0)
    return SparseFactors([W.multiply(1 + rng.random(W.shape)).tocsr() for W in F.factors], pattern=F.pattern)


@pytest.mark.parametrize("circulant", [True, False])
def test_vector_products_use_diagonals_only_for_circulant_factors(circulant):
    rng = np.random.default_rng(4)
    if circulant:
        F = SparseFactors.from_pattern(chord_pattern(64), seed=1)
        F = SparseFactors([W.multiply(1 + rng.random(W.shape)).tocsr() for W in F.factors], pattern=F.pattern)
    else:
        F = SparseFactors([sp.random(64, 64, density=0.1, random_state=s, format="csr") + sp.eye(64) for s in range(3)])
    P = F.to_dense()
    x, y = rng.standard_normal(64), rng.standard_normal((64, 1))
    assert np.allclose(F.matmul(x), P @ x) and np.allclose(F.rmatmul(x), P.T @ x)
    assert np.allclose(F.matmul(y), P @ y) and np.allclose(F.rmatmul(y), P.T @ y)
    kinds = {type(W).__name__ for t in (False, True) for W in F._vector_factors(t)}
    assert kinds == ({"dia_matrix"} if circulant else {"csr_matrix"})


def test_matmul_agrees_with_to_dense_and_scipy(factors):
    D = factors.to_dense()
    P = reduce(lambda a, b: a @ b, factors.to_scipy()).toarray()
    assert np.allclose(D, P, atol=1e-12)
    x = np.arange(37.0)
    X = np.random.default_rng(1).standard_normal((37, 5))
    assert np.allclose(factors.matmul(x), P @ x)
    assert np.allclose(factors.matmul(X), P @ X)
    assert np.allclose(factors.rmatmul(X), P.T @ X)
    op = factors.as_linear_operator()
    assert np.allclose(op @ x, P @ x) and np.allclose(op.T @ x, P.T @ x)
    with pytest.raises(SfaError, match="dimension mismatch"):
        factors.matmul(np.ones(36))


def test_to_dense_guard(factors):
    with pytest.raises(SfaError, match="limit"):
        factors.to_dense(max_n=10)


def test_params_and_repr(factors):
    assert factors.params == sum(W.nnz for W in factors.factors) == 6 * 37 * 6
    assert repr(factors) == f"<SparseFactors chord n=37 factors=6 params={factors.params} float64>"


@pytest.mark.parametrize("ext", ["npz", "h5"])
def test_save_load_round_trip_is_bitwise(factors, tmp_path, ext):
    factors.info["rel_error"] = 0.25
    path = tmp_path / f"F.{ext}"
    factors.save(path)
    G = load_approximation(path)
    assert isinstance(G, SparseFactors) and G.num_factors == factors.num_factors
    for a, b in zip(factors.factors, G.factors):
        assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
    assert G.info["rel_error"] == 0.25 and G.pattern == factors.pattern
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temporary left


def test_npz_layout_readable_with_numpy_and_scipy_alone(factors, tmp_path):
    path = tmp_path / "F.npz"
    factors.save(path)
    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    assert meta["format"] == "sfa" and meta["n"] == 37 and meta["factors"] == 6
    assert meta["pattern"]["name"] == "chord" and meta["pattern"]["permute"] == 1
    Ws = [sp.csr_matrix((z[f"factor{m}.data"], z[f"factor{m}.indices"], z[f"factor{m}.indptr"]), shape=(37, 37))
          for m in range(meta["factors"])]
    assert np.allclose(reduce(lambda a, b: a @ b, Ws).toarray(), factors.to_dense())


def test_h5_layout(factors, tmp_path):
    import h5py

    path = tmp_path / "F.h5"
    factors.save(path)
    with h5py.File(path) as f:
        assert sorted(f["factors"].keys(), key=int) == [str(m) for m in range(6)]
        assert set(f["factors/0"].keys()) == {"indptr", "indices", "data"}
        assert f.attrs["n"] == 37 and json.loads(f.attrs["meta"])["factors"] == 6


def test_load_errors(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, A=np.eye(3))
    with pytest.raises(SfaError, match="not an sfa approximation file"):
        load_approximation(bad)
    with pytest.raises(SfaError, match="not found"):
        load_approximation(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(SfaError, match="cannot read"):
        load_approximation(junk)
