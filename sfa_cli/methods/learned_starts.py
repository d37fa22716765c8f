"""The starts of the learned-support method (:func:`sfa_cli.methods.learned.learned_sparse`).

* ``init="lowrank+sparse"`` (the default): a low-rank plus sparse split written as two
  sparse factors, S(1) = [U_r sqrt(s) | e_i ...], S(2) = [sqrt(s) V_r^T ; residual rows],
  one "slot" column e_i in S(1) for each residual row that holds kept entries (or the
  transposed layout): :func:`_svd_parts` gives the rank-r pair, :func:`_lowrank_sparse_start`
  the supports and values within the budget;
* ``init="chord"``: a Chord fit at the budget (:func:`_chord_start`).

Both starts come back as supports and values (lists rows, cols, values: numpy arrays, one
per factor), from which ``learned_sparse`` builds its chain of factors. Nothing here imports
:mod:`sfa_cli.methods.learned` (``settings`` of :func:`_chord_start` is its ``_FitSettings``).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from sfa_cli.engine.fit import fit
from sfa_cli.engine.options import PatternSpec, Placement, StopRules
from sfa_cli.approximations.patterns import chord_at_budget
from sfa_cli.methods.low_rank import _full_svd, _randomized_low_rank
from sfa_cli.methods.sparse import _largest

#: Largest n for which the start takes an exact SVD (above it a seeded randomized SVD).
_EXACT_SVD_LIMIT = 1024


def _svd_parts(A, r: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(U_r sqrt(s_r), sqrt(s_r) V_r^T): the best rank-r pair, split evenly."""
    n = A.shape[0]
    if r <= 0:
        return np.zeros((n, 0)), np.zeros((0, n))
    if n <= _EXACT_SVD_LIMIT:
        U, s, Vt = _full_svd(A.toarray() if sp.issparse(A) else np.asarray(A, dtype=np.float64))
        U, s, Vt = U[:, :r], s[:r], Vt[:r]
        return U * np.sqrt(s), np.sqrt(s)[:, None] * Vt
    left, right = _randomized_low_rank(A, r, seed=seed, n_iter=4)
    # left = U s, right = V^T: move half of s to the right
    s = np.linalg.norm(left, axis=0)
    root = np.sqrt(np.where(s > 0, s, 1.0))
    return left / root, right * root[:, None]


def _lowrank_sparse_start(D: np.ndarray, left: np.ndarray, right: np.ndarray, budget: int, middle: int):
    """Supports and values of [left | slots] (I ...) [right ; residual rows] within the budget.

    D is the residual A - left @ right (dense, scaled); ``middle`` identity factors
    sit between the two. The residual's largest entries are kept in the layout
    (rows of S(2) behind slots e_i of S(1), or the transpose) that keeps more of
    its energy. Returns the lists rows, cols, values (one array per factor).
    """
    n, r = left.shape
    k = budget - 2 * n * r - middle * n
    best = None
    for orientation in ("rows", "cols"):
        M = D if orientation == "rows" else D.T
        cand = _largest(M.ravel(), max(k, 0))
        cand = cand[np.argsort(-np.abs(M.ravel()[cand]), kind="stable")]
        lines = cand // n
        _, first = np.unique(lines, return_index=True)
        new = np.zeros(len(cand), dtype=bool)
        new[first] = True
        opened = np.cumsum(new)
        cost = np.arange(1, len(cand) + 1) + opened
        keep = cand[(cost <= k) & (opened <= n - r)]
        energy = float(np.sum(M.ravel()[keep] ** 2))
        if best is None or energy > best[0]:
            best = (energy, orientation, keep)
    energy, orientation, keep = best
    M = D if orientation == "rows" else D.T
    line, pos = np.divmod(keep, n)
    lines = np.unique(line)
    slot = np.empty(n, dtype=np.int64)
    slot[lines] = r + np.arange(len(lines))  # the atom that carries residual line `line`
    # low-rank atoms
    lr_rows, lr_cols = np.repeat(np.arange(n), r), np.tile(np.arange(r), n)
    first = (lr_rows, lr_cols, left.reshape(-1))
    last = (np.repeat(np.arange(r), n), np.tile(np.arange(n), r), right.reshape(-1))
    slots = (lines, slot[lines], np.ones(len(lines)))
    entries = (slot[line], pos, M.ravel()[keep])
    if orientation == "rows":  # S1[line, slot] = 1, S2[slot, pos] = value
        f0 = [np.concatenate([a, b]) for a, b in zip(first, slots)]
        f1 = [np.concatenate([a, b]) for a, b in zip(last, entries)]
    else:  # transposed: S1[pos, slot] = value, S2[slot, line] = 1
        f0 = [np.concatenate([a, b]) for a, b in zip(first, (entries[1], entries[0], entries[2]))]
        f1 = [np.concatenate([a, b]) for a, b in zip(last, (slots[1], slots[0], slots[2]))]
    eye = (np.arange(n), np.arange(n), np.ones(n))
    factors = [f0] + [eye] * middle + [f1]
    return [f[0] for f in factors], [f[1] for f in factors], [f[2] for f in factors]


def _chord_start(A, budget: int, seed: int, settings: "_FitSettings"):
    """A Chord fit at the budget, as supports and values (scale of A included); no time limit of its own."""
    pattern_options, _ = chord_at_budget(A.shape[0], budget)
    stop = StopRules(**{**settings.stop.to_dict(), "time_limit": None})
    result = fit.trusted(A, pattern=PatternSpec("chord", **pattern_options), stop=stop, optimizer=settings.optimizer,
                 placement=Placement(settings.placement.device, settings.placement.dtype, seed))
    if result.interrupted:
        raise KeyboardInterrupt
    mats = result.approximation.factors
    rows = [np.repeat(np.arange(W.shape[0]), np.diff(W.indptr)) for W in mats]
    return rows, [W.indices.astype(np.int64) for W in mats], [W.data.astype(np.float64) for W in mats]
