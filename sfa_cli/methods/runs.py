"""How each method of the registry runs at a budget: one function per record.

Every function has the signature ``run(A, budget, *, seed=0, options=None, scale=False,
schedule=None) -> (Approximation, note)``: ``options`` holds only the options the method's
record takes (:mod:`sfa_cli.methods.registry`), ``scale`` asks for the column-block path (nothing
n x n formed), ``schedule`` is the sampled fit's :class:`~sfa_cli.engine.options.SampledSchedule`
options, and ``note`` says what the method chose (a smaller pattern, a split, ...).
A method that cannot run at this n or budget raises :class:`~sfa_cli.errors.NotApplicable`.

The functions import their implementations when called, so the registry stays light.
"""
from __future__ import annotations

import contextlib
import contextvars

from sfa_cli.approximations.patterns import butterfly_at_budget, chord_at_budget

__all__ = ["chord", "butterfly", "tsvd", "rsvd", "topk", "monarch", "lowrank_plus_sparse", "learned_sparse",
           "chord_plus_sparse"]

#: The Chord fits of the comparison in progress, (pattern, seed, options given, SparseFactors) each,
#: so that ``chord+sparse`` starts from the Chord row's fit where its split gives the same pattern.
_CHORD_FITS: contextvars.ContextVar = contextvars.ContextVar("sfa_chord_fits", default=None)


#: Where the fits of the method in progress report their steps (``callback(FitStep)``), or None.
_STEPS: contextvars.ContextVar = contextvars.ContextVar("sfa_fit_steps", default=None)


@contextlib.contextmanager
def reporting_steps(callback):
    """Within this context the Chord, butterfly and Chord + sparse fits call ``callback(step)`` after
    every evaluation (a long method's progress in ``compare``)."""
    token = _STEPS.set(callback)
    try:
        yield
    finally:
        _STEPS.reset(token)


@contextlib.contextmanager
def shared_fits():
    """Within this context the methods share their Chord fits (one :func:`sfa_cli.methods.compare.compare`)."""
    token = _CHORD_FITS.set([])
    try:
        yield
    finally:
        _CHORD_FITS.reset(token)


def _given(options: dict) -> dict:
    """The fit options given (the Chord variant is part of the pattern)."""
    return {k: v for k, v in options.items() if v is not None and k not in ("symmetric", "self_link")}


#: Options of the full-batch fit that the sampled fit does not take (it runs Adam on its own schedule).
_FULL_FIT_ONLY = ("optimizer", "max_iter", "tol", "patience")


def _fit_at(A, pattern: str, sizes: dict, note: str, seed: int, options: dict, scale: bool, schedule: dict | None):
    """The full-batch fit, or at scale the sampled fit (its note says with how many epochs)."""
    options = {k: v for k, v in options.items() if v is not None}
    if scale:
        from sfa_cli.engine.sampled import fit_sampled

        run = {k: v for k, v in options.items() if k not in _FULL_FIT_ONLY
               and not (k == "start" and v == "auto")}  # the sampled fit's own default start
        result = fit_sampled.trusted(A, pattern=pattern, seed=seed, callback=_STEPS.get(), **sizes, **run,
                                     **(schedule or {}))
        epochs = f"{result.epochs} epoch" + ("s" if result.epochs != 1 else "")
        done = f"sampled fit, {epochs} x {result.batch_columns} columns"
        note = f"{done}; {note}" if note else done
    else:
        from sfa_cli.engine.fit import fit

        result = fit.trusted(A, pattern=pattern, seed=seed, callback=_STEPS.get(), **sizes, **options)
    if result.interrupted:
        raise KeyboardInterrupt
    short = short_fit_note(result.iterations, result.stopped_because)
    if short:
        note = f"{note}; {short}" if note else short
    return result.approximation, note


#: A fit with fewer iterations than this is called short in compare's note.
SHORT_FIT_ITERATIONS = 10


def short_fit_note(iterations: int, stopped_because: str) -> str:
    """What a table should say of a fit that made no step or only a few ('' otherwise)."""
    if stopped_because in ("exact", "interrupted", "callback"):  # done, or stopped by the user: nothing to say
        return ""
    if stopped_because == "time_limit_before_first_step":
        return "no step made (the time limit came before the first step): the unfitted start"
    if iterations < SHORT_FIT_ITERATIONS:
        return f"only {iterations} iteration{'s' if iterations != 1 else ''} (stopped by {stopped_because.replace('_', ' ')})"
    return ""


def chord(A, budget, *, seed=0, options=None, scale=False, schedule=None):
    """The Chord factorization sized to the budget (:func:`sfa_cli.approximations.patterns.chord_at_budget`)."""
    options = dict(options or {})
    variant = {k: options[k] for k in ("symmetric", "self_link") if options.get(k) is not None}
    sizes, note = chord_at_budget(A.shape[0], budget, **variant)
    approx, note = _fit_at(A, "chord", sizes, note, seed, options, scale, schedule)
    fits = _CHORD_FITS.get()
    if fits is not None and not scale:
        fits.append((tuple(sorted({**sizes, **variant}.items())), seed, _given(options), approx))
    return approx, note


def butterfly(A, budget, *, seed=0, options=None, scale=False, schedule=None):
    """The butterfly pattern, as many factors as the budget holds: the closed-form hierarchical
    factorization (:func:`sfa_cli.methods.butterfly.butterfly_closed_form`; exact on butterfly products), then an
    L-BFGS polish from it (``max_iter`` iterations, default :func:`sfa_cli.engine.fit.default_max_iter`, with the
    fit's tol stop; the better of the two is kept); at scale the sampled fit."""
    sizes, note = butterfly_at_budget(A.shape[0], budget)
    options = dict(options or {})
    if scale:
        return _fit_at(A, "butterfly", sizes, note, seed, options, scale, schedule)
    from sfa_cli.methods.butterfly import butterfly_closed_form
    from sfa_cli.engine.fit import default_max_iter

    polish = options.get("max_iter") or default_max_iter(A.shape[0])
    approx = butterfly_closed_form.trusted(A, factors=sizes["factors"], polish_iter=polish,
                                           time_limit=options.get("time_limit"), device=options.get("device", "auto"),
                                           callback=_STEPS.get())
    done = "closed form" + (f", polished ({approx.info['polish_iterations']} iterations)"
                            if approx.info.get("polish_iterations") else "")
    return approx, f"{done}; {note}" if note else done


def tsvd(A, budget, *, seed=0, options=None, scale=False, schedule=None):
    """Truncated SVD; at scale by svds on the (sparse) matrix."""
    from sfa_cli.methods.low_rank import truncated_svd

    import scipy.sparse as sp

    from sfa_cli.methods.low_rank import EXACT_SVD_LIMIT

    large = scale or A.shape[0] > EXACT_SVD_LIMIT
    if large and sp.issparse(A):  # as `sfa fit`'s baseline: ARPACK on the sparse matrix gives the optimum
        return truncated_svd.trusted(A, budget, seed=seed, solver="svds"), "svds on the sparse matrix"
    if large:  # dense above LAPACK's size: the randomized range finder
        return truncated_svd.trusted(A, budget, seed=seed, solver="randomized"), "randomized range finder, 4 power iterations"
    return truncated_svd.trusted(A, budget, seed=seed), ""


def rsvd(A, budget, *, seed=0, options=None, scale=False, schedule=None):
    """Randomized SVD; at scale torch.svd_lowrank on the sparse tensor."""
    from sfa_cli.methods.low_rank import randomized_svd

    return randomized_svd.trusted(A, budget, seed=seed, keep_sparse=scale), ""


def topk(A, budget, *, seed=0, options=None, scale=False, schedule=None):
    """The budget's largest entries."""
    from sfa_cli.methods.sparse import top_k

    return top_k.trusted(A, budget, seed=seed), ""


def monarch(A, budget, *, seed=0, options=None, scale=False, schedule=None):
    """The closed-form Monarch projection."""
    from sfa_cli.methods.monarch import monarch as project

    return project.trusted(A, budget, seed=seed), ""


def lowrank_plus_sparse(A, budget, *, seed=0, options=None, scale=False, schedule=None):
    """Low rank plus the residual's largest entries."""
    from sfa_cli.methods.sparse import lowrank_plus_sparse as split

    return split.trusted(A, budget, seed=seed), ""


def _fit_options(options: dict) -> dict:
    from sfa_cli.methods.registry import FIT_OPTIONS, VARIANT_OPTIONS

    return {k: v for k, v in options.items() if k in FIT_OPTIONS + VARIANT_OPTIONS and v is not None}


def learned_sparse(A, budget, *, seed=0, options=None, scale=False, schedule=None):
    """Sparse factors with learned supports."""
    from sfa_cli.methods.learned import learned_sparse as learn

    options = dict(options or {})
    own = {k: options[k] for k in ("factors", "order") if options.get(k) is not None}
    approx = learn.trusted(A, budget, seed=seed, fit_options=_fit_options(options), at_scale=True if scale else None, **own)
    if approx.pattern.get("at_scale"):  # it measured its error and compared it with top-k's in its own passes
        return approx, approx.info.get("note", "")
    return _not_worse_than_top_k(A, budget, approx)


def _not_worse_than_top_k(A, budget, approx):
    """The learned factors, or the budget's largest entries when those are closer to A (a one-factor
    chain: the same kind and file format). The learned method starts from low rank + sparse and never
    ends above its start; this also holds it to top-k, the other start a user would try."""
    from sfa_cli.methods.sparse import top_k
    from sfa_cli.approximations.sparse_factors import SparseFactors
    from sfa_cli.metrics import relative_error

    learned_error = relative_error.trusted(A, approx)
    largest = top_k.trusted(A, budget)
    largest_error = relative_error.trusted(A, largest)
    if largest_error >= 0.999 * learned_error or learned_error - largest_error < 1e-6:  # no real gain
        return approx, approx.info.get("note", "")
    note = (f"the budget's largest entries (one factor): the learned factors reached {learned_error:.4g}, "
            f"top-k {largest_error:.4g}")
    kept = SparseFactors([largest.matrix], method="sparse", pattern={**approx.pattern, "factors": 1},
                         info={**approx.info, "rel_error": largest_error, "note": note})
    return kept, note


def chord_plus_sparse(A, budget, *, seed=0, options=None, scale=False, schedule=None):
    """Chord factors plus the residual's largest entries."""
    from sfa_cli.methods.chord_sparse import chord_plus_sparse as hybrid

    options = dict(options or {})
    fits = _CHORD_FITS.get()
    ours = _given(options)
    known = {pattern: F for pattern, s, given, F in fits or ()  # same seed; options given to both agree
             if s == seed and all(ours[k] == v for k, v in given.items() if k in ours)}
    approx = hybrid.trusted(A, budget, seed=seed, fit_options=_fit_options(options), chord_fits=known,
                            callback=_STEPS.get())
    return approx, approx.info.get("note", "")
