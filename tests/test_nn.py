"""Tests of the parametric (attention) layer in sfa_cli.nn."""
import pytest
import torch

from sfa_cli.errors import SfaError
from sfa_cli.nn import ChordMixing, SavedTensorBytes, SequenceModel, SoftmaxAttention
from sfa_cli.approximations.patterns import chord_pattern

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def dense_reference(layer: ChordMixing, x: torch.Tensor) -> torch.Tensor:
    """W(1) ... W(M) V with every factor formed as a dense (batch, n, n) matrix from the MLP outputs."""
    batch, n, _ = x.shape
    v = layer.value(x)
    if n == 1:
        return v
    entries = layer.row_entries(x)  # (M, batch, n, K)
    table = torch.from_numpy(chord_pattern(n, base=layer.base).tables[0].copy())
    assert entries.shape[1:] == (batch, n, table.shape[1])
    rows = torch.arange(n).unsqueeze(1).expand_as(table)
    y = v
    for m in reversed(range(entries.shape[0])):
        W = torch.zeros(batch, n, n, dtype=x.dtype)
        W[:, rows, table] = entries[m]
        y = W @ y
        if layer.residual:
            y = y + v
    return y


@pytest.mark.parametrize("n", [2, 5, 64, 100, 128])
def test_output_shape(n):
    layer = ChordMixing(8, max_len=128, out_dim=6)
    y = layer(torch.randn(3, n, 8))
    assert y.shape == (3, n, 6)
    assert torch.isfinite(y).all()


def test_factor_count_follows_n():
    layer = ChordMixing(4, max_len=1000)
    assert (layer.factors, layer.nnz_per_row) == (10, 10)
    assert layer.shape_for(1000) == (10, 10)
    assert layer.shape_for(100) == (7, 7)
    assert layer.shape_for(5) == (3, 3)
    assert layer.shape_for(1) == (0, 1)
    with pytest.raises(SfaError, match="length 1 to 1000; got N=1001"):
        layer.shape_for(1001)


@pytest.mark.parametrize("normalize", ["softmax", "scale", "none"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("n", [2, 5, 16, 37])
def test_equals_dense_product_of_factors(n, residual, normalize):
    torch.manual_seed(n)
    layer = ChordMixing(6, max_len=64, hidden=10, residual=residual, normalize=normalize).double()
    x = torch.randn(2, n, 6, dtype=torch.float64)
    got = layer(x)
    want = dense_reference(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The factors really mix tokens: changing the last token moves the first output.
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(layer(x2)[:, 0], got[:, 0])


def test_base_three_equals_dense_product():
    torch.manual_seed(0)
    layer = ChordMixing(5, max_len=50, base=3).double()
    x = torch.randn(2, 30, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=1e-10, atol=1e-12)


def test_softmax_rows_are_stochastic():
    layer = ChordMixing(4, max_len=64)
    e = layer.row_entries(torch.randn(2, 40, 4))
    torch.testing.assert_close(e.sum(-1), torch.ones(e.shape[:-1]))
    assert (e > 0).all()


def test_single_token_is_the_value():
    layer = ChordMixing(4, max_len=8)
    x = torch.randn(2, 1, 4)
    torch.testing.assert_close(layer(x), layer.value(x))


@pytest.mark.parametrize("residual", [False, True])
def test_gradients_reach_every_mlp(residual):
    torch.manual_seed(0)
    layer = ChordMixing(8, max_len=100, residual=residual)  # N = max_len: all M MLPs and all L+1 outputs are used
    x = torch.randn(2, 100, 8, requires_grad=True)
    layer(x).square().sum().backward()
    M = layer.factors
    for name in ("w1", "b1", "w2", "b2"):
        g = getattr(layer.rows, name).grad
        assert g is not None and g.shape[0] == M
        per_factor = g.reshape(M, -1).abs().sum(1)
        assert (per_factor > 0).all(), f"{name}: factors {torch.nonzero(per_factor == 0).ravel().tolist()} got no gradient"
    for p in layer.value.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def _saved_bytes(module, n, dim=8, batch=2):
    x = torch.randn(batch, n, dim, requires_grad=True)
    with SavedTensorBytes() as saved:
        module(x)
    return saved.bytes


def test_saved_activations_grow_about_linearly():
    torch.manual_seed(0)
    chord = ChordMixing(8, max_len=1024)
    ratio = _saved_bytes(chord, 1024) / _saved_bytes(chord, 256)
    # 4x the tokens and 10 instead of 8 factors: about 5x; quadratic would be 16x.
    assert 3.5 < ratio < 6, ratio


def test_saved_activations_of_explicit_softmax_attention_grow_quadratically():
    attention = SoftmaxAttention(8, fused=False)
    ratio = _saved_bytes(attention, 1024) / _saved_bytes(attention, 256)
    assert ratio > 12, ratio  # the measure can tell O(N^2) from O(N)


def test_saved_tensor_bytes_counts_a_storage_once():
    a = torch.randn(1000, requires_grad=True)
    with SavedTensorBytes() as saved:
        (a * a).sum()  # saves `a` twice (both operands)
    assert saved.bytes == 4000 and saved.tensors == 1


def test_bfloat16_forward_on_cpu():
    torch.manual_seed(0)
    layer = ChordMixing(8, max_len=128)
    x = torch.randn(2, 100, 8)
    want = layer(x)
    got = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.isfinite(got.float()).all()
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 0.05, rel


def test_bfloat16_backward_on_cpu():
    layer = ChordMixing(8, max_len=64).to(torch.bfloat16)
    layer(torch.randn(2, 50, 8, dtype=torch.bfloat16)).float().square().sum().backward()
    assert torch.isfinite(layer.rows.w1.grad.float()).all() and layer.rows.w1.grad.abs().sum() > 0


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    torch.manual_seed(0)
    layer = ChordMixing(8, max_len=256)
    x = torch.randn(2, 200, 8)
    want = layer(x)
    layer_gpu = layer.to("cuda", dtype)
    x_gpu = x.to("cuda", dtype).requires_grad_()
    got = layer_gpu(x_gpu)
    got.float().square().sum().backward()
    assert got.device.type == "cuda" and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (got.float().cpu() - want).norm() / want.norm() < tol
    assert x_gpu.grad.abs().sum() > 0


@pytest.mark.parametrize("mixer", ["chord", "softmax"])
@pytest.mark.parametrize("pooling", ["mean", "max", "first", "flatten"])
def test_sequence_model_shapes(mixer, pooling):
    tokens = SequenceModel(4, mixer=mixer, vocab_size=6, dim=8, max_len=32, positional="sinusoidal", pooling=pooling)
    assert tokens(torch.randint(0, 6, (3, 32))).shape == (3, 4)
    feats = SequenceModel(1, mixer=mixer, in_features=2, dim=8, max_len=32, positional="learned", pooling=pooling, depth=2)
    assert feats(torch.randn(3, 32, 2)).shape == (3, 1)


def test_sequence_model_accepts_shorter_sequences_and_trains():
    torch.manual_seed(0)
    model = SequenceModel(1, in_features=2, dim=8, max_len=64)
    out = model(torch.randn(2, 45, 2))
    assert out.shape == (2, 1)
    out.sum().backward()
    assert model.blocks[0].mixer.rows.w1.grad.abs().sum() > 0


def test_sequence_model_rejects_bad_options_and_lengths():
    with pytest.raises(SfaError, match="mixer of SequenceModel must be one of chord, softmax; got 'lstm'"):
        SequenceModel(2, mixer="lstm", vocab_size=4)
    with pytest.raises(SfaError, match="pooling"):
        SequenceModel(2, vocab_size=4, pooling="sum")
    with pytest.raises(SfaError, match="exactly one of vocab_size"):
        SequenceModel(2)
    with pytest.raises(SfaError, match="normalize of ChordMixing"):
        ChordMixing(4, max_len=8, normalize="l2")
    model = SequenceModel(2, vocab_size=4, dim=8, max_len=16)
    with pytest.raises(SfaError, match="at most 16; got N=17"):
        model(torch.zeros(1, 17, dtype=torch.long))
    flat = SequenceModel(2, vocab_size=4, dim=8, max_len=16, pooling="flatten")
    with pytest.raises(SfaError, match="exactly 16; got N=8"):
        flat(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(SfaError, match=r"shape \(batch, N, 4\)"):
        ChordMixing(4, max_len=8)(torch.zeros(2, 4))


def test_softmax_attention_fused_equals_explicit():
    torch.manual_seed(0)
    fused = SoftmaxAttention(8, heads=2)
    explicit = SoftmaxAttention(8, heads=2, fused=False)
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 20, 8)
    torch.testing.assert_close(fused(x), explicit(x), rtol=1e-5, atol=1e-6)
