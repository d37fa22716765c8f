"""The one kernel for chains of sparse factors, on CPU and CUDA.

Every factor W is an n x n sparse matrix with a fixed structure and a 1-D
tensor of values in CSR order (column indices sorted within each row). Three
products are all that fitting, applying and the attention layer need:

* ``W @ X`` and ``W^T @ X``      sparse-dense products, cost nnz * b;
* ``(G @ X^T)`` on W's pattern     a sampled dense-dense product, cost nnz * b
  (the gradient of the values; never an n x n x n product or a dense factor).

:class:`SparseMatmul` wraps them as one autograd function, so a chain
``W(1) ... W(M) X`` is a plain loop and autograd keeps exactly the right
partial products the analytic gradient needs.

Two implementations share that interface, chosen per factor:

* a *circulant* path for patterns whose row i holds columns (i + o_k) mod n for
  fixed offsets o_k (the Chord pattern, and the butterfly after relabelling is
  not needed): ``W @ X`` is K in-place multiply-adds of shifted row slices of X,
  with no index arrays, any dtype, any batch shape;
* a general *CSR* path (torch.sparse CSR products and
  :func:`torch.sparse.sampled_addmm`) for every other pattern, with a gather
  fallback for dtypes the CSR kernels lack (bfloat16 on CPU).

The sampled product always uses ``sampled_addmm`` for float32/float64, which
was the fastest in scripts/bench_fit.py measurements. A leading batch
dimension (one set of values per sample, as in the attention layer) is
supported by both paths.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FactorStructure", "SparseMatmul", "ChainMatmul", "sparse_matmul", "chain_matmul", "resolve_device", "resolve_dtype"]

# torch warns once per process that CSR support is "beta"; it is what we rely on.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
# torch 2.11 warns on every CSR construction unless invariant checks were opted in or out globally;
# sfa builds its structures itself and passes check_invariants=False, so the warning is noise.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

_CSR_DTYPES = {torch.float32, torch.float64}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


# Below this n, ``auto`` stays on the CPU even with a GPU: an evaluation there is bound by kernel
# launches (about 4 ms on an H100 at any n up to 2048, against 3.3 ms on one CPU core at n = 256
# and 11 ms at n = 512; docs/performance.md).
AUTO_CUDA_MIN_N = 512


def resolve_device(device: str | torch.device = "auto", n: int | None = None) -> torch.device:
    """Map ``auto|cpu|cuda|cuda:K`` to a torch device.

    ``auto`` picks CUDA when present, unless the problem size ``n`` is given and below
    :data:`AUTO_CUDA_MIN_N`, where the CPU is faster.
    """
    from sfa_cli.errors import SfaError

    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        small = n is not None and n < AUTO_CUDA_MIN_N
        return torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SfaError(f"device {device!r} was requested but CUDA is not available (torch {torch.__version__})")
        return torch.device(name)
    raise SfaError(f"device must be one of auto, cpu, cuda; got {device!r}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``float32|float64`` (or a torch dtype) to a torch dtype."""
    from sfa_cli.errors import SfaError

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise SfaError(f"dtype must be one of float32, float64; got {dtype!r}") from None


def _circulant_offsets(indptr: np.ndarray, indices: np.ndarray, n: int):
    """(offsets, ell) when row i has columns (i + offsets) mod n, else (None, None).

    ``ell[i * k + j]`` is the CSR position of row i's entry at offset ``offsets[j]``.
    """
    counts = np.diff(indptr)
    if n == 0 or counts.min() != counts.max() or counts[0] == 0:
        return None, None
    k = int(counts[0])
    diff = (indices.reshape(n, k) - np.arange(n)[:, None]) % n
    order = np.argsort(diff, axis=1, kind="stable")
    sorted_diff = np.take_along_axis(diff, order, axis=1)
    if not (sorted_diff == sorted_diff[0]).all():
        return None, None
    ell = (order + (np.arange(n) * k)[:, None]).reshape(-1)
    return tuple(int(o) for o in sorted_diff[0]), ell


@dataclass(frozen=True)
class FactorStructure:
    """The structure of one factor (and of its transpose), on one device.

    Attributes
    ----------
    n : int
    crow, col : LongTensor of shape (n + 1,), (nnz,)
        CSR structure of W, column indices sorted within each row.
    crow_t, col_t : LongTensor
        CSR structure of W^T.
    perm_t : LongTensor of shape (nnz,)
        ``values[perm_t]`` are the values of W^T in its CSR order.
    rows : LongTensor of shape (nnz,)
        Row index of every stored entry.
    offsets : tuple of int or None
        Set when the pattern is circulant: row i holds columns (i + o) mod n.
    ell, ell_inv : LongTensor of shape (nnz,) or None
        ``values[ell]`` viewed as (n, k) gives the value at (i, offsets[j]);
        ``ell_inv`` maps back.
    """

    n: int
    crow: torch.Tensor
    col: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    perm_t: torch.Tensor
    rows: torch.Tensor
    offsets: tuple | None = None
    ell: torch.Tensor | None = None
    ell_inv: torch.Tensor | None = None

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @classmethod
    def from_csr(cls, indptr: np.ndarray, indices: np.ndarray, n: int, device="cpu") -> "FactorStructure":
        """Build from numpy CSR arrays (indices sorted within rows)."""
        indptr = np.asarray(indptr, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
        perm_t = np.lexsort((rows, indices))  # entries by column, then row
        crow_t = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(indices, minlength=n), out=crow_t[1:])
        offsets, ell = _circulant_offsets(indptr, indices, n)
        ell_inv = None if ell is None else np.argsort(ell)

        def as_t(a):
            return None if a is None else torch.from_numpy(np.array(a, dtype=np.int64)).to(device)

        return cls(n, as_t(indptr), as_t(indices), as_t(crow_t), as_t(rows[perm_t]), as_t(perm_t), as_t(rows),
                   offsets, as_t(ell), as_t(ell_inv))

    @classmethod
    def from_table(cls, table: np.ndarray, device="cpu") -> tuple["FactorStructure", np.ndarray]:
        """Build from an (n, k) table of column indices (distinct within a row).

        Returns the structure and ``order``: CSR position -> flat table position,
        so ``values_csr = values_table.reshape(-1)[order]``.
        """
        n, k = table.shape
        order = np.argsort(table, axis=1, kind="stable")
        sorted_cols = np.take_along_axis(table, order, axis=1)
        flat_order = (order + (np.arange(n) * k)[:, None]).reshape(-1)
        indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
        return cls.from_csr(indptr, sorted_cols.reshape(-1), n, device), flat_order


# -- circulant path --------------------------------------------------------------------
def _circulant_apply(s: FactorStructure, values: torch.Tensor, X: torch.Tensor, transpose: bool) -> torch.Tensor:
    n = s.n
    V = values.index_select(-1, s.ell).unflatten(-1, (n, len(s.offsets)))
    shape = torch.broadcast_shapes(V.shape[:-2], X.shape[:-2]) + (n, X.shape[-1])
    Y = X.new_empty(shape, dtype=torch.promote_types(X.dtype, V.dtype))
    for j, o in enumerate(s.offsets):
        v = V[..., j].unsqueeze(-1)
        # transpose: Y[i + o] += V[i, j] X[i];  else: Y[i] += V[i, j] X[i + o]
        # (each as two slices because of the wrap-around; the first offset writes, the rest add)
        head, tail = (slice(o, None), slice(None, o)) if transpose else (slice(None, n - o), slice(n - o, None))
        src_head, src_tail = (slice(None, n - o), slice(n - o, None)) if transpose else (slice(o, None), slice(None, o))
        v_head, v_tail = (slice(None, n - o), slice(n - o, None))
        for dst, src, vs in ((head, src_head, v_head), (tail, src_tail, v_tail)):
            if o == 0 and dst is tail:  # no wrap-around for the self link
                continue
            if j == 0:
                torch.mul(v[..., vs, :], X[..., src, :], out=Y[..., dst, :])
            else:
                Y[..., dst, :].addcmul_(v[..., vs, :], X[..., src, :])
    return Y


def _circulant_sampled(s: FactorStructure, G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """out[..., e] = <G[row e], X[col e]> in CSR order, for dtypes without sampled_addmm."""
    n = s.n
    out = G.new_empty(torch.broadcast_shapes(G.shape[:-2], X.shape[:-2]) + (n, len(s.offsets)))
    for j, o in enumerate(s.offsets):
        out[..., : n - o, j] = (G[..., : n - o, :] * X[..., o:, :]).sum(-1)
        if o:
            out[..., n - o :, j] = (G[..., n - o :, :] * X[..., :o, :]).sum(-1)
    return out.flatten(-2).index_select(-1, s.ell_inv)


# -- compiled circulant path ---------------------------------------------------------
# For a circulant factor the three products are fixed sums of shifted rows:
#   W X   = sum_k V[:, k] * roll(X, -o_k)        W^T G = sum_k roll(V[:, k] * G, o_k)
#   grad  = [rowsum(G * roll(X, -o_k))]_k
# torch.compile (inductor) turns each into one loop nest with the offsets as constants: on one
# core at n = 1024, 256 columns, 2.2x / 2.0x / 1.2x faster than the CSR addmm / sampled_addmm
# (docs/performance.md). Compiling takes seconds (a disk cache makes later processes faster), so the
# path is used from COMPILE_MIN_N up, on the CPU, for plain 2-D float32/float64 blocks; set
# SFA_COMPILE=0 to turn it off. If compiling fails (no C++ compiler, say), sfa warns once and
# keeps the CSR path.
COMPILE_MIN_N = 1024
COMPILE_MAX_KEYS = 6
_compiled: dict = {}
_compile = {"enabled": os.environ.get("SFA_COMPILE", "1") != "0", "devices": {"cpu"},
            "notify": None}  # notify(message) before a new shape compiles (the CLI shows it)


def _make_circulant_kernels(offsets: tuple):
    def forward(V, X):
        Y = V[:, 0:1] * torch.roll(X, -offsets[0], 0)
        for k in range(1, len(offsets)):
            Y = Y + V[:, k : k + 1] * torch.roll(X, -offsets[k], 0)
        return Y

    def transposed(V, G):
        Z = torch.roll(V[:, 0:1] * G, offsets[0], 0)
        for k in range(1, len(offsets)):
            Z = Z + torch.roll(V[:, k : k + 1] * G, offsets[k], 0)
        return Z

    def sampled(G, X):
        return torch.stack([(G * torch.roll(X, -o, 0)).sum(1) for o in offsets], 1)

    return tuple(torch.compile(f, dynamic=False, fullgraph=True) for f in (forward, transposed, sampled))


def _compiled_kernels(s: FactorStructure, X: torch.Tensor):
    """The compiled (forward, transposed, sampled) kernels for this structure and block, or None."""
    if not (_compile["enabled"] and s.offsets is not None and s.n >= COMPILE_MIN_N and X.dim() == 2
            and X.device.type in _compile["devices"] and X.dtype in _CSR_DTYPES):
        return None
    key = (s.offsets, s.n, X.shape[1], X.dtype)
    if key not in _compiled:
        # dynamo recompiles a function's code for every new key and gives up after a few
        # (falling back to slow eager code): past COMPILE_MAX_KEYS, new shapes use CSR.
        if len(_compiled) >= COMPILE_MAX_KEYS:
            return None
        _compiled[key] = _make_circulant_kernels(s.offsets)
        if _compile["notify"] is not None:
            _compile["notify"](f"compiling kernels (n={s.n}, {X.shape[1]} columns; once per size)")
    return _compiled[key]


def _run_compiled(kernel, *args):
    """Call a compiled kernel; on a compiler failure turn the path off for good (None)."""
    try:
        return kernel(*args)
    except Exception as exc:  # torch raises several types (BackendCompilerFailed, InvalidCxxCompiler, ...)
        _compile["enabled"] = False
        warnings.warn(f"sfa: torch.compile failed ({type(exc).__name__}); using the CSR kernels instead", stacklevel=3)
        return None


# -- CSR path -----------------------------------------------------------------------
def _csr(crow, col, values, size):
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


_masks: dict = {}


def _ones_mask(s: FactorStructure, like: torch.Tensor) -> torch.Tensor:
    """W's pattern with unit values (the sampled product's mask), built once per structure and dtype."""
    key = (id(s.crow), like.dtype, like.device)
    hit = _masks.get(key)
    if hit is None or hit[0] is not s.crow:
        if len(_masks) > 256:  # structures come and go (one set per fit); keep the cache small
            _masks.clear()
        hit = (s.crow, _csr(s.crow, s.col, like.new_ones(s.nnz), (s.n, s.n)))
        _masks[key] = hit
    return hit[1]


def _block_diag(crow: torch.Tensor, col: torch.Tensor, n: int, batch: int):
    """CSR structure of a block-diagonal matrix with `batch` copies of (crow, col)."""
    nnz = col.numel()
    offs = torch.arange(batch, device=col.device)
    crow_b = torch.cat([crow.new_zeros(1), (crow[1:].unsqueeze(0) + (offs * nnz).unsqueeze(1)).reshape(-1)])
    col_b = (col.unsqueeze(0) + (offs * n).unsqueeze(1)).reshape(-1)
    return crow_b, col_b


def _spmm(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """W @ X into a fresh tensor: addmm with beta=0 and out= skips the zero-fill and copies of ``W @ X``."""
    out = X.new_empty((W.shape[0], X.shape[1]))
    return torch.addmm(out, W, X, beta=0.0, out=out)


def _csr_apply(s: FactorStructure, values: torch.Tensor, X: torch.Tensor, transpose: bool) -> torch.Tensor:
    n = s.n
    if transpose:
        crow, col, values = s.crow_t, s.col_t, values.index_select(-1, s.perm_t)
    else:
        crow, col = s.crow, s.col
    if X.dtype not in _CSR_DTYPES:  # gather fallback: Y[r] += v * X[c]
        rows = s.col.index_select(0, s.perm_t) if transpose else s.rows
        Xc = X.index_select(-2, col) * values.unsqueeze(-1)
        return Xc.new_zeros(Xc.shape[:-2] + (n, Xc.shape[-1])).index_add_(-2, rows, Xc)
    if values.dim() == 2:  # one factor per sample: one block-diagonal product
        batch, b = values.shape[0], X.shape[-1]
        cb, colb = _block_diag(crow, col, n, batch)
        Xf = X.reshape(batch * n, b) if X.dim() == 3 else X.repeat(batch, 1)
        return _spmm(_csr(cb, colb, values.reshape(-1), (batch * n, batch * n)), Xf).reshape(batch, n, b)
    if X.dim() == 3:  # shared factor, batched right-hand side
        batch, _, b = X.shape
        Y = _spmm(_csr(crow, col, values, (n, n)), X.transpose(0, 1).reshape(n, batch * b))
        return Y.reshape(n, batch, b).transpose(0, 1)
    return _spmm(_csr(crow, col, values, (n, n)), X.contiguous())


def _sampled(s: FactorStructure, G: torch.Tensor, X: torch.Tensor, batched: bool) -> torch.Tensor:
    """Values of (G @ X^T) on W's pattern, CSR order; summed over a batch the values do not have."""
    n = s.n
    kernels = _compiled_kernels(s, G) if G.dim() == 2 and X.dim() == 2 else None
    if kernels is not None:
        out = _run_compiled(kernels[2], G.contiguous(), X.contiguous())
        if out is not None:
            return out.reshape(-1).index_select(0, s.ell_inv)
    if G.dtype in _CSR_DTYPES:
        if G.dim() == 3 and batched:
            batch, _, b = G.shape
            cb, colb = _block_diag(s.crow, s.col, n, batch)
            mask = _csr(cb, colb, G.new_ones(batch * s.nnz), (batch * n, batch * n))
            return torch.sparse.sampled_addmm(mask, G.reshape(batch * n, b), X.reshape(batch * n, b).T,
                                              beta=0.0).values().reshape(batch, -1)
        if G.dim() == 3:  # shared values: the batch sum is one wide product
            batch, _, b = G.shape
            G = G.transpose(0, 1).reshape(n, batch * b)
            X = X.transpose(0, 1).reshape(n, batch * b)
        return torch.sparse.sampled_addmm(_ones_mask(s, G), G.contiguous(), X.T, beta=0.0).values()
    if s.offsets is not None:
        out = _circulant_sampled(s, G, X)
    else:
        out = (G.index_select(-2, s.rows) * X.index_select(-2, s.col)).sum(-1)
    return out if batched or out.dim() == 1 else out.sum(0)


def _apply(s: FactorStructure, values: torch.Tensor, X: torch.Tensor, transpose: bool) -> torch.Tensor:
    # CSR products were as fast or faster for float32/64 in column blocks (scripts/bench_fit.py);
    # the shifted slices serve the other dtypes (bfloat16) without index arrays.
    if s.offsets is not None and X.dtype not in _CSR_DTYPES:
        return _circulant_apply(s, values, X, transpose)
    kernels = _compiled_kernels(s, X) if values.dim() == 1 else None
    if kernels is not None:
        V = values.index_select(0, s.ell).view(s.n, len(s.offsets))
        Y = _run_compiled(kernels[1] if transpose else kernels[0], V, X.contiguous())
        if Y is not None:
            return Y
    return _csr_apply(s, values, X, transpose)


class SparseMatmul(torch.autograd.Function):
    """Y = W X (or W^T X) for a factor with a fixed structure and differentiable values."""

    @staticmethod
    def forward(ctx, values, X, struct: FactorStructure, transpose: bool):
        ctx.struct, ctx.transpose = struct, transpose
        ctx.save_for_backward(values, X)
        return _apply(struct, values, X, transpose)

    @staticmethod
    def backward(ctx, G):
        values, X = ctx.saved_tensors
        grad_values, grad_X = _backward_step(ctx.struct, values, X, G.contiguous(), ctx.transpose,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_values, grad_X, None, None


def _backward_step(s: FactorStructure, values, X, G, transpose: bool, want_values: bool, want_X: bool):
    """Gradients of <G, W X> (or <G, W^T X>) in W's values and in X; None where not wanted."""
    grad_values = grad_X = None
    if want_values:
        # d<G, W X>/dW = G X^T; d<G, W^T X>/dW = X G^T, both on W's pattern
        a, b = (X, G) if transpose else (G, X)
        grad_values = _sampled(s, a, b, batched=values.dim() == 2)
    if want_X:
        grad_X = _apply(s, values, G, not transpose)
        if grad_X.dim() > X.dim():
            grad_X = grad_X.sum(0)
    return grad_values, grad_X


def sparse_matmul(struct: FactorStructure, values: torch.Tensor, X: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """W @ X (or W^T @ X) for one factor; differentiable in values and X.

    values : tensor of shape (nnz,) or (batch, nnz), in CSR order.
    X : tensor of shape (n, b) or (batch, n, b).
    """
    return SparseMatmul.apply(values, X, struct, transpose)


# Up to this n, chain_matmul is one autograd node (ChainMatmul); above, one node per factor. The
# single node saves the per-node overhead (an N = 64 evaluation: 0.4 ms against 0.6 ms) but keeps
# every intermediate block until its backward ends, where per-factor nodes free each as soon as it
# is used: from n = 512 that cost more than it saved (n = 512: 12.5 ms against 10.4 ms; n = 4096:
# 0.81 s against 0.67 s, one thread).
FUSED_CHAIN_MAX_N = 256


class ChainMatmul(torch.autograd.Function):
    """W(1) ... W(M) X (or the transposed chain) as one autograd node.

    The same products as M :class:`SparseMatmul` nodes, with the backward pass as one
    loop: at small n a fit spends much of an evaluation in per-node autograd overhead.
    """

    @staticmethod
    def forward(ctx, X, structs, transpose: bool, *values):
        order = list(range(len(structs))) if transpose else list(reversed(range(len(structs))))
        inputs = []
        for m in order:
            inputs.append(X)
            X = _apply(structs[m], values[m], X, transpose)
        ctx.structs, ctx.transpose, ctx.order = structs, transpose, order
        ctx.save_for_backward(*values, *inputs)
        return X

    @staticmethod
    def backward(ctx, G):
        M, transpose = len(ctx.structs), ctx.transpose
        saved = ctx.saved_tensors
        values, inputs = saved[:M], saved[M:]
        grads = [None] * M
        G = G.contiguous()
        for step in reversed(range(M)):
            m = ctx.order[step]
            grads[m], G = _backward_step(ctx.structs[m], values[m], inputs[step], G, transpose,
                                         ctx.needs_input_grad[3 + m], step > 0 or ctx.needs_input_grad[0])
        return (G, None, None, *grads)


def chain_matmul(structs, values, X: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """W(1) W(2) ... W(M) X, or its transpose W(M)^T ... W(1)^T X.

    structs : sequence of M FactorStructure (factor 0 is the leftmost, W(1)).
    values : sequence of M tensors of shape (nnz_m,) or (batch, nnz_m).
    X : tensor of shape (n, b) or (batch, n, b).
    """
    if structs and structs[0].n <= FUSED_CHAIN_MAX_N:
        return ChainMatmul.apply(X, tuple(structs), transpose, *values)
    order = range(len(structs)) if transpose else reversed(range(len(structs)))
    for m in order:
        X = sparse_matmul(structs[m], values[m], X, transpose=transpose)
    return X
