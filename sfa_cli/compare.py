"""Run every method at the same parameter budget and measure their errors.

Example
-------
>>> import numpy as np
>>> from sfa_cli.compare import compare
>>> A = np.random.default_rng(0).standard_normal((32, 32))
>>> c = compare(A, methods=["tsvd", "topk"])
>>> [r.method for r in c.results], c.budget["params"]
(['tsvd', 'topk'], 960)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from sfa_cli import baselines, learned
from sfa_cli.approximation import Approximation
from sfa_cli.errors import SfaError
from sfa_cli.fit import fit
from sfa_cli.metrics import relative_error
from sfa_cli.patterns import _ceil_log, chord_budget, chord_offsets

__all__ = ["compare", "run_method", "resolve_budget", "chord_at_budget", "METHODS", "METHOD_OPTIONS", "MethodResult",
           "Comparison"]


def chord_at_budget(n: int, budget: int, *, symmetric: bool = False, self_link: bool = True) -> tuple[dict, str]:
    """Chord pattern options that fit in ``budget`` parameters, and a note saying which.

    The paper's pattern (base 2, ceil(log2 n) factors) when it fits; otherwise
    the smallest base whose full-reach pattern fits; otherwise fewer base-2 factors.
    """

    def row_nnz(base):
        return len(chord_offsets(n, base, symmetric=symmetric, self_link=self_link))

    full = _ceil_log(n, 2) * n * row_nnz(2)
    if full <= budget:
        return {"base": 2, "factors": _ceil_log(n, 2)}, ""
    for base in range(3, n + 1):
        M = _ceil_log(n, base)
        if M * n * row_nnz(base) <= budget:
            return {"base": base, "factors": M}, f"base {base}, {M} factors: the base-2 pattern needs {full} > budget"
        if M == 1:
            break
    M = budget // (n * row_nnz(2))
    if M < 1:
        raise baselines.NotApplicable(f"one Chord factor needs {n * row_nnz(2)} parameters > budget {budget}")
    return {"base": 2, "factors": M}, f"{M} of {_ceil_log(n, 2)} factors: the full pattern needs {full} > budget"


def _chord(A, budget, *, seed=0, fit_options=None, **_):
    fit_options = dict(fit_options or {})
    variant = {k: fit_options[k] for k in ("symmetric", "self_link") if fit_options.get(k) is not None}
    options, note = chord_at_budget(A.shape[0], budget, **variant)
    result = fit(A, pattern="chord", seed=seed, **options, **fit_options)
    if result.interrupted:
        raise KeyboardInterrupt
    return result.approximation, note


def _butterfly(A, budget, *, seed=0, fit_options=None, **_):
    n = A.shape[0]
    if n & (n - 1):
        raise baselines.NotApplicable(f"butterfly needs n to be a power of two; n={n}")
    L = n.bit_length() - 1
    M = min(L, budget // (2 * n))
    if M < 1:
        raise baselines.NotApplicable(f"one butterfly factor needs {2 * n} parameters > budget {budget}")
    note = "" if M == L else f"{M} of {L} factors: the full butterfly needs {2 * n * L} > budget"
    options = {k: v for k, v in (fit_options or {}).items() if k not in ("base", "symmetric", "self_link", "permute")}
    result = fit(A, pattern="butterfly", factors=M, seed=seed, **options)
    if result.interrupted:
        raise KeyboardInterrupt
    return result.approximation, note


def _learned(function):
    def run(A, budget, *, seed=0, fit_options=None, **options):
        approx = function(A, budget, seed=seed, fit_options=fit_options, **options)
        return approx, approx.info.get("note", "")

    run.__doc__ = function.__doc__
    return run


def _baseline(function):
    def run(A, budget, *, seed=0, **_):
        return function(A, budget, seed=seed), ""

    run.__doc__ = function.__doc__
    return run


#: name -> callable(A, budget, *, seed, fit_options, **options) -> (Approximation, note)
METHODS = {
    "chord": _chord,
    "butterfly": _butterfly,
    "tsvd": _baseline(baselines.truncated_svd),
    "rsvd": _baseline(baselines.randomized_svd),
    "topk": _baseline(baselines.top_k),
    "monarch": _baseline(baselines.monarch),
    "lowrank+sparse": _baseline(baselines.lowrank_plus_sparse),
    "sparse": _learned(learned.learned_sparse),
    "chord+sparse": _learned(learned.chord_plus_sparse),
}


#: The method options (beyond seed and fit_options) each method takes, passed by ``compare(method_options=...)``.
METHOD_OPTIONS = {"sparse": ("order", "factors")}


def check_methods(methods) -> list[str]:
    """Validate method names against the registry (the error lists the choices)."""
    methods = list(METHODS) if not methods else list(methods)
    for m in methods:
        if m not in METHODS:
            raise SfaError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return methods


def resolve_budget(n: int, budget: float | int | None = None) -> int:
    """Parameters allowed: the Chord budget by default; a value < 1 is a fraction of n^2."""
    if budget is None:
        return chord_budget(n)["params"]
    budget = float(budget)
    if budget <= 0:
        raise SfaError(f"the budget must be positive; got {budget:g}")
    if budget < 1:
        return max(1, int(math.floor(budget * n * n)))
    if budget != int(budget):
        raise SfaError(f"a budget >= 1 is a parameter count and must be an integer; got {budget:g}")
    return int(budget)


@dataclass(frozen=True)
class MethodResult:
    """One method's outcome at one budget."""

    method: str
    budget: int
    params: int | None
    rel_error: float | None
    seconds: float
    status: str  # "ok", "not applicable" or "failed"
    note: str = ""
    approximation: Approximation | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "params": self.params,
            "rel_error": self.rel_error,
            "seconds": self.seconds,
            "status": self.status,
            "note": self.note,
        }


@dataclass(frozen=True)
class Comparison:
    """All methods on one matrix, at one or several budgets."""

    n: int
    nnz: int
    budgets: list
    results: list

    @property
    def budget(self) -> dict:
        params = self.budgets[0]
        return {"params": params, "fraction": params / self.n**2, "chord_default": chord_budget(self.n)["params"]}

    def best(self, budget: int | None = None) -> MethodResult | None:
        """The lowest-error method at a budget (the first budget by default)."""
        budget = self.budgets[0] if budget is None else budget
        ok = [r for r in self.results if r.status == "ok" and r.budget == budget]
        return min(ok, key=lambda r: r.rel_error) if ok else None

    def verdict(self, budget: int | None = None) -> str:
        """One line saying which method wins and by how much."""
        budget = self.budgets[0] if budget is None else budget
        best = self.best(budget)
        if best is None:
            return "no method ran successfully"
        if best.rel_error <= 1e-12:
            if best.method == "topk":
                return f"topk is exact: the matrix has {self.nnz} non-zeros, no more than the budget {budget}"
            return f"{best.method} is exact at this budget"
        others = [r for r in self.results if r.status == "ok" and r.budget == budget and r.method != best.method]
        if not others:
            return f"{best.method}: relative error {best.rel_error:.4g}"
        second = min(others, key=lambda r: r.rel_error)
        ratio = second.rel_error / best.rel_error if best.rel_error > 0 else math.inf
        return (
            f"{best.method} wins: relative error {best.rel_error:.4g} against {second.rel_error:.4g} "
            f"for {second.method} ({ratio:.2f}x)"
        )

    def to_dict(self) -> dict:
        best = self.best()
        out = {
            "n": self.n,
            "nnz": self.nnz,
            "budget": self.budget,
            "results": [r.to_dict() for r in self.results],
            "best": best.method if best else None,
            "verdict": self.verdict(),
        }
        if len(self.budgets) > 1:
            out["sweep"] = [
                {"budget": b, "best": (self.best(b).method if self.best(b) else None)} for b in self.budgets
            ]
        return out


def compare(
    A,
    *,
    methods=None,
    budget: float | int | None = None,
    sweep=None,
    seed: int = 0,
    fit_options: dict | None = None,
    keep: bool = False,
    callback=None,
    method_options: dict | None = None,
) -> Comparison:
    """Run methods at an equal parameter budget and measure their relative errors.

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
    methods : list of str, optional
        Names from METHODS (default: all of them).
    budget : int or float, optional
        Parameter count, or a fraction of n^2 when below 1; default the Chord budget.
    sweep : list of int or float, optional
        Several budgets (overrides ``budget``): an error-versus-parameters curve.
    seed : int, default=0
    fit_options : dict, optional
        Options of :func:`sfa_cli.fit.fit` for the fitted methods (max_iter, time_limit, device, ...).
    keep : bool, default=False
        Keep every approximation in its MethodResult (for saving).
    callback : callable, optional
        ``callback(method, budget)`` before each method runs.
    method_options : dict, optional
        ``{method: {option: value}}``, options of one method (see METHOD_OPTIONS),
        e.g. ``{"sparse": {"order": "hierarchical", "factors": 3}}``.
    """
    methods = check_methods(methods)
    method_options = _check_method_options(method_options)
    n = A.shape[0]
    budgets = [resolve_budget(n, b) for b in (sweep if sweep else [budget])]
    nnz = int(A.nnz if sp.issparse(A) else np.count_nonzero(A))
    results = []
    for b in budgets:
        for name in methods:
            if callback is not None:
                callback(name, b)
            results.append(_run_method(A, name, b, seed, fit_options, keep, method_options.get(name)))
    return Comparison(n=n, nnz=nnz, budgets=budgets, results=results)


def run_method(A, method: str, budget: float | int | None = None, *, seed: int = 0, fit_options: dict | None = None,
               options: dict | None = None) -> MethodResult:
    """Run one method of METHODS at a budget, as :func:`compare` does, keeping its approximation.

    ``budget`` as in :func:`resolve_budget`; ``options`` the method's own options
    (METHOD_OPTIONS). A method that does not apply gives status "not applicable"
    and the reason in ``note``; MethodResult.approximation holds the result otherwise.
    """
    check_methods([method])
    options = _check_method_options({method: options or {}})[method]
    return _run_method(A, method, resolve_budget(A.shape[0], budget), seed, fit_options, True, options)


def _check_method_options(method_options) -> dict:
    method_options = dict(method_options or {})
    for name, opts in method_options.items():
        check_methods([name])
        unknown = [k for k in (opts or {}) if k not in METHOD_OPTIONS.get(name, ())]
        if unknown:
            allowed = ", ".join(METHOD_OPTIONS.get(name, ())) or "none"
            raise SfaError(f"method {name} has no option {unknown[0]!r} (its options: {allowed})")
    return {name: dict(opts or {}) for name, opts in method_options.items()}


def _run_method(A, name, budget, seed, fit_options, keep, options=None) -> MethodResult:
    t0 = time.perf_counter()
    try:
        approx, note = METHODS[name](A, budget, seed=seed, fit_options=fit_options, **(options or {}))
    except baselines.NotApplicable as exc:
        return MethodResult(name, budget, None, None, time.perf_counter() - t0, "not applicable", str(exc))
    except MemoryError:
        return MethodResult(name, budget, None, None, time.perf_counter() - t0, "failed", "out of memory")
    seconds = time.perf_counter() - t0
    if approx.params > budget:  # a method that overspends is a bug; never report it as a win
        raise SfaError(f"method {name} used {approx.params} parameters > budget {budget}")
    error = relative_error(A, approx)
    note = note or approx.info.get("note", "")
    return MethodResult(name, budget, approx.params, error, seconds, "ok", note, approx if keep else None)
