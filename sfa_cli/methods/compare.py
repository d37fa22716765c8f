"""Run every method at the same parameter budget and measure their errors.

A matrix (sparse or dense) with n above :data:`SCALE_ABOVE` is compared *at scale*:
nothing n x n is formed. Chord and butterfly are fitted by the sampled fit
(:func:`sfa_cli.engine.sampled.fit_sampled`), tsvd by ``svds`` and rsvd by
``torch.svd_lowrank`` on the sparse matrix, topk keeps the sparse matrix
(itself when nnz <= budget), and the methods that need dense n x n work are
reported as not applicable with the reason. Every method's error is then an
estimate from the same seeded column sample (:func:`sfa_cli.engine.sampled.error_report`),
with its confidence interval.

Example
-------
>>> import numpy as np
>>> from sfa_cli.methods.compare import compare
>>> A = np.random.default_rng(0).standard_normal((32, 32))
>>> c = compare(A, methods=["tsvd", "topk"])
>>> [r.method for r in c.results], c.budget["params"]
(['tsvd', 'topk'], 960)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


from sfa_cli import limits
from sfa_cli.approximations.base import Approximation
from sfa_cli.errors import NotApplicable, SfaError
from sfa_cli.metrics import never_worse_than_zero
from sfa_cli.validation import count_nonzero, validates_matrix
from sfa_cli.approximations.patterns import chord_at_budget, chord_budget, resolve_budget
from sfa_cli.methods.runs import reporting_steps, shared_fits
from sfa_cli.methods.registry import METHODS as RECORDS
from sfa_cli.methods.registry import check_methods, method_record
from sfa_cli.engine.sampled import EXACT_ERROR_UP_TO, SAMPLED_DEFAULTS, error_report

__all__ = ["compare", "run_method", "resolve_budget", "chord_at_budget", "METHODS", "MethodResult", "Comparison",
           "SCALE_ABOVE", "DENSE_ONLY", "TIE", "check_methods"]

#: A sparse matrix with n above this is compared at scale (nothing n x n is formed, errors are
#: estimated from a column sample); read at call time, so tests may lower it.
SCALE_ABOVE = limits.SCALE_ABOVE  # the one definition is in sfa_cli/limits.py
#: Methods that need dense n x n work, and why: not run at scale (from the registry).
DENSE_ONLY = {name: r.dense_only for name, r in RECORDS.items() if r.dense_only}
#: Two errors within this factor of each other are a tie, not a win.
TIE = 1.01


def _legacy(record):
    """``METHODS[name](A, budget, *, seed, fit_options, scale, sampled_options, **options)``, the
    signature before the registry, for scripts that call a method directly."""

    def run(A, budget, *, seed=0, fit_options=None, scale=False, sampled_options=None, **options):
        return record.run(A, budget, seed=seed, options=_options_for(record, fit_options, options), scale=scale,
                          schedule=sampled_options)

    run.__doc__ = record.description
    return run


#: name -> callable, the registry's functions with the signature scripts used before it existed.
METHODS = {name: _legacy(record) for name, record in RECORDS.items()}


def _options_for(record, fit_options: dict | None, own: dict | None) -> dict:
    """The shared options the method takes (None values dropped) and its own options, checked."""
    shared = {k: v for k, v in (fit_options or {}).items() if v is not None and k in record.shared}
    return {**shared, **record.check_options(own)}


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
        """One line saying which method wins at a budget (the first by default) and by how much.

        Errors within 1% of each other (:data:`TIE`) are called a tie, not a win.
        """
        budget = self.budgets[0] if budget is None else budget
        best = self.best(budget)
        if best is None:
            return "no method ran successfully"
        if best.rel_error <= 1e-12:
            if best.method == "topk":
                return f"topk is exact: the matrix has {self.nnz} non-zeros, no more than the budget {budget}"
            return f"{best.method} is exact at this budget"
        others = sorted((r for r in self.results if r.status == "ok" and r.budget == budget and r is not best),
                        key=lambda r: r.rel_error)
        measured = ""
        if self.error.get("estimate"):
            measured = f"estimates on the same {self.error['sample_columns']} sampled columns"
        if not others:
            return f"{best.method}: relative error {best.rel_error:.4g}" + (f" ({measured})" if measured else "")
        tied = [r for r in others if r.rel_error <= best.rel_error * TIE]
        if tied:
            names = ", ".join([best.method] + [r.method for r in tied])
            return (f"tie within 1%: {names} at relative error {best.rel_error:.4g}"
                    + (f" ({measured})" if measured else ""))
        second = others[0]
        ratio = second.rel_error / best.rel_error if best.rel_error > 0 else math.inf
        return (
            f"{best.method} wins: relative error {best.rel_error:.4g} against {second.rel_error:.4g} "
            f"for {second.method} ({ratio:.2f}x{'; ' + measured if measured else ''})"
        )

    def verdicts(self) -> list[str]:
        """One verdict per budget, and with several budgets a last line saying where the winner changes."""
        if len(self.budgets) == 1:
            return [self.verdict()]
        lines = [f"budget {b}: {self.verdict(b)}" for b in self.budgets]
        winners = [(b, self.best(b).method if self.best(b) else None) for b in self.budgets]
        changes = [f"{prev[1]} -> {cur[1]} at budget {cur[0]}" for prev, cur in zip(winners, winners[1:])
                   if prev[1] != cur[1]]
        lines.append("the winner changes: " + "; ".join(changes) if changes else
                     f"the same method wins at every budget: {winners[0][1]}")
        return lines

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
                {"budget": b, "best": (self.best(b).method if self.best(b) else None), "verdict": self.verdict(b)}
                for b in self.budgets
            ]
        return out


@validates_matrix
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
    result_callback=None,
    step_callback=None,
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
        Names from the registry, :data:`sfa_cli.methods.registry.METHODS` (default: all of them).
    budget : int or float, optional
        Parameter count, or a fraction of n^2 when below 1; default the Chord budget.
    sweep : list of int or float, optional
        Several budgets (overrides ``budget``): an error-versus-parameters curve.
    seed : int, default=0
        Seeds the methods and the error sample.
    fit_options : dict, optional
        Options of :func:`sfa_cli.engine.fit.fit` for the fitted methods (max_iter, time_limit, device, ...);
        at scale those the sampled fit takes (lr, time_limit, device, dtype, pattern variants).
    keep : bool, default=False
        Keep every approximation in its MethodResult (for saving).
    callback : callable, optional
        ``callback(method, budget)`` before each method runs.
    result_callback : callable, optional
        ``result_callback(result: MethodResult)`` after each method ran (progress: its error and time).
    step_callback : callable, optional
        ``step_callback(method, step: FitStep)`` after every evaluation of the long methods' fits
        (chord, butterfly's polish, chord+sparse): progress while they run.
    method_options : dict, optional
        ``{method: {option: value}}``, options of one method (``MethodRecord.own`` in the registry),
        e.g. ``{"sparse": {"order": "hierarchical", "factors": 3}}``.
    scale : bool, optional
        Compare at scale (see the module docstring); None: when n > SCALE_ABOVE (sparse or dense).
    sampled_options : dict, optional
        ``epochs``, ``batch_columns`` of :func:`sfa_cli.engine.sampled.fit_sampled` at scale.
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
    method_options = {name: dict(opts or {}) for name, opts in (method_options or {}).items()}
    for name, opts in method_options.items():
        method_record(name).check_options(opts)
    n = A.shape[0]
    budgets = [resolve_budget(n, b) for b in (sweep if sweep else [budget])]
    nnz = count_nonzero(A)
    if scale is None:
        scale = n > SCALE_ABOVE
    if exact_error is None:
        exact_error = not scale and n <= EXACT_ERROR_UP_TO
    sampled_options = dict(sampled_options or {})
    if scale:
        sampled_options.setdefault("error_sample", error_sample)
    measure = _measure(seed, exact_error, error_sample, confidence)
    results = []
    with shared_fits():
        _run_all(A, budgets, methods, seed, fit_options, method_options, keep, scale, sampled_options, measure,
                 callback, result_callback, step_callback, results)
    error = {"estimate": any(r.rel_error_is_estimate for r in results), "seed": int(seed)}
    if error["estimate"]:
        error.update(sample_columns=min(int(error_sample), n), confidence=confidence)
    return Comparison(n=n, nnz=nnz, budgets=budgets, results=results, scale=bool(scale), error=error)



def _run_all(A, budgets, methods, seed, fit_options, method_options, keep, scale, sampled_options, measure, callback,
             result_callback, step_callback, results) -> None:
    """Every method at every budget, in order, appended to ``results``."""
    for b in budgets:
        for name in methods:
            if callback is not None:
                callback(name, b)
            steps = None if step_callback is None else (lambda step, name=name: step_callback(name, step))
            with reporting_steps(steps):
                results.append(_run_method(A, name, b, seed, _options_for(RECORDS[name], fit_options,
                                                                           method_options.get(name)),
                                           keep, scale, sampled_options, measure))
            if result_callback is not None:
                result_callback(results[-1])


def _measure(seed, exact_error, sample=SAMPLED_DEFAULTS["error_sample"], confidence=SAMPLED_DEFAULTS["confidence"]):
    """How _run_method measures errors: error_report's options."""
    return {"exact_error": bool(exact_error), "sample": sample, "seed": seed, "confidence": confidence}


@validates_matrix
def run_method(A, method: str, budget: float | int | None = None, *, seed: int = 0, fit_options: dict | None = None,
               options: dict | None = None, scale: bool = False, sampled_options: dict | None = None) -> MethodResult:
    """Run one method of the registry at a budget, as :func:`compare` does, keeping its approximation.

    ``budget`` as in :func:`sfa_cli.approximations.patterns.resolve_budget`; ``fit_options`` the shared fitting
    options (those the method does not take are ignored); ``options`` the method's own options
    (``MethodRecord.own``). A method that does not apply gives status "not applicable" and the
    reason in ``note``; MethodResult.approximation holds the result otherwise.
    """
    record = method_record(method)
    measure = _measure(seed, not scale and A.shape[0] <= EXACT_ERROR_UP_TO)
    return _run_method(A, method, resolve_budget(A.shape[0], budget), seed, _options_for(record, fit_options, options),
                       True, scale, sampled_options, measure)


def _run_method(A, name, budget, seed, options, keep, scale=False, sampled_options=None, measure=None) -> MethodResult:
    t0 = time.perf_counter()
    record = RECORDS[name]
    if scale and record.dense_only:
        return MethodResult(name, budget, None, None, 0.0, "not applicable", f"{record.dense_only}; not run at scale")
    try:
        approx, note = record.run(A, budget, seed=seed, options=options, scale=scale, schedule=sampled_options)
    except NotApplicable as exc:
        return MethodResult(name, budget, None, None, time.perf_counter() - t0, "not applicable", str(exc))
    except MemoryError:
        return MethodResult(name, budget, None, None, time.perf_counter() - t0, "failed", "out of memory")
    seconds = time.perf_counter() - t0
    if approx.params > budget:  # a method that overspends is a bug; never report it as a win
        raise SfaError(f"method {name} used {approx.params} parameters > budget {budget}")
    if measure is None:  # as compare() measures by default
        measure = _measure(seed, A.shape[0] <= EXACT_ERROR_UP_TO)
    error = error_report.trusted(A, approx, exact_error=measure["exact_error"], sample=measure["sample"], seed=measure["seed"],
                         confidence=measure["confidence"])
    note = note or approx.info.get("note", "")
    if not error["rel_error_is_estimate"]:  # never worse than the zero matrix (the sampled fit rescales itself)
        approx, error["rel_error"], rescaled = never_worse_than_zero(A, approx, error["rel_error"])
        note = "; ".join(x for x in (note, rescaled) if x)
    return MethodResult(name, budget, approx.params, error["rel_error"], seconds, "ok", note, approx if keep else None,
                        rel_error_is_estimate=error["rel_error_is_estimate"],
                        rel_error_ci=tuple(error["rel_error_ci"]) if "rel_error_ci" in error else None,
                        sample_columns=error.get("sample_columns"))
