"""Error measures of an approximation against its matrix.

The exact relative error ||A - A_hat||_F / ||A||_F is computed over column
blocks, A_hat[:, J] = ``approx.columns(J)``, so that no method needs to form
its dense n x n matrix and A may stay sparse. :func:`residual_blocks` is that
loop for any caller that needs the residual column by column (an estimate
from a sample of columns, a refit of the residual).

Example
-------
>>> import numpy as np
>>> from sfa_cli.approximations.kinds import LowRank
>>> A = np.diag([3.0, 4.0])
>>> relative_error(A, LowRank(np.array([[0.0], [4.0]]), np.array([[0.0, 1.0]]), method="tsvd"))
0.6
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from sfa_cli.errors import SfaError
from sfa_cli.validation import MAPPED_ROWS, mapped_columns, release_pages, validates_matrix

__all__ = ["relative_error", "residual_blocks", "best_scale", "never_worse_than_zero", "residual_columns", "frobenius_norm", "column_block", "BLOCK_COLUMNS"]

#: Columns per block when streaming over A_hat; keeps a block near 64 MiB at n = 16384.
BLOCK_COLUMNS = 512


def frobenius_norm(A) -> float:
    """||A||_F of a dense or sparse matrix, in float64 (A is not validated: see :func:`relative_error`)."""
    if sp.issparse(A):
        return float(np.sqrt(np.sum(np.abs(A.data.astype(np.float64)) ** 2)))
    A = np.asarray(A)
    total = 0.0
    for i in range(0, A.shape[0], MAPPED_ROWS):  # by rows: no float64 copy of A, a memory map's pages go back
        block = A[i:i + MAPPED_ROWS].astype(np.float64)
        total += float(np.einsum("ij,ij->", block, block))
        release_pages(A)
    return float(np.sqrt(total))


def column_block(A, cols: np.ndarray) -> np.ndarray:
    """Dense float64 copy of A[:, cols] for dense or sparse A (not validated)."""
    if sp.issparse(A):
        return np.asarray(A[:, cols].toarray(), dtype=np.float64)
    return np.asarray(mapped_columns(A, cols), dtype=np.float64)


def residual_columns(A, approx, cols) -> np.ndarray:
    """A[:, cols] - A_hat[:, cols] as a float64 array of shape (n, len(cols)).

    Parameters
    ----------
    A : ndarray (a memory map included) or sparse matrix of shape (n, n)
        Already validated (e.g. by :func:`sfa_cli.validation.as_square_matrix`);
        only its shape is checked here, so calling this once per block costs no
        extra pass over A.
    approx : Approximation
        Anything with ``n`` and ``columns`` (or, failing that, ``matmul``).
    cols : sequence of int or integer ndarray
        Column indices in [0, n).
    """
    _check_pair(A, approx)
    cols = np.asarray(cols)
    return column_block(A, cols) - _approx_columns(approx, cols)


@validates_matrix
def residual_blocks(A, approx, cols=None, *, block: int = BLOCK_COLUMNS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The residual A - A_hat over column blocks: yields (J, A[:, J] - A_hat[:, J]).

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
        Validated with :func:`~sfa_cli.validation.as_square_matrix` once, when
        the iteration starts.
    approx : Approximation
    cols : sequence of int, optional
        The columns to visit, in this order (all n by default).
    block : int, default=512
        Columns per yielded block.

    Yields
    ------
    J : ndarray of int64, shape (b,)
    R : ndarray of float64, shape (n, b)
    """
    _check_pair(A, approx)
    if isinstance(block, bool) or int(block) != block or block < 1:
        raise SfaError(f"block must be a positive number of columns; got {block!r}")
    if cols is not None:
        cols = np.asarray(cols)
        if cols.ndim != 1 or cols.dtype.kind not in "iu" or (cols.size and (cols.min() < 0 or cols.max() >= A.shape[0])):
            raise SfaError(f"cols must be a 1-D array of column indices in [0, {A.shape[0]})")
    return _blocks(A, approx, cols, int(block))


def _blocks(A, approx, cols, block: int):
    cols = np.arange(A.shape[0]) if cols is None else cols
    for start in range(0, len(cols), block):
        J = cols[start:start + block]
        yield J, column_block(A, J) - _approx_columns(approx, J)


@validates_matrix
def relative_error(A, approx, *, block: int = BLOCK_COLUMNS) -> float:
    """Relative Frobenius error of approx against A.

    Parameters
    ----------
    A : ndarray, sparse matrix, torch tensor or array-like of shape (n, n)
        Checked by :func:`~sfa_cli.validation.as_square_matrix` (square, real, finite).
    approx : Approximation
        Anything with ``n`` and ``columns`` or ``matmul`` (see :class:`sfa_cli.approximations.base.Approximation`).
    block : int, default=512
        Columns per block of the streamed residual.

    Returns
    -------
    float
        ||A - A_hat||_F / ||A||_F, computed in float64 over column blocks.

    Raises
    ------
    SfaError
        A fails validation, the sizes differ, or A is all zeros.
    """
    _check_pair(A, approx)
    norm = frobenius_norm(A)
    if norm == 0.0:
        raise SfaError("A: the matrix is all zeros; its relative error is undefined")
    if isinstance(block, bool) or int(block) != block or block < 1:
        raise SfaError(f"block must be a positive number of columns; got {block!r}")
    sq = sum(float(np.sum(R * R)) for _, R in _blocks(A, approx, None, int(block)))
    return float(np.sqrt(sq) / norm)


def _check_pair(A, approx) -> None:
    n = getattr(approx, "n", None)
    if n is None or not (hasattr(approx, "columns") or hasattr(approx, "matmul")):
        raise SfaError(f"approx must be an sfa Approximation; got {type(approx).__name__}")
    if A.shape[0] != n:
        raise SfaError(f"the approximation is for n={n} but the matrix has n={A.shape[0]}")


def _approx_columns(approx, cols: np.ndarray) -> np.ndarray:
    """A_hat[:, cols] in float64, through ``columns`` when the object has it."""
    if hasattr(approx, "columns"):
        return np.asarray(approx.columns(cols), dtype=np.float64)
    E = np.zeros((approx.n, len(cols)), dtype=getattr(approx, "dtype", np.float64))
    E[cols, np.arange(len(cols))] = 1
    return np.asarray(approx.matmul(E), dtype=np.float64)


@validates_matrix
def best_scale(A, approx, *, block: int = BLOCK_COLUMNS) -> tuple[float, float]:
    """The scalar c minimising ||A - c A_hat||_F, and the relative error of c A_hat.

    c = <A, A_hat> / ||A_hat||_F^2 (0 when A_hat = 0), so the error sqrt(1 - cos^2) is never above 1:
    no method need report a result worse than the zero matrix. Streams over column blocks.
    """
    _check_pair(A, approx)
    norm = frobenius_norm(A)
    if norm == 0.0:
        raise SfaError("A: the matrix is all zeros; its relative error is undefined")
    inner = power = 0.0
    for start in range(0, A.shape[0], block):
        J = np.arange(start, min(start + block, A.shape[0]))
        P = np.asarray(_approx_columns(approx, J), dtype=np.float64)
        inner += float(np.sum(column_block(A, J) * P))
        power += float(np.sum(P * P))
    if power == 0.0:
        return 0.0, 1.0
    c = inner / power
    return c, float(np.sqrt(max(0.0, 1.0 - inner * inner / (power * norm * norm))))


def never_worse_than_zero(A, approx, rel_error: float) -> tuple[object, float, str]:
    """(approx, rel_error, note): an approximation whose error is above 1 (worse than the zero matrix)
    is replaced by its best multiple c A_hat (:func:`best_scale`), which never is; the note says so."""
    if not rel_error > 1.0:
        return approx, rel_error, ""
    c, error = best_scale.trusted(A, approx)
    note = (f"rescaled by {c:.3g}: the fit's error {rel_error:.4g} was worse than the zero matrix"
            if c != 0.0 else f"the fit's error {rel_error:.4g} was worse than the zero matrix")
    return approx.scaled(c), error, note
