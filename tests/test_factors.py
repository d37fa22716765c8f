"""The kernel and the factor chain: products, transposes, gradients, files."""
import json
from functools import reduce

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sfa_cli.approximation import load_approximation
from sfa_cli.errors import SfaError
from sfa_cli.factors import SparseFactors
from sfa_cli.kernels import FactorStructure, chain_matmul, sparse_matmul
from sfa_cli.patterns import butterfly_pattern, chord_pattern


def _dense_factor(struct, values, n):
    return torch.zeros(n, n, dtype=values.dtype).index_put((struct.rows, struct.col), values)


@pytest.mark.parametrize("pattern", [chord_pattern(13), chord_pattern(16, symmetric=True, permute=3), butterfly_pattern(16)])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("fused_up_to", [0, 10**9], ids=["per-factor nodes", "one node"])
def test_kernel_matches_dense_products_and_gradients(pattern, transpose, fused_up_to, monkeypatch):
    from sfa_cli import kernels

    monkeypatch.setattr(kernels, "FUSED_CHAIN_MAX_N", fused_up_to)
    n = pattern.n
    torch.manual_seed(0)
    structs = [FactorStructure.from_table(t)[0] for t in pattern.tables]
    values = [torch.randn(s.nnz, dtype=torch.float64, requires_grad=True) for s in structs]
    X = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    Y = chain_matmul(structs, values, X, transpose=transpose)
    Ws = [_dense_factor(s, v, n) for s, v in zip(structs, values)]
    P = reduce(torch.matmul, Ws)
    Yd = (P.T if transpose else P) @ X
    assert torch.allclose(Y, Yd, atol=1e-12)
    w = torch.randn_like(Y)
    grads = torch.autograd.grad((Y * w).sum(), values + [X])
    grads_d = torch.autograd.grad((Yd * w).sum(), values + [X])
    for g, gd in zip(grads, grads_d):
        assert torch.allclose(g, gd, atol=1e-10)


def test_gradient_matches_finite_differences():
    s = FactorStructure.from_table(chord_pattern(10).tables[0])[0]
    v = torch.randn(s.nnz, dtype=torch.float64, requires_grad=True)
    X = torch.randn(3, 10, 2, dtype=torch.float64, requires_grad=True)  # batched right-hand side
    assert torch.autograd.gradcheck(lambda v, X: sparse_matmul(s, v, X), (v, X))
    vb = torch.randn(3, s.nnz, dtype=torch.float64, requires_grad=True)  # one factor per sample
    assert torch.autograd.gradcheck(lambda v, X: sparse_matmul(s, v, X, transpose=True), (vb, X))


def _chain_value_and_grads(structs, values, X, transpose):
    Y = chain_matmul(structs, values, X, transpose=transpose)
    w = torch.linspace(-1, 1, Y.numel(), dtype=Y.dtype).reshape(Y.shape)
    return [Y.detach()] + list(torch.autograd.grad((Y * w).sum(), values + [X]))


@pytest.fixture
def compiled_path(monkeypatch):
    """The compiled circulant kernels switched on for small n (they start at COMPILE_MIN_N)."""
    from sfa_cli import kernels

    monkeypatch.setattr(kernels, "COMPILE_MIN_N", 8)
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setitem(kernels._compile, "enabled", True)
    return kernels


@pytest.mark.parametrize("transpose", [False, True])
def test_compiled_circulant_kernels_match_csr(compiled_path, transpose):
    kernels = compiled_path
    pattern = chord_pattern(40)
    structs = [FactorStructure.from_table(t)[0] for t in pattern.tables]
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(s.nnz, dtype=torch.float64, generator=gen, requires_grad=True) for s in structs]
    X = torch.randn(40, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    got = _chain_value_and_grads(structs, values, X, transpose)
    if not kernels._compile["enabled"]:
        pytest.skip("torch.compile is not usable here (no C++ compiler?); the CSR fallback ran")
    assert kernels._compiled, "the compiled path was not taken"
    kernels._compile["enabled"] = False
    want = _chain_value_and_grads(structs, values, X, transpose)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_a_new_compiled_shape_is_announced_once(compiled_path, monkeypatch):
    kernels = compiled_path
    heard = []
    monkeypatch.setitem(kernels._compile, "notify", heard.append)
    monkeypatch.setattr(kernels, "_make_circulant_kernels", lambda offsets: (None, None, None))
    s = FactorStructure.from_table(chord_pattern(16).tables[0])[0]
    X = torch.zeros(16, 3, dtype=torch.float64)
    for _ in range(2):
        kernels._compiled_kernels(s, X)
    kernels._compiled_kernels(s, torch.zeros(16, 5, dtype=torch.float64))
    assert len(heard) == 2 and "n=16, 3 columns" in heard[0] and "5 columns" in heard[1]


def test_compiled_path_falls_back_to_csr_when_compiling_fails(compiled_path, monkeypatch):
    kernels = compiled_path

    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_make_circulant_kernels", lambda offsets: (broken, broken, broken))
    s = FactorStructure.from_table(chord_pattern(16).tables[0])[0]
    v = torch.randn(s.nnz, dtype=torch.float64)
    X = torch.randn(16, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        Y = sparse_matmul(s, v, X)
    assert kernels._compile["enabled"] is False
    assert torch.allclose(Y, _dense_factor(s, v, 16) @ X, atol=1e-12)


def _dense_loss_and_grads(structs, values, T):
    """0.5 ||T - W(1)...W(M)||^2 and its gradient, by autograd through dense factors."""
    vs = [v.detach().clone().requires_grad_(True) for v in values]
    P = reduce(torch.matmul, [_dense_factor(s, v, T.shape[0]) for s, v in zip(structs, vs)])
    loss = 0.5 * ((T - P) ** 2).sum()
    return float(loss), torch.autograd.grad(loss, vs)


def _check_block_objective(pattern, blocks, gen):
    from sfa_cli.fit import BlockObjective

    n = pattern.n
    structs = [FactorStructure.from_table(t)[0] for t in pattern.tables]
    T = torch.randn(n, n, dtype=torch.float64, generator=gen)
    objective = BlockObjective(structs, T, blocks)
    for _ in range(2):  # the second call reuses the blocks of the first with other values
        values = [torch.randn(s.nnz, dtype=torch.float64, generator=gen) for s in structs]
        want_loss, want_grads = _dense_loss_and_grads(structs, values, T)
        grads = [torch.full_like(v, 1.5) for v in values]  # added to, not overwritten
        assert objective(values, grads) == pytest.approx(want_loss, rel=1e-12)
        for g, w in zip(grads, want_grads):
            assert torch.allclose(g - 1.5, w, rtol=1e-10, atol=1e-10)
        leaves = [v.clone().requires_grad_(True) for v in values]  # without grads=: into .grad
        objective(leaves)
        for v, w in zip(leaves, want_grads):
            assert torch.allclose(v.grad, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", [chord_pattern(13), chord_pattern(16, symmetric=True, permute=3),
                                     butterfly_pattern(16), chord_pattern(12, factors=1)],
                         ids=["chord", "chord-permuted", "butterfly", "one-factor"])
def test_block_objective_matches_autograd_through_dense_factors(pattern):
    n = pattern.n
    blocks = [slice(0, 5), slice(5, 10), slice(10, n)]  # uneven widths: two sets of work blocks
    _check_block_objective(pattern, blocks, torch.Generator().manual_seed(3))


def test_block_objective_on_the_compiled_kernels(compiled_path):
    kernels = compiled_path
    _check_block_objective(chord_pattern(40), [slice(0, 16), slice(16, 32), slice(32, 40)],
                           torch.Generator().manual_seed(4))
    if not kernels._compile["enabled"]:
        pytest.skip("torch.compile is not usable here (no C++ compiler?); the CSR fallback ran")
    assert kernels._compiled, "the compiled path was not taken"


def test_factor_columns_is_the_dense_factors_columns_and_differentiable():
    from sfa_cli.kernels import chain_columns, factor_columns

    pattern = chord_pattern(16, symmetric=True, permute=5)
    structs = [FactorStructure.from_table(t)[0] for t in pattern.tables]
    values = [torch.randn(s.nnz, dtype=torch.float64, requires_grad=True) for s in structs]
    cols = slice(3, 11)
    dense = _dense_factor(structs[0], values[0], 16)
    assert torch.equal(factor_columns(structs[0], values[0], cols), dense[:, cols])
    P = reduce(torch.matmul, [_dense_factor(s, v, 16) for s, v in zip(structs, values)])
    assert torch.allclose(chain_columns(structs, values, cols), P[:, cols], atol=1e-12)
    assert torch.autograd.gradcheck(lambda *v: chain_columns(structs, v, cols), tuple(values))


@pytest.mark.parametrize("fused_up_to", [0, 10**9], ids=["per-factor nodes", "one node"])
def test_chain_gradient_matches_finite_differences_batched_and_shared(monkeypatch, fused_up_to):
    from sfa_cli import kernels

    monkeypatch.setattr(kernels, "FUSED_CHAIN_MAX_N", fused_up_to)
    structs = [FactorStructure.from_table(t)[0] for t in chord_pattern(10).tables[:3]]
    shared = [torch.randn(s.nnz, dtype=torch.float64, requires_grad=True) for s in structs]
    batched = [torch.randn(2, s.nnz, dtype=torch.float64, requires_grad=True) for s in structs]
    X = torch.randn(2, 10, 3, dtype=torch.float64, requires_grad=True)
    for transpose in (False, True):
        assert torch.autograd.gradcheck(lambda X, *v: chain_matmul(structs, v, X, transpose=transpose), (X, *shared))
        assert torch.autograd.gradcheck(lambda X, *v: chain_matmul(structs, v, X, transpose=transpose), (X, *batched))
    # values only (the fit's case: the input block needs no gradient)
    E = torch.eye(10, dtype=torch.float64)[:, :4]
    assert torch.autograd.gradcheck(lambda *v: chain_matmul(structs, v, E), tuple(shared))


def test_bfloat16_gather_fallback_matches_float32():
    s = FactorStructure.from_table(chord_pattern(20).tables[0])[0]
    v, X = torch.randn(s.nnz), torch.randn(20, 4)
    y32 = sparse_matmul(s, v, X)
    y16 = sparse_matmul(s, v.bfloat16(), X.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), y32, atol=0.1, rtol=0.05)


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
