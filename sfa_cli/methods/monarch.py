"""The Monarch baseline: the closed-form projection onto Monarch matrices (Dao et al. 2022).

Like every baseline (see :mod:`sfa_cli.methods.low_rank`), :func:`monarch` takes the
matrix and a budget (stored numbers), never spends more than the budget, and returns an
:class:`~sfa_cli.approximations.base.Approximation` (a
:class:`~sfa_cli.approximations.kinds.Monarch`); it raises
:class:`~sfa_cli.errors.NotApplicable` when n has no block structure or the budget is too small.

Example
-------
>>> import numpy as np
>>> A = np.random.default_rng(0).standard_normal((64, 64))
>>> monarch_blocks(64)
(8, 8)
>>> monarch(A, 1024).params
1024
"""
from __future__ import annotations

import math

import numpy as np

from sfa_cli.approximations.kinds import Monarch
from sfa_cli.errors import NotApplicable
from sfa_cli.metrics import column_block
from sfa_cli.validation import check_budget, validates_matrix
from sfa_cli.methods.low_rank import _BLOCK_ENTRIES, _work_dtype

__all__ = [
    "monarch",
    "monarch_blocks",
]


def monarch_blocks(n: int) -> tuple[int, int]:
    """(s0, s1) with n = s0 * s1 and s1 the largest divisor of n not above sqrt(n)."""
    s1 = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
    return n // s1, s1


@validates_matrix
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
