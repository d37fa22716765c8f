"""Low-rank baselines: the truncated SVD and the randomized SVD, each sized to a parameter budget.

Every method takes the matrix and a budget (stored numbers: non-zeros plus
dense factor entries, not bytes), never spends more than the budget, and
returns an :class:`~sfa_cli.approximations.base.Approximation` like the Chord fit,
so ``compare`` and the reports treat them all alike. A method that cannot run
at this n or budget raises :class:`~sfa_cli.errors.NotApplicable` with a one-line reason.
The other baselines live in :mod:`sfa_cli.methods.sparse` (top-k, low rank + sparse)
and :mod:`sfa_cli.methods.monarch`; they use the SVD helpers and the constants here.

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
``tsvd_at_rank``    the same at a given rank
``randomized_svd``  the same rank by ``torch.svd_lowrank`` (Halko, Martinsson, Tropp 2011)
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from sfa_cli.approximations.kinds import LowRank
from sfa_cli.errors import NotApplicable, SfaError
from sfa_cli.approximations.patterns import tsvd_rank_at_budget
from sfa_cli.validation import check_budget, validates_matrix

__all__ = [
    "truncated_svd",
    "tsvd_at_rank",
    "randomized_svd",
]

#: Largest n for which the truncated SVD is an exact LAPACK SVD of the dense matrix.
EXACT_SVD_LIMIT = 4096
#: Largest n for which lowrank+sparse takes a full LAPACK SVD at every alternation;
#: above it a seeded randomized SVD of rank r (a full SVD at n = 2048 takes ~4 s on one
#: core, and the method takes up to len(splits) * alternations of them). Above it too,
#: :func:`_randomized_low_rank` hands a sparse A to torch as a sparse tensor.
#: (Read here and in :mod:`sfa_cli.methods.sparse`, which imports it.)
ALTERNATION_EXACT_LIMIT = 1024
#: Extra columns of the randomized range finder beyond the rank asked for.
OVERSAMPLING = 10
#: Entries per dense block when streaming over columns (32 MiB of float64);
#: also read by :mod:`sfa_cli.methods.sparse` and :mod:`sfa_cli.methods.monarch`, which import it.
_BLOCK_ENTRIES = 1 << 22


# -- methods ---------------------------------------------------------------------
@validates_matrix
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
    n, budget = A.shape[0], check_budget(budget)
    return tsvd_at_rank.trusted(A, _rank_for(n, budget), seed=seed, solver=solver)


@validates_matrix
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


@validates_matrix
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
    n, budget = A.shape[0], check_budget(budget)
    if int(n_iter) != n_iter or n_iter < 0:
        raise SfaError(f"n_iter must be a non-negative integer; got {n_iter!r}")
    r = _rank_for(n, budget)
    left, right = _randomized_low_rank(A, r, seed=seed, n_iter=int(n_iter), keep_sparse=keep_sparse)
    return LowRank(left, right, method="rsvd", info={"n_iter": int(n_iter), "oversampling": OVERSAMPLING})


# -- helpers -----------------------------------------------------------------------
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
