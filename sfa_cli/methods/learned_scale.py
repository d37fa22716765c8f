"""The learned-support method at large n: two sparse factors fitted from blocks of A, nothing n x n formed.

:func:`sfa_cli.methods.learned.learned_sparse` keeps dense n x n residuals, scores and
Gram matrices, which is right up to n = 8192 and impossible at n = 16384-65536
(one n x n array of float32 is 1-16 GiB). :func:`learned_at_scale` fits the same
model, A ~ S(1) S(2) with at most ``budget`` non-zeros over both factors whose
places are chosen by the fit, with the same three steps, each reorganised so
that A is only read by blocks of rows or of columns (a memory-mapped ``.npy``
hands back its pages after each block):

* **start**: the low-rank plus sparse split written as two factors,
  S(1) = [U sqrt(s) | slots], S(2) = [sqrt(s) V^T ; residual rows], for the
  budget splits 0.5, 0.9 and 1 (the last is the truncated SVD at the budget,
  plus the few residual entries its rounding leaves room for). One randomized
  SVD (:func:`sfa_cli.methods.low_rank._randomized_low_rank`, by row blocks for a
  memory map) serves every split, and one pass over the rows of A keeps the
  largest residual entries of each (a running top-k). Each start gets one
  refit; the best continues.
* **refit** (exact alternating least squares): every row i of S(1) on its
  support J solves (S2 S2^T)[J, J] x = (A S2^T)[i, J], then every column of
  S(2) likewise with S1^T S1 and S1^T A. The atoms (columns of S(1), rows of
  S(2)) held by more than a quarter of n entries are *dense*: their Gram blocks
  and their products with A are BLAS products over row blocks of A. The other,
  sparse atoms need only the entries of A they touch, read by index. Gram
  entries between sparse atoms come from the cheaper of the pairs sharing a
  line and the product Gs Gs^T, at most _PAIR_LIMIT of them (beyond, they are
  left out and the refit is Jacobi-like); a line with more than _MAX_LINE
  unknowns keeps its values in that sweep (each line's problem is separate, so
  the other lines still descend). A Jacobi-like refit may not descend; the
  round's acceptance test then undoes it.
* **re-selection** (a round): a pass over the rows of the residual gives the
  gradient R S2^T of S(1), a pass over its columns the gradient S1^T R of S(2);
  an entry's score is its error decrease g^2 / c alone (held entries: c s^2),
  a running top-``budget`` keeps the best new entries, and the budget keeps
  the best of held and new ones together. A round whose refit is not better is
  undone and new entries discounted by 4 (three such rounds end the fit), as
  in :func:`~sfa_cli.methods.learned.learned_sparse`, so the error never increases and
  the result is never worse than its start, which is never worse than the
  truncated SVD at the budget (up to the randomized SVD's accuracy). The
  budget's largest entries (top-k, from the start's pass) are returned instead
  when they are closer.

Per pass the work is about n^2 (r + 1) for r dense atoms and n * nnz for the
sparse ones, the memory a few blocks of rows (32 MiB each) plus the factors.
Runs on the CPU (numpy, scipy); ``time_limit`` is checked after every block and
every batch of small systems. docs/scale.md has the measurements at n = 16384.

Example
-------
>>> import numpy as np
>>> from sfa_cli.metrics import relative_error
>>> rng = np.random.default_rng(0)
>>> A = rng.standard_normal((256, 4)) @ rng.standard_normal((4, 256))
>>> A[rng.integers(0, 256, 300), rng.integers(0, 256, 300)] += 5.0
>>> F = learned_at_scale(A, 4000, seed=0)
>>> F.params <= 4000, F.pattern["at_scale"], relative_error(A, F) < 0.2
(True, True, True)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from sfa_cli.errors import SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.approximations.patterns import tsvd_rank_at_budget
from sfa_cli.validation import check_budget, is_memory_mapped, mapped_columns, release_pages, validates_matrix

__all__ = ["learned_at_scale", "SCALE_SPLITS"]

#: Fractions of the budget given to the low-rank part of the starts (1: the truncated SVD at the budget).
SCALE_SPLITS = (0.5, 0.9, 1.0)
#: Entries of A per block of rows or columns (32 MiB in float64).
_BLOCK = 1 << 22
#: An atom with more than this share of n entries in S(1)'s column or S(2)'s row is handled by BLAS.
_DENSE_SHARE = 0.25
#: Matrix entries per batch of the small least-squares systems.
_BATCH_ENTRIES = 1 << 21
_STEP, _BACKOFF, _REJECTIONS = 0.25, 4.0, 3
#: Unknowns of one line's system at most (a larger line keeps its values in that sweep).
_MAX_LINE = 768


class _OutOfTime(Exception):
    """The deadline passed inside a pass; the best state so far is returned."""


# -- blocks of A -----------------------------------------------------------------------------
class _Blocks:
    """A read by blocks of rows or of columns, in float64; entries read by index."""

    def __init__(self, A, deadline: float):
        self.A, self.n, self.deadline = A, A.shape[0], deadline
        self.sparse = sp.issparse(A)
        if self.sparse:
            self.csr, self.csc = A.tocsr(), A.tocsc()
        self.width = max(1, min(_BLOCK // self.n, self.n // 4))  # a quarter of A at most: never all of it

    def _check(self):
        if time.perf_counter() > self.deadline:
            raise _OutOfTime

    def rows(self):
        """Yields (I, A[I, :]) for consecutive row slices I."""
        for i in range(0, self.n, self.width):
            self._check()
            I = slice(i, min(self.n, i + self.width))
            if self.sparse:
                yield I, self.csr[I].toarray().astype(np.float64)
            else:
                yield I, np.asarray(self.A[I], dtype=np.float64)
                release_pages(self.A)

    def columns(self):
        """Yields (J, A[:, J]) for consecutive column slices J (a memory map by row blocks, pages handed back)."""
        width = self.width if not is_memory_mapped(self.A) else 2 * self.width  # fewer strided passes over a map
        for j in range(0, self.n, width):
            self._check()
            J = slice(j, min(self.n, j + width))
            if self.sparse:
                yield J, self.csc[:, J].toarray().astype(np.float64)
            else:
                yield J, np.asarray(mapped_columns(self.A, np.arange(J.start, J.stop)), dtype=np.float64)

    def entries(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """A[i, j] for index arrays, in float64 (read in sorted order, by chunks)."""
        out = np.empty(len(i), dtype=np.float64)
        order = np.argsort(i * self.n + j, kind="stable")
        step = 1 << 22
        for s in range(0, len(order), step):
            self._check()
            o = order[s:s + step]
            if self.sparse:
                out[o] = np.asarray(self.csr[i[o], j[o]]).ravel()
            else:
                out[o] = self.A[i[o], j[o]]
                release_pages(self.A)
        return out


# -- the two factors and their parts ----------------------------------------------------------
@dataclass
class _Pair:
    """S(1) (columns are atoms) and S(2) (rows are atoms) as CSR, float64."""

    S1: sp.csr_matrix
    S2: sp.csr_matrix

    @property
    def params(self) -> int:
        return int(self.S1.nnz + self.S2.nnz)


class _Parts:
    """The dense atoms of a pair as arrays (D1 = S1[:, d], D2 = S2[d, :]) and the sparse rest."""

    def __init__(self, pair: _Pair):
        n = pair.S1.shape[0]
        S1, S2 = pair.S1, pair.S2
        col_counts = np.bincount(S1.indices, minlength=n)
        row_counts = np.diff(S2.indptr)
        self.dense = (col_counts > _DENSE_SHARE * n) | (row_counts > _DENSE_SHARE * n)
        self.d = np.nonzero(self.dense)[0]
        self.dpos = np.full(n, -1, dtype=np.int64)
        self.dpos[self.d] = np.arange(len(self.d))
        self.D1 = S1[:, self.d].toarray()
        self.D2 = S2[self.d].toarray()
        keep = sp.diags((~self.dense).astype(np.float64))
        self.S1s = (S1 @ keep).tocsr()  # the sparse atoms' columns (dense ones zeroed, n columns kept)
        self.S1s.eliminate_zeros()
        self.S2s = (keep @ S2).tocsr()
        self.S2s.eliminate_zeros()
        self.S2s_csc = self.S2s.tocsc()
        self.S1s_t = self.S1s.T.tocsr()  # rows are atoms

    def product_rows(self, I: slice) -> np.ndarray:
        return self.D1[I] @ self.D2 + (self.S1s[I] @ self.S2s).toarray()

    def product_columns(self, J: slice) -> np.ndarray:
        return self.D1 @ self.D2[:, J] + (self.S1s @ self.S2s_csc[:, J]).toarray()


def _loss(blocks: _Blocks, pair: _Pair) -> float:
    """||A - S1 S2||_F^2 by row blocks."""
    parts = _Parts(pair)
    total = 0.0
    for I, block in blocks.rows():
        R = block - parts.product_rows(I)
        total += float(np.einsum("ij,ij->", R, R))
    return total


# -- exact refits (alternating least squares) ----------------------------------------------------
def _pair_sums(blocks: _Blocks, a: np.ndarray, atoms: np.ndarray, G: sp.csr_matrix, transpose: bool) -> np.ndarray:
    """For each pair (a[p], atoms[p]): sum over G's row atoms[p] entries (c, v) of v * A[a, c] (A[c, a] transposed)."""
    out = np.zeros(len(a))
    counts = np.diff(G.indptr)[atoms]
    ends = np.cumsum(counts)
    p0 = 0
    while p0 < len(a):  # chunks of pairs whose expansion holds about _BLOCK entries
        p1 = max(p0 + 1, int(np.searchsorted(ends, (ends[p0 - 1] if p0 else 0) + _BLOCK, side="right")))
        cnt = counts[p0:p1]
        total = int(cnt.sum())
        if total:
            owner = np.repeat(np.arange(p1 - p0), cnt)
            pos = np.repeat(G.indptr[atoms[p0:p1]] - np.concatenate([[0], np.cumsum(cnt)[:-1]]), cnt) + np.arange(total)
            c, v = G.indices[pos], G.data[pos]
            rows, cols = (c, a[p0:p1][owner]) if transpose else (a[p0:p1][owner], c)
            out[p0:p1] = np.bincount(owner, weights=v * blocks.entries(rows, cols), minlength=p1 - p0)
        p0 = p1
    return out


class _Gram:
    """Entries of G G^T (G: the atoms' rows, dense ones as Gd, the others in Gs) where the systems use them."""

    def __init__(self, Gd: np.ndarray, Gs: sp.csr_matrix, dpos: np.ndarray, F: sp.csr_matrix):
        n = Gs.shape[0]
        self.n, self.dpos = n, dpos
        # with_dense[p, b] = <dense atom p, atom b> for every atom b (column n: padding, zero)
        self.with_dense = np.zeros((Gd.shape[0], n + 1))
        if Gd.shape[0]:
            self.with_dense[:, :n] = np.asarray((Gs @ Gd.T).T)
            dense_atoms = np.nonzero(dpos >= 0)[0]
            self.with_dense[:, dense_atoms] = Gd @ Gd[dpos[dense_atoms]].T
        self.sq = np.asarray(Gs.multiply(Gs).sum(1)).ravel()
        self.keys, self.vals, self.exact = _sparse_gram(Gs, F, dpos >= 0)
        diag = np.concatenate([self.sq, (Gd * Gd).sum(1)])
        self.ridge = 1e-10 * float(diag.max(initial=0.0)) + 1e-300

    def block(self, J: np.ndarray) -> np.ndarray:
        """H[J_b, J_b] for a batch J (b, k) of atom ids, -1 for padding (identity there)."""
        k = J.shape[1]
        Jn = np.where(J >= 0, J, self.n)
        dp = np.where(J >= 0, self.dpos[np.maximum(J, 0)], -1)
        shape = (J.shape[0], k, k)
        a, b = np.broadcast_to(Jn[:, :, None], shape), np.broadcast_to(Jn[:, None, :], shape)
        da, db = np.broadcast_to(dp[:, :, None], shape), np.broadcast_to(dp[:, None, :], shape)
        first = da >= 0  # read the pair from the dense atom's row
        H = np.where(first, self.with_dense[np.maximum(da, 0), b], self.with_dense[np.maximum(db, 0), a]) \
            if self.with_dense.shape[0] else np.zeros(shape)
        both = ~first & (db < 0) & (a < self.n) & (b < self.n)
        if both.any():
            H[both] = 0.0
            same = both & (a == b)
            H[same] = self.sq[a[same]]
            off = both & (a != b)
            if off.any() and len(self.keys):  # a pair not stored is zero (no common column)
                lo, hi = np.minimum(a[off], b[off]), np.maximum(a[off], b[off])
                key = lo * self.n + hi
                at = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
                H[off] = np.where(self.keys[at] == key, self.vals[at], 0.0)
        H[(a == self.n) | (b == self.n)] = 0.0
        eye = np.arange(k)
        H[:, eye, eye] += np.where(J >= 0, self.ridge, 1.0)  # padding: 1 on the diagonal
        return H


#: Sparse-sparse Gram entries computed at most (beyond it they are left out: a Jacobi-like refit,
#: which the round's acceptance test still guards).
_PAIR_LIMIT = 1 << 22


def _sparse_gram(Gs: sp.csr_matrix, F: sp.csr_matrix, dense: np.ndarray):
    """Sorted keys j * n + k (j < k) and values of <Gs[j], Gs[k]> for the sparse atoms the systems of F's
    lines pair up, by the cheaper of two ways: the pairs sharing a line of F (sum of squared counts per
    line), or the product Gs Gs^T (sum of squared counts per column of Gs; only overlapping rows)."""
    n = F.shape[0]
    sparse_entry = ~dense[F.indices]
    per_line = np.bincount(np.repeat(np.arange(n), np.diff(F.indptr))[sparse_entry], minlength=n)
    by_lines = int(np.sum(per_line * (per_line - 1) // 2))
    if by_lines == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0), True
    by_product = int(np.sum(np.bincount(Gs.indices, minlength=n).astype(np.int64) ** 2))
    if min(by_lines, by_product) > _PAIR_LIMIT:
        return np.zeros(0, dtype=np.int64), np.zeros(0), False
    if by_product <= by_lines:
        GG = sp.triu(Gs @ Gs.T, k=1).tocoo()
        keys = GG.row.astype(np.int64) * n + GG.col
        order = np.argsort(keys)
        return keys[order], GG.data[order], True
    atoms = F.indices[sparse_entry]
    starts = np.concatenate([[0], np.cumsum(per_line)])
    keys = [np.zeros(0, dtype=np.int64)]
    for c in np.unique(per_line[per_line >= 2]):  # lines with c sparse atoms: all their pairs at once
        first = starts[np.nonzero(per_line == c)[0]]
        held = atoms[first[:, None] + np.arange(c)[None, :]]
        jj, kk = np.triu_indices(int(c), 1)
        lo, hi = np.minimum(held[:, jj], held[:, kk]), np.maximum(held[:, jj], held[:, kk])
        keys.append((lo * n + hi).ravel())
    keys = np.unique(np.concatenate(keys))
    j, k = np.divmod(keys, n)
    row_nnz = np.diff(Gs.indptr)
    ends = np.cumsum(row_nnz[j] + row_nnz[k])
    vals, p0 = np.zeros(len(keys)), 0
    while p0 < len(keys):  # chunks whose two row copies hold about _BLOCK entries
        p1 = max(p0 + 1, int(np.searchsorted(ends, (ends[p0 - 1] if p0 else 0) + _BLOCK, side="right")))
        vals[p0:p1] = np.asarray(Gs[j[p0:p1]].multiply(Gs[k[p0:p1]]).sum(1)).ravel()
        p0 = p1
    return keys, vals, True


def _solve_lines(F: sp.csr_matrix, gram: _Gram, y: np.ndarray, check=lambda: None) -> np.ndarray:
    """New values of F (in its CSR order): line i on support J solves H[J, J] x = y[J].

    A line with more than _MAX_LINE unknowns keeps its values (each line is its own problem, so the
    others still descend); ``check`` is called before every batch (the deadline)."""
    counts = np.diff(F.indptr)
    out = np.array(F.data, dtype=np.float64)
    grain = np.maximum(1, 1 << np.maximum(np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64) - 2, 0))
    width = np.where((counts > 0) & (counts <= _MAX_LINE), -(-counts // grain) * grain, 0)
    for k in np.unique(width[width > 0]):
        lines_all = np.nonzero(width == k)[0]
        step = max(1, _BATCH_ENTRIES // int(k * k))
        for b0 in range(0, len(lines_all), step):
            check()
            lines = lines_all[b0:b0 + step]
            pos = F.indptr[lines][:, None] + np.arange(k)[None, :]
            valid = np.arange(k)[None, :] < counts[lines][:, None]
            safe = np.where(valid, pos, 0)
            J = np.where(valid, F.indices[safe], -1)
            rhs = np.where(valid, y[safe], 0.0)
            H = gram.block(J)
            try:
                x = np.linalg.solve(H, rhs[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:  # a singular system despite the ridge: least squares, one by one
                x = np.stack([np.linalg.lstsq(h, r, rcond=None)[0] for h, r in zip(H, rhs)])
            out[pos[valid]] = x[valid]
    return out


def _half_step(blocks: _Blocks, F: sp.csr_matrix, parts: _Parts, transpose: bool) -> sp.csr_matrix:
    """Every line of F solved exactly: the rows of S(1) (F = S1, G = S2, y = (A S2^T) at F's entries), or
    with ``transpose`` the columns of S(2) (F = S2^T, G = S1^T, y = (A^T S1) at F's entries)."""
    n = F.shape[0]
    Gd, Gs = (parts.D1.T, parts.S1s_t) if transpose else (parts.D2, parts.S2s)
    lines = np.repeat(np.arange(n), np.diff(F.indptr))
    atoms = F.indices
    y = np.zeros(F.nnz)
    is_dense = parts.dense[atoms]
    if len(parts.d):  # the dense atoms' products with A, over row blocks: A^T D1 or A D2^T
        AD = np.zeros((n, len(parts.d)))
        for I, block in blocks.rows():
            if transpose:
                AD += block.T @ parts.D1[I]
            else:
                AD[I] = block @ Gd.T
        y[is_dense] = AD[lines[is_dense], parts.dpos[atoms[is_dense]]]
    sparse = ~is_dense
    y[sparse] = _pair_sums(blocks, lines[sparse], atoms[sparse], Gs, transpose=transpose)
    gram = _Gram(Gd, Gs, parts.dpos, F)
    return sp.csr_matrix((_solve_lines(F, gram, y, blocks._check), F.indices, F.indptr), shape=F.shape)


def _refit(blocks: _Blocks, pair: _Pair, sweeps: int) -> _Pair:
    """``sweeps`` ALS sweeps: the rows of S(1), then the columns of S(2), each solved exactly."""
    for _ in range(sweeps):
        pair = _Pair(_half_step(blocks, pair.S1, _Parts(pair), transpose=False), pair.S2)
        S2t = _half_step(blocks, pair.S2.T.tocsr(), _Parts(pair), transpose=True)
        pair = _Pair(pair.S1, S2t.T.tocsr())
    return pair


# -- re-selection -------------------------------------------------------------------------------
class _TopK:
    """The k largest positive scores seen so far, with their payload arrays."""

    def __init__(self, k: int):
        self.k, self.floor = int(k), 0.0
        self.score, self.payload = np.zeros(0), None

    def worth(self, score: np.ndarray) -> np.ndarray:
        """Indices of a batch's scores that could enter: above the floor, and among the batch's k largest
        (so that a large batch adds at most about k entries, not all of them)."""
        floor = self.floor
        if len(score) > 2 * self.k:
            kth = float(np.partition(score, len(score) - self.k)[len(score) - self.k]) if self.k else math.inf
            floor = max(floor, np.nextafter(kth, -math.inf))
        return np.nonzero(score > floor)[0]

    def add(self, score: np.ndarray, *payload: np.ndarray) -> None:
        keep = score > self.floor
        score, payload = score[keep], [p[keep] for p in payload]
        if self.payload is None:
            self.payload = [p[:0] for p in payload]
        if not len(score):
            return
        score = np.concatenate([self.score, score])
        payload = [np.concatenate([a, b]) for a, b in zip(self.payload, payload)]
        if len(score) > self.k:
            idx = np.argpartition(score, len(score) - self.k)[len(score) - self.k:]
            score, payload = score[idx], [p[idx] for p in payload]
            self.floor = float(score.min())
        self.score, self.payload = score, payload


def _held_mask(F: sp.csr_matrix, I: slice) -> tuple[np.ndarray, np.ndarray]:
    """(rows within the block, columns) of F's entries in the rows I."""
    sub = F[I]
    return np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr)), sub.indices


def _curvatures(pair: _Pair) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): the curvature of S2[j, l] is a[j] = ||S1[:, j]||^2, that of S1[i, j] is b[j] = ||S2[j, :]||^2."""
    S1, S2 = pair.S1, pair.S2
    a = np.bincount(S1.indices, weights=S1.data ** 2, minlength=S1.shape[0])
    b = np.asarray(S2.multiply(S2).sum(1)).ravel()
    return a, b


def _candidates(blocks: _Blocks, pair: _Pair, budget: int) -> tuple[float, _TopK]:
    """The current loss and the best ``budget`` new entries of both factors (score g^2 / c, value STEP g / c)."""
    n = pair.S1.shape[0]
    parts = _Parts(pair)
    S1, S2 = pair.S1, pair.S2
    a, b = _curvatures(pair)
    inv_b = np.divide(1.0, b, out=np.zeros(n), where=b > 0)
    inv_a = np.divide(1.0, a, out=np.zeros(n), where=a > 0)
    top = _TopK(budget)
    loss = 0.0
    for I, block in blocks.rows():  # gradient of S(1): R S2^T, by rows
        R = block - parts.product_rows(I)
        loss += float(np.einsum("ij,ij->", R, R))
        G = np.asarray((parts.S2s @ R.T).T)
        if len(parts.d):
            G[:, parts.d] = R @ parts.D2.T
        hr, hc = _held_mask(S1, I)
        G[hr, hc] = 0.0
        score = G * G
        score *= inv_b[None, :]
        flat = top.worth(score.ravel())
        rows, cols = np.divmod(flat, n)
        top.add(score.ravel()[flat], np.zeros(len(flat), np.int8), rows + I.start, cols,
                _STEP * G.ravel()[flat] * inv_b[cols])
    S2_csc = S2.tocsc()
    for J, block in blocks.columns():  # gradient of S(2): S1^T R, by columns
        R = block - parts.product_columns(J)
        G = np.asarray(parts.S1s_t @ R)
        if len(parts.d):
            G[parts.d] = parts.D1.T @ R
        sub = S2_csc[:, J]
        G[sub.indices, np.repeat(np.arange(sub.shape[1]), np.diff(sub.indptr))] = 0.0
        score = G * G
        score *= inv_a[:, None]
        flat = top.worth(score.ravel())
        rows, cols = np.divmod(flat, J.stop - J.start)
        top.add(score.ravel()[flat], np.ones(len(flat), np.int8), rows, cols + J.start,
                _STEP * G.ravel()[flat] * inv_a[rows])
    if top.payload is None:
        top.payload = [np.zeros(0, np.int8), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)]
    return loss, top


def _select(pair: _Pair, top: _TopK, budget: int, gamma: float) -> _Pair:
    """Held entries (score c s^2) and new ones (gamma g^2 / c) compete; the budget keeps the best."""
    n = pair.S1.shape[0]
    S1, S2 = pair.S1.tocoo(), pair.S2.tocoo()
    a, b = _curvatures(pair)
    which, rows, cols, vals = top.payload
    score = np.concatenate([b[S1.col] * S1.data ** 2, a[S2.row] * S2.data ** 2, gamma * top.score])
    f = np.concatenate([np.zeros(S1.nnz, np.int8), np.ones(S2.nnz, np.int8), which])
    r = np.concatenate([S1.row, S2.row, rows])
    c = np.concatenate([S1.col, S2.col, cols])
    v = np.concatenate([S1.data, S2.data, vals])
    if len(score) > budget:
        keep = np.argpartition(score, len(score) - budget)[len(score) - budget:]
        f, r, c, v = f[keep], r[keep], c[keep], v[keep]
    first, second = f == 0, f == 1
    return _Pair(sp.csr_matrix((v[first], (r[first], c[first])), shape=(n, n)),
                 sp.csr_matrix((v[second], (r[second], c[second])), shape=(n, n)))


# -- starts -----------------------------------------------------------------------------------------
def _slot_start(n, left, right, cand, values, k) -> tuple[_Pair, float]:
    """[left | slots] [right ; residual lines] from the residual's largest entries (flat indices ``cand``),
    within k non-zeros beyond the low-rank part; returns the pair and the energy of the entries kept."""
    r = left.shape[1]
    order = np.argsort(-np.abs(values), kind="stable")
    cand, values = cand[order], values[order]
    best = None
    for orientation in ("rows", "cols"):
        line, pos = np.divmod(cand, n) if orientation == "rows" else np.divmod(cand, n)[::-1]
        _, first = np.unique(line, return_index=True)
        new = np.zeros(len(cand), dtype=bool)
        new[first] = True
        opened = np.cumsum(new)
        ok = (np.arange(1, len(cand) + 1) + opened <= k) & (opened <= n - r)
        energy = float(np.sum(values[ok] ** 2))
        if best is None or energy > best[0]:
            best = (energy, orientation, line[ok], pos[ok], values[ok])
    energy, orientation, line, pos, vals = best
    lines = np.unique(line)
    slot = np.empty(n, dtype=np.int64)
    slot[lines] = r + np.arange(len(lines))
    lr = (np.repeat(np.arange(n), r), np.tile(np.arange(r), n), left.reshape(-1))
    lr2 = (np.repeat(np.arange(r), n), np.tile(np.arange(n), r), right.reshape(-1))
    if orientation == "rows":  # S1[line, slot] = 1, S2[slot, pos] = value
        f0 = [np.concatenate(p) for p in zip(lr, (lines, slot[lines], np.ones(len(lines))))]
        f1 = [np.concatenate(p) for p in zip(lr2, (slot[line], pos, vals))]
    else:  # S1[pos, slot] = value, S2[slot, line] = 1
        f0 = [np.concatenate(p) for p in zip(lr, (pos, slot[line], vals))]
        f1 = [np.concatenate(p) for p in zip(lr2, (slot[lines], lines, np.ones(len(lines))))]
    pair = _Pair(sp.csr_matrix((f0[2], (f0[0], f0[1])), shape=(n, n)),
                 sp.csr_matrix((f1[2], (f1[0], f1[1])), shape=(n, n)))
    return pair, energy


def _starts(A, blocks: _Blocks, budget: int, seed: int, splits):
    """The low-rank plus sparse starts of every split as (info, pair, squared error), one pass over the rows;
    and (flat indices, values, squared error) of the budget's largest entries (top-k, always computed)."""
    from sfa_cli.methods.low_rank import _randomized_low_rank

    n = A.shape[0]
    plans = {}
    for f in sorted(set(splits)):
        r = min(tsvd_rank_at_budget(n, int(f * budget)), n - 1)
        plans.setdefault(r, f)
    guard = 0 not in plans  # the budget's largest entries are always kept, to return them when they are closer
    plans.setdefault(0, 0.0)
    r_max = max(plans)
    if r_max > 0:
        left, right = _randomized_low_rank(A, r_max, seed=seed, n_iter=4, keep_sparse=True)
        s = np.linalg.norm(left, axis=0)
        root = np.sqrt(np.where(s > 0, s, 1.0))
        left, right = np.asarray(left / root, dtype=np.float64), np.asarray(right * root[:, None], dtype=np.float64)
    else:
        left, right = np.zeros((n, 0)), np.zeros((0, n))
    tops = {r: _TopK(max(budget - 2 * n * r, 0)) for r in plans}
    energy = {r: 0.0 for r in plans}
    for I, block in blocks.rows():
        for r in plans:
            D = block - left[I, :r] @ right[:r] if r else block
            energy[r] += float(np.einsum("ij,ij->", D, D))
            top = tops[r]
            if top.k == 0:
                continue
            flat = D.ravel()
            square = flat * flat
            idx = top.worth(square)
            top.add(square[idx], idx + I.start * n, flat[idx])
    out, largest = [], None
    if tops[0].payload is not None:  # the budget's largest entries alone: top-k, kept to compare
        cand, vals = tops[0].payload
        largest = (cand, vals, max(energy[0] - float(np.dot(vals, vals)), 0.0))
    for r, f in sorted(plans.items()):
        if r == 0 and guard:
            continue
        top = tops[r]
        cand, vals = (top.payload if top.payload is not None else (np.zeros(0, np.int64), np.zeros(0)))
        pair, kept = _slot_start(n, left[:, :r], right[:r], cand, vals, budget - 2 * n * r)
        out.append(({"init": "lowrank+sparse", "split": f, "rank": r}, pair, max(energy[r] - kept, 0.0)))
    return out, largest


# -- the method ----------------------------------------------------------------------------------------
@validates_matrix
def learned_at_scale(A, budget: int, *, seed: int = 0, time_limit: float | None = None, rounds: int = 6,
                     sweeps: int = 2, tol: float = 1e-3, splits=SCALE_SPLITS, callback=None,
                     dtype=np.float32) -> SparseFactors:
    """Two sparse factors with learned supports, fitted from blocks of A (see the module docstring).

    Parameters
    ----------
    A : ndarray (a read-only memory map included) or sparse matrix of shape (n, n)
    budget : int
        Non-zeros allowed over both factors.
    seed : int, default=0
        Seeds the randomized SVD of the start.
    time_limit : float, optional
        Seconds for the whole method; the best factors so far are returned (the
        first start is always completed).
    rounds : int, default=6
        Re-selection rounds at most.
    sweeps : int, default=2
        ALS sweeps after each re-selection (each start gets one).
    tol : float, default=1e-3
        The rounds stop when one improves the relative error by less than this fraction.
    splits : sequence of float, default=SCALE_SPLITS
        Fractions of the budget for the low-rank part of the starts.
    callback : callable, optional
        ``callback(stage, rel_error)`` after the starts and each accepted round; True stops.
    dtype : numpy dtype, default=float32
        Of the returned factors.

    Returns
    -------
    SparseFactors
        method ``sparse``, pattern ``{"name": "learned", "factors": 2, "at_scale": True, ...}``,
        info with ``rel_error`` (exact, from a pass over A), ``start_rel_error``, ``rounds``.
    """
    t0 = time.perf_counter()
    n, budget = A.shape[0], check_budget(budget)
    if budget < 2:
        from sfa_cli.errors import NotApplicable

        raise NotApplicable(f"two sparse factors need at least 2 non-zeros; budget {budget}")
    deadline = t0 + time_limit if time_limit else math.inf
    first = _Blocks(A, math.inf)  # the starts always complete
    from sfa_cli.metrics import frobenius_norm

    norm = frobenius_norm(A)
    if norm == 0.0:
        raise SfaError("the matrix is all zeros; there is nothing to approximate")
    total = norm * norm
    starts, largest = _starts(A, first, budget, seed, splits)
    info, pair, loss = min(starts, key=lambda s: s[2])
    start_rel = math.sqrt(loss / total)
    blocks = _Blocks(A, deadline)
    done, stopped = 0, callback is not None and callback("start", start_rel)
    try:
        best = None  # one refit sweep per start; the best continues
        for s_info, s_pair, s_loss in starts:
            refit = _refit(blocks, s_pair, 1)
            refit_loss = _loss(blocks, refit)
            for cand, cand_loss in ((s_pair, s_loss), (refit, refit_loss)):
                if best is None or cand_loss < best[2]:
                    best = (s_info, cand, cand_loss)
        info, pair, loss = best
        stopped = stopped or (callback is not None and callback("refit", math.sqrt(loss / total)))
        gamma, rejected = 1.0, 0
        while not stopped and done < rounds and rejected < _REJECTIONS:
            current, top = _candidates(blocks, pair, budget)
            loss = min(loss, current)
            while rejected < _REJECTIONS:
                new = _refit(blocks, _select(pair, top, budget, gamma), sweeps)
                new_loss = _loss(blocks, new)
                if new_loss < loss:
                    improvement = 1 - math.sqrt(new_loss / loss)
                    pair, loss = new, new_loss
                    done += 1
                    stopped = (callback is not None and callback(done, math.sqrt(loss / total))) or improvement < tol
                    break
                gamma /= _BACKOFF
                rejected += 1
    except _OutOfTime:
        pass
    pattern = {"name": "learned", "factors": 2, "projection": "total", "order": "joint", "at_scale": True, **info}
    facts = {"rel_error_exact": True, "start_rel_error": start_rel, "rounds": done}
    if largest is not None and largest[2] < loss and math.sqrt(loss / total) - math.sqrt(largest[2] / total) > 1e-6:
        # the budget's largest entries are closer (one factor: the same kind and file format)
        facts["note"] = f"the budget's largest entries (one factor): closer than the learned factors' " \
                        f"{math.sqrt(loss / total):.4g}"
        cand, vals, loss = largest
        rows, cols = np.divmod(cand, n)
        mats = [sp.csr_matrix((vals.astype(dtype), (rows, cols)), shape=(n, n))]
        pattern["factors"] = 1
    else:
        S1, S2 = pair.S1.copy(), pair.S2.copy()
        S1.eliminate_zeros()
        S2.eliminate_zeros()
        mats = [S1.astype(dtype), S2.astype(dtype)]
        facts["note"] = f"2 learned factors, {S1.nnz + S2.nnz} non-zeros (low-rank + sparse start, rank " \
                        f"{info['rank']}; fitted from blocks of A, {done} round(s))"
    facts.update(rel_error=math.sqrt(max(loss, 0.0) / total), seconds=time.perf_counter() - t0)
    return SparseFactors(mats, method="sparse", pattern=pattern, info=facts)
