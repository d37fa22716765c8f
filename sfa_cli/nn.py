"""Torch layers: the parametric Chord factorization (a token-mixing layer for sequences), and
:class:`FactorizedLinear`, any approximation sfa writes as a trainable ``nn.Linear``.

Instead of learning the non-zero entries of the factors directly, one small MLP
per factor maps each token x_i to the L+1 non-zeros of row i of that factor, so
the factors depend on the input:

    Y = W(1)(x) W(2)(x) ... W(M)(x) V(x),      V(x) = MLP(x)

with the Chord pattern (row i links i and i + b^k mod N), M = ceil(log_b N)
and L = floor(log_b N). The product replaces the softmax attention matrix of a
Transformer: every output token can depend on every input token, yet the layer
costs O(N log^2 N) time and O(N log N) memory instead of O(N^2). The sparse
products run through :func:`sfa_cli.approximations.kernels.sparse_matmul` (CSR on CPU and
CUDA for float32/float64; shifted row slices of the circulant Chord pattern for
bfloat16).

Example
-------
>>> import torch
>>> layer = ChordMixing(16, max_len=1024)
>>> layer(torch.randn(2, 100, 16)).shape          # any N <= max_len
torch.Size([2, 100, 16])
>>> model = SequenceModel(1, in_features=2, dim=16, max_len=256)
>>> model(torch.randn(4, 256, 2)).shape
torch.Size([4, 1])

Reference: R. Khalitov, T. Yu, L. Cheng, Z. Yang, "Sparse factorization of
square matrices with application to neural attention modeling", Neural
Networks 152 (2022) 160-168.

:class:`FactorizedLinear` (at the end of this module) is ``y = x A_hat^T + b`` with A_hat a
fitted approximation of any kind: its stored numbers are the parameters, its
sparse supports fixed buffers, and the n x n weight is never formed.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from sfa_cli.errors import SfaError
from sfa_cli.approximations.base import Approximation, load_approximation
from sfa_cli.approximations.kernels import FactorStructure, chain_matmul, resolve_dtype, sparse_matmul
from sfa_cli.approximations.kinds import LowRank, Monarch, SparseMatrix, SumApproximation
from sfa_cli.approximations.patterns import chord_budget, chord_pattern
from sfa_cli.approximations.sparse_factors import SparseFactors

__all__ = ["ChordMixing", "SoftmaxAttention", "SequenceModel", "SavedTensorBytes", "FactorizedLinear", "MIXERS",
           "NORMALIZATIONS", "POOLINGS"]

#: How the row entries produced by the MLPs are normalised (see :class:`ChordMixing`).
NORMALIZATIONS = ("softmax", "scale", "none")
POOLINGS = ("mean", "max", "first", "flatten")
POSITIONALS = ("sinusoidal", "learned", None)


def _choice(name: str, value, choices, owner: str):
    if value not in choices:
        shown = ", ".join("None" if c is None else str(c) for c in choices)
        raise SfaError(f"{name} of {owner} must be one of {shown}; got {value!r}")
    return value


@functools.lru_cache(maxsize=64)
def _chord_structure(n: int, base: int, device: torch.device):
    """CSR structure of the n x n Chord factor on `device`, and where its values come from.

    Returns ``(struct, k, i)``: CSR entry e lies in row ``i[e]`` and holds row
    entry ``k[e]`` of the Chord table (column ``table[i[e], k[e]]``).
    Every Chord factor has the same pattern, so one structure serves all M
    factors; cached because building it is O(nnz log nnz) numpy work.
    """
    table = chord_pattern(n, base=base).tables[0]
    struct, order = FactorStructure.from_table(table, device)
    K = table.shape[1]
    i, k = np.divmod(order, K)  # order[e] = i * K + k: position in the (n, K) table
    return struct, torch.as_tensor(k, device=device), torch.as_tensor(i, device=device)


class _FactorMLPs(nn.Module):
    """M independent two-layer MLPs d -> hidden -> K, evaluated as two batched products.

    Parameters are stacked along a leading factor axis (``w1[m]``, ``b1[m]``,
    ``w2[m]``, ``b2[m]`` are the MLP of factor m), so the first layers of all M
    MLPs are one matrix product, not M small ones. The result is feature-major,
    (M, K, tokens): the softmax over a row's K entries then runs over a
    non-contiguous axis with the tokens contiguous, which is several times
    faster on CPU than a softmax over a last axis of length K ~ 12.
    """

    def __init__(self, factors: int, dim: int, hidden: int, out: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(factors, hidden, dim))
        self.b1 = nn.Parameter(torch.empty(factors, hidden, 1))
        self.w2 = nn.Parameter(torch.empty(factors, out, hidden))
        self.b2 = nn.Parameter(torch.empty(factors, out, 1))
        self.reset_parameters()

    def reset_parameters(self):
        # The same uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) as nn.Linear's default.
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[2])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor, factors: int, out: int) -> torch.Tensor:
        """x (tokens, d) -> (factors, out, tokens): the first `factors` MLPs, their first `out` outputs."""
        w1, b1 = self.w1[:factors], self.b1[:factors]
        w2, b2 = self.w2[:factors, :out], self.b2[:factors, :out]
        h = (w1.reshape(-1, x.shape[1]) @ x.T).view(factors, -1, x.shape[0])  # (M, hidden, tokens)
        h = F.gelu(h + b1)
        return torch.baddbmm(b2, w2, h)


class ChordMixing(nn.Module):
    """Token mixing by a product of data-dependent sparse Chord factors.

    ``Y = W(1)(x) ... W(M)(x) V(x)``: MLP m maps token x_i to the L+1 non-zero
    entries of row i of factor W(m) (columns i and i + base^k mod N, k < L, the
    order of :func:`sfa_cli.approximations.patterns.chord_pattern`), and a value MLP gives V.
    With ``residual=True`` the value is added back after every factor, as in
    the paper's code: ``Y_M = W(M) V + V``, ``Y_m = W(m) Y_(m+1) + V``.

    Parameters
    ----------
    dim : int
        Token dimension d of the input (batch, N, d).
    max_len : int
        Longest sequence the layer accepts; fixes the number of factor MLPs,
        ceil(log_base max_len), and their width floor(log_base max_len) + 1.
        A shorter sequence uses the first ceil(log_base N) MLPs and their first
        floor(log_base N) + 1 outputs (the Chord offsets of a shorter sequence
        are a prefix of those of a longer one).
    out_dim : int, default=dim
        Channels of V and of the output.
    hidden : int, default=dim
        Hidden width of every MLP (one GELU layer).
    base : int, default=2
        Chord offsets are powers of base.
    residual : bool, default=False
        Add V back after every factor (the paper's code does). With softmax
        rows it is not needed for stability and trained worse in
        ``docs/attention.md``; the blocks of :class:`SequenceModel` have their
        own residual around the whole layer.
    normalize : {"softmax", "scale", "none"}, default="softmax"
        What is done to the L+1 entries of each row: ``softmax`` makes every
        factor row-stochastic (so the product is row-stochastic, like an
        attention matrix, and stays bounded at any depth); ``scale`` divides the
        raw entries by sqrt(L+1); ``none`` uses them raw (the paper's code).
        Without softmax the product of M factors shrinks or grows
        geometrically with M unless ``residual=True``.
    dropout : float, default=0.0
        Dropout on V.

    Shapes: input (batch, N, dim) with 1 <= N <= max_len, output (batch, N, out_dim).
    float32, float64 and bfloat16 on CPU and CUDA.
    """

    def __init__(self, dim: int, *, max_len: int, out_dim: int | None = None, hidden: int | None = None,
                 base: int = 2, residual: bool = False, normalize: str = "softmax", dropout: float = 0.0):
        super().__init__()
        if int(dim) < 1:
            raise SfaError(f"dim of ChordMixing must be >= 1; got {dim}")
        if int(base) < 2:
            raise SfaError(f"base of ChordMixing must be an integer >= 2; got {base}")
        if int(max_len) < 2:
            raise SfaError(f"max_len of ChordMixing must be >= 2; got {max_len}")
        self.dim = int(dim)
        self.out_dim = int(out_dim or dim)
        self.hidden = int(hidden or dim)
        self.base = int(base)
        self.max_len = int(max_len)
        self.residual = bool(residual)
        self.normalize = _choice("normalize", normalize, NORMALIZATIONS, "ChordMixing")
        budget = chord_budget(self.max_len, self.base)
        self.factors, self.nnz_per_row = budget["factors"], budget["nnz_per_row"]
        self.rows = _FactorMLPs(self.factors, self.dim, self.hidden, self.nnz_per_row)
        self.value = nn.Sequential(nn.Linear(self.dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, self.out_dim))
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, out_dim={self.out_dim}, hidden={self.hidden}, max_len={self.max_len}, "
                f"base={self.base}, factors={self.factors}, residual={self.residual}, normalize={self.normalize!r}")

    def shape_for(self, n: int) -> tuple[int, int]:
        """(M, L+1): factors and non-zeros per row used for a sequence of length n."""
        if not 1 <= n <= self.max_len:
            raise SfaError(f"ChordMixing was built for sequences of length 1 to {self.max_len}; got N={n}")
        if n == 1:
            return 0, 1
        budget = chord_budget(n, self.base)
        return budget["factors"], budget["nnz_per_row"]

    def _entries(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised row entries, feature-major: (M, L+1, batch * N)."""
        batch, n, d = x.shape
        M, K = self.shape_for(n)
        raw = self.rows(x.reshape(batch * n, d), M, K)
        if self.normalize == "softmax":
            return torch.softmax(raw, dim=1)
        if self.normalize == "scale":
            return raw / math.sqrt(K)
        return raw

    def row_entries(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised row entries of every factor, in Chord table order.

        x : tensor of shape (batch, N, dim).
        Returns a tensor of shape (M, batch, N, L+1); entry [m, b, i, k] is
        W(m+1)[i, table[i, k]] for sample b, with ``table = chord_pattern(N, base=base).tables[0]``.
        """
        batch, n, _ = x.shape
        e = self._entries(x)
        return e.view(e.shape[0], e.shape[1], batch, n).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise SfaError(f"ChordMixing expects input of shape (batch, N, {self.dim}); got {tuple(x.shape)}")
        batch, n, _ = x.shape
        v = self.dropout(self.value(x))
        if n == 1:  # a 1 x 1 pattern has no factors: nothing to mix
            return v
        entries = self._entries(x)  # (M, K, batch * n)
        struct, k, i = _chord_structure(n, self.base, x.device)
        # CSR entry e of sample b is entries[m, k[e], b * n + i[e]]: one gather for all factors.
        source = (k * (batch * n) + i).unsqueeze(0) + (torch.arange(batch, device=x.device) * n).unsqueeze(1)
        values = entries.reshape(entries.shape[0], -1).index_select(1, source.reshape(-1))
        y = v
        for w in reversed(values.view(entries.shape[0], batch, -1).unbind(0)):  # W(M) acts first
            y = sparse_matmul(struct, w, y)
            if self.residual:
                y = y + v
        return y


class SoftmaxAttention(nn.Module):
    """Multi-head softmax self-attention, the O(N^2) baseline that ChordMixing replaces.

    Parameters
    ----------
    dim : int
        Token dimension (divisible by heads).
    heads : int, default=1
    fused : bool, default=True
        Use :func:`torch.nn.functional.scaled_dot_product_attention` (flash or
        memory-efficient kernels where torch has them: O(N) memory, O(N^2)
        time). ``False`` forms softmax(QK^T / sqrt(d_head)) explicitly, which
        keeps the N x N matrix for the backward pass.
    dropout : float, default=0.0
        Dropout on the attention weights (training only).
    """

    def __init__(self, dim: int, *, heads: int = 1, fused: bool = True, dropout: float = 0.0):
        super().__init__()
        if int(heads) < 1 or int(dim) % int(heads):
            raise SfaError(f"dim of SoftmaxAttention ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.fused, self.p = int(dim), int(heads), bool(fused), float(dropout)
        self.qkv = nn.Linear(self.dim, 3 * self.dim)
        self.out = nn.Linear(self.dim, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, fused={self.fused}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise SfaError(f"SoftmaxAttention expects input of shape (batch, N, {self.dim}); got {tuple(x.shape)}")
        batch, n, d = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.p if self.training else 0.0
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            a = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads), dim=-1)
            y = F.dropout(a, p) @ v
        return self.out(y.transpose(1, 2).reshape(batch, n, d))


#: Token mixers that :class:`SequenceModel` can use, by name.
MIXERS = {"chord": ChordMixing, "softmax": SoftmaxAttention}


def _sinusoidal(n: int, dim: int, device, dtype) -> torch.Tensor:
    """The fixed sine/cosine position code of Vaswani et al., shape (n, dim)."""
    pos = torch.arange(n, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype)


class _Block(nn.Module):
    """Pre-norm residual block: x + mixer(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, mixer: nn.Module, dim: int, ffn: bool, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim) if ffn else None
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) if ffn else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.dropout(self.mixer(self.norm1(x)))
        if self.ffn is not None:
            x = x + self.dropout(self.ffn(self.norm2(x)))
        return x


class SequenceModel(nn.Module):
    """A small classifier/regressor for sequences: embed, mix tokens, pool, predict.

    ``embedding (+ position) -> depth x [x + mixer(LN x); x + FFN(LN x)] -> LN -> pooling -> head``.
    The blocks differ between ``mixer="chord"`` and ``mixer="softmax"`` only in
    the token mixer, so the two are compared at the same width and depth.

    Parameters
    ----------
    out_features : int
        Outputs: classes for classification (logits), 1 for regression.
    mixer : {"chord", "softmax"}, default="chord"
    vocab_size : int, optional
        Token input: LongTensor (batch, N) of ids in [0, vocab_size).
    in_features : int, optional
        Feature input: float tensor (batch, N, in_features). Exactly one of
        vocab_size and in_features is given.
    dim : int, default=32
        Width of every token representation.
    depth : int, default=1
        Number of blocks.
    max_len : int, default=4096
        Longest sequence (fixes ChordMixing's factor count and the size of a
        learned positional table; ``pooling="flatten"`` needs N == max_len).
    positional : {"sinusoidal", "learned", None}, default=None
        Position code added to the embedding.
    pooling : {"mean", "max", "first", "flatten"}, default="mean"
        How the (batch, N, dim) tokens become one vector: mean or max over N,
        the first token, or all tokens concatenated (the paper's FLATTEN).
    ffn : bool, default=True
        Feed-forward sub-layer in every block.
    dropout : float, default=0.0
    mixer_options : dict, optional
        Extra keywords for the mixer, e.g. ``{"normalize": "none"}`` for
        ChordMixing or ``{"heads": 2}`` for SoftmaxAttention.
    """

    def __init__(self, out_features: int, *, mixer: str = "chord", vocab_size: int | None = None,
                 in_features: int | None = None, dim: int = 32, depth: int = 1, max_len: int = 4096,
                 positional: str | None = None, pooling: str = "mean", ffn: bool = True, dropout: float = 0.0,
                 mixer_options: dict | None = None):
        super().__init__()
        _choice("mixer", mixer, tuple(MIXERS), "SequenceModel")
        _choice("positional", positional, POSITIONALS, "SequenceModel")
        _choice("pooling", pooling, POOLINGS, "SequenceModel")
        if (vocab_size is None) == (in_features is None):
            raise SfaError("SequenceModel needs exactly one of vocab_size (token ids) and in_features (float features)")
        self.mixer, self.positional, self.pooling = mixer, positional, pooling
        self.dim, self.max_len = int(dim), int(max_len)
        self.embed = nn.Embedding(vocab_size, dim) if vocab_size is not None else nn.Linear(in_features, dim)
        self.pos_table = nn.Embedding(self.max_len, dim) if positional == "learned" else None
        options = dict(mixer_options or {})
        if mixer == "chord":
            options.setdefault("max_len", self.max_len)
        self.blocks = nn.ModuleList(_Block(MIXERS[mixer](dim, **options), dim, ffn, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        pooled = dim * self.max_len if pooling == "flatten" else dim
        self.head = nn.Linear(pooled, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, N) token ids or (batch, N, in_features) floats -> (batch, out_features)."""
        h = self.embed(x)
        n = h.shape[1]
        if n > self.max_len or (self.pooling == "flatten" and n != self.max_len):
            need = f"exactly {self.max_len}" if self.pooling == "flatten" else f"at most {self.max_len}"
            raise SfaError(f"SequenceModel was built for sequences of length {need}; got N={n}")
        if self.positional == "learned":
            h = h + self.pos_table.weight[:n]
        elif self.positional == "sinusoidal":
            h = h + _sinusoidal(n, self.dim, h.device, h.dtype)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        if self.pooling == "mean":
            h = h.mean(1)
        elif self.pooling == "max":
            h = h.amax(1)
        elif self.pooling == "first":
            h = h[:, 0]
        else:
            h = h.reshape(h.shape[0], -1)
        return self.head(h)


class SavedTensorBytes:
    """Context manager that adds up the bytes autograd saves for the backward pass.

    This is the activation memory of a training step, independent of the
    allocator: every tensor packed by :func:`torch.autograd.graph.saved_tensors_hooks`
    is counted once per storage (views of one buffer count once), dense
    tensors by the size of their storage, others by numel * element size.

    >>> x = torch.randn(2, 64, 8, requires_grad=True)
    >>> with SavedTensorBytes() as saved:
    ...     y = ChordMixing(8, max_len=64)(x)
    >>> saved.bytes > 0
    True
    """

    def __init__(self):
        self.bytes = 0
        self.tensors = 0
        self._seen: set = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key, size = (storage.data_ptr(), t.device), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse and other layouts have no plain storage
            key, size = (id(t), t.device), t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += size
            self.tensors += 1
        return t

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._seen.clear()
        return False


# -- an approximation as a trainable linear layer ----------------------------------------
def _parameter(a: np.ndarray, dtype: torch.dtype, device) -> nn.Parameter:
    """A parameter holding a copy of ``a`` (training never writes into the approximation's arrays)."""
    return nn.Parameter(torch.tensor(np.asarray(a), dtype=dtype, device=device))


def _index_buffer(a: np.ndarray, device) -> torch.Tensor:
    return torch.tensor(np.asarray(a, dtype=np.int64), device=device)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A parameter's current values as a fresh float32/float64 array (approximations store those two)."""
    t = t.detach().to("cpu")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.numpy().copy()


class _SparseChain(nn.Module):
    """W(1) ... W(M) with fixed CSR supports: a SparseFactors chain, or one SparseMatrix (M = 1).

    ``values[m]`` are W(m+1)'s non-zeros in CSR order (parameters); ``crow{m}`` and
    ``col{m}`` its support (buffers). The kernels' structures are built from the
    buffers once per device and rebuilt after ``load_state_dict``.
    """

    def __init__(self, approx: SparseFactors | SparseMatrix, dtype: torch.dtype, device):
        super().__init__()
        self.kind, self.n, self.method = approx.kind, approx.n, approx.method
        self.info = dict(approx.info)
        self.pattern = dict(approx.pattern) if isinstance(approx, SparseFactors) else None
        mats = approx.factors if isinstance(approx, SparseFactors) else [approx.matrix]
        self.num_factors = len(mats)
        self.values = nn.ParameterList(_parameter(W.data, dtype, device) for W in mats)
        for m, W in enumerate(mats):
            self.register_buffer(f"crow{m}", _index_buffer(W.indptr, device))
            self.register_buffer(f"col{m}", _index_buffer(W.indices, device))
        self._structures_by_device: dict = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.values[0].dtype

    def _support(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_buffer(f"crow{m}"), self.get_buffer(f"col{m}")

    def structures(self, device: torch.device) -> tuple[FactorStructure, ...]:
        """The kernels' structures of the factors on ``device`` (built on first use there)."""
        key = str(device)
        hit = self._structures_by_device.get(key)
        if hit is None:
            hit = tuple(FactorStructure.from_csr(crow.cpu().numpy(), col.cpu().numpy(), self.n, device)
                        for crow, col in (self._support(m) for m in range(self.num_factors)))
            self._structures_by_device[key] = hit
        return hit

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._structures_by_device.clear()  # the supports may have changed

    @torch.compiler.disable  # torch.compile cannot build the sparse CSR tensors of the kernels
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, n) -> x W(M)^T ... W(1)^T = (W(1) ... W(M) x^T)^T."""
        return chain_matmul(self.structures(x.device), list(self.values), x.T).T

    def to_approximation(self, info: dict) -> SparseFactors | SparseMatrix:
        mats = []
        for m in range(self.num_factors):
            crow, col = self._support(m)
            mats.append(sp.csr_matrix((_numpy(self.values[m]), col.cpu().numpy(), crow.cpu().numpy()),
                                      shape=(self.n, self.n)))
        if self.kind == SparseMatrix.kind:
            return SparseMatrix(mats[0], method=self.method, info=info)
        return SparseFactors(mats, method=self.method, pattern=self.pattern, info=info)

    def extra_repr(self) -> str:
        nnz = [int(v.numel()) for v in self.values]
        return f"kind={self.kind!r}, factors={self.num_factors}, nnz={nnz if len(nnz) > 1 else nnz[0]}"


class _LowRank(nn.Module):
    """left @ right as two dense parameters: x -> (x right^T) left^T, 2 n r multiply-adds a row."""

    def __init__(self, approx: LowRank, dtype: torch.dtype, device):
        super().__init__()
        self.kind, self.n, self.method, self.info = approx.kind, approx.n, approx.method, dict(approx.info)
        self.left = _parameter(approx.left, dtype, device)
        self.right = _parameter(approx.right, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.right.T) @ self.left.T

    def to_approximation(self, info: dict) -> LowRank:
        return LowRank(_numpy(self.left), _numpy(self.right), method=self.method, info=info)

    def extra_repr(self) -> str:
        return f"rank={self.left.shape[1]}"


class _Monarch(nn.Module):
    """The Monarch product as its two block-diagonal factors u and v (parameters), as in ``Monarch._matmul``.

    With x[b, j0 * s1 + j1]: z[b, j0, i1] = sum_j1 v[i1, j0, j1] x[b, j0, j1] (s0 blocks of
    s1 x s1), then y[b, i0 * s1 + i1] = sum_j0 u[i1, j0, i0] z[b, j0, i1] (s1 blocks of s0 x s0);
    the permutation between the two is the change of axes of z.
    """

    def __init__(self, approx: Monarch, dtype: torch.dtype, device):
        super().__init__()
        self.kind, self.n, self.method, self.info = approx.kind, approx.n, approx.method, dict(approx.info)
        self.s0, self.s1 = approx.s0, approx.s1
        self.u = _parameter(approx.u, dtype, device)
        self.v = _parameter(approx.v, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        z = torch.einsum("iaj,baj->bai", self.v, x.reshape(b, self.s0, self.s1))
        return torch.einsum("iak,bai->bki", self.u, z).reshape(b, self.n)

    def to_approximation(self, info: dict) -> Monarch:
        return Monarch(_numpy(self.u), _numpy(self.v), method=self.method, info=info)

    def extra_repr(self) -> str:
        return f"blocks={self.s0}x{self.s1}"


class _Sum(nn.Module):
    """A sum of approximations: one operator per part (a ModuleList), their outputs added."""

    def __init__(self, approx: SumApproximation, dtype: torch.dtype, device):
        super().__init__()
        self.kind, self.n, self.method, self.info = approx.kind, approx.n, approx.method, dict(approx.info)
        self.parts = nn.ModuleList(_operator(p, dtype, device) for p in approx.parts)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.parts[0](x)
        for part in self.parts[1:]:
            y = y + part(x)
        return y

    def to_approximation(self, info: dict) -> SumApproximation:
        return SumApproximation([p.to_approximation(p.info) for p in self.parts], method=self.method, info=info)


_OPERATORS = {
    SparseFactors.kind: _SparseChain,
    SparseMatrix.kind: _SparseChain,
    LowRank.kind: _LowRank,
    Monarch.kind: _Monarch,
    SumApproximation.kind: _Sum,
}


def _operator(approx, dtype: torch.dtype, device) -> nn.Module:
    op = _OPERATORS.get(getattr(approx, "kind", None)) if isinstance(approx, Approximation) else None
    if op is None:
        what = f"a {approx.kind!r} approximation" if isinstance(approx, Approximation) else f"a {type(approx).__name__}"
        raise SfaError(f"FactorizedLinear is built from an sfa approximation of kind {', '.join(sorted(_OPERATORS))}; "
                       f"got {what}")
    return op(approx, dtype, device)


class FactorizedLinear(nn.Module):
    """A linear layer ``y = x A_hat^T + b`` whose n x n weight is an sfa approximation, trainable.

    The ``nn.Linear`` convention, with the weight A_hat never formed: the
    approximation's stored numbers are the parameters (their count is
    ``params``) on its fixed structure, and a forward pass costs what a product
    with the approximation costs.

    The parameters by kind (under ``operator``):

    - ``sparse_factors``: ``values[m]``, the non-zeros of factor m+1 in CSR order,
      on the supports ``crow{m}``, ``col{m}`` (buffers); products by the chain kernels.
    - ``sparse``: the same with one factor.
    - ``low_rank``: ``left`` (n, r) and ``right`` (r, n); two thin products.
    - ``monarch``: ``u`` and ``v``; two batched block-diagonal products.
    - ``sum``: ``parts``, a ModuleList of the above; their outputs added.

    Parameters
    ----------
    approximation : Approximation
        A :class:`~sfa_cli.approximations.sparse_factors.SparseFactors`,
        :class:`~sfa_cli.approximations.kinds.LowRank`,
        :class:`~sfa_cli.approximations.kinds.SparseMatrix`,
        :class:`~sfa_cli.approximations.kinds.Monarch` or a
        :class:`~sfa_cli.approximations.kinds.SumApproximation` of them. Its
        arrays are copied: training does not change it.
    bias : bool, default=False
        Add a bias vector b of length n (initialised to zeros).
    dtype : torch.dtype or str, optional
        Of the parameters; default the approximation's (float32 or float64).
        The sparse kernels serve float32/float64 (bfloat16 by a slower gather).
    device : torch.device or str, optional
        Where the parameters live; default torch's default device.

    Notes
    -----
    Shapes: input (..., n), output (..., n), of the parameters' dtype. Under
    ``torch.compile`` low rank and Monarch compile whole; the sparse products
    (``sparse_factors``, ``sparse``, the sparse parts of a ``sum``) run eagerly,
    with a graph break around each (so ``fullgraph=True`` fails for those kinds):
    torch.compile cannot build the sparse CSR tensors of the kernels.

    Example
    -------
    >>> import torch
    >>> from sfa_cli import FactorizedLinear, SparseFactors, chord_pattern
    >>> layer = FactorizedLinear(SparseFactors.from_pattern(chord_pattern(16)), bias=True)
    >>> layer(torch.randn(8, 16, dtype=torch.float64)).shape
    torch.Size([8, 16])
    >>> layer.to_approximation()              # the current values, ready to .save(path)
    <SparseFactors chord n=16 factors=4 params=320 float64>

    ``FactorizedLinear.from_file("F.npz")`` builds the layer from a file that
    ``sfa fit`` wrote.
    """

    def __init__(self, approximation: Approximation, *, bias: bool = False, dtype=None, device=None):
        super().__init__()
        if dtype is None:
            dtype = torch.from_numpy(np.zeros(0, dtype=getattr(approximation, "dtype", np.float64))).dtype
        dtype = resolve_dtype(dtype)
        self.operator = _operator(approximation, dtype, device)
        self.kind = approximation.kind
        self.n = self.in_features = self.out_features = approximation.n
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.n, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_approximation(cls, approximation: Approximation, *, bias: bool = False, dtype=None,
                           device=None) -> "FactorizedLinear":
        """The layer of an approximation object (the same as ``FactorizedLinear(approximation, ...)``)."""
        return cls(approximation, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_file(cls, path, *, bias: bool = False, dtype=None, device=None) -> "FactorizedLinear":
        """The layer of an approximation file (``.npz`` or ``.h5``, any kind), read by :func:`load_approximation`."""
        return cls(load_approximation(path), bias=bias, dtype=dtype, device=device)

    @property
    def params(self) -> int:
        """Numbers of the approximation (the parameters less the bias), as ``Approximation.params`` counts them."""
        return int(sum(p.numel() for p in self.operator.parameters()))

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (the input's must match)."""
        return self.operator.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ A_hat.T + b`` for x of shape (..., n)."""
        if x.dim() < 1 or x.shape[-1] != self.n:
            raise SfaError(f"FactorizedLinear expects input of shape (..., {self.n}); got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise SfaError(f"FactorizedLinear has {self.dtype} parameters; got input of dtype {x.dtype} "
                           f"(convert one of them with .to(dtype))")
        y = self.operator(x.reshape(-1, self.n)).reshape(x.shape)
        return y if self.bias is None else y + self.bias

    def to_approximation(self, info: dict | None = None) -> Approximation:
        """The current parameter values as an approximation of the same kind (the bias is not part of it).

        Its method, pattern and per-part facts are those of the approximation the
        layer was built from; ``info`` replaces the facts stored with the result
        (default: the original's, which describe the values before training).
        ``.save(path)`` writes it and :func:`load_approximation` reads it back.
        """
        return self.operator.to_approximation(dict(self.operator.info if info is None else info))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n={self.n}, params={self.params}, bias={self.bias is not None}"
