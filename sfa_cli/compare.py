"""Run every method at the same parameter budget and measure their errors.

A sparse matrix with n above :data:`SCALE_ABOVE` is compared *at scale*:
nothing n x n is formed. Chord and butterfly are fitted by the sampled fit
(:func:`sfa_cli.sampled.fit_sampled`), tsvd by ``svds`` and rsvd by
``torch.svd_lowrank`` on the sparse matrix, topk keeps the sparse matrix
(itself when nnz <= budget), and the methods that need dense n x n work are
reported as not applicable with the reason. Every method's error is then an
estimate from the same seeded column sample (:func:`sfa_cli.sampled.error_report`),
with its confidence interval.

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

from sfa_cli import baselines, learned, sampled
from sfa_cli.approximation import Approximation
from sfa_cli.errors import NotApplicable, SfaError
from sfa_cli.fit import DENSE_FIT_LIMIT, fit
from sfa_cli.patterns import butterfly_at_budget, chord_at_budget, chord_budget, resolve_budget
from sfa_cli.sampled import SAMPLED_DEFAULTS, error_report, fit_sampled

__all__ = ["compare", "run_method", "resolve_budget", "chord_at_budget", "METHODS", "METHOD_OPTIONS", "MethodResult",
           "Comparison", "SCALE_ABOVE", "DENSE_ONLY"]

#: A sparse matrix with n above this is compared at scale (nothing n x n is formed, errors are
#: estimated from a column sample); read at call time, so tests may lower it.
SCALE_ABOVE = DENSE_FIT_LIMIT
#: Methods that need dense n x n work, and why: not run at scale.
DENSE_ONLY = {
    "monarch": "reads all n^2 entries of A as dense blocks",
    "lowrank+sparse": "reads all n^2 entries of A - L",
    "sparse": "keeps dense n x n residuals",
    "chord+sparse": "needs all n^2 entries of A - P",
}
#: Options of the full-batch fit that the sampled fit does not take (it uses Adam with its own schedule).
_FULL_FIT_ONLY = ("optimizer", "max_iter", "tol")


def _fit_at(A, pattern, options, note, seed, fit_options, scale, sampled_options):
    """The full-batch fit, or at scale the sampled fit (its note says with how many epochs)."""
    if scale:
        run = {k: v for k, v in fit_options.items() if k not in _FULL_FIT_ONLY}
        result = fit_sampled(A, pattern=pattern, seed=seed, **options, **run, **(sampled_options or {}))
        epochs = f"{result.epochs} epoch" + ("s" if result.epochs != 1 else "")
        done = f"sampled fit, {epochs} x {result.batch_columns} columns"
        note = f"{done}; {note}" if note else done
    else:
        result = fit(A, pattern=pattern, seed=seed, **options, **fit_options)
    if result.interrupted:
        raise KeyboardInterrupt
    return result.approximation, note


def _chord(A, budget, *, seed=0, fit_options=None, scale=False, sampled_options=None, **_):
    fit_options = dict(fit_options or {})
    variant = {k: fit_options[k] for k in ("symmetric", "self_link") if fit_options.get(k) is not None}
    options, note = chord_at_budget(A.shape[0], budget, **variant)
    return _fit_at(A, "chord", options, note, seed, fit_options, scale, sampled_options)


def _butterfly(A, budget, *, seed=0, fit_options=None, scale=False, sampled_options=None, **_):
    sizes, note = butterfly_at_budget(A.shape[0], budget)
    options = {k: v for k, v in (fit_options or {}).items() if k not in ("base", "symmetric", "self_link", "permute")}
    return _fit_at(A, "butterfly", sizes, note, seed, options, scale, sampled_options)


def _learned(function):
    def run(A, budget, *, seed=0, fit_options=None, scale=False, sampled_options=None, **options):
        approx = function(A, budget, seed=seed, fit_options=fit_options, **options)
        return approx, approx.info.get("note", "")

    run.__doc__ = function.__doc__
    return run


def _baseline(function):
    def run(A, budget, *, seed=0, **_):
        return function(A, budget, seed=seed), ""

    run.__doc__ = function.__doc__
    return run


def _tsvd(A, budget, *, seed=0, scale=False, **_):
    """Truncated SVD; at scale by svds on the (sparse) matrix."""
    if scale:
        return baselines.truncated_svd(A, budget, seed=seed, solver="svds"), "svds on the sparse matrix"
    return baselines.truncated_svd(A, budget, seed=seed), ""


def _rsvd(A, budget, *, seed=0, scale=False, **_):
    """Randomized SVD; at scale torch.svd_lowrank on the sparse tensor."""
    return baselines.randomized_svd(A, budget, seed=seed, keep_sparse=scale), ""


#: name -> callable(A, budget, *, seed, fit_options, scale, sampled_options, **options) -> (Approximation, note)
METHODS = {
    "chord": _chord,
    "butterfly": _butterfly,
    "tsvd": _tsvd,
    "rsvd": _rsvd,
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


@dataclass(frozen=True)
class MethodResult:
    """One method's outcome at one budget.

    ``rel_error`` is exact, or with ``rel_error_is_estimate`` the estimate from
    ``sample_columns`` sampled columns, with its interval ``rel_error_ci``.
    """

    method: str
    budget: int
    params: int | None
    rel_error: float | None
    seconds: float
    status: str  # "ok", "not applicable" or "failed"
    note: str = ""
    approximation: Approximation | None = field(default=None, repr=False, compare=False)
    rel_error_is_estimate: bool = False
    rel_error_ci: tuple | None = None
    sample_columns: int | None = None

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "params": self.params,
            "rel_error": self.rel_error,
            "rel_error_is_estimate": self.rel_error_is_estimate,
            "rel_error_estimate": self.rel_error if self.rel_error_is_estimate else None,
            "rel_error_ci": list(self.rel_error_ci) if self.rel_error_ci is not None else None,
            "sample_columns": self.sample_columns,
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
    scale: bool = False
    error: dict = field(default_factory=lambda: {"estimate": False})

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
        measured = ""
        if self.error.get("estimate"):
            measured = f"estimates on the same {self.error['sample_columns']} sampled columns"
        if not others:
            return f"{best.method}: relative error {best.rel_error:.4g}" + (f" ({measured})" if measured else "")
        second = min(others, key=lambda r: r.rel_error)
        ratio = second.rel_error / best.rel_error if best.rel_error > 0 else math.inf
        return (
            f"{best.method} wins: relative error {best.rel_error:.4g} against {second.rel_error:.4g} "
            f"for {second.method} ({ratio:.2f}x{'; ' + measured if measured else ''})"
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
            "at_scale": self.scale,
            "rel_error_is_estimate": bool(self.error.get("estimate")),
            # as in `sfa fit --sampled`: the sample's column count (None: exact errors), its seed and level
            "error_sample": self.error.get("sample_columns"),
            "confidence": self.error.get("confidence"),
            "seed": self.error.get("seed"),
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
    scale: bool | None = None,
    sampled_options: dict | None = None,
    exact_error: bool | None = None,
    error_sample: int = SAMPLED_DEFAULTS["error_sample"],
    confidence: float = SAMPLED_DEFAULTS["confidence"],
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
        Seeds the methods and the error sample.
    fit_options : dict, optional
        Options of :func:`sfa_cli.fit.fit` for the fitted methods (max_iter, time_limit, device, ...);
        at scale those the sampled fit takes (lr, time_limit, device, dtype, pattern variants).
    keep : bool, default=False
        Keep every approximation in its MethodResult (for saving).
    callback : callable, optional
        ``callback(method, budget)`` before each method runs.
    method_options : dict, optional
        ``{method: {option: value}}``, options of one method (see METHOD_OPTIONS),
        e.g. ``{"sparse": {"order": "hierarchical", "factors": 3}}``.
    scale : bool, optional
        Compare at scale (see the module docstring); None: when A is sparse and n > SCALE_ABOVE.
    sampled_options : dict, optional
        ``epochs``, ``batch_columns`` of :func:`sfa_cli.sampled.fit_sampled` at scale.
    exact_error : bool, optional
        True: exact errors (streaming over all columns); False: estimates from
        ``error_sample`` seeded columns, the same columns for every method; None:
        exact up to n = EXACT_ERROR_UP_TO unless at scale.
    error_sample : int, default=1024
        Columns of the error sample (also the sampled fit's).
    confidence : float, default=0.95
        Level of the intervals ``rel_error_ci``.
    """
    methods = check_methods(methods)
    method_options = _check_method_options(method_options)
    n = A.shape[0]
    budgets = [resolve_budget(n, b) for b in (sweep if sweep else [budget])]
    nnz = int(A.nnz if sp.issparse(A) else np.count_nonzero(A))
    if scale is None:
        scale = sp.issparse(A) and n > SCALE_ABOVE
    if exact_error is None:
        exact_error = not scale and n <= sampled.EXACT_ERROR_UP_TO
    fit_options = dict(fit_options or {})
    sampled_options = dict(sampled_options or {})
    if scale:
        sampled_options.setdefault("error_sample", error_sample)
    measure = _measure(seed, exact_error, error_sample, confidence)
    results = []
    for b in budgets:
        for name in methods:
            if callback is not None:
                callback(name, b)
            results.append(_run_method(A, name, b, seed, fit_options, keep, scale, sampled_options, measure,
                                       method_options.get(name)))
    error = {"estimate": any(r.rel_error_is_estimate for r in results), "seed": int(seed)}
    if error["estimate"]:
        error.update(sample_columns=min(int(error_sample), n), confidence=confidence)
    return Comparison(n=n, nnz=nnz, budgets=budgets, results=results, scale=bool(scale), error=error)


def _measure(seed, exact_error, sample=SAMPLED_DEFAULTS["error_sample"], confidence=SAMPLED_DEFAULTS["confidence"]):
    """How _run_method measures errors: error_report's options."""
    return {"exact_error": bool(exact_error), "sample": sample, "seed": seed, "confidence": confidence}


def run_method(A, method: str, budget: float | int | None = None, *, seed: int = 0, fit_options: dict | None = None,
               options: dict | None = None) -> MethodResult:
    """Run one method of METHODS at a budget, as :func:`compare` does, keeping its approximation.

    ``budget`` as in :func:`resolve_budget`; ``options`` the method's own options
    (METHOD_OPTIONS). A method that does not apply gives status "not applicable"
    and the reason in ``note``; MethodResult.approximation holds the result otherwise.
    """
    check_methods([method])
    options = _check_method_options({method: options or {}})[method]
    return _run_method(A, method, resolve_budget(A.shape[0], budget), seed, fit_options, True, options=options)


def _check_method_options(method_options) -> dict:
    method_options = dict(method_options or {})
    for name, opts in method_options.items():
        check_methods([name])
        unknown = [k for k in (opts or {}) if k not in METHOD_OPTIONS.get(name, ())]
        if unknown:
            allowed = ", ".join(METHOD_OPTIONS.get(name, ())) or "none"
            raise SfaError(f"method {name} has no option {unknown[0]!r} (its options: {allowed})")
    return {name: dict(opts or {}) for name, opts in method_options.items()}


def _run_method(A, name, budget, seed, fit_options, keep, scale=False, sampled_options=None, measure=None,
                options=None) -> MethodResult:
    t0 = time.perf_counter()
    if scale and name in DENSE_ONLY:
        return MethodResult(name, budget, None, None, 0.0, "not applicable",
                            f"{DENSE_ONLY[name]}; not run at scale")
    try:
        approx, note = METHODS[name](A, budget, seed=seed, fit_options=fit_options, scale=scale,
                                     sampled_options=sampled_options, **(options or {}))
    except NotApplicable as exc:
        return MethodResult(name, budget, None, None, time.perf_counter() - t0, "not applicable", str(exc))
    except MemoryError:
        return MethodResult(name, budget, None, None, time.perf_counter() - t0, "failed", "out of memory")
    seconds = time.perf_counter() - t0
    if approx.params > budget:  # a method that overspends is a bug; never report it as a win
        raise SfaError(f"method {name} used {approx.params} parameters > budget {budget}")
    if measure is None:  # as compare() measures by default
        measure = _measure(seed, A.shape[0] <= sampled.EXACT_ERROR_UP_TO)
    error = error_report(A, approx, exact_error=measure["exact_error"], sample=measure["sample"], seed=measure["seed"],
                         confidence=measure["confidence"])
    note = note or approx.info.get("note", "")
    return MethodResult(name, budget, approx.params, error["rel_error"], seconds, "ok", note, approx if keep else None,
                        rel_error_is_estimate=error["rel_error_is_estimate"],
                        rel_error_ci=tuple(error["rel_error_ci"]) if "rel_error_ci" in error else None,
                        sample_columns=error.get("sample_columns"))
