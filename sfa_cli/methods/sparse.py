"""Sparse baselines: the largest entries alone, and a low-rank part plus the largest entries of the rest.

Like every baseline (see :mod:`sfa_cli.methods.low_rank`), each method takes the
matrix and a budget (stored numbers), never spends more than the budget, and returns an
:class:`~sfa_cli.approximations.base.Approximation`; one that cannot run at this n or
budget raises :class:`~sfa_cli.errors.NotApplicable`.

Example
-------
>>> import numpy as np
>>> from sfa_cli.metrics import relative_error
>>> A = np.random.default_rng(0).standard_normal((64, 64))
>>> top_k(A, 1000).params
1000
>>> approx = lowrank_plus_sparse(A, 1000)
>>> approx.params <= 1000 and relative_error(A, approx) <= relative_error(A, top_k(A, 1000))
True

Methods
-------
``top_k``           the ``budget`` largest-magnitude entries
``lowrank_plus_sparse``  rank-r part plus the largest entries of the rest, by alternation
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from sfa_cli.approximations.kinds import LowRank, SparseMatrix, SumApproximation
from sfa_cli.errors import SfaError
from sfa_cli.metrics import column_block, frobenius_norm
from sfa_cli.approximations.patterns import tsvd_rank_at_budget
from sfa_cli.validation import check_budget, count_nonzero, is_memory_mapped, release_pages, validates_matrix
from sfa_cli.methods.low_rank import (
    ALTERNATION_EXACT_LIMIT,
    _BLOCK_ENTRIES,
    _dense,
    _full_svd,
    _randomized_low_rank,
    _work_dtype,
)

__all__ = [
    "top_k",
    "lowrank_plus_sparse",
]


# -- methods ---------------------------------------------------------------------
@validates_matrix
def top_k(A, budget: int, *, seed: int = 0) -> SparseMatrix:
    """Keep the ``budget`` largest-magnitude entries of A.

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
    budget : int
        Entries kept (ties broken arbitrarily).
    seed : int, default=0
        Unused (the method is deterministic); accepted like every method's.

    Returns
    -------
    SparseMatrix
        method ``topk``; A itself, with the note ``exact: nnz <= budget``, when A
        has no more non-zeros than the budget.
    """
    n, budget = A.shape[0], check_budget(budget)
    if sp.issparse(A):
        S = A.copy()
        S.sum_duplicates()
        S.eliminate_zeros()
        if S.nnz <= budget:
            return SparseMatrix(S, method="topk", info={"note": "exact: nnz <= budget"})
        keep = np.argpartition(np.abs(S.data), S.nnz - budget)[S.nnz - budget:]
        rows = np.repeat(np.arange(n), np.diff(S.indptr))[keep]
        cols, vals = S.indices[keep], S.data[keep]
    elif is_memory_mapped(A):  # by blocks of rows, a running top-k: one pass, nothing n x n in memory
        S = _largest_of_difference(A, np.zeros((n, 0)), np.zeros((0, n)), budget)[0]
        S.eliminate_zeros()
        # fewer non-zeros kept than allowed: A had no more; exactly the budget: count to tell (rare)
        exact = S.nnz < budget or (S.nnz == budget and count_nonzero(A) == budget)
        return SparseMatrix(S, method="topk", info={"note": "exact: nnz <= budget"} if exact else {})
    else:
        flat = A.ravel()
        if np.count_nonzero(flat) <= budget:
            return SparseMatrix(sp.csr_matrix(A), method="topk", info={"note": "exact: nnz <= budget"})
        keep = np.argpartition(np.abs(flat), flat.size - budget)[flat.size - budget:]
        rows, cols = np.divmod(keep, n)
        vals = flat[keep]
    return SparseMatrix(sp.csr_matrix((vals, (rows, cols)), shape=(n, n)), method="topk")


@validates_matrix
def lowrank_plus_sparse(
    A,
    budget: int,
    *,
    seed: int = 0,
    splits=(0.1, 0.25, 0.5, 0.75, 0.9),
    alternations: int = 5,
) -> SumApproximation:
    """A rank-r part plus the k largest entries of the rest, the best of several budget splits.

    For each split f: r = floor(f * budget / 2n) and k = budget - 2nr; starting
    from S = 0, alternate L = best rank-r approximation of A - S and S = the k
    largest-magnitude entries of A - L. Each step minimises the error over one
    part, so the error never increases. The split with the smallest relative
    error wins. The two ends, f = 0 (the k = budget largest entries alone) and
    f = 1 (the truncated-SVD rank plus the leftover entries), are always tried
    as well, so the result is never worse than :func:`top_k` or
    :func:`truncated_svd` at the same budget.

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
    budget : int
        Parameters allowed: 2 n r + nnz(S) <= budget.
    seed : int, default=0
        Seeds the randomized SVD used above n = 1024.
    splits : sequence of float, default=(0.1, 0.25, 0.5, 0.75, 0.9)
        Fractions of the budget given to the low-rank part, each in [0, 1].
    alternations : int, default=5
        L/S alternations per split.

    Returns
    -------
    SumApproximation
        A :class:`LowRank` (rank 0 when the sparse part alone wins) plus a
        :class:`SparseMatrix`, method ``lowrank+sparse``; info records ``split``,
        ``rank``, ``nnz`` and ``rel_error``.

    Notes
    -----
    Up to n = 1024 every L-step is a full LAPACK SVD (the first one, of A, is
    shared by all splits); above that it is a seeded ``torch.svd_lowrank`` of
    rank r, and the S-step streams over column blocks, so a sparse A is never
    densified.
    """
    n, budget = A.shape[0], check_budget(budget)
    splits = [float(f) for f in splits]
    if any(not 0 <= f <= 1 for f in splits):
        raise SfaError(f"splits must be fractions in [0, 1]; got {splits}")
    if int(alternations) != alternations or alternations < 1:
        raise SfaError(f"alternations must be a positive integer; got {alternations!r}")
    plans, ranks = [], set()
    for f in sorted({0.0, 1.0, *splits}):
        r = tsvd_rank_at_budget(n, int(f * budget))
        if r not in ranks:
            ranks.add(r)
            plans.append((f, r, budget - 2 * n * r))
    norm = frobenius_norm(A)
    if norm == 0.0:
        raise SfaError("the matrix is all zeros; there is nothing to approximate")
    exact = n <= ALTERNATION_EXACT_LIMIT
    if exact:
        A = _dense(A)
        first = _full_svd(A) if len(plans) > 1 else None  # the first L-step (S = 0) is shared by all splits
    dtype = _work_dtype(A)
    best = None
    for f, r, k in plans:
        S = None
        for _ in range(int(alternations) if r > 0 else 1):  # with r = 0 there is nothing to alternate with
            if r == 0:
                left, right = np.zeros((n, 0), dtype), np.zeros((0, n), dtype)
            elif exact:
                U, s, Vt = first if S is None else _full_svd(_minus_sparse(A, S))
                left, right = U[:, :r] * s[:r], Vt[:r]
            else:
                left, right = _randomized_low_rank(A if S is None else _minus_sparse(A, S), r, seed=seed, n_iter=4)
            S, residual_sq = _largest_of_difference(A, left, right, k)
        error = math.sqrt(residual_sq) / norm
        if best is None or error < best[0]:
            best = (error, f, r, left, right, S)
    error, f, r, left, right, S = best
    S.eliminate_zeros()
    info = {
        "split": f,
        "rank": r,
        "nnz": int(S.nnz),
        "alternations": int(alternations),
        "rel_error": error,
        "note": f"rank {r} + {S.nnz} entries (split {f:g})",
    }
    parts = [LowRank(left, right, method="lowrank"), SparseMatrix(S, method="sparse")]
    return SumApproximation(parts, method="lowrank+sparse", info=info)


# -- helpers -----------------------------------------------------------------------
def _minus_sparse(A, S: sp.csr_matrix):
    """A - S, dense when A is dense (a copy), CSR when A is sparse."""
    if sp.issparse(A):
        return (A - S).tocsr()
    D = np.array(A, copy=True)
    coo = S.tocoo()
    D[coo.row, coo.col] -= coo.data
    return D



def largest_by_columns(n: int, k: int, block, dtype=np.float64) -> tuple[np.ndarray, np.ndarray, float]:
    """The k largest-magnitude entries of an n x n matrix given by column blocks, ``block(cols)`` ->
    (n, len(cols)) array: their flat indices (row * n + col), their values, and the matrix's squared
    norm. Blocks of about :data:`_BLOCK_ENTRIES` entries, so the matrix is never formed whole; the
    values are kept in ``dtype`` (or wider, as the blocks come)."""
    width = max(1, _BLOCK_ENTRIES // n)
    keep = np.empty(0, dtype=np.int64)
    vals = np.empty(0, dtype=dtype)
    total = 0.0
    for start in range(0, n, width):
        cols = np.arange(start, min(n, start + width))
        D = block(cols)
        total += float(np.sum(D * D))
        flat = D.ravel()  # index row * len(cols) + c
        top = _largest(flat, k)
        rows, c = np.divmod(top, len(cols))
        keep = np.concatenate([keep, rows * n + cols[c]])
        vals = np.concatenate([vals, flat[top]])
        sel = _largest(vals, k)
        keep, vals = keep[sel], vals[sel]
    return keep, vals, total


def _largest_of_difference(A, left: np.ndarray, right: np.ndarray, k: int):
    """The k largest-magnitude entries of A - left @ right as CSR, and the squared norm of the rest."""
    n = A.shape[0]
    if not sp.issparse(A) and n <= ALTERNATION_EXACT_LIMIT:
        D = (A - left @ right).ravel()
        keep = _largest(D, k)
        vals = D[keep]
        D[keep] = 0.0
        rest = float(np.dot(D, D))
    elif is_memory_mapped(A):  # rows are contiguous in a map: blocks of rows, pages handed back
        rows_per = max(1, _BLOCK_ENTRIES // n)
        keep = np.empty(0, dtype=np.int64)
        vals = np.empty(0, dtype=np.float64)
        total, floor = 0.0, 0.0
        for start in range(0, n, rows_per):
            D = np.asarray(A[start:start + rows_per], dtype=np.float64) - left[start:start + rows_per] @ right
            release_pages(A)
            total += float(np.einsum("ij,ij->", D, D))
            flat = D.ravel()
            idx = np.nonzero(np.abs(flat) > floor)[0] if len(keep) >= k else np.arange(flat.size)
            keep = np.concatenate([keep, idx + start * n])
            vals = np.concatenate([vals, flat[idx]])
            if len(vals) > k:
                sel = _largest(vals, k)
                keep, vals = keep[sel], vals[sel]
                floor = float(np.abs(vals).min()) if k > 0 else math.inf
        rest = max(total - float(np.dot(vals, vals)), 0.0)
    else:  # column blocks, so that neither A - L nor a dense A is formed whole
        keep, vals, total = largest_by_columns(n, k, lambda cols: column_block(A, cols) - left @ right[:, cols],
                                               left.dtype)
        rest = max(total - float(np.dot(vals, vals)), 0.0)
    rows, cols = np.divmod(keep, n)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n)), rest


def _largest(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest-magnitude entries of a 1-D array (all of them when k >= its size)."""
    if k >= x.size:
        return np.arange(x.size)
    if k <= 0:
        return np.arange(0)
    return np.argpartition(np.abs(x), x.size - k)[x.size - k:]
