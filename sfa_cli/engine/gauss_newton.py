"""Levenberg-Marquardt for a chain of sparse factors on a fixed pattern.

The fit's objective 0.5 ||T - W(1)...W(M)||_F^2 is a least-squares problem in the
factor values x. Its Jacobian J (n^2 residuals x nnz unknowns) is never formed:

* ``J v`` is the directional derivative of the product, sum over m of
  W(1)..V(m)..W(M): one forward pass that carries (X, dX) through the chain,
  dX <- W(m) dX + V(m) X, with the kernels of :mod:`sfa_cli.approximations.kernels`;
* ``J^T R`` of a residual-like block R is the gradient's backward pass.

Both run over column blocks of n x b, as the fit's block objective does, so the
memory is a few n x b blocks per factor (plus, when it fits in ``cache_bytes``,
the forward blocks at the linearisation point, kept between the products).

:func:`lm_fit` solves (J^T J + lambda D) d = -J^T r by truncated,
Jacobi-preconditioned conjugate gradients at each step and updates lambda by
the gain ratio (Nielsen 1999; Madsen, Nielsen & Tingleff, *Methods for
non-linear least squares problems*, 2004, section 3.2). :func:`fit_lm` is the
convenience entry point on a matrix.

Example
-------
>>> import numpy as np
>>> from sfa_cli.engine.gauss_newton import chord_product, fit_lm
>>> A = chord_product(16, seed=0)                      # an exact product of 4 Chord factors
>>> result = fit_lm(A, seed=0, max_iter=30, device="cpu")
>>> result.rel_error < 0.05 * result.initial_rel_error, result.optimizer
(True, 'lm')
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from sfa_cli.errors import SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors, initial_values, pattern_structures
from sfa_cli.approximations.kernels import (FactorStructure, chain_backward, chain_forward, chain_matmul, column_entries,
                             factor_columns, resolve_device, resolve_dtype)
from sfa_cli.memory import peak_device_bytes, peak_rss_bytes
from sfa_cli.engine.objective import column_blocks
from sfa_cli.engine.optimize import Run, Stop
from sfa_cli.engine.result import FitResult, make_pattern
from sfa_cli.approximations.patterns import Pattern, chord_pattern

__all__ = ["ChainLeastSquares", "Linearization", "conjugate_gradient", "lm_fit", "fit_lm", "start_values", "STARTS",
           "LM_DEFAULTS", "chord_factors", "chord_product"]

#: Starting points :func:`start_values` knows.
STARTS = ("identity", "paper", "random")


def _product(s, v, X, out):
    """W X into ``out`` (one factor through the chain kernel)."""
    return chain_forward([s], [v], X, outs=[out])[2]


class ChainLeastSquares:
    """0.5 ||T - W(1)...W(M)||_F^2 with its gradient and Gauss-Newton products, over column blocks.

    Parameters
    ----------
    structs : sequence of FactorStructure
        The M factors (W(1) first), on the target's device.
    target : Tensor of shape (n, n)
    blocks : list of slice, optional
        Column blocks (default: about 2^19 elements each).
    cache_bytes : int, default=2**28
        The forward blocks at the linearisation point ((M - 1) n^2 numbers) are kept
        between Gauss-Newton products when they fit in this many bytes; otherwise every
        product recomputes them (one more forward pass per product).
    """

    def __init__(self, structs, target: torch.Tensor, blocks=None, cache_bytes: int = 1 << 28):
        self.structs, self.target = list(structs), target
        self.n = n = target.shape[0]
        self.blocks = column_blocks(n) if blocks is None else blocks
        M = len(self.structs)
        self.cache = (M - 1) * n * n * target.element_size() <= cache_bytes
        self._work: dict[int, list[torch.Tensor]] = {}

    def _scratch(self, width: int) -> list[torch.Tensor]:
        """Five n x width blocks reused by every pass: R / dY, the JVP's and the backward's ping-pong."""
        work = self._work.get(width)
        if work is None:
            work = [self.target.new_empty((self.n, width)) for _ in range(5)]
            self._work[width] = work
        return work

    def _forward(self, values, cols: slice, outs=None):
        """The chain's blocks for columns ``cols``: (order, inputs, Y) as kernels.chain_forward."""
        structs = self.structs
        M = len(structs)
        if outs is None:
            outs = [self.target.new_empty((self.n, cols.stop - cols.start)) for _ in range(M)]
        X = factor_columns(structs[-1], values[-1], cols, out=outs[0])
        return chain_forward(structs[:-1], values[:-1], X, outs=outs[1:M])

    def _backward(self, values, order, inputs, G, cols: slice, grads) -> None:
        """Add J^T of the block G (columns ``cols``) into ``grads``; G is overwritten."""
        structs, M = self.structs, len(self.structs)
        work = self._scratch(cols.stop - cols.start)
        block_grads, G = chain_backward(structs[:-1], values[:-1], order, inputs, G, False, [True] * (M - 1), True,
                                        outs=(work[3], work[4]))
        for acc, g in zip(grads, block_grads):
            acc.add_(g)
        sel, pos = column_entries(structs[-1], cols)  # W(M)'s part: G at its entries
        grads[-1].index_add_(0, sel, G.reshape(-1)[pos])

    def loss(self, values) -> float:
        """The loss alone (forward passes only)."""
        total = 0.0
        with torch.no_grad():
            for cols in self.blocks:
                _, _, Y = self._forward(values, cols)
                total += 0.5 * float(torch.linalg.vector_norm(Y - self.target[:, cols]).double() ** 2)
        return total

    def linearize(self, values) -> "Linearization":
        """Loss and gradient at ``values``, and the point's Jacobian products (:class:`Linearization`)."""
        values = [v.detach() for v in values]
        grads = [torch.zeros_like(v) for v in values]
        total, kept = 0.0, []
        M = len(self.structs)
        with torch.no_grad():
            for cols in self.blocks:
                width = cols.stop - cols.start
                outs = [self.target.new_empty((self.n, width)) for _ in range(M - 1)] + [self._scratch(width)[0]]
                order, inputs, Y = self._forward(values, cols, outs)
                R = Y.sub_(self.target[:, cols])
                total += 0.5 * float(torch.linalg.vector_norm(R).double() ** 2)
                self._backward(values, order, inputs, R, cols, grads)
                if self.cache:
                    kept.append((order, inputs))
        return Linearization(self, values, total, grads, kept if self.cache else None)


@dataclass
class Linearization:
    """A point of :class:`ChainLeastSquares` with its loss, gradient and Jacobian products.

    ``values`` are the caller's tensors (detached, not copied): they must not change while the
    linearisation is used. ``kept``: the forward blocks per column block, when cached.
    """

    problem: ChainLeastSquares
    values: list
    loss: float
    grad: list
    kept: list | None = field(default=None, repr=False)

    def _inputs(self, i: int, cols: slice):
        if self.kept is not None:
            return self.kept[i]
        order, inputs, _ = self.problem._forward(self.values, cols)
        return order, inputs

    def _jvp_block(self, direction, order, inputs, cols: slice, work) -> torch.Tensor:
        p = self.problem
        structs = p.structs
        dX = factor_columns(structs[-1], direction[-1], cols, out=work[1])
        for step, m in enumerate(order):  # m = M-2 ... 0
            dst = work[2] if dX is work[1] else work[1]
            _product(structs[m], self.values[m], dX, dst)
            dst.add_(_product(structs[m], direction[m], inputs[step], work[0]))
            dX = dst
        return dX

    def jvp(self, direction, cols: slice | None = None) -> torch.Tensor:
        """J v as the (n, |cols|) block of the product's directional derivative (all columns by default)."""
        p = self.problem
        blocks = p.blocks if cols is None else [cols]
        out = []
        with torch.no_grad():
            for i, c in enumerate(blocks):
                order, inputs = self._inputs(i, c) if cols is None else p._forward(self.values, c)[:2]
                out.append(self._jvp_block(direction, order, inputs, c, p._scratch(c.stop - c.start)).clone())
        return torch.cat(out, dim=1)

    def gauss_newton_product(self, direction) -> list:
        """J^T J v, one tensor per factor."""
        p = self.problem
        out = [torch.zeros_like(v) for v in self.values]
        with torch.no_grad():
            for i, cols in enumerate(p.blocks):
                order, inputs = self._inputs(i, cols)
                dY = self._jvp_block(direction, order, inputs, cols, p._scratch(cols.stop - cols.start))
                p._backward(self.values, order, inputs, dY, cols, out)
        return out

    def gauss_newton_diagonal(self) -> list:
        """diag(J^T J), one tensor per factor.

        d r / d W(m)[i, j] is the outer product of column i of L(m) = W(1)..W(m-1) and row j of
        R(m) = W(m+1)..W(M), so the diagonal is |L(m)[:, i]|^2 |R(m)[j, :]|^2: the column norms of
        every prefix (one pass of the transposed chain) and the row norms of every suffix (one pass
        of the chain), both over column blocks of the identity.
        """
        p = self.problem
        structs, M, n = p.structs, len(p.structs), p.n
        col_sq = [torch.zeros(n, dtype=self.values[0].dtype, device=self.values[0].device) for _ in range(M)]
        row_sq = [torch.zeros_like(c) for c in col_sq]
        col_sq[0].fill_(1.0)  # L(1) = I
        row_sq[-1].fill_(1.0)  # R(M) = I
        with torch.no_grad():
            for cols in p.blocks:
                width = cols.stop - cols.start
                E = p.target.new_zeros((n, width))
                E[cols, :] = torch.eye(width, dtype=E.dtype, device=E.device)
                X = E
                for m in range(M - 1, 0, -1):  # X = R(m-1)[:, cols] = W(m)...W(M) E
                    X = _product(structs[m], self.values[m], X, p.target.new_empty((n, width)))
                    row_sq[m - 1].add_(X.square().sum(1))
                X = E
                for m in range(M - 1):  # X = L(m+2)^T[:, cols] = W(m+1)^T ... W(1)^T E
                    X = chain_forward([structs[m]], [self.values[m]], X, transpose=True)[2]
                    col_sq[m + 1].add_(X.square().sum(1))
        return [col_sq[m][s.rows] * row_sq[m][s.col] for m, s in enumerate(structs)]


def _dot(a: list, b: list) -> float:
    return float(sum(torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)))


def conjugate_gradient(product, rhs: list, precond: list | None, max_iter: int, rel_tol: float,
                       x0: list | None = None, check=None):
    """Solve product(x) = rhs by preconditioned conjugate gradients, over lists of tensors.

    precond : the inverse of a diagonal preconditioner (one tensor per block), or None.
    x0 : a start (default 0). check : called before every product (may raise to stop).
    Returns (x, r, iterations) with r = rhs - product(x) the final residual.
    """
    x = [torch.zeros_like(v) for v in rhs] if x0 is None else [v.clone() for v in x0]
    r = [v.clone() for v in rhs] if x0 is None else [b - a for b, a in zip(rhs, product(x))]
    z = r if precond is None else [ri * pi for ri, pi in zip(r, precond)]
    d = [zi.clone() for zi in z]
    rz, stop = _dot(r, z), rel_tol**2 * _dot(rhs, rhs)
    it = 0
    while it < max_iter and _dot(r, r) > stop:
        if check is not None:
            check()
        q = product(d)
        dq = _dot(d, q)
        if not dq > 0:  # J^T J + lambda D is positive definite; guards against rounding
            break
        alpha = rz / dq
        for di, qi, xi, ri in zip(d, q, x, r):
            xi.add_(di, alpha=alpha)
            ri.add_(qi, alpha=-alpha)
        z = r if precond is None else [ri * pi for ri, pi in zip(r, precond)]
        rz, beta = _dot(r, z), _dot(r, z) / rz
        for di, zi in zip(d, z):
            di.mul_(beta).add_(zi)
        it += 1
    return x, r, it


def _check_time(run: Run) -> None:
    """Stop inside a step (between CG products) once the time limit has passed."""
    if run.time_is_up():
        raise Stop("time_limit")


#: Defaults of :func:`lm_fit` (scripts/bench_recovery_chord.py, docs/engine.md).
LM_DEFAULTS = {"cg_iter": 20, "cg_tol": 1e-4, "warm_start": 0.95, "initial_lambda": 1e-3, "window": 50}
#: :func:`lm_fit` stops (``tol``) once the damping passes this: a step then changes no value in float64,
#: and nu's doubling would overflow float32 a few rejections later.
MAX_LAMBDA = 1e16


def lm_fit(structs, values, target: torch.Tensor, *, max_iter: int = 1000, time_limit: float | None = None,
           tol: float = 1e-5, window: int = LM_DEFAULTS["window"], cg_iter: int = LM_DEFAULTS["cg_iter"],
           cg_tol: float = LM_DEFAULTS["cg_tol"], warm_start: float = LM_DEFAULTS["warm_start"],
           damping: str = "diagonal", initial_lambda: float = LM_DEFAULTS["initial_lambda"], callback=None,
           problem: ChainLeastSquares | None = None):
    """Levenberg-Marquardt on 0.5 ||target - W(1)...W(M)||_F^2, starting from ``values``.

    Each step solves (J^T J + lambda D) d = -J^T r by at most ``cg_iter`` Jacobi-preconditioned
    CG iterations (stopped at relative residual ``cg_tol``; started from ``warm_start`` times the
    last accepted step), evaluates x + d, and accepts it when the loss fell. lambda follows the
    gain ratio rho = actual / predicted decrease: times max(1/3, 1 - (2 rho - 1)^3) after an
    accepted step, times nu (2, doubling while steps fail) after a rejected one.

    Parameters
    ----------
    structs : sequence of FactorStructure
        The M factors (W(1) first), on the target's device.
    values : list of Tensor
        The start, one 1-D tensor of CSR-ordered values per factor (not modified).
    target : Tensor of shape (n, n)
        Relative errors are measured against its Frobenius norm.
    max_iter : int, default=1000
        LM steps, accepted or not (each is one evaluation and up to ``cg_iter`` products).
    time_limit : float, optional
        Seconds; checked after every evaluation and before every CG product.
    tol, window : float, int
        Stop when the best relative error improved by less than ``tol`` of itself over the last
        ``window`` steps (``tol=0``: never).
    damping : {"diagonal", "identity"}, default="diagonal"
        D: Marquardt's diag(J^T J) (invariant to rescaling single entries) or the identity
        scaled by the mean of that diagonal.
    callback : callable, optional
        ``callback(step: FitStep)`` after every evaluation; returning True stops.
    problem : ChainLeastSquares, optional
        Reuse one built on (structs, target).

    Returns
    -------
    values : list of Tensor
        The best values found.
    history : list of dict
        One entry per evaluation (iteration, evaluations, seconds, rel_error) as in
        :func:`sfa_cli.engine.fit.fit`, with ``lambda``, ``cg_iterations`` and ``accepted`` for the steps.
    stopped_because : str
        ``max_iter``, ``time_limit``, ``tol``, ``exact``, ``callback``, ``diverged`` or ``interrupted``.
    """
    if damping not in ("diagonal", "identity"):
        raise SfaError(f"damping must be one of diagonal, identity; got {damping!r}")
    problem = problem or ChainLeastSquares(structs, target)
    norm_sq = float(torch.linalg.vector_norm(target).double()) ** 2
    sizes = [v.numel() for v in values]
    flat = torch.cat([v.detach().reshape(-1) for v in values])
    x = list(flat.split(sizes))  # views: the run keeps its best copy from `flat`
    run = Run([flat], max_iter=max_iter, time_limit=time_limit, tol=tol, window=window, callback=callback)
    try:
        lin = problem.linearize(x)
        run.record(lin.loss / norm_sq)
        lam, nu, warm = None, 2.0, None
        while True:
            diag = lin.gauss_newton_diagonal()
            top = max(float(d.max()) for d in diag)
            if damping == "diagonal":
                D = [d.clamp_min(1e-12 * top) for d in diag]
            else:
                mean = sum(float(d.sum()) for d in diag) / flat.numel()
                D = [torch.full_like(d, mean) for d in diag]
            if lam is None:
                lam = initial_lambda

            def product(v, lam=lam, lin=lin, D=D):
                out = lin.gauss_newton_product(v)
                for o, vi, di in zip(out, v, D):
                    o.addcmul_(vi, di, value=lam)
                return out

            precond = [1.0 / (d + lam * Dd) for d, Dd in zip(diag, D)]
            x0 = None if warm is None or not warm_start else [w * warm_start for w in warm]
            step, r, cg_done = conjugate_gradient(product, [-g for g in lin.grad], precond, cg_iter, cg_tol, x0,
                                                  check=lambda: _check_time(run))
            # predicted decrease -(g.d + d.JtJ.d / 2), with d.(JtJ + lam D).d = -g.d - r.d from CG
            gd, rd = _dot(lin.grad, step), _dot(r, step)
            dDd = _dot([s * di for s, di in zip(step, D)], step)
            predicted = -0.5 * gd + 0.5 * rd + 0.5 * lam * dDd
            trial = [xi + si for xi, si in zip(x, step)]
            new = problem.linearize(trial)
            rho = (lin.loss - new.loss) / predicted if predicted > 0 else -math.inf
            accepted = new.loss < lin.loss and math.isfinite(new.loss)
            if accepted:
                saved = None
                lin, warm = new, step
                torch.cat([t.reshape(-1) for t in trial], out=flat)  # the run reads the point from flat
                lam *= max(1.0 / 3.0, 1.0 - (2.0 * min(rho, 1.0) - 1.0) ** 3) if rho > 0 else nu
                nu = 2.0
            else:
                saved = flat.clone()
                torch.cat([t.reshape(-1) for t in trial], out=flat)
                lam *= nu
                nu *= 2.0
            # a rejected trial that ran away is not recorded: the run would call that diverged
            if accepted or new.loss / norm_sq < 1e10:
                try:
                    run.record(new.loss / norm_sq)
                finally:
                    if saved is not None:
                        flat.copy_(saved)
                    run.history[-1].update({"lambda": lam, "cg_iterations": cg_done, "accepted": accepted})
            else:
                flat.copy_(saved)
            if lam > MAX_LAMBDA:  # steps of relative size 1/lam fail: no decrease left at this precision
                raise Stop("tol")
            run.end_iteration()
    except Stop as stop:
        run.stopped_because = stop.reason
    except KeyboardInterrupt:
        run.stopped_because = "interrupted"
    best = [b.clone() for b in run.best[0].split(sizes)]
    return best, run.history, run.stopped_because


# -- starts and test matrices ----------------------------------------------------------------
def start_values(structs, start: str = "identity", *, seed: int = 0, dtype=torch.float64, noise: float | None = None,
                 device="cpu") -> list[torch.Tensor]:
    """Starting values for a chain on ``structs``, scaled so that the product has unit Frobenius norm.

    ``identity``: W(m) = I plus normal entries of standard deviation ``noise`` (default
    0.1 / sqrt(k), k non-zeros per row) off the diagonal; ``paper``: each row averages its
    non-zeros with 1% noise (:func:`sfa_cli.approximations.sparse_factors.initial_values`, the L-BFGS fit's start);
    ``random``: normal / sqrt(k) entries. Drawn on the CPU from ``seed`` (same start on every
    device). Every factor needs its diagonal in the pattern for ``identity`` (Chord's self link).
    """
    if start not in STARTS:
        raise SfaError(f"unknown start {start!r}; choose from {', '.join(STARTS)}")
    gen = torch.Generator().manual_seed(int(seed))
    if start == "paper":
        vals = initial_values(structs, seed=seed, dtype=torch.float64)
    else:
        vals = []
        for s in structs:
            k = s.nnz / s.n
            z = torch.randn(s.nnz, generator=gen, dtype=torch.float64)
            if start == "random":
                vals.append(z / math.sqrt(k))
                continue
            diag = (s.rows == s.col).cpu()
            if int(diag.sum()) != s.n:
                raise SfaError("the identity start needs every diagonal entry in the pattern (a self link)")
            eps = 0.1 / math.sqrt(k) if noise is None else float(noise)
            vals.append(torch.where(diag, 1.0, eps * z))
    cpu = [FactorStructure.from_csr(s.crow.cpu().numpy(), s.col.cpu().numpy(), s.n) for s in structs]
    n = structs[0].n
    # ||product||_F from all columns up to n = 512, above from a seeded sample of 256 (a start's scale
    # need not be exact, and n x n would not fit at large n)
    cols = torch.arange(n) if n <= 512 else torch.randperm(n, generator=gen)[:256].sort().values
    E = torch.zeros(n, len(cols), dtype=torch.float64)
    E[cols, torch.arange(len(cols))] = 1.0
    with torch.no_grad():
        sq = float(torch.linalg.vector_norm(chain_matmul(cpu, vals, E))) ** 2
    norm = math.sqrt(sq * n / len(cols))
    c = norm ** (-1.0 / len(structs))
    return [(v * c).to(device=device, dtype=dtype) for v in vals]


def chord_factors(n: int, *, kind: str = "signed", seed: int = 0, factors: int | None = None,
                  rng: np.random.Generator | None = None) -> tuple[Pattern, list[np.ndarray]]:
    """The pattern and random values (CSR order, one array per factor) of a Chord product.

    ``kind="signed"``: entries normal / sqrt(k) (k non-zeros per row); ``"positive"``: rows of
    uniform entries normalised to sum 1 (row-stochastic). ``rng`` (default: one seeded by
    ``seed``) draws the values.
    """
    pat = chord_pattern(n, factors=factors)
    rng = np.random.default_rng(seed) if rng is None else rng
    k = pat.nnz_per_row
    if kind == "signed":
        return pat, [rng.standard_normal(t.size) / math.sqrt(k) for t in pat.tables]
    if kind == "positive":
        return pat, [(u / u.sum(1, keepdims=True)).reshape(-1) for u in (rng.random((n, k)) for _ in pat.tables)]
    raise SfaError(f"kind must be one of signed, positive; got {kind!r}")


def chord_product(n: int, *, kind: str = "signed", noise: float = 0.0, seed: int = 0,
                  factors: int | None = None) -> np.ndarray:
    """A dense (n, n) product of random Chord factors (:func:`chord_factors`), plus Gaussian
    noise of relative size ``noise``: the noise matrix E is scaled to ||E||_F = noise * ||product||_F.
    """
    rng = np.random.default_rng(seed)
    pat, vals = chord_factors(n, kind=kind, factors=factors, rng=rng)
    P = SparseFactors.from_pattern(pat, vals).to_dense()
    if noise:
        E = rng.standard_normal((n, n))
        P = P + noise * np.linalg.norm(P) / np.linalg.norm(E) * E
    return P


def fit_lm(A, pattern: str | Pattern = "chord", *, factors: int | None = None, start: str = "identity",
           max_iter: int = 1000, time_limit: float | None = None, tol: float = 1e-5, seed: int = 0,
           device: str = "auto", dtype: str = "float64", callback=None, **options):
    """Fit sparse factors on a fixed pattern to A by Levenberg-Marquardt (:func:`lm_fit`).

    Parameters
    ----------
    A : ndarray or scipy sparse matrix of shape (n, n)
    pattern : {"chord", "butterfly"} or Pattern, default="chord"
    factors : int, optional
        Number of factors (the pattern's default otherwise).
    start : {"identity", "paper", "random"}, default="identity"
        See :func:`start_values`.
    max_iter, time_limit, tol, callback
        As in :func:`lm_fit`.
    seed : int, default=0
        Seed of the start's noise.
    device : {"auto", "cpu", "cuda"}, default="auto"
    dtype : {"float32", "float64"}, default="float64"
    **options
        Passed to :func:`lm_fit` (cg_iter, cg_tol, warm_start, damping, initial_lambda, window).

    Returns
    -------
    FitResult
        As :func:`sfa_cli.engine.fit.fit` returns, with ``optimizer="lm"``. A is scaled to unit
        Frobenius norm for the fit and the scale spread evenly over the returned factors.
    """

    t0 = time.perf_counter()
    n = A.shape[0]
    if max_iter < 1:
        raise SfaError(f"max_iter must be >= 1; got {max_iter}")
    if time_limit is not None and time_limit <= 0:
        raise SfaError(f"time_limit must be positive; got {time_limit}")
    dev, tdtype = resolve_device(device, n), resolve_dtype(dtype)
    pat = make_pattern(n, pattern, factors=factors)
    structs, _ = pattern_structures(pat, dev)
    dense = A.toarray() if sp.issparse(A) else np.asarray(A)
    with warnings.catch_warnings():  # a read-only memory map: never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        target = torch.as_tensor(dense).to(device=dev, dtype=tdtype)
    scale = float(torch.linalg.vector_norm(target.double()))
    if scale == 0.0:
        raise SfaError("the matrix is all zeros; there is nothing to approximate")
    target = target / scale
    x0 = start_values(structs, start, seed=seed, dtype=tdtype, device=dev)
    values, history, stopped = lm_fit(structs, x0, target, max_iter=max_iter, time_limit=time_limit, tol=tol,
                                      callback=callback, **options)
    c = scale ** (1.0 / pat.factors)
    np_dtype = np.float32 if tdtype == torch.float32 else np.float64
    approx = SparseFactors.from_pattern(pat, [(v.double() * c).cpu().numpy().astype(np_dtype) for v in values])
    steps = [h for h in history if "accepted" in h]
    return FitResult(
        approximation=approx,
        rel_error=min(h["rel_error"] for h in history),
        initial_rel_error=history[0]["rel_error"],
        iterations=len(steps),
        evaluations=len(history),
        seconds=time.perf_counter() - t0,
        device=str(dev),
        dtype=str(tdtype).replace("torch.", ""),
        optimizer="lm",
        stopped_because=stopped,
        history=history,
        peak_memory_bytes=peak_rss_bytes(),
        peak_device_memory_bytes=peak_device_bytes(dev),
    )
