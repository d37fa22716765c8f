"""The kernels: products of sparse factors and chains, transposes, gradients, the compiled path."""
from functools import reduce

import pytest
import torch

from sfa_cli.approximations.kernels import FactorStructure, chain_matmul, sparse_matmul
from sfa_cli.approximations.patterns import butterfly_pattern, chord_pattern


def _dense_factor(struct, values, n):
    return torch.zeros(n, n, dtype=values.dtype).index_put((struct.rows, struct.col), values)


@pytest.mark.parametrize("pattern", [chord_pattern(13), chord_pattern(16, symmetric=True, permute=3), butterfly_pattern(16)])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("fused_up_to", [0, 10**9], ids=["per-factor nodes", "one node"])
def test_kernel_matches_dense_products_and_gradients(pattern, transpose, fused_up_to, monkeypatch):
    from sfa_cli.approximations import kernels

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


@pytest.mark.parametrize("transpose", [False, True])
def test_compiled_circulant_kernels_match_csr(compiled_path, transpose):
    kernels = compiled_path
    pattern = chord_pattern(40)
    structs = [FactorStructure.from_table(t)[0] for t in pattern.tables]
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(s.nnz, dtype=torch.float64, generator=gen, requires_grad=True) for s in structs]
    X = torch.randn(40, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    got = _chain_value_and_grads(structs, values, X, transpose)
    if not kernels.compiled_kernels_usable():
        pytest.skip("torch.compile is not usable here (no C++ compiler?); the CSR fallback ran")
    assert kernels._compiled, "the compiled path was not taken"
    with kernels.csr_only():
        want = _chain_value_and_grads(structs, values, X, transpose)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_a_new_compiled_shape_is_announced_once(compiled_path, monkeypatch):
    kernels = compiled_path
    heard = []
    monkeypatch.setattr(kernels, "_make_circulant_kernels", lambda offsets: (None, None, None))
    s = FactorStructure.from_table(chord_pattern(16).tables[0])[0]
    X = torch.zeros(16, 3, dtype=torch.float64)
    with kernels.compile_notifier(heard.append):
        for _ in range(2):
            kernels._compiled_kernels(s, X)
        kernels._compiled_kernels(s, torch.zeros(16, 5, dtype=torch.float64))
    assert len(heard) == 2 and "n=16, 3 columns" in heard[0] and "5 columns" in heard[1]
    assert kernels.compile_settings.notify is None  # the context restored it
    kernels._compiled_kernels(s, torch.zeros(16, 7, dtype=torch.float64))
    assert len(heard) == 2


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
    assert not kernels.compiled_kernels_usable()
    with kernels.use_compiled(True):  # a failure is for good: no second try, no second warning
        assert kernels._compiled_kernels(s, X) is None
    assert torch.allclose(Y, _dense_factor(s, v, 16) @ X, atol=1e-12)


def test_factor_columns_is_the_dense_factors_columns_and_differentiable():
    from sfa_cli.approximations.kernels import chain_columns, factor_columns

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
    from sfa_cli.approximations import kernels

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
