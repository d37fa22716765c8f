"""Error measures of an approximation against its matrix.

The exact relative error ||A - A_hat||_F / ||A||_F is computed over column
blocks, A_hat[:, J] = A_hat @ E_J, so that no method needs to form its dense
n x n matrix and A may stay sparse.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from sfa_cli.errors import SfaError

__all__ = ["relative_error", "frobenius_norm", "column_block"]

#: Columns per block when streaming over A_hat; keeps a block near 64 MiB at n = 16384.
BLOCK_COLUMNS = 512


def frobenius_norm(A) -> float:
    """||A||_F of a dense or sparse matrix."""
    if sp.issparse(A):
        return float(np.sqrt(np.sum(np.abs(A.data.astype(np.float64)) ** 2)))
    return float(np.linalg.norm(np.asarray(A, dtype=np.float64)))


def column_block(A, cols: np.ndarray) -> np.ndarray:
    """Dense float64 copy of A[:, cols] for dense or sparse A."""
    if sp.issparse(A):
        return np.asarray(A[:, cols].toarray(), dtype=np.float64)
    return np.asarray(A[:, cols], dtype=np.float64)


def _unit_columns(n: int, cols: np.ndarray, dtype) -> np.ndarray:
    E = np.zeros((n, len(cols)), dtype=dtype)
    E[cols, np.arange(len(cols))] = 1
    return E


def relative_error(A, approx, *, block: int = BLOCK_COLUMNS) -> float:
    """Relative Frobenius error of approx against A.

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
    approx : Approximation
        Anything with ``n`` and ``matmul`` (see :class:`sfa_cli.approximation.Approximation`).

    Returns
    -------
    float
        ||A - A_hat||_F / ||A||_F, computed in float64 over column blocks.
    """
    n = A.shape[0]
    if approx.n != n:
        raise SfaError(f"the approximation is for n={approx.n} but the matrix has n={n}")
    norm = frobenius_norm(A)
    if norm == 0.0:
        raise SfaError("the matrix is all zeros; its relative error is undefined")
    sq = 0.0
    for start in range(0, n, block):
        cols = np.arange(start, min(start + block, n))
        P = np.asarray(approx.matmul(_unit_columns(n, cols, approx.dtype)), dtype=np.float64)
        sq += float(np.sum((column_block(A, cols) - P) ** 2))
    return float(np.sqrt(sq) / norm)
