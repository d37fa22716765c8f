"""Sparse factors whose supports are learned by the fit.

:func:`learned_sparse` approximates A by S(1) S(2) ... S(M), n x n sparse factors
whose non-zeros are *chosen by the fit* under a total budget (FAuST's problem,
Le Magoarou & Gribonval 2016), instead of being fixed in advance like the Chord
pattern. It alternates two steps:

* **re-select the supports** (a projection): for every factor and every entry
  (i, j), the negative gradient g = (P_l^T R P_r^T)[i, j] of 0.5 ||A - S(1)...S(M)||^2
  and the curvature c = ||P_l[:, i]||^2 ||P_r[j, :]||^2 (P_l, P_r the products
  left and right of the factor, R the residual) give the error decrease of
  adding the entry alone, g^2 / c, and the increase of removing a held entry of
  value s, c s^2. The budget keeps the entries with the largest of these
  scores, over all factors together (``projection="total"``), per factor, per
  row or per column; a new entry starts at a damped Newton step 0.25 g / c;
* **fit the values on the supports**: for two factors, alternating least
  squares (every row of S(1), then every column of S(2), solved exactly on its
  support); for more, L-BFGS over column blocks, the engine of :mod:`sfa_cli.engine.fit`.

A round whose refit is not better than the last accepted one is undone and new
entries are discounted (their scores divided by 4) in the next, so the error
never increases; three such rounds end the fit. Every product is a sparse-dense
product with n x b blocks or n x n dense matrices (cost n * nnz); nothing costs
n^3: the gradient of every entry of a factor is P_l^T (R P_r^T), chains of
sparse factors applied to the residual.

The start is a low-rank plus sparse split written as two sparse factors
(``init="lowrank+sparse"``, the default): S(1) = [U_r sqrt(s) | e_i ...],
S(2) = [sqrt(s) V_r^T ; residual rows], one "slot" column e_i in S(1) for each
residual row that holds kept entries (or the transposed layout); A itself when
all its entries fit. ``init="chord"`` warm-starts from a Chord fit at the
budget instead. Both starts are built in :mod:`sfa_cli.methods.learned_starts`;
at large n the fit runs from blocks of A (:mod:`sfa_cli.methods.learned_scale`).

Example
-------
>>> import numpy as np
>>> from sfa_cli.metrics import relative_error
>>> rng = np.random.default_rng(0)
>>> A = rng.standard_normal((64, 3)) @ rng.standard_normal((3, 64))
>>> F = learned_sparse(A, 600, seed=0)
>>> F.method, F.pattern["name"], F.num_factors, F.params <= 600
('sparse', 'learned', 2, True)
>>> relative_error(A, F) < 0.6
True
"""
from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp
import torch

from dataclasses import dataclass

from sfa_cli.errors import NotApplicable, SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.engine.fit import DENSE_FIT_LIMIT
from sfa_cli.approximations.kernels import FactorStructure, chain_matmul, factor_columns, resolve_device, resolve_dtype
from sfa_cli.memory import available_bytes
from sfa_cli.metrics import frobenius_norm
from sfa_cli.engine.objective import BlockObjective, column_blocks
from sfa_cli.engine.optimize import Run, minimize
from sfa_cli.engine.options import OptimizerSpec, Placement, StopRules
from sfa_cli.validation import check_budget, validates_matrix
from sfa_cli.methods.learned_starts import _chord_start, _lowrank_sparse_start, _svd_parts

__all__ = ["learned_sparse", "LearnedOptions", "INITS", "PROJECTIONS", "ORDERS", "REFITS", "LEARNED_DEFAULTS"]

INITS = ("auto", "lowrank+sparse", "chord")
PROJECTIONS = ("total", "factor", "row", "column")
#: How more than two factors are fitted: all supports together, or FAuST's hierarchy of two-factor splits.
ORDERS = ("joint", "hierarchical")
#: How the values are fitted on fixed supports: exactly by alternating least squares (two factors) or by L-BFGS.
REFITS = ("auto", "als", "lbfgs")
#: Defaults, chosen from scripts/bench_quality.py measurements (docs/quality.md).
LEARNED_DEFAULTS = {
    "factors": 2,
    "order": "joint",
    "splits": (0.5, 0.9),
    "hysteresis": 1.0,
    "step": 0.25,
    "tol": 1e-3,
}
#: A refit whose relative error is above this ran away (the objective is a polynomial of degree 2M).
_RUNAWAY = 1e3
#: After a rejected round the hysteresis is divided by this; after _REJECTIONS of them the rounds stop.
_BACKOFF = 4.0
_REJECTIONS = 3


def default_rounds(n: int) -> int:
    """Selection rounds when not given: 16 up to n = 1024, then fewer (8 at n = 4096)."""
    return int(max(6, min(16, round(16 * 1024 / n)))) if n > 1024 else 16


def default_inner_iter(n: int) -> int:
    """L-BFGS iterations per round: 25 up to n = 1024, 12 at n = 4096."""
    return int(max(10, min(25, round(25 * 2048 / n)))) if n > 2048 else 25


def default_polish_iter(n: int) -> int:
    """L-BFGS iterations on the final supports: 200 up to n = 512, 100 at n = 1024, none above.

    (Above n = 1024 an L-BFGS iteration costs several seconds; two factors are
    polished by alternating least squares instead.)
    """
    return 0 if n > 1024 else int(min(200, round(200 * 512 / n)))


# -- the chain of factors with free supports ------------------------------------------
class _Chain:
    """M factors as row-major sorted supports (numpy) and values (torch), with kernel structures."""

    def __init__(self, n: int, rows, cols, values, device):
        self.n = n
        self.rows, self.cols, self.values, self.structs = [], [], [], []
        for r, c, v in zip(rows, cols, values):
            r = np.asarray(r, dtype=np.int64)
            c = np.asarray(c, dtype=np.int64)
            order = np.lexsort((c, r))
            r, c = r[order], c[order]
            indptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.bincount(r, minlength=n), out=indptr[1:])
            self.rows.append(r)
            self.cols.append(c)
            self.values.append(v[torch.from_numpy(order).to(v.device)])
            self.structs.append(FactorStructure.from_csr(indptr, c, n, device))

    @property
    def factors(self) -> int:
        return len(self.values)

    @property
    def params(self) -> int:
        return int(sum(len(r) for r in self.rows))

    def with_values(self, values) -> "_Chain":
        out = object.__new__(_Chain)
        out.n, out.rows, out.cols, out.structs = self.n, self.rows, self.cols, self.structs
        out.values = list(values)
        return out

    def product(self, X: torch.Tensor, *, transpose: bool = False, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """S(lo+1) ... S(hi) X (or its transpose), factors lo..hi-1; X itself when the range is empty."""
        hi = self.factors if hi is None else hi
        if hi <= lo:
            return X
        return chain_matmul(self.structs[lo:hi], self.values[lo:hi], X, transpose=transpose)

    def dense(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """The dense n x n product S(lo+1) ... S(hi): the last factor scattered, the others applied (n * nnz work)."""
        hi = self.factors if hi is None else hi
        if hi <= lo:
            like = self.values[0]
            return torch.eye(self.n, dtype=like.dtype, device=like.device)
        return self.product(factor_columns(self.structs[hi - 1], self.values[hi - 1].detach(), slice(0, self.n)),
                            lo=lo, hi=hi - 1)

    def to_scipy(self, scale: float = 1.0, dtype=np.float64) -> list[sp.csr_matrix]:
        factor_scale = scale ** (1.0 / self.factors)
        mats = []
        for s, v in zip(self.structs, self.values):
            data = (v.detach().double() * factor_scale).cpu().numpy().astype(dtype)
            mats.append(sp.csr_matrix((data, s.col.cpu().numpy(), s.crow.cpu().numpy()), shape=(self.n, self.n)))
        return mats


class _Target:
    """The scaled dense target T, its transpose (for ALS) and column blocks; a chain's objective on it."""

    def __init__(self, T: torch.Tensor):
        self.T = T
        self.T_t = T.T.contiguous()
        self.blocks = column_blocks(T.shape[0])

    def objective(self, chain: _Chain) -> BlockObjective:
        return BlockObjective(chain.structs, self.T, self.blocks)

    def loss(self, chain: _Chain) -> float:
        """0.5 ||T - chain||_F^2."""
        return self.objective(chain).loss(chain.values)

    def residual(self, chain: _Chain) -> torch.Tensor:
        """R = T - S(1)...S(M), a dense n x n matrix (n * nnz work)."""
        return self.objective(chain).residual(chain.values)


def _refine(chain: _Chain, target: _Target, iters: int, deadline: float) -> tuple[_Chain, float]:
    """L-BFGS on the values of a fixed support (iters iterations, 2 * iters evaluations at most);
    returns the best chain seen and its loss."""
    if iters <= 0:
        return chain, target.loss(chain)
    params = [v.detach().clone().requires_grad_(True) for v in chain.values]
    objective = target.objective(chain)
    left = deadline - time.perf_counter()
    # no restarts: a runaway line search ends the refit, whose best point is kept
    run = Run(params, time_limit=max(left, 1e-9) if left < math.inf else None, restarts=0, runaway=_RUNAWAY)

    def closure():
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        loss = objective(params, check=run.check_time)
        run.record(loss)
        return loss

    minimize(run, closure, "lbfgs", lbfgs_iterations=iters, lbfgs_evaluations=2 * iters)
    if not run.evaluations:
        return chain, target.loss(chain)
    return chain.with_values(run.best), 0.5 * run.best_rel**2


class _LineSystems:
    """The small least-squares systems of one factor's lines, indexed once and solved at every sweep.

    A line is a row of S(1) or a column of S(2); line i with unknowns at J solves
    H[J, J] x = Y[J, i] (Cholesky, float64, a tiny ridge so that an unused
    atom's entry gets zero). Lines of similar length are batched (lengths rounded
    up by at most a quarter), at most ``max_entries`` matrix entries per batch.
    """

    def __init__(self, n: int, lines: np.ndarray, others: np.ndarray, device, max_entries: int = 1 << 22):
        self.n, self.nnz = n, len(lines)
        counts = np.bincount(lines, minlength=n)
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        grain = np.maximum(1, 1 << np.maximum(np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64) - 2, 0))
        width = np.where(counts > 0, -(-counts // grain) * grain, 0)
        self.batches = []
        total = int(np.sum(width.astype(np.int64) ** 2))
        cache = total <= (1 << 24)  # flat indices of every batch kept when they are small (<= 128 MiB)
        for k in np.unique(width[width > 0]):
            ids_all = np.nonzero(width == k)[0]
            step = max(1, max_entries // int(k * k))
            for b0 in range(0, len(ids_all), step):
                ids = ids_all[b0:b0 + step]
                pos = starts[ids][:, None] + np.arange(k)[None, :]
                valid = np.arange(k)[None, :] < counts[ids][:, None]
                # padding points at row/column n of the padded H and Y, which hold zeros
                J = torch.from_numpy(np.where(valid, others[np.where(valid, pos, 0)], n)).to(device)
                flat = J[:, :, None] * (n + 1) + J[:, None, :] if cache else None
                V = torch.from_numpy(valid).to(device)
                pad = (~V).to(torch.float64)  # 1 on the padding's diagonal keeps the systems definite
                self.batches.append((J, flat, V, pad, torch.from_numpy(ids).to(device)[:, None],
                                     torch.from_numpy(pos[valid]).to(device)))

    def solve(self, H: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """x in the order of (lines, others): H[J, J] x_i = Y[J, i] for every line i."""
        n = self.n
        x = torch.zeros(self.nnz, dtype=H.dtype, device=H.device)
        ridge = 1e-7 * float(torch.diagonal(H).abs().max()) + 1e-30
        Hp = H.new_zeros((n + 1, n + 1))
        Hp[:n, :n] = H
        Yp = Y.new_zeros((n + 1, n))
        Yp[:n] = Y
        Hp = Hp.reshape(-1)
        for J, flat, V, pad, line, dest in self.batches:
            Hs = Hp[flat if flat is not None else J[:, :, None] * (n + 1) + J[:, None, :]].double()
            Hs.diagonal(dim1=1, dim2=2).add_(pad).add_(ridge)
            ys = Yp[J, line].double()
            L, _ = torch.linalg.cholesky_ex(Hs)
            x[dest] = torch.cholesky_solve(ys.unsqueeze(-1), L).squeeze(-1)[V].to(H.dtype)
        return x


def _refine_als(chain: _Chain, objective: _Target, sweeps: int, deadline: float) -> tuple[_Chain, float]:
    """Alternating least squares for two factors: each row of S(1), then each column of S(2), solved exactly.

    Row i of S(1) on its support J: (S2 S2^T)[J, J] x = (T S2^T)[i, J]; column l of
    S(2) likewise with S1^T S1 and S1^T T. Each half-step minimises the error over
    one factor, so it never increases. Per sweep: two sparse-dense products with
    T and two for the Gram matrices (n * nnz each), and the small solves.
    """
    T, n = objective.T, chain.n
    values = [v.detach() for v in chain.values]
    order = np.lexsort((chain.rows[1], chain.cols[1]))  # S(2) entries by column, then row
    order_t = torch.from_numpy(order).to(T.device)
    rows_of_first = _LineSystems(n, chain.rows[0], chain.cols[0], T.device)
    columns_of_last = _LineSystems(n, chain.cols[1][order], chain.rows[1][order], T.device)
    with torch.no_grad():
        for _ in range(sweeps):
            if time.perf_counter() > deadline:
                break
            c = chain.with_values(values)
            H = c.product(c.dense(lo=1).T.contiguous(), lo=1)  # S2 S2^T
            Y = c.product(objective.T_t, lo=1)  # S2 T^T = (T S2^T)^T: Y[j, i]
            values[0] = rows_of_first.solve(H, Y)
            c = chain.with_values(values)
            H = c.product(c.dense(hi=1), transpose=True, hi=1)  # S1^T S1
            Y = c.product(T, transpose=True, hi=1)  # S1^T T: Y[j, l]
            x = columns_of_last.solve(H, Y)
            values[1] = torch.empty_like(x).index_copy_(0, order_t, x)
    out = chain.with_values(values)
    return out, objective.loss(out)


# -- the support re-selection ---------------------------------------------------------------
def _curvatures(chain: _Chain, m: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a[i] = ||P_l[:, i]||^2 and b[j] = ||P_r[j, :]||^2 for factor m (the curvature of entry (i, j) is a_i b_j)."""
    n, M = chain.n, chain.factors
    ones = like.new_ones(n)
    if m == 0:
        a = ones
    elif m == 1:  # column norms of one factor, from its values
        v = chain.values[0].detach()
        a = like.new_zeros(n).index_add_(0, chain.structs[0].col, v * v)
    else:
        P = chain.dense(hi=m)
        a = (P * P).sum(0)
    if m == M - 1:
        b = ones
    elif m == M - 2:  # row norms of the last factor
        v = chain.values[M - 1].detach()
        b = like.new_zeros(n).index_add_(0, chain.structs[M - 1].rows, v * v)
    else:
        P = chain.dense(lo=m + 1)
        b = (P * P).sum(1)
    return a, b


def _negative_gradient(chain: _Chain, m: int, R: torch.Tensor) -> torch.Tensor:
    """P_l^T R P_r^T for factor m: two chains applied to the residual (n * nnz work)."""
    X = chain.product(R, transpose=True, hi=m)
    if m < chain.factors - 1:  # X P_r^T = (P_r X^T)^T
        X = chain.product(X.T.contiguous(), lo=m + 1).T
    return X


def _top_mask(scores: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """Boolean mask of the k largest positive scores (over everything, or along dim)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if dim is None:
        flat = scores.reshape(-1)
        k = min(k, int((flat > 0).sum()))
        if k > 0:
            mask.view(-1)[torch.topk(flat, k, sorted=False).indices] = True
        return mask
    k = min(k, scores.shape[dim])
    idx = torch.topk(scores, k, dim=dim, sorted=False).indices
    mask.scatter_(dim, idx, True)
    return mask & (scores > 0)


def _select(chain: _Chain, R: torch.Tensor, budget: int, projection: str, hysteresis: float, step: float,
            revive: bool, shares=None) -> _Chain:
    """New supports: the entries with the largest error scores (held: c s^2; new: hysteresis * g^2 / c).

    New entries start at ``step * g / c`` (a damped diagonal Newton step); with
    ``revive`` (two factors), empty atoms j (column j of S(1) and row j of S(2) both
    zero) are offered as "slots": S(1)[i, j] = 1 for a row i of large residual, its
    row of S(2) then scored like R[i, :].
    """
    n, M = chain.n, chain.factors
    like = R
    scores, values = [], []
    slot_rows = None
    for m in range(M):
        G = _negative_gradient(chain, m, R)
        a, b = _curvatures(chain, m, like)
        c = a[:, None] * b[None, :]
        V = torch.zeros_like(R)
        held_r = torch.from_numpy(chain.rows[m]).to(R.device)
        held_c = torch.from_numpy(chain.cols[m]).to(R.device)
        V[held_r, held_c] = chain.values[m].detach()
        live = c > 0
        safe_c = torch.where(live, c, torch.ones_like(c))
        new_value = torch.where(live, step * G / safe_c, torch.zeros_like(G))
        score = torch.where(live, hysteresis * G * G / safe_c, torch.zeros_like(G))
        held_score = c[held_r, held_c] * V[held_r, held_c] ** 2
        score[held_r, held_c] = held_score
        new_value[held_r, held_c] = V[held_r, held_c]
        scores.append(score)
        values.append(new_value)
    if revive and M == 2 and projection in ("total", "factor"):
        dead = (scores[0].amax(0) <= 0) & (scores[1].amax(1) <= 0)
        dead &= (torch.bincount(torch.from_numpy(chain.cols[0]).to(R.device), minlength=n) == 0)
        dead &= (torch.bincount(torch.from_numpy(chain.rows[1]).to(R.device), minlength=n) == 0)
        atoms = torch.nonzero(dead).reshape(-1)
        if atoms.numel():
            energy = (R * R).sum(1)
            slot_rows = torch.topk(energy, atoms.numel(), sorted=True).indices
            row_scores = hysteresis * R[slot_rows] ** 2
            scores[1][atoms] = row_scores
            values[1][atoms] = step * R[slot_rows]
            # a slot is worth the best entry it carries, so it is kept whenever one of them is
            scores[0][slot_rows, atoms] = row_scores.amax(1) * (1 + 1e-6)
            values[0][slot_rows, atoms] = 1.0
    masks = _project(scores, budget, projection, n, shares)
    if slot_rows is not None:  # drop slots without entries and entries without their slot
        slot_kept = masks[0][slot_rows, atoms]
        carried = masks[1][atoms].any(1)
        masks[0][slot_rows, atoms] = slot_kept & carried
        masks[1][atoms] &= slot_kept[:, None]
    rows, cols, vals = [], [], []
    for m in range(M):
        idx = torch.nonzero(masks[m])
        rows.append(idx[:, 0].cpu().numpy())
        cols.append(idx[:, 1].cpu().numpy())
        vals.append(values[m][idx[:, 0], idx[:, 1]])
    return _Chain(n, rows, cols, vals, R.device)


def _project(scores, budget: int, projection: str, n: int, shares=None) -> list[torch.Tensor]:
    """Masks keeping the largest scores under the budget, split as the projection says.

    ``shares`` (projection "factor"): the non-zeros of each factor; default an even split.
    """
    M = len(scores)
    if projection == "total":
        flat = torch.stack(scores)
        return list(_top_mask(flat, budget))
    if projection == "factor":
        if shares is None:
            shares = [budget // M + (1 if m < budget % M else 0) for m in range(M)]
        return [_top_mask(s, k) for s, k in zip(scores, shares)]
    per = budget // (M * n)
    dim = 1 if projection == "row" else 0
    return [_top_mask(s, per, dim) for s in scores]


# -- the rounds ---------------------------------------------------------------------------------
def _rounds(starts, objective, budget, projection, hysteresis, rounds, tol, deadline, refine, one_round, callback,
            shares=None):
    """Refit each start and give it one round; the best continues with rounds until no round helps.

    A round whose refit is not better is undone and the hysteresis divided by
    ``_BACKOFF``; after ``_REJECTIONS`` such rounds, or an improvement below
    ``tol``, the rounds stop. Returns (info, chain, loss, start_rel_error, rounds done).
    """
    best = None
    for info, chain in starts:
        if best is not None and time.perf_counter() > deadline:
            break
        if projection != "total" or chain.params > budget:  # project the start: held entries only compete
            chain = _select(chain, objective.residual(chain), budget, projection, 0.0, LEARNED_DEFAULTS["step"], False,
                            shares)
        chain, loss = refine(chain)
        if time.perf_counter() < deadline:
            new, new_loss = one_round(chain, hysteresis)
            if new_loss < loss:
                chain, loss = new, new_loss
        if best is None or loss < best[2]:
            best = (info, chain, loss)
    info, chain, loss = best
    start_rel = math.sqrt(2 * loss)
    gamma, done, rejected = hysteresis, 1, 0
    stopped = (callback is not None and callback(done, start_rel)) or loss <= 5e-15
    while not stopped and done < rounds and rejected < _REJECTIONS and time.perf_counter() < deadline:
        new, new_loss = one_round(chain, gamma)
        done += 1
        if new_loss < loss:
            improvement = 1 - math.sqrt(new_loss / loss)
            chain, loss = new, new_loss
            stopped = (callback is not None and callback(done, math.sqrt(2 * loss))) or improvement < tol \
                or loss <= 5e-15
        else:
            gamma /= _BACKOFF
            rejected += 1
    return info, chain, loss, start_rel, done


def _hierarchy(D, budget, M, seed, objective, as_chain, level, inner_iter, deadline, settings, callback):
    """FAuST's hierarchical order: T ~ S(1) R(1), R(1) ~ S(2) R(2), ..., with a global refit after each split.

    Split l is a two-factor learned fit of R(l-1) (R(0) = D) under the budget
    left, S(l) held to budget // M non-zeros and R(l) to the rest; then L-BFGS
    refits the values of S(1) ... S(l) R(l) against D on their supports.
    Returns (info, chain, loss, rel_error after the first split, splits done).
    """
    share = budget // M
    left_rows, left_cols, left_vals = [], [], []
    target, start_rel = D, None
    for split in range(M - 1):
        level_budget = budget - sum(len(r) for r in left_rows)
        sub = {"device": settings.placement.device, "dtype": settings.placement.dtype}
        if deadline < math.inf:
            sub["time_limit"] = max(deadline - time.perf_counter(), 1e-3)
        F = learned_sparse.trusted(target, level_budget, factors=2, seed=seed, fit_options=sub, projection="factor",
                           factor_budgets=(share, level_budget - share), polish_iter=0, **level)
        parts = [(np.repeat(np.arange(W.shape[0]), np.diff(W.indptr)), W.indices.astype(np.int64),
                  W.data.astype(np.float64)) for W in F.factors]
        rows = left_rows + [p[0] for p in parts]
        cols = left_cols + [p[1] for p in parts]
        chain = as_chain(rows, cols, left_vals + [p[2] for p in parts])
        if split == 0:  # the first split is a fit against D already
            loss = objective.loss(chain)
        else:
            chain, loss = _refine(chain, objective, inner_iter, deadline)
        if start_rel is None:
            start_rel = math.sqrt(2 * loss)
        if callback is not None and callback(split + 1, math.sqrt(2 * loss)):
            break
        if split == M - 2 or time.perf_counter() > deadline:
            break
        values = [v.detach().double().cpu().numpy() for v in chain.values]
        left_rows, left_cols, left_vals = chain.rows[:-1], chain.cols[:-1], values[:-1]
        last = sp.csr_matrix((values[-1], (chain.rows[-1], chain.cols[-1])), shape=D.shape)
        target = last.toarray()
        if not np.any(target):  # the split left nothing to factor further
            break
    # stopped early (time, callback, or nothing left to split): fewer factors than asked, said by the pattern
    return {"init": "lowrank+sparse", "levels": split + 1}, chain, loss, start_rel, split + 1


# -- the method --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LearnedOptions:
    """The learned-support method's own options, checked when built (see :func:`learned_sparse`)."""

    factors: int | None = None
    init: str = "auto"
    projection: str = "total"
    order: str = LEARNED_DEFAULTS["order"]
    factor_budgets: tuple | None = None
    splits: tuple = LEARNED_DEFAULTS["splits"]
    rounds: int | None = None
    inner_iter: int | None = None
    polish_iter: int | None = None
    hysteresis: float = LEARNED_DEFAULTS["hysteresis"]
    tol: float = LEARNED_DEFAULTS["tol"]
    refit: str = "auto"
    sweeps: int | None = None

    def __post_init__(self):
        for name, value, choices in (("init", self.init, INITS), ("projection", self.projection, PROJECTIONS),
                                     ("order", self.order, ORDERS), ("refit", self.refit, REFITS)):
            if value not in choices:
                raise SfaError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")
        if self.factors is not None and (int(self.factors) != self.factors or self.factors < 2):
            raise SfaError(f"factors must be an integer >= 2 for the learned-support method; got {self.factors!r}")
        if not 0 < self.hysteresis <= 1:  # 0 would freeze the supports
            raise SfaError(f"hysteresis must be in (0, 1]; got {self.hysteresis}")
        for name in ("rounds", "sweeps", "inner_iter", "polish_iter"):
            value = getattr(self, name)
            low = 0 if name in ("inner_iter", "polish_iter") else 1
            if value is not None and (int(value) != value or value < low):
                raise SfaError(f"{name} must be an integer >= {low}; got {value!r}")
        if any(not 0 <= float(f) <= 1 for f in self.splits):
            raise SfaError(f"splits must be fractions in [0, 1]; got {list(self.splits)}")
        if self.hierarchical and (self.init == "chord" or self.projection not in ("total", "factor")
                                  or self.factor_budgets is not None):
            raise SfaError("order='hierarchical' starts from low-rank + sparse splits with budget / M non-zeros per "
                           "factor: it takes neither init='chord', a row/column projection nor factor_budgets")

    def scale_obstacle(self) -> str | None:
        """Why these options cannot run from blocks of A (:mod:`sfa_cli.methods.learned_scale`), or None when they can."""
        if self.M != 2:
            return f"factors={self.M}"
        for name, value, ok in (("init", self.init, ("auto", "lowrank+sparse")), ("projection", self.projection,
                                ("total",)), ("refit", self.refit, ("auto", "als"))):
            if value not in ok:
                return f"{name}={value!r}"
        if self.factor_budgets is not None:
            return "factor_budgets"
        return None

    @property
    def M(self) -> int:
        return int(self.factors or LEARNED_DEFAULTS["factors"])

    @property
    def hierarchical(self) -> bool:
        return self.order == "hierarchical" and self.M > 2

    def check(self, n: int, budget: int) -> None:
        """The checks that need the matrix size and the budget (SfaError, or NotApplicable)."""
        shares = self.factor_budgets
        if shares is not None and (self.projection != "factor" or self.init == "chord" or len(shares) != self.M
                                   or min(shares) < 1 or sum(shares) > budget):
            raise SfaError(f"factor_budgets must give each of the factors (projection='factor', factors={self.M}) at "
                           f"least 1 non-zero and sum to at most the budget {budget}; got {list(shares)}")
        if budget < 2:
            raise NotApplicable(f"two sparse factors need at least 2 non-zeros; budget {budget}")
        if self.projection in ("row", "column") and budget < (self.factors or 2) * n:
            need = (self.factors or 2) * n
            raise NotApplicable(f"one non-zero per {self.projection} of every factor needs {need} > budget {budget}")


@dataclass(frozen=True)
class _FitSettings:
    """A method's ``fit_options`` dict as the typed options of :func:`sfa_cli.engine.fit.fit`, plus the Chord variant."""

    stop: StopRules
    optimizer: OptimizerSpec
    placement: Placement
    variant: dict

    #: fit_options keys that choose the pattern: the methods size the pattern themselves and ignore them
    SIZED = ("base", "factors", "permute", "pattern")
    VARIANT = ("symmetric", "self_link")

    @classmethod
    def from_options(cls, fit_options: dict | None, caller: str) -> "_FitSettings":
        options = {k: v for k, v in (fit_options or {}).items() if v is not None}
        known = set(StopRules.names()) | set(OptimizerSpec.names()) | set(Placement.names()) | set(cls.SIZED) \
            | set(cls.VARIANT)
        unknown = sorted(set(options) - known)
        if unknown:
            raise SfaError(f"{caller}: unknown option(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        return cls(StopRules.from_dict(options), OptimizerSpec.from_dict(options), Placement.from_dict(options),
                   {k: options[k] for k in cls.VARIANT if k in options})


@validates_matrix
def learned_sparse(
    A,
    budget: int,
    *,
    factors: int | None = None,
    seed: int = 0,
    fit_options: dict | None = None,
    init: str = "auto",
    projection: str = "total",
    order: str = LEARNED_DEFAULTS["order"],
    factor_budgets=None,
    splits=LEARNED_DEFAULTS["splits"],
    rounds: int | None = None,
    inner_iter: int | None = None,
    polish_iter: int | None = None,
    hysteresis: float = LEARNED_DEFAULTS["hysteresis"],
    tol: float = LEARNED_DEFAULTS["tol"],
    refit: str = "auto",
    sweeps: int | None = None,
    callback=None,
    at_scale: bool | None = None,
) -> SparseFactors:
    """Sparse factors S(1)...S(M) whose supports are learned, with at most ``budget`` non-zeros in all.

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
        Densified for the fit up to n = DENSE_FIT_LIMIT; above, read by blocks (``at_scale``).
    budget : int
        Non-zeros allowed over all factors.
    factors : int, optional
        M >= 2; default 2, whose values are refitted exactly (alternating least
        squares) and which was the better choice in the study of docs/quality.md;
        with ``init="chord"`` the Chord fit's count. More factors start with
        identity factors in the middle (n non-zeros each) and refit by L-BFGS.
    seed : int, default=0
        Seeds the randomized SVD of the start (n > 1024) and the Chord warm start;
        the same seed gives the same factors on the same device.
    fit_options : dict, optional
        Keywords of :func:`sfa_cli.engine.fit.fit` (an unknown one is an error):
        ``device``, ``dtype``, ``time_limit`` (seconds for the whole method; the
        best factors so far are returned) and ``max_iter`` (caps the final
        L-BFGS iterations) are used here; the Chord warm start also takes the
        optimiser's options and the other stopping rules.
    init : {"auto", "lowrank+sparse", "chord"}, default="auto"
        ``lowrank+sparse`` (auto): a rank-r part plus residual entries written as
        factors, the best of ``splits`` (fractions of the budget for the rank-r
        part) after one round each (A itself when all its entries fit);
        ``chord``: a Chord fit at the budget (M = its factor count).
    projection : {"total", "factor", "row", "column"}, default="total"
        Where the budget applies: the k largest over all factors, over each
        factor (budget / M, or ``factor_budgets``), in each row, or in each
        column (budget / (M n)).
    order : {"joint", "hierarchical"}, default="joint"
        How M > 2 factors are fitted. ``joint``: the start holds M - 2 identity
        factors in the middle and every round re-selects all supports together.
        ``hierarchical`` (FAuST's order, Le Magoarou & Gribonval 2016): split
        A ~ S(1) R(1) with S(1) held to budget / M non-zeros, then R(1) ~ S(2) R(2),
        ..., each split a two-factor learned fit (``projection="factor"`` with
        shares budget / M and the rest), each followed by an L-BFGS refit of all
        factors so far against A; a final L-BFGS polish. The same as ``joint`` for
        M = 2. docs/quality.md measures both (joint is the default).
    factor_budgets : sequence of int, optional
        With ``projection="factor"``: the non-zeros allowed in each factor
        (M numbers summing to at most ``budget``); default an even split.
    splits : sequence of float, default=(0.5, 0.9)
    rounds, inner_iter, polish_iter : int, optional
        Selection rounds, L-BFGS iterations per round (L-BFGS refits) and on the
        final supports (defaults: :func:`default_rounds`, :func:`default_inner_iter`;
        :func:`default_polish_iter` with L-BFGS refits, none after ALS, which
        ends with a double polish sweep count).
    hysteresis : float, default=1.0
        A new entry's score g^2 / c is multiplied by this before it competes with
        held entries; divided by 4 after each rejected round (3 rejections stop),
        so that fewer, only clearly better entries swap in.
    tol : float, default=1e-3
        The rounds stop when one improves the relative error by less than this fraction.
    refit : {"auto", "als", "lbfgs"}, default="auto"
        How values are fitted on a support: alternating least squares (rows of
        S(1), columns of S(2), exactly; two factors only, the auto choice) or L-BFGS.
    sweeps : int, default=2
        ALS sweeps per round (the final polish makes twice as many).
    callback : callable, optional
        ``callback(round, rel_error)`` after the start and after each accepted
        round; returning True stops.
    at_scale : bool, optional
        Fit from blocks of A, nothing n x n formed (:func:`sfa_cli.methods.learned_scale.learned_at_scale`:
        two factors, the total projection, a low-rank + sparse start, exact ALS refits; on the CPU);
        None: when n > DENSE_FIT_LIMIT, or when the dense fit's peak (about 120 bytes per entry
        of A) does not fit in the memory available. ``rounds`` and ``sweeps`` apply there too.

    Returns
    -------
    SparseFactors
        method ``sparse``, pattern ``{"name": "learned", "factors": M, ...}``,
        info with ``rel_error``, ``rounds``, ``init`` and ``split``.

    Raises
    ------
    NotApplicable
        When the budget cannot hold the start (e.g. fewer than 2 non-zeros, or
        the Chord warm start's smallest pattern), or at scale with options that
        need dense n x n work (more factors, a Chord start, a per-factor projection).
    """
    t0 = time.perf_counter()
    n, budget = A.shape[0], check_budget(budget)
    opts = LearnedOptions(factors=factors, init=init, projection=projection, order=order,
                          factor_budgets=None if factor_budgets is None else tuple(int(k) for k in factor_budgets),
                          splits=tuple(float(f) for f in splits), rounds=rounds, inner_iter=inner_iter, polish_iter=polish_iter,
                          hysteresis=hysteresis, tol=tol, refit=refit, sweeps=sweeps)
    opts.check(n, budget)
    settings = _FitSettings.from_options(fit_options, "learned_sparse fit_options")
    if at_scale or (at_scale is None and (n > DENSE_FIT_LIMIT or _DENSE_BYTES_PER_ENTRY * n * n > available_bytes())):
        return _learned_at_scale(A, budget, opts, settings, seed, rounds, sweeps, callback)
    factors, hierarchical, factor_budgets, splits = opts.factors, opts.hierarchical, opts.factor_budgets, opts.splits
    device = resolve_device(settings.placement.device, n)
    dtype = resolve_dtype(settings.placement.dtype)
    time_limit = settings.stop.time_limit
    deadline = t0 + time_limit if time_limit else math.inf
    rounds = default_rounds(n) if rounds is None else int(rounds)
    sweeps = 2 if sweeps is None else int(sweeps)
    inner_iter = default_inner_iter(n) if inner_iter is None else int(inner_iter)

    scale = frobenius_norm(A)
    if scale == 0.0:
        raise SfaError("the matrix is all zeros; there is nothing to approximate")
    D = (A.toarray() if sp.issparse(A) else np.asarray(A, dtype=np.float64)) / scale
    T = torch.as_tensor(D, device=device).to(dtype)
    objective = _Target(T)

    def as_chain(rows, cols, vals) -> _Chain:
        return _Chain(n, rows, cols, [torch.as_tensor(np.asarray(v, dtype=np.float64)).to(device, dtype) for v in vals],
                      device)

    # -- starts: one round from each, keep the best
    use_chord = init == "chord"
    starts, exact = [], False
    if hierarchical:
        M = int(factors)
        shares = budget // M
        if shares < 1 or budget - (M - 2) * shares < 2:
            raise NotApplicable(f"{M} hierarchical factors need at least one non-zero each; budget {budget}")
    elif use_chord:
        rows, cols, vals = _chord_start(A, budget, seed, settings)
        M = len(rows)
        vals = [v / scale ** (1.0 / M) for v in vals]
        starts.append(({"init": "chord"}, as_chain(rows, cols, vals)))
    else:
        M = int(factors or LEARNED_DEFAULTS["factors"])
        middle = M - 2
        if budget < middle * n + 2:
            raise NotApplicable(
                f"{M} factors start with {middle} identity factors ({middle * n} non-zeros) > budget {budget}")
        plans = {}
        for f in sorted(set(splits)):
            r = min(int(f * (budget - middle * n)) // (2 * n), n - 1)
            plans.setdefault(r, f)
        nonzero = D != 0
        exact = np.count_nonzero(nonzero) + min(np.count_nonzero(nonzero.any(1)), np.count_nonzero(nonzero.any(0))) \
            + middle * n <= budget
        if exact:
            plans = {0: 0.0}  # every entry of A fits with its slot: the start is exact
        r_max = max(plans)
        left_all, right_all = _svd_parts(D, r_max, seed)
        for r, f in sorted(plans.items()):
            left, right = left_all[:, :r], right_all[:r]
            Dr = D - left @ right
            rows, cols, vals = _lowrank_sparse_start(Dr, left, right, budget, middle)
            starts.append(({"init": "lowrank+sparse", "split": f, "rank": r}, as_chain(rows, cols, vals)))
    revive = M == 2 and projection in ("total", "factor")
    step = LEARNED_DEFAULTS["step"]
    use_als = M == 2 and refit in ("auto", "als")
    if polish_iter is None:  # ALS leaves nothing for L-BFGS to polish (docs/quality.md)
        polish_iter = 0 if use_als else default_polish_iter(n)
    if settings.stop.max_iter:
        polish_iter = min(int(polish_iter), settings.stop.max_iter)

    def refine(chain):
        if use_als:
            return _refine_als(chain, objective, sweeps, deadline)
        return _refine(chain, objective, inner_iter, deadline)

    def one_round(chain, gamma):
        R = objective.residual(chain)
        candidate = _select(chain, R, budget, projection, gamma, step, revive, factor_budgets)
        del R
        return refine(candidate)

    if hierarchical:
        level = {"splits": splits, "rounds": rounds, "hysteresis": hysteresis, "tol": tol, "refit": refit,
                 "sweeps": sweeps}
        info, chain, loss, start_rel, done = _hierarchy(D, budget, M, seed, objective, as_chain, level, inner_iter,
                                                        deadline, settings, callback)
        if polish_iter > 0 and time.perf_counter() < deadline:
            chain, loss = _refine(chain, objective, polish_iter, deadline)
    elif exact:  # the start holds A itself; nothing to fit
        info, chain = starts[0]
        loss = objective.loss(chain)
        start_rel, done = math.sqrt(2 * loss), 0
        if callback is not None:
            callback(done, start_rel)
    else:
        info, chain, loss, start_rel, done = _rounds(starts, objective, budget, projection, hysteresis, rounds,
                                                     tol, deadline, refine, one_round, callback, factor_budgets)
        if use_als and time.perf_counter() < deadline:
            chain, loss = _refine_als(chain, objective, 2 * sweeps, deadline)
        if polish_iter > 0 and time.perf_counter() < deadline:
            chain, loss = _refine(chain, objective, polish_iter, deadline)
    # drop entries the fit zeroed: they cost budget and carry nothing
    keep = [(v != 0).cpu().numpy() for v in chain.values]
    if not all(k.all() for k in keep):
        chain = _Chain(n, [r[k] for r, k in zip(chain.rows, keep)], [c[k] for c, k in zip(chain.cols, keep)],
                       [v[torch.from_numpy(k).to(v.device)] for v, k in zip(chain.values, keep)], device)
    rel = math.sqrt(max(2 * loss, 0.0))
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    pattern = {"name": "learned", "factors": chain.factors, "projection": projection, "order": "hierarchical" if hierarchical
               else "joint", **info}
    facts = {
        "rel_error": rel,
        "start_rel_error": start_rel,
        "rounds": done,
        "seconds": time.perf_counter() - t0,
        "note": f"{chain.factors} learned factors, {chain.params} non-zeros ({info['init']} start)",
    }
    return SparseFactors(chain.to_scipy(scale, np_dtype), method="sparse", pattern=pattern, info=facts)


#: Peak bytes per entry of A of the dense fit: its n x n residuals, scores and Gram matrices
#: (7.5 GiB at n = 8192, scripts/bench_scale_dense.py).
_DENSE_BYTES_PER_ENTRY = 120


def _learned_at_scale(A, budget, opts: LearnedOptions, settings: _FitSettings, seed, rounds, sweeps, callback):
    """The fit from blocks of A, for the options it takes."""
    from sfa_cli.methods.learned_scale import learned_at_scale

    obstacle = opts.scale_obstacle()
    if obstacle is not None:
        raise NotApplicable(f"at n = {A.shape[0]} the learned-support method fits two factors (total projection, "
                            f"low-rank + sparse start) from blocks of A; {obstacle} needs dense n x n residuals "
                            f"(n <= {DENSE_FIT_LIMIT})")
    dtype = np.float32 if resolve_dtype(settings.placement.dtype) == torch.float32 else np.float64
    return learned_at_scale.trusted(A, budget, seed=seed, time_limit=settings.stop.time_limit, callback=callback,
                            splits=(*opts.splits, 1.0), dtype=dtype,
                            **{k: int(v) for k, v in (("rounds", rounds), ("sweeps", sweeps)) if v is not None})
