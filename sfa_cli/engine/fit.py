"""The fitting engine: minimise 0.5 ||A - W(1)...W(M)||_F^2 over the pattern's entries.

The objective (:class:`sfa_cli.engine.objective.BlockObjective`) is evaluated over
column blocks on the structured kernels of :mod:`sfa_cli.approximations.kernels` (no n x n x n
products, no dense factors), in torch on CPU or CUDA, and the optimiser loop is
:mod:`sfa_cli.engine.optimize`'s (stopping rules, callback, best iterate). A is
scaled to unit Frobenius norm for the optimisation (the objective is then
half the squared relative error, so tolerances do not depend on A's scale);
the scale is put back into the factors at the end, spread evenly over them.

Example
-------
>>> import numpy as np
>>> from sfa_cli.engine.fit import fit
>>> A = np.random.default_rng(0).standard_normal((32, 32))
>>> result = fit(A, max_iter=50, seed=0)
>>> result.rel_error < 0.9, result.approximation.num_factors
(True, 5)
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from sfa_cli import limits
from sfa_cli.errors import SfaError
from sfa_cli.validation import validates_matrix
from sfa_cli.approximations.sparse_factors import SparseFactors, initial_values, pattern_structures
from sfa_cli.approximations.kernels import compile_decision, compiling_pays, resolve_device, resolve_dtype
from sfa_cli.memory import peak_device_bytes, peak_rss_bytes, require_memory
from sfa_cli.engine.objective import DENSE_CHAIN_MAX_N, BlockObjective, DenseChainObjective
from sfa_cli.engine.optimize import ADAM_LR, EXACT_REL_ERROR, FitStep, Run, minimize
from sfa_cli.engine.options import OPTIMIZERS, OptimizerSpec, PatternSpec, Placement, StopRules
from sfa_cli.engine.result import FitResult, make_pattern, typed_options
from sfa_cli.approximations.patterns import Pattern

__all__ = ["fit", "FitResult", "FitStep", "OPTIMIZERS", "DENSE_FIT_LIMIT", "make_pattern", "default_max_iter"]

#: Largest n for which a sparse input is densified for the full-batch fit (8192^2 float32 = 0.25 GiB);
#: above it sfa fits from column blocks (:mod:`sfa_cli.engine.sampled`), and ``compare`` compares at scale.
DENSE_FIT_LIMIT = limits.DENSE_FIT_MAX_N  # the one definition is in sfa_cli/limits.py
#: ``start="auto"`` takes the identity start when the diagonal holds at least this share of ||A||_F^2.
IDENTITY_START_SHARE = 0.25
#: The fit decides whether compiling the kernels pays after this many (CSR) evaluations.
COMPILE_DECISION_AFTER = 3
#: Defaults of the loose keywords, from the typed options (chosen from scripts/bench_fit.py measurements,
#: docs/performance.md).
DEFAULTS = {"max_iter": StopRules.max_iter, "tol": StopRules.tol, "window": StopRules.window,
            "patience": StopRules.patience,
            "history_size": OptimizerSpec.history_size, "adam_lr": ADAM_LR}


def default_max_iter(n: int) -> int:
    """Iterations when max_iter is not given: 5000 up to n = 256, then 5000 * 256 / n, at least 300.

    An evaluation costs about n^2 (log2 n)^2, so this keeps the default fit of a
    large matrix within minutes while small matrices get the many iterations
    their long plateaus need (3000 iterations left bcsstk01 22% above the
    5000 of the old engine: docs/performance.md).
    """
    return int(min(5000, max(300, round(5000 * 256 / n))))


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
    with warnings.catch_warnings():  # a read-only memory map: the fit never writes into its target
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(dense).to(dtype).to(device)


@validates_matrix
def fit(
    A,
    *,
    pattern: str | Pattern | PatternSpec = "chord",
    stop: StopRules | None = None,
    optimizer: str | OptimizerSpec = "lbfgs",
    placement: Placement | None = None,
    init: SparseFactors | None = None,
    callback=None,
    factors: int | None = None,
    base: int | None = None,
    symmetric: bool | None = None,
    self_link: bool | None = None,
    permute: int | None = None,
    max_iter: int | None = None,
    time_limit: float | None = None,
    tol: float | None = None,
    window: int | None = None,
    patience: float | None = None,
    lr: float | None = None,
    history_size: int | None = None,
    start: str | None = None,
    seed: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> FitResult:
    """Fit sparse factors W(1)...W(M) with a fixed pattern to a square matrix.

    Parameters
    ----------
    A : ndarray or scipy sparse matrix of shape (n, n)
        The target; a sparse A is densified when n <= DENSE_FIT_LIMIT.
    pattern : {"chord", "butterfly"}, PatternSpec or Pattern, default="chord"
    stop : StopRules, optional
        When to stop (default ``StopRules()``: max_iter :func:`default_max_iter` of n, 5000 for
        n <= 256 and 312 at n = 4096; tol 1e-5 over a window of 50 iterations; patience 0.001: stop
        when the best error improved by less than 0.1% of itself over the last quarter of the
        fit's seconds; no time limit). The time limit is checked between the column blocks of
        every evaluation.
    optimizer : {"lbfgs", "adam", "lm"} or OptimizerSpec, default="lbfgs"
        L-BFGS with a strong-Wolfe line search (step 1), Adam (step 0.01), or Levenberg-Marquardt
        with matrix-free CG (:func:`sfa_cli.engine.gauss_newton.lm_fit`; goes further on graph-like
        matrices in long runs, docs/engine.md).
    placement : Placement, optional
        Device (``auto``), dtype (``float32``) and the seed of the initial noise (0); the same seed
        gives the same factors on the same device (bitwise on CPU).
    init : SparseFactors, optional
        Warm start (must have the pattern's structure); the initial noise is not used.
    callback : callable, optional
        ``callback(step: FitStep)`` after every evaluation; returning True stops the fit.
    factors, base, symmetric, self_link, permute
        The pattern's options as keywords (:class:`~sfa_cli.engine.options.PatternSpec`).
    max_iter, time_limit, tol, window, patience
        The stopping rules as keywords (:class:`~sfa_cli.engine.options.StopRules`).
    lr, history_size, start
        The optimiser's options as keywords (:class:`~sfa_cli.engine.options.OptimizerSpec`); ``start``
        ``auto`` (default) takes the identity start when the diagonal holds at least a quarter of
        ||A||_F^2 and the pattern has the self link, the paper's start otherwise; ``lifted`` recovers
        products of 2-5 Chord factors exactly (:mod:`sfa_cli.engine.lifted`).
    seed, device, dtype
        The placement as keywords (:class:`~sfa_cli.engine.options.Placement`).

    Returns
    -------
    FitResult
        An interrupt (Ctrl-C) ends the fit early and returns the best factors
        so far with ``stopped_because == "interrupted"``.
    """
    n = A.shape[0]
    if isinstance(optimizer, str):
        optimizer = OptimizerSpec(optimizer, **{k: v for k, v in (("lr", lr), ("history_size", history_size),
                                                                  ("start", start)) if v is not None})
    else:
        optimizer = typed_options(OptimizerSpec, optimizer, "fit", lr=lr, history_size=history_size, start=start)
    stop = typed_options(StopRules, stop, "fit", max_iter=max_iter, time_limit=time_limit, tol=tol, window=window,
                        patience=patience)
    placement = typed_options(Placement, placement, "fit", seed=seed, device=device, dtype=dtype)
    pat = make_pattern(n, pattern, factors=factors, base=base, symmetric=symmetric, self_link=self_link,
                       permute=permute)
    return _FullFit(A, pat, stop, optimizer, placement).run(init, callback)


#: Up to this n a CPU fit runs on one thread: its kernels are too small to share (waking a second
#: thread costs more than it saves, many times more when another process holds the cores).
ONE_THREAD_MAX_N = 256


@contextlib.contextmanager
def _threads_for(n: int, device):
    """torch on one thread for a small CPU fit (:data:`ONE_THREAD_MAX_N`), as configured otherwise."""
    if device.type != "cpu" or n > ONE_THREAD_MAX_N or torch.get_num_threads() == 1:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class _FullFit:
    """One full-batch fit: A on the device scaled to unit norm, the flat parameter leaf, the run."""

    def __init__(self, A, pat: Pattern, stop: StopRules, optimizer: OptimizerSpec, placement: Placement):
        n = A.shape[0]
        self.pat, self.optimizer = pat, optimizer
        self.max_iter = default_max_iter(n) if stop.max_iter is None else stop.max_iter
        self.stop, self.seed = stop, placement.seed
        self.start_stopped = None  # "interrupted" (Ctrl-C) or "callback" during the lifted start's sweeps
        self.dev, self.dtype = resolve_device(placement.device, n), resolve_dtype(placement.dtype)
        self.structs, _ = pattern_structures(pat, self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        target = _dense_target(A, self.dev, self.dtype)
        self.scale = float(torch.linalg.norm(target.double()))
        if self.scale == 0.0:
            raise SfaError("the matrix is all zeros; there is nothing to approximate")
        self.target = target / self.scale  # never in place: may share A's memory
        small = n <= DENSE_CHAIN_MAX_N and self.dev.type == "cpu"
        self.objective = (DenseChainObjective if small else BlockObjective)(self.structs, self.target)

    def _start(self, init: SparseFactors | None, callback=None) -> tuple[str, list[torch.Tensor]]:
        """The start, by name: a warm start, the paper's row averages, the identity or the lifted start.

        ``auto`` takes the identity start when the diagonal holds at least :data:`IDENTITY_START_SHARE`
        of ||A||_F^2 (Laplacians, covariances, kernels: the product starts at about I, which already
        has the diagonal) and the pattern has the self link; the paper's start otherwise (adjacency
        matrices, zero diagonals), where it reaches the authors' errors sooner (docs/engine.md).
        """
        pat, n = self.pat, self.structs[0].n
        if init is not None:
            if init.n != n or init.num_factors != pat.factors:
                raise SfaError(f"the warm start has n={init.n}, {init.num_factors} factors; the pattern needs n={n}, "
                               f"{pat.factors}")
            # Remove the scale of A from the warm start, evenly over the factors.
            return "warm", [v.to(device=self.dev, dtype=self.dtype) / self.scale ** (1.0 / pat.factors)
                            for v in init.torch_chain(dtype=torch.float64)[1]]
        wanted = self.optimizer.start
        has_diagonal = all(bool((s.rows == s.col).sum() == s.n) for s in self.structs)
        if wanted == "identity" and not has_diagonal:
            raise SfaError("the identity start needs the self link (every factor's diagonal in the pattern)")
        if wanted == "auto":
            share = float(torch.linalg.vector_norm(torch.diagonal(self.target).double())) ** 2  # ||A||_F = 1
            wanted = "identity" if has_diagonal and share >= IDENTITY_START_SHARE else "paper"
        if wanted == "lifted":
            from sfa_cli.engine.lifted import LIFTED_DEFAULTS, lifted_start

            # in float32 the target itself is rounded at about 1e-8: stop the sweeps at the fit's exact stop
            tol = LIFTED_DEFAULTS["tol"] if self.dtype == torch.float64 else EXACT_REL_ERROR
            limit = None if self.stop.time_limit is None else self.stop.time_limit / 2  # the rest polishes
            t0 = time.perf_counter()

            def progress(sweep, residual):  # the sweeps' progress as fit steps of iteration 0
                return callback is not None and bool(callback(FitStep(0, 0, time.perf_counter() - t0, residual,
                                                                      residual)))

            values, info = lifted_start(self.target, pat, time_limit=limit, tol=tol, callback=progress)
            if info["stopped_because"] in ("interrupted", "callback"):
                self.start_stopped = info["stopped_because"]
            return "lifted", [v.to(self.dtype) for v in values]
        if wanted == "identity":
            from sfa_cli.engine.gauss_newton import start_values

            return "identity", start_values(self.structs, "identity", seed=self.seed, dtype=self.dtype,
                                            device=self.dev)
        return "paper", [v.to(self.dev) for v in initial_values(self.structs, seed=self.seed, dtype=self.dtype)]

    def _optimise(self, start, max_iter: int, time_limit, callback) -> dict:
        """One optimiser run from ``start``; its book-keeping as a dict (best values, history, counts)."""
        spec = self.optimizer
        if spec.optimizer == "lm":
            from sfa_cli.engine.gauss_newton import lm_fit

            values, history, stopped = lm_fit(self.structs, start, self.target, max_iter=max_iter,
                                              time_limit=time_limit, tol=self.stop.tol, window=self.stop.window,
                                              callback=callback)
            best = min((h["rel_error"] for h in history), default=math.inf)
            return {"values": [v.detach() for v in values], "best_rel": best, "history": history,
                    "iterations": max((h["iteration"] for h in history), default=0), "evaluations": len(history),
                    "stopped_because": stopped}
        # One leaf holds every factor's values: the optimiser's per-tensor loops (several per evaluation)
        # then run once, and the objective reads and writes views of it.
        sizes = [v.numel() for v in start]
        flat = torch.cat([v.reshape(-1) for v in start]).requires_grad_(True)
        flat.grad = torch.zeros_like(flat)
        values, grads = list(flat.detach().split(sizes)), list(flat.grad.split(sizes))
        run = Run([flat], max_iter=max_iter, time_limit=time_limit, tol=self.stop.tol, window=self.stop.window,
                  patience=self.stop.patience, callback=callback)

        def objective():
            flat.grad.zero_()  # in place: the views stay valid
            loss = self.objective(values, grads, check=run.check_time)
            run.record(loss)
            if run.evaluations == COMPILE_DECISION_AFTER:
                self._decide_compiling(run, max_iter, time_limit, decision)
            return loss

        with compile_decision() as decision, _threads_for(self.structs[0].n, self.dev):
            minimize(run, objective, spec.optimizer, lr=spec.lr, history_size=spec.history_size)
        return {"values": list(run.best[0].split(sizes)), "best_rel": run.best_rel, "history": run.history,
                "iterations": run.iteration, "evaluations": run.evaluations, "stopped_because": run.stopped_because}

    def _decide_compiling(self, run: Run, max_iter: int, time_limit, decision) -> None:
        """Approve the compiled kernels when the rest of the fit is expected to repay compiling them.

        The evaluations so far ran the CSR kernels; their seconds times the evaluations left (about
        1.1 per iteration up to ``max_iter``, fewer if the time limit comes first) is what compiling
        could shorten (:func:`sfa_cli.approximations.kernels.compiling_pays`).
        """
        seconds = [h["seconds"] for h in run.history]
        per_evaluation = (seconds[-1] - seconds[0]) / max(len(seconds) - 1, 1)
        expected = 1.1 * max(max_iter - run.iteration, 0) * per_evaluation
        if time_limit is not None:
            expected = min(expected, time_limit - run.seconds)
        widths = [b.stop - b.start for b in getattr(self.objective, "blocks", ())]
        decision.approved = compiling_pays(self.structs, widths, self.target.dtype, self.dev, expected)

    def run(self, init, callback) -> FitResult:
        t0 = time.perf_counter()
        name, start = self._start(init, callback)
        limit = self.stop.time_limit
        if limit is not None:  # the start's seconds count against the limit (the optimiser still takes a step)
            limit = max(limit - (time.perf_counter() - t0), 1e-3)
        if self.start_stopped:  # stopped in the start: evaluate it, keep it, stop
            best = self._optimise(start, 1, limit, callback)
            best["stopped_because"] = self.start_stopped
        else:
            best = self._optimise(start, self.max_iter, limit, callback)
        history = best["history"]
        factor_scale = self.scale ** (1.0 / self.pat.factors)
        vals = [(v.double() * factor_scale).cpu().numpy() for v in best["values"]]
        np_dtype = np.float32 if self.dtype == torch.float32 else np.float64
        approx = SparseFactors.from_pattern(self.pat, [v.astype(np_dtype) for v in vals])
        return FitResult(
            approximation=approx,
            rel_error=best["best_rel"],
            initial_rel_error=history[0]["rel_error"] if history else float("nan"),
            iterations=best["iterations"],
            evaluations=best["evaluations"],
            seconds=time.perf_counter() - t0,
            device=str(self.dev),
            dtype=str(self.dtype).replace("torch.", ""),
            optimizer=self.optimizer.optimizer,
            stopped_because=best["stopped_because"],
            history=history,
            peak_memory_bytes=peak_rss_bytes(),
            peak_device_memory_bytes=peak_device_bytes(self.dev),
            start=name,
        )
