"""What a matrix looks like to sfa: size, sparsity, symmetry, rank and budget.

Up to n = ``EXACT_RANK_MAX_N`` every singular value is computed (an eigenvalue
solver when A is symmetric, an SVD otherwise); above it the leading ones come
from a seeded randomized range finder (Halko, Martinsson, Tropp 2011) that reads
A a fixed number of times, so a dense n = 16384 matrix takes well under a minute
(docs/scale.md, "sfa info at scale").

Example
-------
>>> import numpy as np
>>> info = matrix_info(np.eye(8))
>>> info["n"], info["rank"], info["budget"]["factors"], info["sparse_is_exact"]
(8, 8, 3, True)
"""
from __future__ import annotations

import contextlib

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from sfa_cli import limits
from sfa_cli.validation import validates_matrix
from sfa_cli.approximations.patterns import chord_budget, tsvd_rank_at_budget

__all__ = ["matrix_info", "is_symmetric", "EXACT_RANK_MAX_N", "STAGES"]

EXACT_RANK_MAX_N = limits.EXACT_RANK_MAX_N  # the one definition is in sfa_cli/limits.py
"""Largest n whose rank comes from every singular value; above it, the leading ones."""

LEADING_VALUES_MIN = 64
"""Fewest leading singular values computed above ``EXACT_RANK_MAX_N`` (else twice the TSVD rank)."""

POWER_ITERATIONS = 2
"""Power iterations of the randomized range finder: 2 q + 2 passes over A in all."""

OVERSAMPLING = 10
"""Columns of the range finder beyond the values reported (the last ones are the least accurate)."""

STAGES = ("norm", "symmetry", "singular values")
"""The stages ``matrix_info`` reports to its callback, in order."""

_SYMMETRY_RTOL = 1e-12
_ROW_BLOCK = 1024
_SEED = 0  # a fixed start: the same answer every run


@validates_matrix(name_from="path")
def matrix_info(A, path: str | None = None, *, callback=None) -> dict:
    """Describe a square matrix and its equal-budget Chord / truncated-SVD figures.

    Parameters
    ----------
    A : ndarray, scipy sparse matrix or torch.Tensor of shape (n, n)
        A memory-mapped array is read by blocks of rows, never copied whole.
    path : str, optional
        Where the matrix came from; reported as is.
    callback : callable, optional
        ``callback(stage, fraction)`` as the work goes on: ``stage`` is one of
        ``STAGES``, ``fraction`` the share of that stage done: 0.0 when it starts
        (None instead when no share can be known until it ends: all the singular
        values at once, up to ``EXACT_RANK_MAX_N``) and 1.0 when it ends.

    Returns
    -------
    dict
        ``path, n, nnz, density, dtype, storage ("dense" | "sparse"),
        symmetric, fro_norm, rank, rank_is_estimate, rank_is_lower_bound,
        budget {factors, nnz_per_row, params, tsvd_rank}, tsvd_energy,
        sparse_is_exact``. ``nnz`` counts non-zero values (explicit zeros of
        a sparse matrix excluded); ``rank`` is numerical, the number of singular
        values above numpy's ``matrix_rank`` tolerance ``S.max() * n * eps``.
        Up to n = ``EXACT_RANK_MAX_N`` it is exact. Above it only the
        ``max(2 * tsvd_rank, LEADING_VALUES_MIN)`` leading singular values are
        computed, by a randomized range finder, and ``rank_is_estimate`` is True;
        when even the smallest of them is above the tolerance, the rank is at least
        the number computed and ``rank_is_lower_bound`` is True. ``tsvd_energy``
        is the share of ``||A||_F^2`` kept by the equal-budget truncated SVD (an
        estimate from the same leading values above ``EXACT_RANK_MAX_N``; the
        range finder's values never exceed the true ones, so it errs low);
        ``sparse_is_exact`` says that storing the non-zeros fits the budget.
    """
    report = callback if callback is not None else _ignore
    n = A.shape[0]
    budget = chord_budget(n)
    budget["tsvd_rank"] = max(1, tsvd_rank_at_budget(n, budget["params"]))
    nnz, fro, largest = _norm(A, report)
    symmetric = _is_symmetric(A, largest, report)
    s, estimated = _singular_values(A, budget["tsvd_rank"], symmetric, report)
    rank, tol = _numerical_rank(s, n)
    return {
        "path": path,
        "n": n,
        "nnz": nnz,
        "density": nnz / (n * n),
        "dtype": str(A.dtype),
        "storage": "sparse" if sp.issparse(A) else "dense",
        "symmetric": symmetric,
        "fro_norm": fro,
        "rank": rank,
        "rank_is_estimate": estimated,
        "rank_is_lower_bound": bool(estimated and s.size < n and rank == s.size and s.size > 0),
        "budget": budget,
        "tsvd_energy": _energy(s, budget["tsvd_rank"], fro),
        "sparse_is_exact": nnz <= budget["params"],
    }


@validates_matrix
def is_symmetric(A) -> bool:
    """Whether ``max|A - A^T| <= 1e-12 * max|A|`` (exactly symmetric up to roundoff)."""
    return _is_symmetric(A, _norm(A, _ignore)[2], _ignore)


def _ignore(stage: str, fraction: float | None) -> None:
    pass


def _row_blocks(n: int):
    return range(0, n, _ROW_BLOCK)


def _norm(A, report) -> tuple[int, float, float]:
    """(nnz, ||A||_F, max|A|), a dense A read one block of rows at a time (float64 sums)."""
    report("norm", 0.0)
    if sp.issparse(A):
        values = A.data
        result = int(np.count_nonzero(values)), float(np.linalg.norm(values)), float(np.abs(values).max(initial=0.0))
    else:
        n, nnz, squares, largest = A.shape[0], 0, 0.0, 0.0
        for i in _row_blocks(n):
            block = np.asarray(A[i:i + _ROW_BLOCK], dtype=np.float64)
            nnz += int(np.count_nonzero(block))
            squares += float(np.einsum("ij,ij->", block, block))
            largest = max(largest, float(np.abs(block).max()))
            if i + _ROW_BLOCK < n:
                report("norm", (i + _ROW_BLOCK) / n)
        result = nnz, float(np.sqrt(squares)), largest
    report("norm", 1.0)
    return result


def _is_symmetric(A, largest: float, report) -> bool:
    """The symmetry test of :func:`is_symmetric` given max|A|; a dense A stops at the first failing block."""
    report("symmetry", 0.0)
    tol = _SYMMETRY_RTOL * largest
    if sp.issparse(A):
        diff = abs(A - A.T)
        symmetric = (diff.max() if diff.nnz else 0.0) <= tol
    else:
        n, symmetric = A.shape[0], True
        for i in _row_blocks(n):
            if float(np.abs(A[i:i + _ROW_BLOCK] - A[:, i:i + _ROW_BLOCK].T).max()) > tol:
                symmetric = False
                break
            if i + _ROW_BLOCK < n:
                report("symmetry", (i + _ROW_BLOCK) / n)
    report("symmetry", 1.0)
    return bool(symmetric)


def _singular_values(A, tsvd_rank: int, symmetric: bool, report) -> tuple[np.ndarray, bool]:
    """Singular values, descending, and whether only the leading ones were computed."""
    n = A.shape[0]
    if n <= EXACT_RANK_MAX_N:
        report("singular values", None)  # one LAPACK call: no share to report until it returns
        s = _all_singular_values(A.toarray() if sp.issparse(A) else np.asarray(A), symmetric)
        report("singular values", 1.0)
        return s, False
    k = min(n, max(2 * tsvd_rank, LEADING_VALUES_MIN))
    report("singular values", 0.0)
    return _leading_singular_values(A, k, report), True


def _all_singular_values(D: np.ndarray, symmetric: bool) -> np.ndarray:
    """Every singular value of a dense matrix, descending.

    A symmetric matrix's are its eigenvalues' magnitudes, and the eigenvalue solver
    is many times faster than the SVD (docs/scale.md).
    """
    if symmetric:
        w = scipy.linalg.eigh(D, eigvals_only=True, driver="evr", check_finite=False)
        return np.sort(np.abs(w))[::-1]
    return np.linalg.svd(D, compute_uv=False)


def _leading_singular_values(A, k: int, report) -> np.ndarray:
    """The k largest singular values by a seeded randomized range finder, descending.

    Each pass multiplies A (or A^T) by an n x (k + OVERSAMPLING) block in A's
    precision, re-orthonormalised between passes. The values are those of Q^T A
    for an orthonormal Q, so none exceeds the true one.
    """
    n = A.shape[0]
    dtype = np.float32 if A.dtype == np.float32 else np.float64
    passes = _Passes(A, dtype, 2 * POWER_ITERATIONS + 2, report)
    start = np.random.default_rng(_SEED).standard_normal((n, min(n, k + OVERSAMPLING)), dtype=dtype)
    Q = _orthonormal(passes.times(start))
    for _ in range(POWER_ITERATIONS):
        Q = _orthonormal(passes.times(_orthonormal(passes.times_transpose(Q))))
    B = passes.times_transpose(Q)  # (A^T Q)^T = Q^T A
    with _one_blas_thread():
        return np.linalg.svd(B, compute_uv=False)[:k]


class _Passes:
    """Products with A and A^T that report the share of the planned passes done."""

    def __init__(self, A, dtype, planned: int, report):
        self.A, self.dtype, self.planned, self.report, self.done = A, dtype, planned, report, 0

    def times(self, X: np.ndarray) -> np.ndarray:
        return self._counted(self.A @ X)

    def times_transpose(self, X: np.ndarray) -> np.ndarray:
        return self._counted(self.A.T @ X)

    def _counted(self, Y) -> np.ndarray:
        self.done += 1
        self.report("singular values", self.done / self.planned)
        return np.asarray(Y, dtype=self.dtype)


def _orthonormal(Y: np.ndarray) -> np.ndarray:
    with _one_blas_thread():
        return np.linalg.qr(Y)[0]


def _one_blas_thread():
    """A context that runs BLAS on one thread: a tall, thin QR syncs its threads at every column.

    On a loaded machine two BLAS threads made each QR 14x slower, one thread costs
    nothing idle (docs/scale.md, "sfa info at scale"); the big products keep every thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an environment older than the dependency: same values, slower under load
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _numerical_rank(s: np.ndarray, n: int) -> tuple[int, float]:
    """Number of singular values above numpy's default tolerance S.max() * n * eps, and the tolerance."""
    if s.size == 0:
        return 0, 0.0
    tol = float(s.max()) * n * float(np.finfo(s.dtype).eps)
    return int(np.count_nonzero(s > tol)), tol


def _energy(s: np.ndarray, rank: int, fro: float) -> float:
    """Share of ||A||_F^2 in the leading `rank` singular values (1.0 for A = 0)."""
    if fro == 0.0:
        return 1.0  # the zero matrix is reproduced exactly at any rank
    top = np.asarray(s[:rank], dtype=np.float64)
    return min(1.0, float(np.sum(top * top)) / (fro * fro))
