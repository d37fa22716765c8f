"""The lifted start: recover a shallow product of sparse factors by projections on its paths.

A product P = W(1) W(2) ... W(M) on a fixed pattern is a sum over paths: row j0 reaches column
jM through nodes j1, ..., j(M-1), taking non-zero t_m of row j(m-1) of factor m, and the path
carries the value W(1)[j0, t1] W(2)[j1, t2] ... W(M)[j(M-1), tM]. The lifted problem keeps one
unknown per path, T (N k^M of them for k non-zeros per row), and asks for two things:

* **consistency** (an affine set): for every entry (j0, jM) the paths that end there sum to
  A[j0, jM]. Its projection adds the entry's residual, divided by its number of paths, to each
  of them (the paths of different entries are disjoint, so the map's Gram matrix is diagonal);
* **factorisation** (one set per layer m = 1 .. M-1): the paths through node j at depth m form a
  matrix, prefixes (j0, t1..tm) by suffixes (t(m+1)..tM), and on a product it has rank one,
  prefix value times suffix value. Its projection is that matrix's top singular pair (a few
  warm-started power iterations).

The sweeps are RAAR (relaxed averaged alternating reflections, Luke 2005; beta = 0.99-0.995,
near Douglas-Rachford) in the product space, one copy of the paths per depth. They need no start:
from A alone they reach signed Chord products of 2 factors (N = 16-1024), 3 (N = 32-256), 4 and 5
(N = 64; five take some 15,000 sweeps, half an hour here) to 1e-12, where plain alternating
projections stall from 4 factors and the gradient engines from 2 (LM from the identity start: 0.05-0.1; docs/recovery.md, "Depth"). The factors are
read off the rank-one pairs of the best point checked (:func:`lifted_start`). Where the product is
nearly dense the sweeps stall; the path count N k^M grows past what memory holds at full depth,
so :data:`MAX_PATHS` bounds it.

Example
-------
>>> import torch
>>> from sfa_cli.approximations.sparse_factors import SparseFactors
>>> from sfa_cli.engine.gauss_newton import chord_factors
>>> pat, vals = chord_factors(64, factors=2, seed=1)
>>> A = torch.as_tensor(SparseFactors.from_pattern(pat, vals).to_dense())
>>> values, info = lifted_start(A / A.norm(), pat, sweeps=2000)
>>> info["rel_error"] < 1e-8
True
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from sfa_cli.errors import SfaError
from sfa_cli.approximations.sparse_factors import pattern_structures
from sfa_cli.engine.objective import BlockObjective
from sfa_cli.approximations.patterns import Pattern

__all__ = ["lifted_start", "path_count", "MAX_PATHS", "LIFTED_DEFAULTS", "CHECK_EVERY"]

#: The most paths (unknowns of the lifted problem) :func:`lifted_start` takes: 2^22. Its memory is
#: about 24 M bytes a path (estimated from its arrays: two copies and a sort order per inner depth), 0.4 GB
#: at the cap with 4 factors.
MAX_PATHS = 1 << 22
#: Defaults of :func:`lifted_start`.
LIFTED_DEFAULTS = {"sweeps": 10000, "tol": 1e-12, "beta": None, "power_iterations": 2, "window": 20}
#: :func:`lifted_start` measures its progress every this many sweeps.
CHECK_EVERY = 50


def path_count(pattern: Pattern) -> int:
    """N times the product of the factors' non-zeros per row: the lifted problem's unknowns."""
    return pattern.n * math.prod(int(t.shape[1]) for t in pattern.tables)


class _Paths:
    """Index tables of every path of a pattern, on one device."""

    def __init__(self, pattern: Pattern, device):
        n = pattern.n
        self.n, self.ks = n, [int(t.shape[1]) for t in pattern.tables]
        self.tables = [torch.as_tensor(np.array(t, dtype=np.int64), device=device) for t in pattern.tables]
        nodes = torch.arange(n, device=device)
        self.layers = []  # per inner depth m = 1..M-1: (sort order of prefixes by node, group size)
        for m, table in enumerate(self.tables):
            nodes = table[nodes].reshape(-1)  # node at depth m + 1 of every prefix, prefixes in row-major order
            if m + 1 < len(self.tables):
                order = torch.argsort(nodes, stable=True)
                counts = torch.bincount(nodes, minlength=n)
                if bool((counts != counts[0]).any()):
                    raise SfaError("the lifted start needs every node to be reached by as many paths "
                                   f"(factor {m + 1} has columns of unequal counts)")
                self.layers.append((order, int(counts[0])))
        sources = torch.arange(n, device=device).repeat_interleave(nodes.numel() // n)
        # the entries (j0, jM) some path reaches, flat, and each path's index among them
        self.reached, self.entry = torch.unique(sources * n + nodes, return_inverse=True)
        self.count = torch.bincount(self.entry, minlength=self.reached.numel())


def _consistency(T, paths: _Paths, target_reached, inv_count) -> float:
    """Project T on the paths that sum to the target (on the entries they reach); return
    ||residual||_F before the projection."""
    residual = target_reached - torch.bincount(paths.entry, weights=T, minlength=target_reached.numel())
    T += (residual * inv_count)[paths.entry]
    return float(torch.linalg.vector_norm(residual))


def _node_matrices(T, paths: _Paths, m: int) -> torch.Tensor:
    """T's paths grouped by their node at inner depth m: (n, prefixes, suffixes), a copy."""
    order, group = paths.layers[m]
    return T.view(order.numel(), -1)[order].view(paths.n, group, -1)


def _rank_one(T, paths: _Paths, m: int, us: list, power_iterations: int) -> None:
    """Project the layer-m node matrices (prefixes x suffixes) of T on rank one, in place."""
    order, _ = paths.layers[m]
    X = _node_matrices(T, paths, m)
    u = us[m]
    for _ in range(power_iterations):
        v = torch.einsum("ngs,ng->ns", X, u)
        u = torch.einsum("ngs,ns->ng", X, v)
        norm = torch.linalg.vector_norm(u, dim=1, keepdim=True)
        u = torch.where(norm > 0, u / norm.clamp_min(1e-300), us[m])
    us[m] = u
    v = torch.einsum("ngs,ng->ns", X, u)
    T.view(order.numel(), -1)[order] = (u.unsqueeze(2) * v.unsqueeze(1)).view(order.numel(), -1)


def _factors(T, paths: _Paths, us: list) -> list[torch.Tensor]:
    """Read the factors (table order, (n, k) each) off the rank-one node matrices of T."""
    n, M = paths.n, len(paths.ks)
    if M == 1:
        return [T.view(n, paths.ks[0]).clone()]
    suffix = []  # per layer: (n, k(m+1) ... kM), the suffix values at each node
    for m in range(len(paths.layers)):
        suffix.append(torch.einsum("ngs,ng->ns", _node_matrices(T, paths, m), us[m]))
    first = torch.empty_like(us[0]).view(-1)  # prefix (j0, t1) takes its entry of u at node j1
    first[paths.layers[0][0]] = us[0].reshape(-1)
    out = [first.view(n, paths.ks[0])]
    for m in range(1, M - 1):
        here = suffix[m - 1].view(n, paths.ks[m], -1)  # node j at depth m: row t is W(m+1)[j, t] x suffix at next
        nxt = suffix[m][paths.tables[m]]  # (n, k, rest): the suffix at each next node
        sq = (nxt * nxt).sum(-1)
        out.append(torch.where(sq > 0, (here * nxt).sum(-1) / sq.clamp_min(1e-300), torch.zeros_like(sq)))
    out.append(suffix[M - 2].view(n, paths.ks[M - 1]))
    return out


def lifted_start(target: torch.Tensor, pattern: Pattern, *, sweeps: int = LIFTED_DEFAULTS["sweeps"],
                 time_limit: float | None = None, tol: float = LIFTED_DEFAULTS["tol"],
                 beta: float | None = LIFTED_DEFAULTS["beta"], power_iterations: int = LIFTED_DEFAULTS["power_iterations"],
                 window: int = LIFTED_DEFAULTS["window"], max_paths: int = MAX_PATHS, callback=None):
    """Factor values of ``pattern`` whose product approximates ``target``, by the lifted problem.

    Parameters
    ----------
    target : Tensor of shape (n, n)
        Computed in float64 on its device.
    pattern : Pattern
        Every node must be entered by as many paths at each depth (Chord and butterfly are).
    sweeps : int, default=10000
        RAAR iterations (each: one consistency projection, one rank-one projection per inner depth).
    time_limit : float, optional
        Seconds; checked every :data:`CHECK_EVERY` sweeps.
    tol : float, default=1e-12
        Stop when the residual (checked every :data:`CHECK_EVERY` sweeps: the current point made
        rank one at every depth in turn, against the target's entries that paths reach, relative to
        ||target||_F) falls below it.
    beta : float, optional
        RAAR's relaxation (1 is Douglas-Rachford). Default: 0.99 up to 4 factors, 0.995 from 5. At
        N = 64, 0.99 reaches four-factor products that 0.95 and 0.8 do not, and 0.995 five-factor
        ones where 0.99 stalls at 0.076-0.078; 0.995 takes up to 1.9x the sweeps on shallower ones
        (docs/recovery.md).
    power_iterations : int, default=2
        Per sweep and depth, warm-started.
    window : int, default=20
        Stop when the best residual fell by less than 1% over this many checks.
    max_paths : int, default=MAX_PATHS
        Refuse patterns with more paths (:func:`path_count`) than this.
    callback : callable, optional
        ``callback(sweep, residual)`` at every check; returning True stops (``callback``).

    Returns
    -------
    values : list of Tensor
        One 1-D tensor per factor, in CSR order (:meth:`sfa_cli.approximations.kernels.FactorStructure.from_table`),
        float64, on the target's device.
    info : dict
        ``sweeps``, ``seconds``, ``residual`` (the best checked residual, whose point gives the factors),
        ``rel_error`` (of the returned factors' product), ``stopped_because`` (``tol``,
        ``sweeps``, ``time_limit``, ``stalled``, ``callback``, ``interrupted``: Ctrl-C) and ``paths``.
    """
    t0 = time.perf_counter()
    paths_total = path_count(pattern)
    if paths_total > max_paths:
        raise SfaError(f"the lifted start needs one unknown per path, N x k^M = {paths_total:,} here, more than "
                       f"{max_paths:,}; take fewer factors (--factors) or another start")
    device = target.device
    A = target.to(torch.float64)
    norm = float(torch.linalg.vector_norm(A))
    if norm == 0.0:
        raise SfaError("the matrix is all zeros; there is nothing to approximate")
    paths = _Paths(pattern, device)
    A_reached = A.reshape(-1)[paths.reached]
    inv_count = 1.0 / paths.count.to(torch.float64)
    layers = len(paths.layers)

    def fresh_state():
        return [torch.full((pattern.n, g), 1.0 / math.sqrt(g), dtype=torch.float64, device=device)
                for _, g in paths.layers]

    def consistent(X):  # the projection on {every copy equal, paths summing to A}: a copy's value
        T = X.mean(0)
        _consistency(T, paths, A_reached, inv_count)
        return T

    def product_like(T, state):  # T made rank one at every depth in turn; its consistency residual
        W = T.clone()
        for m in range(layers):
            _rank_one(W, paths, m, state, power_iterations)
        return W, float(torch.linalg.vector_norm(
            A_reached - torch.bincount(paths.entry, weights=W, minlength=A_reached.numel()))) / norm

    # RAAR in the product space: one copy of the paths per depth (Luke 2005)
    X = torch.zeros(max(layers, 1), paths.entry.numel(), dtype=torch.float64, device=device)
    us, watch = fresh_state(), fresh_state()
    best = (math.inf, None, None)
    if beta is None:
        beta = 0.99 if pattern.factors <= 4 else 0.995
    residuals, stopped, sweep = [], "sweeps", 0
    try:
        for sweep in range(1, sweeps + 1):
            T = consistent(X)
            Z = 2.0 * T - X
            for m in range(layers):
                _rank_one(Z[m], paths, m, us, power_iterations)
            X.mul_(beta).add_(Z, alpha=beta).add_(T, alpha=1.0 - 2.0 * beta)
            if sweep % CHECK_EVERY and sweep != sweeps:
                continue
            W, residual = product_like(consistent(X), watch)
            residuals.append(residual)
            if residual < best[0]:
                best = (residual, W, [u.clone() for u in watch])
            if residual <= tol:
                stopped = "tol"
                break
            if callback is not None and callback(sweep, residual):
                stopped = "callback"
                break
            if len(residuals) > window and min(residuals[-window:]) > 0.99 * min(residuals[:-window]):
                stopped = "stalled"
                break
            if time_limit is not None and time.perf_counter() - t0 >= time_limit:
                stopped = "time_limit"
                break
    except KeyboardInterrupt:  # Ctrl-C: the best point checked so far
        stopped = "interrupted"
    if best[1] is None:
        W, residual = product_like(consistent(X), watch)
        best = (residual, W, watch)
    residual, T, us = best
    table_values = _factors(T, paths, us)
    structs, orders = pattern_structures(pattern, device)
    values = [v.reshape(-1)[torch.as_tensor(o, device=device)] for v, o in zip(table_values, orders)]
    err = math.sqrt(2.0 * BlockObjective(structs, A).loss(values)) / norm
    return values, {"sweeps": sweep, "seconds": time.perf_counter() - t0, "residual": residual,
                    "rel_error": err, "stopped_because": stopped, "paths": paths_total}
