"""Chord factors plus a sparse residual: :func:`chord_plus_sparse`.

Part of the budget goes to Chord factors fitted to A, the rest to the largest entries of
the residual, alternately refitted; the split is chosen like
:func:`sfa_cli.methods.sparse.lowrank_plus_sparse` (the best of several, top-k alone among
them), so the result is never worse than :func:`~sfa_cli.methods.sparse.top_k` at the
same budget. The fits take ``fit_options`` like :func:`sfa_cli.methods.learned.learned_sparse`.
"""
from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp

from sfa_cli.approximations.kinds import SparseMatrix, SumApproximation
from sfa_cli.errors import NotApplicable, SfaError
from sfa_cli.engine.fit import default_max_iter, fit
from sfa_cli.metrics import frobenius_norm, residual_columns
from sfa_cli.engine.options import PatternSpec, Placement, StopRules
from sfa_cli.approximations.patterns import chord_at_budget
from sfa_cli.validation import check_budget, validates_matrix
from sfa_cli.methods.learned import _FitSettings
from sfa_cli.methods.sparse import _minus_sparse, largest_by_columns, top_k

__all__ = ["chord_plus_sparse"]


def _largest_of_residual(A, approx, k: int) -> tuple[sp.csr_matrix, float]:
    """The k largest-magnitude entries of A - approx as CSR, and the squared norm of the rest (column blocks)."""
    n = A.shape[0]
    keep, vals, total = largest_by_columns(n, k, lambda cols: residual_columns(A, approx, cols))
    nz = vals != 0
    keep, vals = keep[nz], vals[nz]
    rest = max(total - float(np.dot(vals, vals)), 0.0)
    r, c = np.divmod(keep, n)
    return sp.csr_matrix((vals, (r, c)), shape=(n, n)), rest


@validates_matrix
def chord_plus_sparse(
    A,
    budget: int,
    *,
    seed: int = 0,
    fit_options: dict | None = None,
    splits=(0.5, 1.0),
    alternations: int = 2,
    chord_fits: dict | None = None,
    callback=None,
) -> SumApproximation:
    """Chord factors on part of the budget plus the largest entries of the residual, the best of several splits.

    For each split f the Chord pattern is sized to f * budget
    (:func:`sfa_cli.approximations.patterns.chord_at_budget`) and fitted to A; the rest of the
    budget keeps the largest entries S of A - C; then, ``alternations - 1``
    times, the Chord factors are refitted to A - S (warm start) and S is taken
    again. The split f = 0 (the budget's largest entries alone, :func:`top_k`) is
    always tried, so the result is never worse than top-k at the same budget.

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
    budget : int
        Parameters allowed: Chord non-zeros + nnz(S) <= budget.
    seed : int, default=0
        Seed of the Chord fits.
    fit_options : dict, optional
        Options of :func:`sfa_cli.engine.fit.fit` for the Chord fits (max_iter,
        time_limit, device, ...); ``symmetric`` and ``self_link`` choose
        the Chord variant; time_limit bounds all the fits together. Without max_iter each fit runs a tenth of
        :func:`sfa_cli.engine.fit.default_max_iter` (at least 100): the method makes
        ``len(splits) * alternations`` fits.
    splits : sequence of float, default=(0.5, 1.0)
        Fractions of the budget offered to the Chord part.
    alternations : int, default=2
        Chord/sparse alternations per split.
    chord_fits : dict, optional
        Chord factors already fitted to A, keyed by ``tuple(sorted(pattern options))`` (sizes and
        variant, as :func:`sfa_cli.approximations.patterns.chord_at_budget` gives them): a split
        whose pattern is there starts from them instead of fitting again (``compare`` passes its
        Chord row's fit).
    callback : callable, optional
        ``callback(step: FitStep)`` after every evaluation of the Chord fits (progress).

    ``fit_options["time_limit"]`` bounds the whole method: each fit gets an equal share of the
    seconds left, and splits not reached when they run out are skipped (``info["skipped"]``).

    Returns
    -------
    SumApproximation
        A :class:`SparseFactors` (Chord, absent when top-k alone wins) plus a
        :class:`SparseMatrix`, method ``chord+sparse``; info records ``split``,
        ``chord_params``, ``nnz`` and ``rel_error``.
    """

    n, budget = A.shape[0], check_budget(budget)
    splits = [float(f) for f in splits]
    if any(not 0 <= f <= 1 for f in splits):
        raise SfaError(f"splits must be fractions in [0, 1]; got {splits}")
    if int(alternations) != alternations or alternations < 1:
        raise SfaError(f"alternations must be a positive integer; got {alternations!r}")
    settings = _FitSettings.from_options(fit_options, "chord_plus_sparse fit_options")
    norm = frobenius_norm(A)
    if norm == 0.0:
        raise SfaError("the matrix is all zeros; there is nothing to approximate")
    variant = settings.variant
    stop = settings.stop
    if stop.max_iter is None:
        stop = StopRules(**{**stop.to_dict(), "max_iter": max(100, default_max_iter(n) // 10)})
    placement = Placement(settings.placement.device, settings.placement.dtype, seed)

    top = top_k.trusted(A, budget)
    top_rest = max(frobenius_norm(A) ** 2 - float(np.sum(top.matrix.data.astype(np.float64) ** 2)), 0.0)
    best = (math.sqrt(top_rest) / norm, 0.0, None, top.matrix)
    candidates, seen = [], set()
    for f in sorted(set(splits) - {0.0}):
        try:
            pattern_options, _ = chord_at_budget(n, max(1, int(f * budget)), **variant)
        except NotApplicable:
            continue
        key = tuple(sorted(pattern_options.items()))
        if key not in seen:
            seen.add(key)
            candidates.append((f, pattern_options))
    deadline = None if stop.time_limit is None else time.perf_counter() + stop.time_limit
    reused, skipped = [], []
    for i, (f, pattern_options) in enumerate(candidates):
        C, S, rest = None, None, None
        known = (chord_fits or {}).get(tuple(sorted({**pattern_options, **variant}.items())))
        for alternation in range(int(alternations)):
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0 and C is not None:
                break  # out of time: keep this split's last Chord part
            if left is not None and left <= 0:
                skipped.append(f)
                break
            if alternation == 0 and known is not None:
                C = known
                reused.append(f)
            else:
                target = A if S is None else (A - S if sp.issparse(A) else _minus_sparse(A, S))
                fits_left = int(alternations) - alternation + int(alternations) * (len(candidates) - i - 1)
                rules = stop if left is None else StopRules(**{**stop.to_dict(), "time_limit": left / fits_left})
                result = fit.trusted(target, pattern=PatternSpec("chord", **pattern_options, **variant), stop=rules,
                                     optimizer=settings.optimizer, placement=placement, init=C, callback=callback)
                if result.interrupted:
                    raise KeyboardInterrupt
                C = result.approximation
            S, rest = _largest_of_residual(A, C, budget - C.params)
        if rest is None:
            continue
        error = math.sqrt(rest) / norm
        if error < best[0]:
            best = (error, f, C, S)
    error, f, C, S = best
    S.eliminate_zeros()
    chord_params = C.params if C is not None else 0
    info = {
        "split": f,
        "chord_params": chord_params,
        "nnz": int(S.nnz),
        "alternations": int(alternations),
        "rel_error": error,
        **({"reused_chord_fit": reused} if reused else {}),
        **({"skipped": skipped} if skipped else {}),
        "note": (f"Chord {C.num_factors} factors ({chord_params} non-zeros) + {S.nnz} entries (split {f:g})"
                 if C is not None else f"top-k alone: {S.nnz} entries"),
    }
    parts = ([C] if C is not None else []) + [SparseMatrix(S, method="sparse")]
    return SumApproximation(parts, method="chord+sparse", info=info)
