"""The fitting engine: minimise 0.5 ||A - W(1)...W(M)||_F^2 over the pattern's entries.

The objective is evaluated on the structured kernels of :mod:`sfa_cli.kernels`
(no n x n x n products, no dense factors), in torch on CPU or CUDA. A is
scaled to unit Frobenius norm for the optimisation (the objective is then
half the squared relative error, so tolerances do not depend on A's scale);
the scale is put back into the factors at the end, spread evenly over them.

Example
-------
>>> import numpy as np
>>> from sfa_cli.fit import fit
>>> A = np.random.default_rng(0).standard_normal((32, 32))
>>> result = fit(A, max_iter=50, seed=0)
>>> result.rel_error < 0.9, result.approximation.num_factors
(True, 5)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from sfa_cli.errors import SfaError
from sfa_cli.factors import SparseFactors, initial_values, pattern_structures
from sfa_cli.kernels import chain_backward, chain_forward, column_entries, factor_columns, resolve_device, resolve_dtype
from sfa_cli.memory import peak_device_bytes, peak_rss_bytes, require_memory
from sfa_cli.patterns import PATTERNS, Pattern

__all__ = ["fit", "FitResult", "FitStep", "OPTIMIZERS", "DENSE_FIT_LIMIT", "make_pattern"]

OPTIMIZERS = ("lbfgs", "adam")
#: Largest n for which a sparse input is densified for the fit.
DENSE_FIT_LIMIT = 8192
#: Defaults, chosen from scripts/bench_fit.py measurements (see docs/performance.md).
DEFAULTS = {"max_iter": None, "tol": 1e-5, "window": 50, "history_size": 20, "adam_lr": 0.01}


def default_max_iter(n: int) -> int:
    """Iterations when max_iter is not given: 5000 up to n = 256, then 5000 * 256 / n, at least 300.

    An evaluation costs about n^2 (log2 n)^2, so this keeps the default fit of a
    large matrix within minutes while small matrices get the many iterations
    their long plateaus need.
    """
    return int(min(5000, max(300, round(5000 * 256 / n))))


@dataclass(frozen=True)
class FitStep:
    """What the progress callback receives after each objective evaluation."""

    iteration: int
    evaluations: int
    seconds: float
    rel_error: float
    best_rel_error: float


@dataclass(frozen=True)
class FitResult:
    """The outcome of :func:`fit`.

    Attributes
    ----------
    approximation : SparseFactors
        The best factors found (the scale of A included).
    rel_error : float
        ||A - A_hat||_F / ||A||_F of ``approximation``.
    history : list of dict
        One entry per evaluation: iteration, evaluations, seconds, rel_error.
    stopped_because : str
        ``max_iter``, ``time_limit``, ``tol``, ``exact``, ``callback`` or ``interrupted``.
    peak_memory_bytes : int
        Peak resident memory of this process (host) when the fit ended, in bytes.
    peak_device_memory_bytes : int or None
        Peak torch allocation on the CUDA device during the fit (None on the CPU).
    """

    approximation: SparseFactors
    rel_error: float
    initial_rel_error: float
    iterations: int
    evaluations: int
    seconds: float
    device: str
    dtype: str
    optimizer: str
    stopped_because: str
    history: list = field(repr=False, default_factory=list)
    peak_memory_bytes: int = 0
    peak_device_memory_bytes: int | None = None

    @property
    def interrupted(self) -> bool:
        return self.stopped_because == "interrupted"

    @property
    def converged(self) -> bool:
        return self.stopped_because in ("tol", "exact")

    def to_dict(self, history: bool = False) -> dict:
        out = {
            "n": self.approximation.n,
            "factors": self.approximation.num_factors,
            "params": self.approximation.params,
            "compression": self.approximation.n**2 / self.approximation.params,
            "rel_error": self.rel_error,
            "initial_rel_error": self.initial_rel_error,
            "iterations": self.iterations,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "device": self.device,
            "dtype": self.dtype,
            "optimizer": self.optimizer,
            "stopped_because": self.stopped_because,
            "interrupted": self.interrupted,
            "pattern": self.approximation.pattern,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_device_memory_bytes": self.peak_device_memory_bytes,
        }
        if history:
            out["history"] = list(self.history)
        return out


class _Restart(Exception):
    """Raised inside the objective when an L-BFGS line search ran away."""


#: A relative error above this during an L-BFGS line search restarts it from the best point
#: (the objective is a polynomial of degree 2M in the step, and extrapolation can overflow).
RUNAWAY = 1e6
MAX_RESTARTS = 20


class _Stop(Exception):
    """Raised inside the objective to end the optimiser's step early."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def make_pattern(n: int, pattern: str | Pattern = "chord", **options) -> Pattern:
    """A Pattern object from a name and its options (``None`` options are left at defaults)."""
    if isinstance(pattern, Pattern):
        if pattern.n != n:
            raise SfaError(f"the pattern is for n={pattern.n} but the matrix has n={n}")
        return pattern
    if pattern not in PATTERNS:
        raise SfaError(f"unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
    if pattern == "butterfly":
        extra = {k: v for k, v in options.items() if v not in (None, False) and k not in ("factors", "self_link")}
        if extra or options.get("self_link") is False:
            raise SfaError(f"the butterfly pattern takes no options but the number of factors; got {sorted(extra) or ['no self link']}")
        return PATTERNS[pattern](n, factors=options.get("factors"))
    return PATTERNS[pattern](n, **{k: v for k, v in options.items() if v is not None})


def dense_target_bytes(A, device, dtype) -> tuple[int, int]:
    """(host bytes, device bytes) that :func:`fit` allocates to hold A densely.

    Host: the dense copy of a sparse A in its own dtype, and A converted to the
    fit's dtype; device (the same memory on the CPU): A in the fit's dtype and
    its scaled copy A / ||A||_F.
    """
    n = A.shape[0]
    item = torch.finfo(dtype).bits // 8
    source = np.dtype(getattr(A, "dtype", np.float64)).itemsize
    host = n * n * source if sp.issparse(A) else 0
    if source != item:
        host += n * n * item
    work = 2 * n * n * item
    if torch.device(device).type == "cpu":
        return host + work, 0
    return host, work


def _dense_target(A, device, dtype) -> torch.Tensor:
    n = A.shape[0]
    if sp.issparse(A) and n > DENSE_FIT_LIMIT:
        raise SfaError(
            f"the sparse matrix has n={n}; the full-batch fit densifies it, which sfa allows up to "
            f"n={DENSE_FIT_LIMIT} ({DENSE_FIT_LIMIT**2 * 4 / 2**30:.2f} GiB in float32)"
        )
    host, work = dense_target_bytes(A, device, dtype)
    name = str(dtype).replace("torch.", "")
    what = f"densifying the {n} x {n} matrix for the full-batch fit"
    require_memory(host, what, "use --sampled (fits from column blocks, never forms n x n)", dtype=name)
    if work:
        require_memory(work, f"moving the {n} x {n} matrix to {device}", "use --device cpu or --sampled",
                       device=device, dtype=name)
    dense = A.toarray() if sp.issparse(A) else np.asarray(A)
    return torch.as_tensor(dense).to(dtype).to(device)


def fit(
    A,
    *,
    pattern: str | Pattern = "chord",
    factors: int | None = None,
    base: int | None = None,
    symmetric: bool | None = None,
    self_link: bool | None = None,
    permute: int | None = None,
    optimizer: str = "lbfgs",
    lr: float | None = None,
    max_iter: int | None = DEFAULTS["max_iter"],
    time_limit: float | None = None,
    tol: float = DEFAULTS["tol"],
    window: int = DEFAULTS["window"],
    history_size: int = DEFAULTS["history_size"],
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    init: SparseFactors | None = None,
    callback=None,
) -> FitResult:
    """Fit sparse factors W(1)...W(M) with a fixed pattern to a square matrix.

    Parameters
    ----------
    A : ndarray or scipy sparse matrix of shape (n, n)
        The target; a sparse A is densified when n <= DENSE_FIT_LIMIT.
    pattern : {"chord", "butterfly"} or Pattern, default="chord"
    factors, base, symmetric, self_link, permute
        Pattern options (see :func:`sfa_cli.patterns.chord_pattern`).
    optimizer : {"lbfgs", "adam"}, default="lbfgs"
        L-BFGS with a strong-Wolfe line search, or Adam.
    lr : float, optional
        Step size: 1 for L-BFGS (the line search scales it), 0.01 for Adam.
    max_iter : int or None, default=None
        Optimiser iterations (L-BFGS iterations may use several evaluations);
        None picks :func:`default_max_iter` (5000 for n <= 256, 312 at n = 4096).
    time_limit : float or None
        Seconds; the fit stops at the first evaluation past it.
    tol : float, default=1e-5
        Stop when the best relative error improved by less than this fraction
        over the last ``window`` (default 50) iterations.
    seed : int, default=0
        Seed of the initial noise; the same seed gives the same factors on the
        same device (bitwise on CPU).
    device : {"auto", "cpu", "cuda"}, default="auto"
    dtype : {"float32", "float64"}, default="float32"
    init : SparseFactors, optional
        Warm start (must have the pattern's structure); the initial noise is not used.
    callback : callable, optional
        ``callback(step: FitStep)`` after every evaluation; returning True stops the fit.

    Returns
    -------
    FitResult
        An interrupt (Ctrl-C) ends the fit early and returns the best factors
        so far with ``stopped_because == "interrupted"``.
    """
    if optimizer not in OPTIMIZERS:
        raise SfaError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    n = A.shape[0]
    max_iter = default_max_iter(n) if max_iter is None else int(max_iter)
    if max_iter < 1:
        raise SfaError(f"max_iter must be >= 1; got {max_iter}")
    if time_limit is not None and time_limit <= 0:
        raise SfaError(f"time_limit must be positive; got {time_limit}")
    dev, tdtype = resolve_device(device, n), resolve_dtype(dtype)
    pat = make_pattern(n, pattern, factors=factors, base=base, symmetric=symmetric, self_link=self_link, permute=permute)
    structs, _ = pattern_structures(pat, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    target = _dense_target(A, dev, tdtype)
    scale = float(torch.linalg.norm(target.double()))
    if scale == 0.0:
        raise SfaError("the matrix is all zeros; there is nothing to approximate")
    target = target / scale  # never in place: target may share A's memory
    loss_and_grad = BlockObjective(structs, target)

    if init is not None:
        if init.n != n or init.num_factors != pat.factors:
            raise SfaError(f"the warm start has n={init.n}, {init.num_factors} factors; the pattern needs n={n}, {pat.factors}")
        start = [v.to(device=dev, dtype=tdtype) for v in init.torch_chain(dtype=torch.float64)[1]]
        # Remove the scale of A from the warm start, evenly over the factors.
        start = [v / scale ** (1.0 / pat.factors) for v in start]
    else:
        start = [v.to(dev) for v in initial_values(structs, seed=seed, dtype=tdtype)]
    # One leaf holds every factor's values: the optimiser's per-tensor loops (several per evaluation)
    # then run once, and the objective reads and writes views of it.
    sizes = [v.numel() for v in start]
    flat = torch.cat([v.reshape(-1) for v in start]).requires_grad_(True)
    flat.grad = torch.zeros_like(flat)
    values, grads = list(flat.detach().split(sizes)), list(flat.grad.split(sizes))
    params = [flat]

    run = _Run(params, callback, time_limit, max_iter, tol, window)

    def objective():
        run.optimizer.zero_grad(set_to_none=False)  # zeroes flat.grad in place: the views stay valid
        loss = loss_and_grad(values, grads)
        run.record(loss)
        return loss

    def make_optimizer():
        if optimizer == "lbfgs":
            return torch.optim.LBFGS(
                params, lr=lr or 1.0, max_iter=max_iter + 1, max_eval=25 * (max_iter + 1), history_size=history_size,
                tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe",
            )
        return torch.optim.Adam(params, lr=lr or DEFAULTS["adam_lr"])

    run.optimizer = make_optimizer()
    run.stopped_because = _optimise(run, objective, make_optimizer)

    best = [(v.double() * scale ** (1.0 / pat.factors)).cpu().numpy() for v in run.best[0].split(sizes)]
    np_dtype = np.float32 if tdtype == torch.float32 else np.float64
    approx = SparseFactors.from_pattern(pat, [v.astype(np_dtype) for v in best])
    return FitResult(
        approximation=approx,
        rel_error=run.best_rel,
        initial_rel_error=run.history[0]["rel_error"] if run.history else float("nan"),
        iterations=run.iteration,
        evaluations=run.evaluations,
        seconds=time.perf_counter() - run.t0,
        device=str(dev),
        dtype=str(tdtype).replace("torch.", ""),
        optimizer=optimizer,
        stopped_because=run.stopped_because,
        history=run.history,
        peak_memory_bytes=peak_rss_bytes(),
        peak_device_memory_bytes=peak_device_bytes(dev),
    )


def block_columns(n: int) -> int:
    """Columns per block: about 2^19 elements of n x b, so a block's chain stays in cache."""
    return int(min(n, max(64, (1 << 19) // n)))


def column_blocks(n: int, b: int) -> list[slice]:
    return [slice(j, min(j + b, n)) for j in range(0, n, b)]


class BlockObjective:
    """0.5 ||target - W(1)...W(M)||_F^2 over column blocks, and its gradient in the factor values.

    For each block J of columns: W(M)'s columns J scattered (as in kernels.factor_columns), the
    other M - 1 products (kernels.chain_forward), the residual R, whose loss gradient is R itself,
    and the backward pass by hand (kernels.chain_backward). These are the products autograd would
    run, without its graph and into M + 2 blocks of n x b that live as long as the objective: fresh
    blocks at every evaluation cost page faults (glibc hands large freed blocks back to the system).
    An n = 1024 evaluation took 0.048-0.051 s through autograd and takes 0.027-0.028 s here (one
    thread; docs/performance.md).
    """

    def __init__(self, structs, target: torch.Tensor, blocks=None):
        n = target.shape[0]
        self.structs, self.target = list(structs), target
        self.blocks = column_blocks(n, block_columns(n)) if blocks is None else blocks
        self._work: dict[int, list[torch.Tensor]] = {}

    def _blocks_of(self, width: int) -> list[torch.Tensor]:
        work = self._work.get(width)
        if work is None:
            work = [self.target.new_empty((self.target.shape[0], width)) for _ in range(len(self.structs) + 2)]
            self._work[width] = work
        return work

    def __call__(self, values, grads=None) -> float:
        """The loss at ``values`` (one tensor per factor); adds its gradient into ``grads`` (tensors
        shaped like ``values``) or, without them, into the values' ``.grad``."""
        structs, M = self.structs, len(self.structs)
        block_sums = [None] * M
        total = 0.0
        with torch.no_grad():
            for cols in self.blocks:
                work = self._blocks_of(cols.stop - cols.start)
                # work: [0] W(M)'s columns, [1..M-1] the products, [M] R, [M-1] and [M+1] the backward pass
                X = factor_columns(structs[-1], values[-1], cols, out=work[0])
                order, inputs, Y = chain_forward(structs[:-1], values[:-1], X, outs=work[1:M])
                R = torch.sub(Y, self.target[:, cols], out=work[M])
                # row norms (one pass, no n x b temporary), squared and summed in float64: as accurate
                # as a cascade sum over the block
                total += 0.5 * float(torch.linalg.vector_norm(R, dim=1).double().square().sum())
                block_grads, G = chain_backward(structs[:-1], values[:-1], order, inputs, R, False, [True] * (M - 1),
                                                True, outs=(work[M - 1], work[M + 1]))
                sel, pos = column_entries(structs[-1], cols)  # W(M)'s gradient: G at its entries
                block_grads.append(values[-1].new_zeros(values[-1].shape).index_add_(0, sel, G.view(-1)[pos]))
                block_sums = [g if acc is None else acc.add_(g) for acc, g in zip(block_sums, block_grads)]
        for i, (v, g) in enumerate(zip(values, block_sums)):
            if grads is not None:
                grads[i].add_(g)
            elif v.grad is None:
                v.grad = g
            else:
                v.grad.add_(g)
        return total


class _Run:
    """Book-keeping shared by the optimiser loop and the objective; stopping rules live here."""

    def __init__(self, params, callback, time_limit, max_iter, tol, window):
        self.params = params
        self.callback = callback
        self.time_limit = time_limit
        self.max_iter, self.tol, self.window = max_iter, tol, window
        self.optimizer = None
        self.t0 = time.perf_counter()
        self.iteration = 0
        self.evaluations = 0
        self.history: list[dict] = []
        self.best = [p.detach().clone() for p in params]
        self.best_rel = math.inf
        self.best_at: list[float] = []  # best relative error when each iteration ended
        self.stopped_because = ""
        self.iteration_base = 0  # iterations done before the current optimiser (restarts)
        self.restarts = 0

    def _current_iteration(self) -> int:
        if isinstance(self.optimizer, torch.optim.LBFGS):
            # L-BFGS counts an iteration when it starts; evaluations belong to it.
            return self.iteration_base + max(self.optimizer.state[self.params[0]].get("n_iter", 1) - 1, 0)
        return self.iteration

    def record(self, loss: float) -> None:
        """Called by the objective after every evaluation; raises _Stop when a rule fires."""
        iteration = self._current_iteration()
        while self.iteration < iteration:  # iterations that ended since the last call
            self.best_at.append(self.best_rel)
            self.iteration += 1
            self._check_progress()
        self.evaluations += 1
        rel = math.sqrt(max(2.0 * loss, 0.0))
        seconds = time.perf_counter() - self.t0
        if rel < self.best_rel:
            self.best_rel = rel
            for b, p in zip(self.best, self.params):
                b.copy_(p.detach())
        self.history.append({"iteration": iteration, "evaluations": self.evaluations, "seconds": seconds, "rel_error": rel})
        if not rel < RUNAWAY:  # also NaN
            if isinstance(self.optimizer, torch.optim.LBFGS):
                raise _Restart
            raise _Stop("diverged")
        if self.callback is not None and self.callback(FitStep(iteration, self.evaluations, seconds, rel, self.best_rel)):
            raise _Stop("callback")
        if self.best_rel <= 1e-7:
            raise _Stop("exact")
        if self.time_limit is not None and seconds >= self.time_limit:
            raise _Stop("time_limit")

    def _check_progress(self) -> None:
        if self.iteration >= self.max_iter:
            raise _Stop("max_iter")
        k = self.window
        if len(self.best_at) > k and self.best_at[-1 - k] - self.best_at[-1] <= self.tol * self.best_at[-1 - k]:
            raise _Stop("tol")


def _optimise(run: _Run, objective, make_optimizer) -> str:
    """Step the optimiser until a stopping rule fires; returns the rule's name."""
    try:
        while isinstance(run.optimizer, torch.optim.LBFGS):
            try:
                # One call runs every iteration; the objective raises _Stop to end it.
                run.optimizer.step(objective)
                # L-BFGS returns early only when the gradient vanishes or the line search stalls.
                run.record(float(objective()))
                return "tol"
            except _Restart:
                run.restarts += 1
                if run.restarts > MAX_RESTARTS:
                    return "diverged"
                with torch.no_grad():
                    for p, b in zip(run.params, run.best):
                        p.copy_(b)
                run.iteration_base = run.iteration
                run.optimizer = make_optimizer()
        while True:
            run.optimizer.step(objective)
            run.iteration += 1
            run.best_at.append(run.best_rel)
            run._check_progress()
    except _Stop as stop:
        return stop.reason
    except KeyboardInterrupt:
        return "interrupted"
