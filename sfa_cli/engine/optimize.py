"""The one optimiser loop of every fit: stopping rules, progress callback, best iterate, Ctrl-C.

A :class:`Run` holds the book-keeping of one fit whatever steps it: the full
fit's L-BFGS or Adam (:func:`minimize`), the sampled fit's Adam on column
blocks, the learned method's L-BFGS refits. The rules are checked in one place
and end the loop by raising :class:`Stop`; the run keeps a copy of the best
parameters seen, so whichever rule fires (Ctrl-C included) the best iterate is
what the caller returns.

The time limit can also be checked *inside* an evaluation (:meth:`Run.check_time`,
which :class:`sfa_cli.engine.objective.BlockObjective` calls between column blocks), so
one slow evaluation at large n overruns it by at most a block.

Example
-------
>>> import torch
>>> x = torch.tensor([3.0], requires_grad=True)
>>> run = Run([x], max_iter=100, tol=0.0)
>>> def objective():
...     x.grad = 2 * x.detach()  # gradient of x^2
...     loss = float(x.detach() ** 2)
...     run.record(0.5 * loss)  # the run reads a loss as 0.5 * rel_error^2
...     return loss
>>> minimize(run, objective, "adam", lr=0.5)
'max_iter'
>>> run.best_rel < 0.1
True
"""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass

import torch

__all__ = ["Run", "Stop", "FitStep", "Adam", "ScipyLBFGS", "minimize", "RUNAWAY", "MAX_RESTARTS", "EXACT_REL_ERROR",
           "ADAM_LR", "STEPPERS", "PATIENCE_AFTER"]

#: A relative error above this during an L-BFGS line search restarts it from the best point
#: (the objective is a polynomial of degree 2M in the step, and extrapolation can overflow).
RUNAWAY = 1e6
#: Restarts after runaway line searches before the fit is called diverged.
MAX_RESTARTS = 20
#: A relative error at or below this ends a fit as ``exact``.
EXACT_REL_ERROR = 1e-7
#: The patience rule (``StopRules.patience``) is checked from this many seconds of a run on.
PATIENCE_AFTER = 2.0
#: ... and once the best error is below this share of the start's (not on the start's plateau).
PATIENCE_PLATEAU = 0.95
#: Adam's step size when none is given (full-batch fits; the sampled fit has its own schedule).
ADAM_LR = 0.01


@dataclass(frozen=True)
class FitStep:
    """What the progress callback receives after each objective evaluation."""

    iteration: int
    evaluations: int
    seconds: float
    rel_error: float
    best_rel_error: float


class Stop(Exception):
    """Ends an optimiser loop; ``reason`` becomes the fit's ``stopped_because``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Restart(Exception):
    """Raised inside the objective when an L-BFGS line search ran away."""


class Run:
    """Book-keeping of one optimiser run: the stopping rules, the callback, the best iterate.

    Parameters
    ----------
    params : list of Tensor
        The optimised leaves; :attr:`best` holds a copy of them at the best loss.
    max_iter : int, optional
        Iterations (``None``: no limit but the others).
    time_limit : float, optional
        Seconds since the run was made.
    tol, window : float, int
        Stop when the best relative error improved by less than ``tol`` of itself over
        the last ``window`` iterations (``tol=0`` turns the rule off).
    patience : float, default=0
        Stop when the best relative error improved by less than ``patience`` of itself over
        the last quarter of the run's seconds, from :data:`PATIENCE_AFTER` seconds on
        (``stopped_because="patience"``; 0 turns the rule off). It is judged on at least
        ``window`` iterations in that quarter, and only once the best error is below
        :data:`PATIENCE_PLATEAU` of the start's.
    callback : callable, optional
        ``callback(step: FitStep)`` after every recorded evaluation; True stops the run.
    restarts : int, optional
        L-BFGS restarts after runaway line searches (default :data:`MAX_RESTARTS`); a
        runaway with none left, or under another optimiser, stops the run as ``diverged``.
    runaway : float, optional
        The relative error that counts as a runaway (default :data:`RUNAWAY`).

    Losses are recorded as ``0.5 * rel_error ** 2`` (the fits scale their target to unit norm).
    """

    def __init__(self, params, *, max_iter: int | None = None, time_limit: float | None = None, tol: float = 0.0,
                 window: int = 50, callback=None, restarts: int | None = None, runaway: float | None = None,
                 patience: float = 0.0):
        self.params = list(params)
        self.max_iter, self.time_limit, self.tol, self.window = max_iter, time_limit, tol, window
        self.patience = patience
        self.callback = callback
        self.max_restarts = MAX_RESTARTS if restarts is None else restarts
        self.runaway = RUNAWAY if runaway is None else runaway
        self.optimizer = None
        self.t0 = time.perf_counter()
        self.iteration = 0
        self.evaluations = 0
        self.history: list[dict] = []
        self.best = [p.detach().clone() for p in self.params]
        self.best_rel = math.inf
        self.best_at: list[float] = []  # best relative error when each iteration ended
        self.ended_at: list[float] = []  # and the run's seconds then
        self.stopped_because = ""
        self.iteration_base = 0  # iterations done before the current optimiser (restarts)
        self.restarts = 0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    # -- the rules ----------------------------------------------------------------------
    def time_is_up(self) -> bool:
        return self.time_limit is not None and self.seconds >= self.time_limit

    def check_time(self) -> None:
        """Raise :class:`Stop` when the time limit has passed (callable inside an evaluation).

        Not before the first evaluation was recorded: a run always has one iterate to return.
        """
        if self.evaluations and self.time_is_up():
            # with one evaluation recorded the best iterate is the start: say so
            raise Stop("time_limit" if self.evaluations > 1 or self.iteration else "time_limit_before_first_step")

    def keep_if_best(self, rel: float, values=None) -> bool:
        """Copy the parameters (or ``values``) into :attr:`best` when ``rel`` beats the best so far."""
        if not rel < self.best_rel:
            return False
        self.best_rel = rel
        for b, p in zip(self.best, self.params if values is None else values):
            b.copy_(p.detach())
        return True

    def _current_iteration(self) -> int:
        if isinstance(self.optimizer, torch.optim.LBFGS):
            # L-BFGS counts an iteration when it starts; evaluations belong to it.
            return self.iteration_base + max(self.optimizer.state[self.params[0]].get("n_iter", 1) - 1, 0)
        return self.iteration

    def record(self, loss: float) -> None:
        """Called after every evaluation of the full objective; raises :class:`Stop` when a rule fires."""
        iteration = self._current_iteration()
        while self.iteration < iteration:  # iterations that ended since the last call
            self.iteration += 1
            self._iteration_rules()
        self.evaluations += 1
        rel = math.sqrt(max(2.0 * loss, 0.0))
        seconds = self.seconds
        self.keep_if_best(rel)
        self.history.append({"iteration": iteration, "evaluations": self.evaluations, "seconds": seconds,
                             "rel_error": rel})
        if not rel < self.runaway:  # also NaN
            if isinstance(self.optimizer, (torch.optim.LBFGS, ScipyLBFGS)) and self.max_restarts > 0:
                raise _Restart
            raise Stop("diverged")
        if self.callback is not None and self.callback(FitStep(iteration, self.evaluations, seconds, rel,
                                                               self.best_rel)):
            raise Stop("callback")
        if self.best_rel <= EXACT_REL_ERROR:
            raise Stop("exact")
        self.check_time()

    def end_iteration(self) -> None:
        """Called after each step of an optimiser that does not count its own iterations (Adam)."""
        self.iteration += 1
        self._iteration_rules()

    def _iteration_rules(self) -> None:
        seconds = self.seconds
        self.best_at.append(self.best_rel)
        self.ended_at.append(seconds)
        if self.max_iter is not None and self.iteration >= self.max_iter:
            raise Stop("max_iter")
        k = self.window
        if self.tol > 0 and len(self.best_at) > k \
                and self.best_at[-1 - k] - self.best_at[-1] <= self.tol * self.best_at[-1 - k]:
            raise Stop("tol")
        if self.patience > 0 and seconds >= PATIENCE_AFTER and self.history \
                and self.best_rel < PATIENCE_PLATEAU * self.history[0]["rel_error"]:
            # judged on at least `window` iterations, and never on the start's plateau (the product of
            # M small factors barely moves at first)
            quarter = max(bisect.bisect_right(self.ended_at, 0.75 * seconds) - 1, 0)
            then = self.best_at[quarter]
            if len(self.best_at) - 1 - quarter >= self.window and then - self.best_at[-1] < self.patience * then:
                raise Stop("patience")

    def restore_best(self) -> None:
        """Put the best parameters back into the optimised leaves."""
        with torch.no_grad():
            for p, b in zip(self.params, self.best):
                p.copy_(b)


class Adam:
    """Adam (Kingma & Ba 2015) with torch.optim.Adam's defaults; the step size may change per step.

    The one Adam of sfa (the full fit's ``optimizer="adam"`` and the sampled fit). Written out
    rather than torch.optim.Adam because constructing a torch.optim optimizer imports
    torch._dynamo, a cost of seconds that every `sfa fit --sampled` process (and every torchrun
    rank) would pay (docs/performance.md), and because the sampled fit's schedule sets the step
    size at every step.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None, lr: float | None = None):
        """One update from the parameters' ``.grad`` (computed first by ``closure`` when given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        step = -(self.lr if lr is None else lr) / c1
        for p, m, v in zip(self.params, self.m, self.v):
            m.lerp_(p.grad, 1.0 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1.0 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=step)
        return loss


def _lbfgs(params, lr: float, max_iter: int, max_eval: int, history_size: int) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, max_eval=max_eval, history_size=history_size,
                             tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")


def minimize(run: Run, objective, optimizer: str = "lbfgs", *, lr: float | None = None, history_size: int = 20,
             lbfgs_iterations: int | None = None, lbfgs_evaluations: int | None = None) -> str:
    """Step ``optimizer`` over ``run.params`` until a rule of ``run`` fires; returns its name (also set on run).

    ``objective()`` sets the parameters' ``.grad``, calls ``run.record(loss)`` and returns the loss.
    L-BFGS (strong-Wolfe line search, step ``lr`` default 1) runs inside one ``step`` call and is
    ended by the run's rules, or by itself after ``lbfgs_iterations`` iterations or
    ``lbfgs_evaluations`` evaluations (defaults: past ``run.max_iter``); a runaway line search
    restarts it from the best point. Adam's step is ``lr`` (default :data:`ADAM_LR`). Ctrl-C ends
    the loop as ``interrupted``. Another optimiser is one more entry in :data:`STEPPERS`.
    """
    if optimizer not in STEPPERS:
        from sfa_cli.errors import SfaError

        raise SfaError(f"optimizer must be one of {', '.join(STEPPERS)}; got {optimizer!r}")
    options = {"lr": lr, "history_size": history_size, "iterations": lbfgs_iterations,
               "evaluations": lbfgs_evaluations}
    try:
        run.stopped_because = STEPPERS[optimizer](run, objective, **options)
    except Stop as stop:
        run.stopped_because = stop.reason
    except KeyboardInterrupt:
        run.stopped_because = "interrupted"
    return run.stopped_because


def _step_lbfgs(run: Run, objective, *, lr, history_size, iterations, evaluations) -> str:
    if iterations is None:
        iterations = (run.max_iter if run.max_iter is not None else 10**9) + 1
    evaluations = 25 * iterations if evaluations is None else evaluations
    if ScipyLBFGS.serves(run.params):
        make = lambda: ScipyLBFGS(run, history_size, iterations, evaluations)  # noqa: E731
    else:
        make = lambda: _lbfgs(run.params, lr or 1.0, iterations, evaluations, history_size)  # noqa: E731
    run.optimizer = make()
    while True:
        try:
            # One call runs every iteration; the objective raises Stop to end it.
            run.optimizer.step(objective)
            # L-BFGS returns early only when the gradient vanishes, the line search stalls, or its
            # own caps are reached; its last point was evaluated (and recorded) already.
            if isinstance(run.optimizer, torch.optim.LBFGS):
                run.iteration = run.iteration_base + run.optimizer.state[run.params[0]].get("n_iter", 0)
            return "tol"
        except _Restart:
            run.restarts += 1
            if run.restarts > run.max_restarts:
                return "diverged"
            run.restore_best()
            run.iteration_base = run.iteration
            run.optimizer = make()


class ScipyLBFGS:
    """L-BFGS on one flat CPU leaf by SciPy's L-BFGS-B (no bounds): the CPU fits' L-BFGS.

    SciPy's compiled two-loop and Moré-Thuente line search cost microseconds per iteration where
    ``torch.optim.LBFGS`` spends about as long as a small fit's whole evaluation in Python; it also
    keeps its curvature pairs in float64. Measured in docs/performance.md ("Answers in seconds"). The
    leaf keeps its dtype: each evaluation copies the float64 point into it and the gradient back.
    Iterations are counted by SciPy's per-iteration callback (:meth:`Run.end_iteration`), so the
    run's rules end the loop by raising :class:`Stop` as with every other optimiser.
    """

    def __init__(self, run: Run, history_size: int, iterations: int, evaluations: int):
        self.run, self.leaf, self.history_size = run, run.params[0], history_size
        self.iterations, self.evaluations = iterations, evaluations

    @staticmethod
    def serves(params) -> bool:
        """One 1-D float32/float64 leaf on the CPU (the full fit's flat parameter vector)."""
        return (len(params) == 1 and params[0].dim() == 1 and params[0].device.type == "cpu"
                and params[0].dtype in (torch.float32, torch.float64))

    def step(self, closure) -> None:
        import scipy.optimize
        from threadpoolctl import threadpool_limits

        leaf = self.leaf

        def value_and_gradient(x):
            with torch.no_grad():
                leaf.copy_(torch.from_numpy(x))
            loss = closure()
            return float(loss), leaf.grad.detach().double().numpy()

        x0 = leaf.detach().double().numpy().copy()
        options = {"maxcor": self.history_size, "maxiter": self.iterations, "maxfun": self.evaluations,
                   "ftol": 0.0, "gtol": 0.0, "maxls": 25}
        # SciPy's OpenBLAS threads spin after each small call and starve torch's threads on few cores
        with threadpool_limits(limits=1, user_api="blas"):
            scipy.optimize.minimize(value_and_gradient, x0, jac=True, method="L-BFGS-B", options=options,
                                    callback=lambda *_: self.run.end_iteration())


def _step_adam(run: Run, objective, *, lr, history_size, iterations, evaluations) -> str:  # noqa: ARG001
    run.optimizer = Adam(run.params, lr=lr or ADAM_LR)
    while True:
        run.optimizer.step(objective)
        run.end_iteration()


#: name -> stepper(run, objective, *, lr, history_size, iterations, evaluations) -> stop reason; a stepper
#: loops until the run's rules raise :class:`Stop` (or returns a reason of its own).
STEPPERS = {"lbfgs": _step_lbfgs, "adam": _step_adam}
