"""What a matrix looks like to sfa: size, sparsity, symmetry, rank and budget.

Example
-------
>>> import numpy as np
>>> info = matrix_info(np.eye(8))
>>> info["n"], info["rank"], info["budget"]["factors"], info["sparse_is_exact"]
(8, 8, 3, True)
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from sfa_cli.io import as_square_matrix
from sfa_cli.patterns import chord_budget, tsvd_rank_at_budget

__all__ = ["matrix_info", "is_symmetric", "EXACT_RANK_MAX_N"]

EXACT_RANK_MAX_N = 4096
"""Largest n whose rank comes from a full SVD; above it, leading singular values."""

_SYMMETRY_RTOL = 1e-12
_ROW_BLOCK = 1024


def matrix_info(A, path: str | None = None) -> dict:
    """Describe a square matrix and its equal-budget Chord / truncated-SVD figures.

    Parameters
    ----------
    A : ndarray, scipy sparse matrix or torch.Tensor of shape (n, n)
    path : str, optional
        Where the matrix came from; reported as is.

    Returns
    -------
    dict
        ``path, n, nnz, density, dtype, storage ("dense" | "sparse"),
        symmetric, fro_norm, rank, rank_is_estimate,
        budget {factors, nnz_per_row, params, tsvd_rank}, tsvd_energy,
        sparse_is_exact``. ``nnz`` counts non-zero values (explicit zeros of
        a sparse matrix excluded); ``rank`` is numerical with numpy's
        ``matrix_rank`` tolerance ``S.max() * n * eps``, from a full SVD up to
        n = ``EXACT_RANK_MAX_N`` and from the leading singular values above
        (then ``rank_is_estimate`` is True, and the rank may be a lower
        bound); ``tsvd_energy`` is the share of ``||A||_F^2`` kept by the
        equal-budget truncated SVD; ``sparse_is_exact`` says that storing the
        non-zeros fits the budget.
    """
    A = as_square_matrix(A, name=path or "A")
    n = A.shape[0]
    nnz = int(A.count_nonzero()) if sp.issparse(A) else int(np.count_nonzero(A))
    budget = chord_budget(n)
    budget["tsvd_rank"] = max(1, tsvd_rank_at_budget(n, budget["params"]))
    fro = float(np.linalg.norm(A.data if sp.issparse(A) else A))
    s, estimated = _singular_values(A, budget["tsvd_rank"])
    return {
        "path": path,
        "n": n,
        "nnz": nnz,
        "density": nnz / (n * n),
        "dtype": str(A.dtype),
        "storage": "sparse" if sp.issparse(A) else "dense",
        "symmetric": is_symmetric(A),
        "fro_norm": fro,
        "rank": _numerical_rank(s, n),
        "rank_is_estimate": estimated,
        "budget": budget,
        "tsvd_energy": _energy(s, budget["tsvd_rank"], fro),
        "sparse_is_exact": nnz <= budget["params"],
    }


def is_symmetric(A) -> bool:
    """Whether ``max|A - A^T| <= 1e-12 * max|A|`` (exactly symmetric up to roundoff)."""
    if sp.issparse(A):
        diff = abs(A - A.T)
        worst = diff.max() if diff.nnz else 0.0
        scale = abs(A).max() if A.nnz else 0.0
    else:
        worst = max(
            float(np.abs(A[i:i + _ROW_BLOCK] - A[:, i:i + _ROW_BLOCK].T).max())
            for i in range(0, A.shape[0], _ROW_BLOCK)
        )
        scale = float(np.abs(A).max())
    return bool(worst <= _SYMMETRY_RTOL * scale)


def _singular_values(A, tsvd_rank: int) -> tuple[np.ndarray, bool]:
    """Singular values, descending, and whether only the leading ones were computed.

    Up to ``EXACT_RANK_MAX_N`` all of them (a sparse matrix is densified for
    this only); above it the ``max(2 * tsvd_rank, 64)`` largest by ARPACK.
    """
    n = A.shape[0]
    if n <= EXACT_RANK_MAX_N:
        dense = A.toarray() if sp.issparse(A) else A
        return np.linalg.svd(dense, compute_uv=False), False
    k = min(n - 1, max(2 * tsvd_rank, 64))
    v0 = np.random.default_rng(0).standard_normal(n)  # a fixed start: same answer every run
    s = svds(A, k=k, v0=v0, return_singular_vectors=False)
    return np.sort(s)[::-1], True


def _numerical_rank(s: np.ndarray, n: int) -> int:
    """Number of singular values above numpy's default tolerance S.max() * n * eps."""
    if s.size == 0:
        return 0
    tol = s.max() * n * np.finfo(s.dtype).eps
    return int(np.count_nonzero(s > tol))


def _energy(s: np.ndarray, rank: int, fro: float) -> float:
    """Share of ||A||_F^2 in the leading `rank` singular values (1.0 for A = 0)."""
    if fro == 0.0:
        return 1.0  # the zero matrix is reproduced exactly at any rank
    top = np.asarray(s[:rank], dtype=np.float64)
    return min(1.0, float(np.sum(top * top)) / (fro * fro))
