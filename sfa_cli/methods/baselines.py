"""Low-rank and other structured baselines, each sized to a parameter budget.

Every method takes the matrix and a budget (stored numbers: non-zeros plus
dense factor entries, not bytes), never spends more than the budget, and
returns an :class:`~sfa_cli.approximations.base.Approximation` like the Chord fit,
so ``compare`` and the reports treat them all alike. A method that cannot run
at this n or budget raises :class:`NotApplicable` with a one-line reason.

Example
-------
>>> import numpy as np
>>> from sfa_cli.metrics import relative_error
>>> A = np.random.default_rng(0).standard_normal((64, 64))
>>> approx = truncated_svd(A, 1000)          # rank floor(1000 / (2 * 64)) = 7
>>> approx
<LowRank tsvd n=64 rank=7 params=896 float64>
>>> approx.params <= 1000
True
>>> round(relative_error(A, approx), 3) < 1.0
True

Methods
-------
``truncated_svd``   best rank-r approximation, r = floor(budget / 2n) (LAPACK, or ARPACK above n = 4096)
``randomized_svd``  the same rank by ``torch.svd_lowrank`` (Halko, Martinsson, Tropp 2011)
``top_k``           the ``budget`` largest-magnitude entries
``monarch``         closed-form projection onto Monarch matrices (Dao et al. 2022)
``lowrank_plus_sparse``  rank-r part plus the largest entries of the rest, by alternation
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import scipy.sparse as sp

# The approximation classes live in sfa_cli.approximations.kinds; importing them from here keeps working.
from sfa_cli.approximations.kinds import LowRank, Monarch, SparseMatrix, SumApproximation
from sfa_cli.errors import NotApplicable, SfaError
from sfa_cli.metrics import column_block, frobenius_norm
from sfa_cli.approximations.patterns import tsvd_rank_at_budget
from sfa_cli.validation import as_square_matrix, check_budget, count_nonzero, is_memory_mapped, release_pages

__all__ = [
    "NotApplicable",
    "LowRank",
    "SparseMatrix",
    "SumApproximation",
    "Monarch",
    "truncated_svd",
    "tsvd_at_rank",
    "randomized_svd",
    "top_k",
    "monarch",
    "monarch_blocks",
    "lowrank_plus_sparse",
]

#: Largest n for which the truncated SVD is an exact LAPACK SVD of the dense matrix.
EXACT_SVD_LIMIT = 4096
#: Largest n for which lowrank+sparse takes a full LAPACK SVD at every alternation;
#: above it a seeded randomized SVD of rank r (a full SVD at n = 2048 takes ~4 s on one
#: core, and the method takes up to len(splits) * alternations of them).
ALTERNATION_EXACT_LIMIT = 1024
#: Extra columns of the randomized range finder beyond the rank asked for.
OVERSAMPLING = 10
#: Entries per dense block when streaming over columns (32 MiB of float64).
_BLOCK_ENTRIES = 1 << 22


# -- methods ---------------------------------------------------------------------
def truncated_svd(A, budget: int, *, seed: int = 0, solver: str = "auto") -> LowRank:
    """Best rank-r approximation with r = floor(budget / 2n), capped at n.

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
    budget : int
        Parameters allowed; the result stores 2 n r <= budget numbers.
    seed : int, default=0
        Start vector of ARPACK (used above n = 4096, or with ``solver="svds"``).
    solver : {"auto", "svds", "randomized"}, default="auto"
        As in :func:`tsvd_at_rank`.

    Returns
    -------
    LowRank
        method ``tsvd``.

    Raises
    ------
    NotApplicable
        When budget < 2n (not even rank 1 fits).
    """
    A = as_square_matrix(A)
    n, budget = A.shape[0], check_budget(budget)
    return tsvd_at_rank(A, _rank_for(n, budget), seed=seed, solver=solver)


def tsvd_at_rank(A, rank: int, *, seed: int = 0, solver: str = "auto") -> LowRank:
    """Best rank-``rank`` approximation (Eckart-Young) of A.

    An exact LAPACK SVD of the dense matrix up to n = 4096; above that
    ``scipy.sparse.linalg.svds`` (ARPACK), which keeps a sparse A sparse.

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
    rank : int
        At least 1; capped at n.
    seed : int, default=0
        Start vector of ARPACK.
    solver : {"auto", "svds", "randomized"}, default="auto"
        ``svds`` always uses ARPACK on A as given (a sparse A is never densified;
        what ``compare`` uses at scale for sparse inputs); it needs rank < n - 1.
        ``randomized``: a seeded randomized range finder with 4 power iterations
        (``torch.svd_lowrank``; what ``fit`` and ``compare`` use for dense A above
        n = 4096, where it matches ARPACK on decaying spectra in a fraction of the time).

    Returns
    -------
    LowRank
        left (n, rank) with the singular values folded in, right (rank, n); method ``tsvd``.
    """
    A = as_square_matrix(A)
    n = A.shape[0]
    if int(rank) != rank or rank < 1:
        raise SfaError(f"the truncated-SVD rank must be a positive integer; got {rank!r}")
    if solver not in ("auto", "svds", "randomized"):
        raise SfaError(f"unknown truncated-SVD solver {solver!r}; choose auto, svds or randomized")
    r = min(int(rank), n)
    if solver == "randomized" and r < n:
        left, right = _randomized_low_rank(A, r, seed=seed, n_iter=4)
        return LowRank(left, right, method="tsvd", info={"note": "randomized range finder, 4 power iterations"})
    if solver == "svds" and r >= n - 1:
        raise NotApplicable(f"svds computes rank < n - 1 = {n - 1}; rank {r} needs the dense SVD")
    if solver == "auto" and (n <= EXACT_SVD_LIMIT or r >= n - 1):
        U, s, Vt = _full_svd(_dense(A))
    else:
        from scipy.sparse.linalg import svds

        U, s, Vt = svds(A, k=r, rng=np.random.default_rng(seed))
        order = np.argsort(s)[::-1]
        U, s, Vt = U[:, order], s[order], Vt[order]
    info = {"note": "exact: rank n"} if r == n else {}
    return LowRank(U[:, :r] * s[:r], Vt[:r], method="tsvd", info=info)


def randomized_svd(A, budget: int, *, seed: int = 0, n_iter: int = 4, keep_sparse: bool = False) -> LowRank:
    """Rank r = floor(budget / 2n) approximation by ``torch.svd_lowrank`` (randomized range finder).

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
        A sparse A with n > 1024 is passed to torch as a sparse tensor, never densified.
    budget : int
        Parameters allowed; the result stores 2 n r <= budget numbers.
    seed : int, default=0
        Seeds torch inside ``torch.random.fork_rng``; the global torch state is untouched.
    n_iter : int, default=4
        Power (subspace) iterations.
    keep_sparse : bool, default=False
        Pass a sparse A to torch as a sparse tensor at any n (``compare`` at scale).

    Returns
    -------
    LowRank
        method ``rsvd``.

    Raises
    ------
    NotApplicable
        When budget < 2n.
    """
    A = as_square_matrix(A)
    n, budget = A.shape[0], check_budget(budget)
    if int(n_iter) != n_iter or n_iter < 0:
        raise SfaError(f"n_iter must be a non-negative integer; got {n_iter!r}")
    r = _rank_for(n, budget)
    left, right = _randomized_low_rank(A, r, seed=seed, n_iter=int(n_iter), keep_sparse=keep_sparse)
    return LowRank(left, right, method="rsvd", info={"n_iter": int(n_iter), "oversampling": OVERSAMPLING})


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
    A = as_square_matrix(A)
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


def monarch_blocks(n: int) -> tuple[int, int]:
    """(s0, s1) with n = s0 * s1 and s1 the largest divisor of n not above sqrt(n)."""
    s1 = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
    return n // s1, s1


def monarch(A, budget: int, *, seed: int = 0) -> Monarch:
    """Closed-form projection of A onto Monarch matrices (Dao et al. 2022).

    With n = s0 * s1 (see :func:`monarch_blocks`), A viewed as the tensor
    A[i0, i1, j0, j1] splits into s1 * s0 independent s0 x s1 slices
    A[:, i1, j0, :]; a Monarch matrix is rank 1 on each, so the Frobenius-nearest
    one takes each slice's best rank-1 approximation (batched SVDs over the
    slices, a block of columns at a time so that a sparse A is never densified
    whole). Stores n (s0 + s1) numbers.

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
    budget : int
        Must be at least n (s0 + s1).
    seed : int, default=0
        Unused (the projection is deterministic); accepted like every method's.

    Returns
    -------
    Monarch

    Raises
    ------
    NotApplicable
        When n is prime (no block structure) or n (s0 + s1) > budget.
    """
    A = as_square_matrix(A)
    n, budget = A.shape[0], check_budget(budget)
    s0, s1 = monarch_blocks(n)
    if s1 == 1:
        why = " (n is prime)" if n > 1 else ""
        raise NotApplicable(f"Monarch needs n = s0 * s1 with 1 < s1 <= sqrt(n); n={n} has no such divisor{why}")
    need = n * (s0 + s1)
    if need > budget:
        raise NotApplicable(f"Monarch with {s0} x {s1} blocks needs n*(s0+s1) = {need} parameters > budget {budget}")
    dtype = _work_dtype(A)
    u = np.empty((s1, s0, s0), dtype=dtype)
    v = np.empty((s1, s0, s1), dtype=dtype)
    chunk = max(1, _BLOCK_ENTRIES // (n * s1))  # values of j0 per batch
    for start in range(0, s0, chunk):
        stop = min(s0, start + chunk)
        block = column_block(A, np.arange(start * s1, stop * s1))  # [i0*s1+i1, (j0-start)*s1+j1]
        slices = block.reshape(s0, s1, stop - start, s1).transpose(1, 2, 0, 3)  # [i1, j0, i0, j1]
        U, s, Vt = np.linalg.svd(slices, full_matrices=False)
        u[:, start:stop] = U[..., :, 0] * s[..., :1]
        v[:, start:stop] = Vt[..., 0, :]
    return Monarch(u, v, method="monarch")


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
    A = as_square_matrix(A)
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
# learned.py calls these two by their old names.
_as_matrix = as_square_matrix
_check_budget = check_budget


def _rank_for(n: int, budget: int) -> int:
    r = tsvd_rank_at_budget(n, budget)
    if r < 1:
        raise NotApplicable(f"a rank-1 approximation needs 2n = {2 * n} parameters > budget {budget}")
    return r


def _work_dtype(A) -> np.dtype:
    return np.dtype(np.float32) if A.dtype == np.float32 else np.dtype(np.float64)


def _dense(A) -> np.ndarray:
    return A.toarray() if sp.issparse(A) else np.asarray(A)


def _full_svd(D: np.ndarray):
    try:
        return scipy.linalg.svd(D, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    except np.linalg.LinAlgError:  # gesdd occasionally fails to converge; gesvd is slower but robust
        return scipy.linalg.svd(D, full_matrices=False, lapack_driver="gesvd", check_finite=False)


def _minus_sparse(A, S: sp.csr_matrix):
    """A - S, dense when A is dense (a copy), CSR when A is sparse."""
    if sp.issparse(A):
        return (A - S).tocsr()
    D = np.array(A, copy=True)
    coo = S.tocoo()
    D[coo.row, coo.col] -= coo.data
    return D


def _randomized_low_rank(A, r: int, *, seed: int, n_iter: int, keep_sparse: bool = False):
    """(left, right) of a rank-r approximation by torch.svd_lowrank, seeded without touching global state.

    A memory-mapped dense A is read by blocks of rows instead (:func:`_blocked_low_rank`), so the
    passes never hold the whole file in memory.
    """
    import torch

    from sfa_cli.io import is_memory_mapped

    n = A.shape[0]
    if not sp.issparse(A) and is_memory_mapped(A):
        return _blocked_low_rank(A, r, seed=seed, n_iter=n_iter)
    if sp.issparse(A) and (keep_sparse or n > ALTERNATION_EXACT_LIMIT):
        coo = A.tocoo()
        T = torch.sparse_coo_tensor(
            np.vstack([coo.row, coo.col]), coo.data, (n, n), check_invariants=False
        ).coalesce()
    else:
        T = torch.from_numpy(np.ascontiguousarray(_dense(A)))
    q = min(n, r + OVERSAMPLING)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        U, s, V = torch.svd_lowrank(T, q=q, niter=n_iter)
    U, s, V = U[:, :r].numpy(), s[:r].numpy(), V[:, :r].numpy()
    return U * s, np.ascontiguousarray(V.T)


def _blocked_low_rank(A, r: int, *, seed: int, n_iter: int):
    """The randomized range finder with ``n_iter`` power iterations (Halko, Martinsson, Tropp 2011,
    algorithm 4.4), every product with A taken over blocks of rows whose pages are handed back after use."""
    from sfa_cli.io import release_pages

    n = A.shape[0]
    q = min(n, r + OVERSAMPLING)
    rows = max(1, _BLOCK_ENTRIES // n)
    work = np.float32 if A.dtype == np.float32 else np.float64

    def times(X):  # A @ X
        out = np.empty((n, X.shape[1]), dtype=work)
        for i in range(0, n, rows):
            out[i:i + rows] = A[i:i + rows] @ X
            release_pages(A)
        return out

    def transposed_times(Y):  # A^T @ Y
        out = np.zeros((n, Y.shape[1]), dtype=np.float64)
        for i in range(0, n, rows):
            out += A[i:i + rows].T @ Y[i:i + rows]
            release_pages(A)
        return out.astype(work)

    Q = np.linalg.qr(times(np.random.default_rng(seed).standard_normal((n, q)).astype(work)))[0]
    for _ in range(n_iter):
        Q = np.linalg.qr(times(np.linalg.qr(transposed_times(Q))[0]))[0]
    B = transposed_times(Q).T  # Q^T A, (q, n)
    Ub, s, Vt = np.linalg.svd(B.astype(np.float64), full_matrices=False)
    left = (Q.astype(np.float64) @ Ub[:, :r]) * s[:r]
    return left, np.ascontiguousarray(Vt[:r])


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
        width = max(1, _BLOCK_ENTRIES // n)
        keep = np.empty(0, dtype=np.int64)
        vals = np.empty(0, dtype=left.dtype)
        total = 0.0
        for start in range(0, n, width):
            cols = np.arange(start, min(n, start + width))
            D = column_block(A, cols) - left @ right[:, cols]
            total += float(np.sum(D * D))
            flat = D.ravel()  # index row * len(cols) + c
            top = _largest(flat, k)
            rows, c = np.divmod(top, len(cols))
            keep = np.concatenate([keep, rows * n + cols[c]])
            vals = np.concatenate([vals, flat[top]])
            sel = _largest(vals, k)
            keep, vals = keep[sel], vals[sel]
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
