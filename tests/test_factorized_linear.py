"""FactorizedLinear (sfa_cli.nn): an approximation of every kind as a trainable y = x A_hat^T + b."""
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import sfa_cli
from sfa_cli.approximations.base import load_approximation
from sfa_cli.approximations.kinds import LowRank, Monarch, SparseMatrix, SumApproximation
from sfa_cli.approximations.patterns import butterfly_pattern
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.errors import SfaError
from sfa_cli.nn import FactorizedLinear

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def _target(n: int, seed: int = 0) -> np.ndarray:
    """Low rank plus a few large entries plus noise: every method has something to find (rank > 0 in a sum)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, 3)) @ rng.standard_normal((3, n)) + 0.1 * rng.standard_normal((n, n))
    A[rng.integers(0, n, 2 * n), rng.integers(0, n, 2 * n)] += 5.0
    return A


def _build(kind: str, n: int):
    A = _target(n)
    if kind == "chord":
        return sfa_cli.fit(A, max_iter=3, device="cpu", dtype="float64").approximation
    if kind == "butterfly":
        return sfa_cli.butterfly_closed_form(A)
    if kind == "tsvd":
        return sfa_cli.truncated_svd(A, 8 * n)
    if kind == "topk":
        return sfa_cli.top_k(A, 8 * n)
    if kind == "monarch":
        return sfa_cli.monarch(A, 12 * n)
    if kind == "lowrank+sparse":
        return sfa_cli.lowrank_plus_sparse(A, 12 * n)
    if kind == "mixed_sum":  # every part kind in one sum, a chain of two non-circulant factors among them
        rng = np.random.default_rng(1)
        chain = SparseFactors([sp.random(n, n, density=0.2, random_state=k) for k in range(2)], method="sparse")
        u, v = rng.standard_normal((4, n // 4, n // 4)), rng.standard_normal((4, n // 4, 4))
        return SumApproximation([chain, Monarch(u, v), LowRank(rng.standard_normal((n, 2)), rng.standard_normal((2, n)),
                                                              method="tsvd"), sfa_cli.top_k(A, n)], method="mixed")
    raise ValueError(kind)


KINDS = ["chord", "butterfly", "tsvd", "topk", "monarch", "lowrank+sparse", "mixed_sum"]
_CACHE: dict = {}


def approximation(kind: str, n: int = 32):
    if (kind, n) not in _CACHE:
        _CACHE[kind, n] = _build(kind, n)
    return _CACHE[kind, n]


def dense(A_hat, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(A_hat.to_dense()).to(dtype)


def _close(got, want, dtype):
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()) if want.numel() else 0.0)


def test_the_kinds_are_what_the_test_names_say():
    assert approximation("chord").kind == approximation("butterfly").kind == "sparse_factors"
    assert [approximation(k).kind for k in ("tsvd", "topk", "monarch")] == ["low_rank", "sparse", "monarch"]
    parts = approximation("lowrank+sparse").parts
    assert [p.kind for p in parts] == ["low_rank", "sparse"] and parts[0].rank > 0
    assert [p.kind for p in approximation("mixed_sum").parts] == ["sparse_factors", "monarch", "low_rank", "sparse"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_output_is_x_times_the_transposed_matrix(kind, dtype):
    A_hat = approximation(kind)
    layer = FactorizedLinear(A_hat, dtype=dtype)
    W = dense(A_hat, dtype)
    torch.manual_seed(0)
    for shape in [(5, 32), (2, 3, 32), (32,), (0, 32)]:
        x = torch.randn(shape, dtype=dtype)
        y = layer(x)
        assert y.shape == x.shape and y.dtype == dtype
        _close(y, x @ W.T, dtype)
    assert layer.params == A_hat.params == sum(p.numel() for p in layer.parameters())


def test_the_default_dtype_is_the_approximations_and_bias_is_added():
    A32 = SparseFactors([W.astype(np.float32) for W in approximation("chord").factors], method="chord")
    assert FactorizedLinear(A32).dtype == torch.float32
    layer = FactorizedLinear(approximation("tsvd"), bias=True)
    assert layer.dtype == torch.float64 and torch.equal(layer.bias, torch.zeros(32, dtype=torch.float64))
    with torch.no_grad():
        layer.bias.fill_(2.0)
    x = torch.randn(4, 32, dtype=torch.float64)
    _close(layer(x), x @ dense(approximation("tsvd")).T + 2.0, torch.float64)
    assert layer.params == approximation("tsvd").params  # the bias is not counted


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_in_float64(kind):
    A_hat = approximation(kind, n=16)
    layer = FactorizedLinear(A_hat, bias=True, dtype=torch.float64)
    named = [(name, p) for name, p in layer.named_parameters() if p.numel()]  # a rank-0 part has nothing to check
    names = [name for name, _ in named]
    params = [p.detach().clone().requires_grad_() for _, p in named]
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["topk", "chord"])
def test_gradient_of_the_values_is_the_dense_gradient_on_the_support(kind):
    A_hat = approximation(kind)
    layer = FactorizedLinear(A_hat)
    x = torch.randn(7, 32, dtype=torch.float64)
    g = torch.randn(7, 32, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    if kind == "topk":  # d<g, x W^T>/dW = g^T x, read on W's support in CSR order
        S = A_hat.matrix
        rows = np.repeat(np.arange(32), np.diff(S.indptr))
        want = (g.T @ x)[rows, S.indices]
        torch.testing.assert_close(layer.operator.values[0].grad, want)
    else:  # the chain: the first factor's gradient is (g^T x (W2...WM)^T) on its support
        rest = SparseFactors(A_hat.factors[1:], method="chord").to_dense()
        W1 = A_hat.factors[0]
        rows = np.repeat(np.arange(32), np.diff(W1.indptr))
        want = ((g.T @ x) @ torch.from_numpy(rest).T)[rows, W1.indices]
        torch.testing.assert_close(layer.operator.values[0].grad, want)


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_the_values_and_keeps_the_supports(kind):
    A_hat = approximation(kind)
    before = A_hat.to_dense().copy()
    layer = FactorizedLinear(A_hat, bias=True)
    buffers = {k: b.clone() for k, b in layer.named_buffers()}
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    x = torch.randn(8, 2, 32, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        loss = (layer(x) - x.flip(-1)).pow(2).mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        opt.step()
    assert all(torch.equal(b, buffers[k]) for k, b in layer.named_buffers())
    assert np.array_equal(A_hat.to_dense(), before), "training wrote into the approximation's arrays"
    assert not np.allclose(layer.to_approximation().to_dense(), before)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    A_hat = approximation(kind)
    trained = FactorizedLinear(A_hat, bias=True)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(5, 32, dtype=torch.float64)
    trained(x)  # builds the kernel structures before the state is loaded
    fresh = FactorizedLinear(A_hat, bias=True)
    fresh(x)
    state = trained.state_dict()
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


def test_loading_another_support_rebuilds_the_structures():
    n = 16
    a = SparseMatrix(sp.random(n, n, density=0.25, random_state=0, format="csr"), method="topk")
    b = SparseMatrix(sp.random(n, n, density=0.25, random_state=1, format="csr"), method="topk")
    assert a.params == b.params
    la, lb = FactorizedLinear(a), FactorizedLinear(b)
    x = torch.randn(3, n, dtype=torch.float64)
    la(x)
    la.load_state_dict(lb.state_dict())
    torch.testing.assert_close(la(x), x @ dense(b).T)


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
@pytest.mark.parametrize("kind", KINDS)
def test_from_file(kind, suffix, tmp_path):
    A_hat = approximation(kind)
    A_hat.save(tmp_path / f"f{suffix}")
    layer = FactorizedLinear.from_file(tmp_path / f"f{suffix}", bias=True, dtype="float32")
    assert layer.kind == A_hat.kind and layer.dtype == torch.float32 and layer.bias is not None
    x = torch.randn(2, 3, 32)
    _close(layer(x), x @ dense(A_hat, torch.float32).T, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_to_approximation_saves_and_loads_as_the_module(kind, tmp_path):
    A_hat = approximation(kind)
    layer = FactorizedLinear.from_approximation(A_hat)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.5)
    out = layer.to_approximation()
    assert type(out) is type(A_hat) and out.kind == A_hat.kind and out.method == A_hat.method
    assert out.params == A_hat.params and out.dtype == A_hat.dtype
    if isinstance(A_hat, SumApproximation):
        assert [type(p) for p in out.parts] == [type(p) for p in A_hat.parts]
    out.save(tmp_path / "g.npz", info={"note": "fine-tuned"})
    back = load_approximation(tmp_path / "g.npz")
    assert type(back) is type(A_hat) and back.info["note"] == "fine-tuned"
    x = torch.randn(6, 32, dtype=torch.float64)
    _close(layer(x), x @ dense(back).T, torch.float64)
    if isinstance(A_hat, SparseFactors):
        assert back.pattern == A_hat.pattern
    assert layer.to_approximation(info={"x": 1}).info == {"x": 1}


def test_float32_layer_writes_float32_approximations():
    layer = FactorizedLinear(approximation("monarch"), dtype=torch.float32)
    assert layer.to_approximation().dtype == np.float32


def test_extra_repr_names_kind_n_and_params():
    text = repr(FactorizedLinear(approximation("chord"), bias=True))
    assert text.startswith("FactorizedLinear(") and "kind='sparse_factors', n=32, params=" in text
    assert f"params={approximation('chord').params}, bias=True" in text
    text = repr(FactorizedLinear(approximation("lowrank+sparse")))
    assert "kind='sum'" in text and "_LowRank(rank=" in text and "kind='sparse'" in text
    assert "blocks=8x4" in repr(FactorizedLinear(approximation("monarch")))


def test_empty_parts():
    n = 8
    zero = SparseMatrix(sp.csr_matrix((n, n)), method="topk")
    none = LowRank(np.zeros((n, 0)), np.zeros((0, n)), method="tsvd")
    layer = FactorizedLinear(SumApproximation([none, zero], method="lowrank+sparse"), bias=True)
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, torch.zeros(2, n, dtype=torch.float64))
    y.sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((n,), 2.0, dtype=torch.float64))


def test_wrong_inputs_are_refused():
    layer = FactorizedLinear(approximation("tsvd"))
    with pytest.raises(SfaError, match=r"input of shape \(\.\.\., 32\); got \(4, 31\)"):
        layer(torch.randn(4, 31, dtype=torch.float64))
    with pytest.raises(SfaError, match="float64 parameters; got input of dtype torch.float32"):
        layer(torch.randn(4, 32))
    with pytest.raises(SfaError, match="sfa approximation of kind"):
        FactorizedLinear(np.eye(4))
    with pytest.raises(SfaError, match="not found"):
        FactorizedLinear.from_file("/nonexistent/f.npz")


def test_module_conversions_follow_torch():
    layer = FactorizedLinear(approximation("mixed_sum")).float()
    assert layer.dtype == torch.float32
    x = torch.randn(3, 32)
    _close(layer(x), x @ dense(approximation("mixed_sum"), torch.float32).T, torch.float32)
    assert all(b.dtype == torch.int64 for b in layer.buffers())


def test_exported_from_the_package():
    assert sfa_cli.FactorizedLinear is FactorizedLinear and "FactorizedLinear" in sfa_cli.__all__


def test_butterfly_pattern_values_from_a_pattern():
    F = SparseFactors.from_pattern(butterfly_pattern(16), seed=3)
    layer = FactorizedLinear(F, dtype=torch.float32)
    x = torch.randn(4, 16)
    _close(layer(x), x @ dense(F, torch.float32).T, torch.float32)


@pytest.mark.slow  # ~25 s on 2 cores: forward and backward compiled for every kind
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch's own, while compiling
def test_torch_compile_cpu_forward_and_backward():
    import torch._dynamo

    started = time.perf_counter()
    for kind in KINDS:
        torch._dynamo.reset()
        layer = FactorizedLinear(approximation(kind, n=16), bias=True)
        compiled = torch.compile(layer)
        x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
        y = compiled(x)
        torch.testing.assert_close(y, layer(x))
        y.sum().backward()
        assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    for kind in ("tsvd", "monarch"):  # no sparse product: one graph
        torch._dynamo.reset()
        layer = FactorizedLinear(approximation(kind, n=16))
        torch.compile(layer, fullgraph=True)(torch.randn(5, 16, dtype=torch.float64))
    assert time.perf_counter() - started < 300


@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    A_hat = approximation(kind)
    cpu = FactorizedLinear(A_hat, bias=True, dtype=torch.float32)
    gpu = FactorizedLinear(A_hat, bias=True, dtype=torch.float32, device="cuda")
    x = torch.randn(4, 3, 32)
    y = gpu(x.cuda())
    assert y.device.type == "cuda"
    _close(y.cpu(), cpu(x), torch.float32)
    y.square().sum().backward()
    cpu(x).square().sum().backward()
    for (name, p), q in zip(gpu.named_parameters(), cpu.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=1e-4, msg=name)
    moved = FactorizedLinear(A_hat, dtype=torch.float32).cuda()
    _close(moved(x.cuda()).cpu(), x @ dense(A_hat, torch.float32).T, torch.float32)
    assert type(gpu.to_approximation()) is type(A_hat)
