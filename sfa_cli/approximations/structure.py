"""What an approximation stores, kind by kind: the summary `sfa show` prints, and its supports.

:func:`structure` describes any approximation from its kind's public attributes
(``SparseFactors.factors`` and ``.pattern``, ``LowRank.left``/``.right``,
``SparseMatrix.matrix``, ``Monarch.u``/``.v``, ``SumApproximation.parts``):
kind, n, dtype, method, params, compression, the kind's own fields and, per
stored matrix (a :class:`Support`), its shape, entries and entries per row.
:func:`supports` lists those matrices; :meth:`Support.grid` bins one's
entries into a count grid of at most ``size x size`` cells, in chunks of rows,
so that drawing the support of a factor of any n never forms it densely.

Example
-------
>>> import numpy as np
>>> from sfa_cli.approximations.kinds import LowRank
>>> s = structure(LowRank(np.ones((4, 1)), np.ones((1, 4)), method="tsvd"))
>>> s["kind"], s["rank"], s["params"], s["compression"]
('low_rank', 1, 8, 2.0)
>>> [(p["name"], p["shape"], p["nnz_per_row"]["max"]) for p in s["supports"]]
[('left', [4, 1], 1), ('right', [1, 4], 4)]
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["structure", "supports", "Support", "GRID_CHUNK_ENTRIES"]

#: Entries binned at a time by :meth:`Support.grid` (two int64 index arrays of this length: 64 MiB).
GRID_CHUNK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class Support:
    """The positions of one stored matrix of an approximation (a factor, a dense pair half, a part).

    Attributes
    ----------
    name : str
        ``W(1)`` ... ``W(M)`` (sparse factors, leftmost first), ``left``/``right`` (low rank),
        ``S`` (one sparse matrix), ``L (u)``/``R (v)`` (Monarch: A_hat = L R with the
        permutation folded into L); a part of a sum is prefixed ``part{i} ``.
    shape : (rows, cols)
    per_row : ndarray of int64, shape (rows,)
        Stored entries in each row.
    entries : callable (r0, r1) -> (rows, cols)
        The row and column indices of the stored entries of rows r0..r1-1.
    """

    name: str
    shape: tuple[int, int]
    per_row: np.ndarray
    entries: Callable[[int, int], tuple[np.ndarray, np.ndarray]]

    @property
    def nnz(self) -> int:
        """Stored entries (what the approximation's ``params`` counts)."""
        return int(self.per_row.sum())

    def summary(self) -> dict:
        """``{name, shape, nnz, density, nnz_per_row: {min, mean, max}}`` (stored entries)."""
        rows, cols = self.shape
        per_row = self.per_row
        return {
            "name": self.name, "shape": [rows, cols], "nnz": self.nnz,
            "density": self.nnz / (rows * cols) if rows * cols else 0.0,
            "nnz_per_row": {"min": int(per_row.min()) if rows else 0, "mean": float(per_row.mean()) if rows else 0.0,
                            "max": int(per_row.max()) if rows else 0},
        }

    def grid(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored entries counted in bins: (counts, row_bin_sizes, col_bin_sizes).

        The rows are cut into ``min(rows, size)`` contiguous bins (row i in bin
        ``i * bins // rows``), the columns likewise; with ``size`` at least the
        shape every bin is one entry and ``counts`` is the 0/1 support itself
        (of shape (n, 0) for the empty half of a rank-0 pair).
        Works through the rows in chunks of about :data:`GRID_CHUNK_ENTRIES`
        entries: the memory is the grid plus one chunk, whatever n is.
        """
        rows, cols = self.shape
        size = max(1, int(size))
        gr, gc = min(rows, size), min(cols, size)
        counts = np.zeros(gr * gc, dtype=np.int64)
        if rows and cols:
            ends = np.cumsum(self.per_row)
            r0 = 0
            while r0 < rows:
                done = ends[r0 - 1] if r0 else 0
                r1 = int(np.searchsorted(ends, done + GRID_CHUNK_ENTRIES, side="right"))
                r1 = min(rows, max(r1, r0 + 1))
                i, j = self.entries(r0, r1)
                if i.size:
                    cells = (i.astype(np.int64) * gr // rows) * gc + j.astype(np.int64) * gc // cols
                    counts += np.bincount(cells, minlength=gr * gc)
                r0 = r1
        return counts.reshape(gr, gc), _bin_sizes(rows, gr), _bin_sizes(cols, gc)


def _bin_sizes(length: int, bins: int) -> np.ndarray:
    """How many of ``length`` indices fall in each of ``bins`` (index i in bin i * bins // length)."""
    return np.bincount(np.arange(length, dtype=np.int64) * bins // length, minlength=bins)


# -- the supports of each kind ------------------------------------------------------------
def _csr_support(name: str, W) -> Support:
    indptr, indices = W.indptr, W.indices

    def entries(r0, r1):
        lo, hi = int(indptr[r0]), int(indptr[r1])
        rows = np.repeat(np.arange(r0, r1, dtype=np.int64), np.diff(indptr[r0:r1 + 1]))
        return rows, np.asarray(indices[lo:hi], dtype=np.int64)

    return Support(name, (int(W.shape[0]), int(W.shape[1])), np.diff(indptr).astype(np.int64), entries)


def _regular_support(name: str, shape: tuple[int, int], per_row: int, cols_of: Callable) -> Support:
    """A support with ``per_row`` entries in every row, at columns ``cols_of(rows) -> (len(rows), per_row)``."""

    def entries(r0, r1):
        rows = np.arange(r0, r1, dtype=np.int64)
        return np.repeat(rows, per_row), cols_of(rows).reshape(-1)

    return Support(name, shape, np.full(shape[0], per_row, dtype=np.int64), entries)


def _dense_support(name: str, array: np.ndarray) -> Support:
    rows, cols = array.shape
    return _regular_support(name, (rows, cols), cols,
                            lambda r: np.broadcast_to(np.arange(cols, dtype=np.int64), (len(r), cols)))


def _monarch_supports(m) -> list[Support]:
    """A_hat = L R: R[(j0, i1), (j0, j1)] = v[i1, j0, j1] (s0 diagonal blocks of s1 x s1) and
    L[(i0, i1), (j0, i1)] = u[i1, j0, i0] (the permutation folded in), index (a, b) = a * s1 + b."""
    s0, s1, n = m.s0, m.s1, m.n
    left = _regular_support("L (u)", (n, n), s0,
                            lambda r: np.arange(s0, dtype=np.int64)[None, :] * s1 + (r % s1)[:, None])
    right = _regular_support("R (v)", (n, n), s1,
                             lambda r: (r // s1 * s1)[:, None] + np.arange(s1, dtype=np.int64)[None, :])
    return [left, right]


def _own_supports(approx) -> list[Support]:
    kind = approx.kind
    if kind == "sparse_factors":
        return [_csr_support(f"W({m + 1})", W) for m, W in enumerate(approx.factors)]
    if kind == "low_rank":
        return [_dense_support("left", approx.left), _dense_support("right", approx.right)]
    if kind == "sparse":
        return [_csr_support("S", approx.matrix)]
    if kind == "monarch":
        return _monarch_supports(approx)
    if kind == "sum":
        return [Support(f"part{i} {s.name}", s.shape, s.per_row, s.entries)
                for i, part in enumerate(approx.parts) for s in _own_supports(part)]
    return []  # a kind this module does not know yet: summarised without supports


def supports(approx) -> list[Support]:
    """The stored matrices of an approximation, leftmost factor first (a sum's parts in order).

    Empty for a kind this module does not describe.
    """
    return _own_supports(approx)


# -- the summary --------------------------------------------------------------------------
def _own_fields(approx) -> dict:
    """The kind's own structural fields (as its file's meta record names them)."""
    kind = approx.kind
    if kind == "sparse_factors":
        return {"factors": len(approx.factors), "pattern": dict(approx.pattern or {})}
    if kind == "low_rank":
        return {"rank": int(approx.left.shape[1])}
    if kind == "monarch":
        return {"blocks": [approx.s0, approx.s1]}
    return {}


def _header(approx) -> dict:
    n, params = approx.n, approx.params
    return {"kind": approx.kind, "n": n, "dtype": approx.dtype.name, "method": approx.method, "params": params,
            "compression": n * n / params if params else None, **_own_fields(approx)}


def structure(approx) -> dict:
    """The structure of an approximation as one JSON-ready dict.

    Parameters
    ----------
    approx : Approximation
        Any kind (e.g. from :func:`~sfa_cli.approximations.base.load_approximation`).

    Returns
    -------
    dict
        ``kind, n, dtype, method, params, compression`` (n^2 / params; None for
        no parameters); the kind's own fields: ``factors`` and ``pattern``
        (sparse factors: the pattern record stored in the file), ``rank``
        (low rank), ``blocks`` ([s0, s1], Monarch), ``parts`` (a sum: each
        part's fields as above, without supports); ``supports``: one
        ``{name, shape, nnz, density, nnz_per_row: {min, mean, max}}`` per
        stored matrix (:func:`supports`; counts are stored entries); ``info``:
        the facts recorded with the file (error reached, input, ...).
    """
    out = _header(approx)
    if approx.kind == "sum":
        out["parts"] = [_header(part) for part in approx.parts]
    out["supports"] = [s.summary() for s in supports(approx)]
    out["info"] = dict(approx.info)
    return out
