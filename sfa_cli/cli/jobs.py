"""What `sfa fit` and `sfa eval` compute, as library calls: the CLI parses, calls one of these, renders.

:func:`fit_matrix` decides between the full-batch fit and the column-block (sampled) fit,
sizes the pattern to a budget, runs any other method of the registry, and measures the
equal-budget truncated SVD; it returns a :class:`FitOutcome` whose ``summary`` is the
table / JSON the command prints, ``report`` the ``--report`` file, and ``facts`` what the
factor file records besides the approximation's own metadata.

Ctrl-C during the fit returns the best factors so far (``interrupted``); Ctrl-C after the
optimiser finished (during the final error or the baseline) keeps the result too, without
what was not measured, and sets ``interrupted`` as well.

Example
-------
>>> import numpy as np
>>> from sfa_cli.cli.jobs import fit_matrix
>>> A = np.random.default_rng(0).standard_normal((16, 16))
>>> outcome = fit_matrix(A, method="tsvd", budget=0.25)
>>> outcome.summary["method"], outcome.summary["params"] <= 64, outcome.interrupted
('tsvd', True, False)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from sfa_cli import limits
from sfa_cli.errors import SfaError
from sfa_cli.validation import validates_matrix
from sfa_cli.methods.registry import FIT_OPTIONS, method_record

__all__ = ["FitOutcome", "fit_matrix", "tsvd_baseline", "uses_sampled_fit"]


@dataclass
class FitOutcome:
    """The result of :func:`fit_matrix`.

    Attributes
    ----------
    approximation : Approximation
        What to save.
    summary : dict
        The keys `sfa fit` prints (README, "sfa fit").
    report : dict
        The summary plus ``history`` (Chord and butterfly fits) or ``details`` (other methods).
    facts : dict
        Recorded in the saved file's metadata: ``rel_error``, ``input``, ``stopped_because``.
    interrupted : bool
        Ctrl-C ended the run; what was done is kept.
    hints : list of str
        Advice for the user (e.g. the budget holds every non-zero, so storing the matrix is exact).
    """

    approximation: object
    summary: dict
    report: dict
    facts: dict
    interrupted: bool = False
    hints: list = field(default_factory=list)


def uses_sampled_fit(A, sampled: bool | None = None) -> bool:
    """Whether the fit of A works from column blocks: when asked (True/False), else for n above
    :data:`sfa_cli.limits.DENSE_FIT_MAX_N` (sparse or dense), or when the full fit's n x n work copies
    (:func:`sfa_cli.engine.fit.dense_target_bytes` in float32) do not fit in the memory available."""
    if sampled is not None:
        return bool(sampled)
    n = A.shape[0]
    if n > limits.DENSE_FIT_MAX_N:
        return True
    from sfa_cli.memory import available_bytes

    source = 0 if not sp.issparse(A) else n * n * np.dtype(A.dtype).itemsize
    convert = 0 if getattr(A, "dtype", None) == np.float32 else n * n * 4
    return source + convert + 2 * n * n * 4 > available_bytes()


def tsvd_baseline(A, params: int, **estimate) -> dict:
    """The equal-budget truncated SVD the fit summaries report: rank floor(params / 2n), at least 1.

    Exact, or with ``estimate`` (error_report's exact_error, sample, seed) measured as the sampled fit is.
    """
    from sfa_cli.methods.low_rank import tsvd_at_rank
    from sfa_cli.metrics import relative_error
    from sfa_cli.approximations.patterns import tsvd_rank_at_budget
    from sfa_cli.engine.sampled import error_report

    from sfa_cli.methods.low_rank import EXACT_SVD_LIMIT

    n = A.shape[0]
    rank = max(1, tsvd_rank_at_budget(n, params))
    # a dense A above the LAPACK size: the randomized range finder (ARPACK took minutes at n = 16384)
    solver = "randomized" if n > EXACT_SVD_LIMIT and not sp.issparse(A) else "auto"
    approx = tsvd_at_rank.trusted(A, rank, solver=solver)
    shown = {"tsvd_rank": rank, "tsvd_solver": "randomized" if solver == "randomized" else
             ("lapack" if n <= EXACT_SVD_LIMIT or rank >= n - 1 else "arpack")}
    if not estimate:
        return {**shown, "tsvd_rel_error": relative_error.trusted(A, approx)}
    tsvd = error_report.trusted(A, approx, **estimate)
    return {**shown, "tsvd_rel_error": tsvd["rel_error"], "tsvd_rel_error_ci": tsvd.get("rel_error_ci")}


@validates_matrix(name_from="path")
def fit_matrix(
    A,
    *,
    method: str = "chord",
    budget: float | int | None = None,
    pattern: str = "chord",
    pattern_options: dict | None = None,
    fit_options: dict | None = None,
    method_options: dict | None = None,
    seed: int = 0,
    sampled: bool | None = None,
    schedule: dict | None = None,
    baseline: bool = True,
    path: str | None = None,
    output: str | None = None,
    callback=None,
    on_stage=None,
) -> FitOutcome:
    """Fit one method to A the way `sfa fit` does, and measure it.

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
    method : str, default="chord"
        A name of :data:`sfa_cli.methods.registry.METHODS`.
    budget : int or float, optional
        Parameters allowed (a count, or a fraction of n^2 below 1). Chord: sizes the pattern
        (:func:`sfa_cli.approximations.patterns.chord_at_budget`; default its full pattern); other methods:
        default the Chord budget.
    pattern : {"chord", "butterfly"}, default="chord"
        The fixed pattern of ``method="chord"``.
    pattern_options : dict, optional
        ``factors, base, symmetric, self_link, permute`` (None leaves a default).
    fit_options : dict, optional
        ``optimizer, start, lr, max_iter, time_limit, tol, device, dtype``.
    method_options : dict, optional
        The method's own options (``order``, ``factors`` of ``sparse``).
    seed : int, default=0
    sampled : bool, optional
        Force (True) or forbid (False) the column-block fit; None: :func:`uses_sampled_fit`.
    schedule : dict, optional
        The sampled fit's ``batch_columns, epochs, exact_error, error_sample``.
    baseline : bool, default=True
        Measure the equal-budget truncated SVD.
    path, output : str, optional
        Names reported in the summary (the input and the factor file).
    callback : callable, optional
        The fit's progress callback (``FitStep``), returning True to stop.
    on_stage : callable, optional
        ``on_stage(name)`` when a stage starts: "fitting", "error", "baseline".
    """
    try:
        return _fit_matrix(A, method, budget, pattern, pattern_options, fit_options, method_options, seed, sampled,
                           schedule, baseline, path, output, callback, on_stage)
    except SfaError as exc:  # say which file (the memory guards, a method that does not apply, ...)
        if path and str(path) not in str(exc):
            raise SfaError(f"{path}: {exc}") from None
        raise


def _fit_matrix(A, method, budget, pattern, pattern_options, fit_options, method_options, seed, sampled, schedule,
                baseline, path, output, callback, on_stage) -> FitOutcome:
    record = method_record(method)
    stage = on_stage or (lambda name: None)
    fit_options = {k: v for k, v in (fit_options or {}).items() if v is not None}
    pattern_options = {k: v for k, v in (pattern_options or {}).items() if v is not None}
    head = {"path": path, "output": output}
    if method != "chord":
        return _fit_method(A, record, budget, fit_options, pattern_options, method_options, seed, baseline, head,
                           stage, sampled)
    from sfa_cli.approximations.patterns import chord_at_budget, resolve_budget

    n = A.shape[0]
    extra = {}
    if budget is not None:
        if pattern != "chord":
            raise SfaError("a budget sizes the Chord pattern; for a butterfly at a budget use method butterfly")
        variant = {k: v for k, v in pattern_options.items() if k in ("symmetric", "self_link")}
        params = resolve_budget(n, budget)
        sizes, note = chord_at_budget(n, params, **variant)
        pattern_options.update(sizes)
        extra = {"budget": params, **({"note": note} if note else {})}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not uses_sampled_fit(A, sampled):
        raise SfaError("runs under torchrun need the sampled fit (the full-batch fit runs in one process)")
    if fit_options.get("time_limit") is not None:  # the limit bounds the fit and what follows it
        fit_options, skip = _within_limit(A, pattern_options, fit_options, baseline, uses_sampled_fit(A, sampled))
        if skip:
            baseline = False
            extra["baseline_skipped"] = skip
    stage("fitting")
    if uses_sampled_fit(A, sampled):
        outcome = _fit_sampled(A, pattern, pattern_options, fit_options, seed, schedule or {}, baseline, head,
                               callback, stage)
    else:
        outcome = _fit_full(A, pattern, pattern_options, fit_options, seed, baseline, head, callback, stage)
    if extra.get("baseline_skipped"):
        outcome.hints.append(extra["baseline_skipped"])
    for target in (outcome.summary, outcome.report):
        notes = [x for x in (extra.get("note"), target.get("note")) if x]
        target.update(extra)
        if notes:
            target["note"] = "; ".join(notes)
    return outcome


#: Under --time-limit the equal-budget TSVD is skipped when it would take more than this share of it.
BASELINE_SHARE = 0.25
#: Share of --time-limit held back for the fit's last step overrunning it.
OVERRUN_SHARE = 0.05


def _within_limit(A, pattern_options, fit_options, baseline: bool, sampled: bool) -> tuple[dict, str | None]:
    """The fit's own time limit, so that the fit, the error and the baseline end within --time-limit.

    The error measurement and the equal-budget TSVD after the fit are estimated from their
    multiply-adds and this machine's measured GEMM rate; the fit gets what is left (less
    :data:`OVERRUN_SHARE` for its last step). A baseline that would take more than
    :data:`BASELINE_SHARE` of the limit is skipped, and the returned line says so.
    """
    from sfa_cli.approximations.patterns import chord_budget, tsvd_rank_at_budget
    from sfa_cli.methods.low_rank import EXACT_SVD_LIMIT

    limit = float(fit_options["time_limit"])
    n = A.shape[0]
    rate = _gemm_rate()
    params = chord_budget(n, pattern_options.get("base") or 2)["params"]  # the pattern's size, near enough
    error_seconds = 2.0 * params * (n if not sampled else min(n, 1024)) / rate
    rank = max(1, tsvd_rank_at_budget(n, params))
    if sp.issparse(A):
        tsvd_seconds = 60.0 * 2 * A.nnz * 2 * rank / rate  # ARPACK: some tens of products
    elif n > EXACT_SVD_LIMIT:
        tsvd_seconds = _randomized_tsvd_seconds(A, rank)
    else:
        tsvd_seconds = 10.0 * n**3 / rate  # LAPACK's full SVD
    skip = None
    if baseline and tsvd_seconds > BASELINE_SHARE * limit:
        skip = (f"the equal-budget truncated SVD (about {tsvd_seconds:.0f} s here) was skipped to keep to "
                f"--time-limit {limit:g}; `sfa compare FILE --methods tsvd` measures it")
    reserve = error_seconds + (tsvd_seconds if baseline and not skip else 0.0)
    own = max((1.0 - OVERRUN_SHARE) * limit - reserve, 0.05 * limit)
    return {**fit_options, "time_limit": own}, skip


def _randomized_tsvd_seconds(A, rank: int) -> float:
    """Seconds of the baseline's randomized range finder on a dense A, from one block of its passes
    timed here (reading the file's pages included): 1 + 2 x 4 power iterations + 1 passes."""
    from sfa_cli.methods.low_rank import _BLOCK_ENTRIES, OVERSAMPLING

    n = A.shape[0]
    q = min(n, rank + OVERSAMPLING)
    rows = max(1, min(n, 4 * (_BLOCK_ENTRIES // n)))
    work = np.float32 if A.dtype == np.float32 else np.float64
    X = np.ones((n, q), dtype=work)
    t0 = time.perf_counter()
    A[n - rows:] @ X  # the last rows: the fit's error sample reads the file from its start
    A[n - rows:].T @ np.ones((rows, q))
    # x 1.5: the passes also hand the file's pages back and read them again (measured 1.4-1.7x)
    return 1.5 * (time.perf_counter() - t0) * (n / rows) * (2 * 4 + 2) / 2


def _gemm_rate() -> float:
    """Multiply-adds x 2 per second of this machine's BLAS on a float32 block product (a 30 ms probe)."""
    a, b = np.ones((1024, 1024), np.float32), np.ones((1024, 64), np.float32)
    a @ b
    t0 = time.perf_counter()
    for _ in range(4):
        a @ b
    return 4 * 2.0 * 1024 * 1024 * 64 / max(time.perf_counter() - t0, 1e-6)


def _interruptible(outcome_parts: dict, stage, steps) -> bool:
    """Run ``steps`` (name, function returning a dict) in order, merging their results into
    ``outcome_parts``; Ctrl-C stops the remaining ones. Returns whether it was pressed."""
    for name, step in steps:
        stage(name)
        try:
            outcome_parts.update(step())
        except KeyboardInterrupt:
            return True
    return False


def _fit_full(A, pattern, pattern_options, fit_options, seed, baseline, head, callback, stage) -> FitOutcome:
    from sfa_cli.engine.fit import fit
    from sfa_cli.metrics import relative_error

    result = fit.trusted(A, pattern=pattern, seed=seed, callback=callback, **pattern_options, **fit_options)
    from sfa_cli.metrics import never_worse_than_zero

    kept = {"approx": result.approximation}
    summary = {**head, "method": pattern, **result.to_dict(), "fit_rel_error": result.rel_error}

    def error():  # float64, from the factors as saved; never worse than the zero matrix
        approx, rel_error, note = never_worse_than_zero(A, kept["approx"], relative_error.trusted(A, kept["approx"]))
        kept["approx"] = approx
        return {"rel_error": rel_error, **({"note": note} if note else {})}

    steps = [("error", error)]
    if baseline:
        steps.append(("baseline", lambda: tsvd_baseline(A, kept["approx"].params)))
    late = _interruptible(summary, stage, steps)
    return _outcome(A, kept["approx"], summary, {"history": result.history}, result.stopped_because,
                    result.interrupted or late)


def _fit_sampled(A, pattern, pattern_options, fit_options, seed, schedule, baseline, head, callback,
                 stage) -> FitOutcome:
    from sfa_cli.engine.sampled import fit_sampled, init_distributed

    rank, _world = init_distributed(fit_options.get("device", "auto"))
    if fit_options.get("optimizer", "lbfgs") != "lbfgs" or fit_options.get("max_iter") is not None:
        raise SfaError("the sampled fit uses Adam with its schedule: give epochs and lr, not optimizer/max_iter")
    run = {k: v for k, v in fit_options.items() if k not in ("max_iter", "tol", "patience", "optimizer")
           and not (k == "start" and v == "auto")}  # the sampled fit's own default start
    result = fit_sampled.trusted(A, pattern=pattern, seed=seed, callback=callback, **schedule, **pattern_options, **run)
    approx = result.approximation
    summary = {**head, "method": pattern, **result.to_dict(), "seed": seed}
    late = False
    if baseline and rank == 0:  # measured on the same columns as the fit's estimate
        late = _interruptible(summary, stage, [("baseline", lambda: tsvd_baseline(
            A, approx.params, exact_error=schedule.get("exact_error", False), sample=result.error_sample, seed=seed))])
    outcome = _outcome(A, approx, summary, {"history": result.history}, result.stopped_because,
                       result.interrupted or late)
    outcome.summary["rank"] = rank  # removed by the caller: only rank 0 writes and prints
    return outcome


def _fit_method(A, record, budget, fit_options, pattern_options, method_options, seed, baseline, head, stage,
                sampled) -> FitOutcome:
    from sfa_cli.methods.compare import run_method
    from sfa_cli.approximations.sparse_factors import SparseFactors
    from sfa_cli.memory import peak_rss_bytes

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SfaError(f"method {record.name} runs in one process; under torchrun only the Chord sampled fit runs")
    shared = {k: v for k, v in {**fit_options, **pattern_options}.items() if k in FIT_OPTIONS or k in record.shared}
    stage("fitting")
    result = run_method.trusted(A, record.name, budget, seed=seed, fit_options=shared, options=method_options,
                        scale=bool(sampled))
    if result.status != "ok":
        what = "does not apply" if result.status == "not applicable" else "failed"
        raise SfaError(f"{head['path'] or 'A'}: method {record.name} {what}: {result.note}")
    approx = result.approximation
    n = A.shape[0]
    summary = {**head, "method": record.name, "n": n}
    if isinstance(approx, SparseFactors):
        summary["factors"] = approx.num_factors
    summary.update(budget=result.budget, params=approx.params, compression=n**2 / approx.params,
                   rel_error=result.rel_error, seconds=result.seconds, dtype=approx.dtype.name)
    if isinstance(approx, SparseFactors):
        summary["pattern"] = approx.pattern
    if result.note:
        summary["note"] = result.note
    summary["peak_memory_bytes"] = peak_rss_bytes()
    late = False
    if baseline and record.name != "tsvd":
        late = _interruptible(summary, stage, [("baseline", lambda: tsvd_baseline(A, approx.params))])
    return _outcome(A, approx, summary, {"details": dict(approx.info)}, None, late)


def _outcome(A, approx, summary, extra_report, stopped_because, interrupted) -> FitOutcome:
    facts = {"rel_error": summary.get("rel_error"), "input": str(summary.get("path"))}
    if stopped_because is not None:
        facts["stopped_because"] = stopped_because
    return FitOutcome(approx, summary, {**summary, **extra_report}, facts, interrupted, _hints(A, summary))


def _hints(A, summary) -> list[str]:
    """Advice worth a line: when storing the matrix itself is exact within the budget, and when a fit
    ended no better than the zero matrix (Adam from a poor step size does)."""
    hints = []
    from sfa_cli.validation import count_nonzero

    nnz = count_nonzero(A)
    budget = summary.get("budget") or summary.get("params")
    if budget and nnz <= budget and summary.get("method") != "topk":
        hints.append(f"the matrix has {nnz} non-zeros, no more than the budget {budget}: storing them "
                     f"(--method topk) is exact")
    rel_error, tsvd = summary.get("rel_error"), summary.get("tsvd_rel_error")
    if rel_error is not None and tsvd is not None and tsvd < 0.9 * rel_error:
        hints.append(f"the truncated SVD at the same budget is better ({tsvd:.4g} against {rel_error:.4g}): "
                     f"--method tsvd, or `sfa compare` for every method")
    if rel_error is not None and rel_error >= 0.99 and summary.get("method") in ("chord", "butterfly"):
        hints.append(f"the fit ended at relative error {rel_error:.4g}, no better than the zero matrix: "
                     + "; ".join(_what_limited(summary)))
    elif summary.get("method") in ("chord", "butterfly") and summary.get("iterations") is not None:
        from sfa_cli.methods.runs import short_fit_note

        short = short_fit_note(summary["iterations"], summary.get("stopped_because") or "")
        if short:
            hints.append(f"the fit: {short}; {_what_limited(summary)[1]}")
    return hints


def _what_limited(summary) -> tuple[str, str]:
    """What ended the fit, and what to try: only options other than those already in use."""
    stopped, iterations = summary.get("stopped_because") or "", summary.get("iterations")
    if summary.get("sampled"):
        return ("the column-block fit's early steps barely move it",
                "give a longer --time-limit or more --epochs")
    if stopped == "time_limit_before_first_step":
        return "the time limit came before the first step", "give a longer --time-limit"
    if stopped == "time_limit":
        return f"the time limit stopped it after {iterations} iterations", "give a longer --time-limit"
    if stopped == "max_iter":
        return f"it ran all its {iterations} iterations", "give more --max-iter"
    other_optimizer = "lm" if summary.get("optimizer") != "lm" else "lbfgs"
    other_start = "identity" if summary.get("start") != "identity" else "paper"
    return (f"it stopped improving ({stopped}) after {iterations} iterations",
            f"try --start {other_start} or --optimizer {other_optimizer}")
