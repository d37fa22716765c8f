"""The sampled fit: fit sparse factors to a matrix too large to densify.

0.5 ||A - P||_F^2 with P = W(1)...W(M) is a sum over columns, so each step
takes a block of columns J, computes P[:, J] = W(1)...W(M) E_J with M sparse
products (cost O(n (L+1) |J|) each, never an n x n array), compares it with
A[:, J] taken from the CSC matrix, and follows the gradient of that block,
scaled by n / |J| so that it is an unbiased estimate of the full gradient.
An epoch visits every column once, in a seeded random order. Adam with a
warm-up and a cosine-decaying step size does the updates, from factors that
start near a multiple of the identity (Adam from the paper's averaging start
falls to the saddle P = 0). After each epoch the error of the current
factors is estimated on a column sample; the best factors are returned.
The product is fitted as c W(1)...W(M) with c the least-squares scale,
which removes the gradient's pull towards P = 0.

The exact relative error needs every column of P, so the error is
*estimated* from a seeded uniform sample of columns, with a confidence
interval (:func:`estimate_relative_error`); ``exact_error=True`` streams over
all columns at the end. The same sample (same ``seed``) serves every method,
so ``eval`` and ``compare`` measure them on the same columns.

Several processes (``torchrun``) split every step's column block between them
and sum their gradients with ``torch.distributed`` before each update, so all
ranks make the same updates and the result does not depend on the number of
processes (up to floating-point summation order).

Example
-------
>>> import scipy.sparse as sp
>>> from sfa_cli.engine.sampled import fit_sampled
>>> A = sp.random(512, 512, density=0.01, random_state=0, format="csr")
>>> r = fit_sampled(A, epochs=2, batch_columns=128, device="cpu", error_sample=256)
>>> r.rel_error_is_estimate, len(r.rel_error_ci), r.epochs
(True, 2, 2)
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import scipy.sparse as sp
import torch

from sfa_cli import limits
from sfa_cli.errors import SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors, initial_values, pattern_structures
from sfa_cli.engine.result import FitResult, make_pattern, typed_options
from sfa_cli.io import as_square_matrix, is_memory_mapped, release_pages
from sfa_cli.validation import mapped_columns, mapped_trace, validates_matrix
from sfa_cli.approximations.kernels import ColumnChain, resolve_device, resolve_dtype
from sfa_cli.memory import peak_device_bytes, peak_rss_bytes, require_memory
from sfa_cli.engine.objective import ColumnSetObjective
from sfa_cli.engine.optimize import EXACT_REL_ERROR, Adam, FitStep, Run, Stop
from sfa_cli.engine.options import PatternSpec, Placement, SampledSchedule, StopRules
from sfa_cli.approximations.patterns import Pattern

__all__ = [
    "fit_sampled",
    "SampledFitResult",
    "SampledFitStep",
    "estimate_relative_error",
    "error_report",
    "sample_columns",
    "init_distributed",
    "default_lr",
    "SAMPLED_DEFAULTS",
    "EXACT_ERROR_UP_TO",
]

#: Defaults, chosen from scripts/bench_scale.py measurements (see docs/scale.md); the ones that are
#: options come from :class:`~sfa_cli.engine.options.SampledSchedule`.
SAMPLED_DEFAULTS = {
    "batch_columns": SampledSchedule.batch_columns,
    "epochs": SampledSchedule.epochs,
    "final_lr_fraction": 0.05,
    "warmup_fraction": 0.05,
    "start_norm_min": 0.3,
    "error_sample": SampledSchedule.error_sample,
    "confidence": SampledSchedule.confidence,
}
#: Largest n for which ``eval`` and ``compare`` compute the exact error by default (it costs a product
#: with all n columns); above it they estimate it from a column sample.
EXACT_ERROR_UP_TO = limits.EXACT_ERROR_MAX_N  # the one definition is in sfa_cli/limits.py
#: Bytes of working memory one chunk of columns may use (forward activations and gradients).
CHUNK_BYTES = 1 << 30
#: Columns per chunk at most: about where the sparse products reach their best time per column.
CHUNK_COLUMNS = 64
#: Decay of the running sums <A_J, P_J> and ||P_J||^2 that give the output scale c
#: of the fitted product c W(1)...W(M) (they average about the last 10 steps).
SCALE_DECAY = 0.9


# -- results ----------------------------------------------------------------------
@dataclass(frozen=True)
class SampledFitStep(FitStep):
    """What the callback receives after each step, and once more at the end of each epoch.

    ``rel_error`` is the running estimate from this epoch's training blocks (the
    parameters move while it is gathered); at an epoch end (``epoch_end``) it is
    the sample estimate of the current factors, with ``rel_error_ci``.
    """

    epoch: int = 0
    epochs: int = 0
    step_in_epoch: int = 0
    steps_per_epoch: int = 0
    epoch_end: bool = False
    rel_error_ci: tuple | None = None


@dataclass(frozen=True)
class SampledFitResult(FitResult):
    """The outcome of :func:`fit_sampled`: a :class:`FitResult` with the facts of a sampled fit.

    Attributes (besides FitResult's)
    --------------------------------
    rel_error : float
        The estimate from the error sample, or the exact error with ``exact_error=True``.
    rel_error_estimate : float
        The sample estimate of the returned factors' relative error.
    rel_error_ci : tuple of float
        Its confidence interval (low, high); ``(e, e)`` when exact.
    rel_error_is_estimate : bool
        False when ``rel_error`` is exact (``exact_error=True``, or the sample was every column).
    epochs : int
        Epochs completed (a partial last epoch is not counted).
    batch_columns : int
        Columns per step, over all processes together.
    peak_memory_bytes : int
        Peak resident memory of this process (host), in bytes.
    peak_device_memory_bytes : int or None
        Peak torch allocation on the CUDA device, when fitting on one.
    """

    rel_error_estimate: float = float("nan")
    rel_error_ci: tuple = (float("nan"), float("nan"))
    rel_error_is_estimate: bool = True
    confidence: float = SAMPLED_DEFAULTS["confidence"]
    error_sample: int = 0
    epochs: int = 0
    steps_per_epoch: int = 0
    batch_columns: int = 0
    lr: float = 0.0
    processes: int = 1
    exact_rel_error: float | None = None

    def to_dict(self, history: bool = False) -> dict:
        out = super().to_dict(history=history)
        out.update(
            {
                "sampled": True,
                "rel_error_estimate": self.rel_error_estimate,
                "rel_error_ci": list(self.rel_error_ci),
                "rel_error_is_estimate": self.rel_error_is_estimate,
                "confidence": self.confidence,
                "error_sample": self.error_sample,
                "exact_rel_error": self.exact_rel_error,
                "epochs": self.epochs,
                "steps_per_epoch": self.steps_per_epoch,
                "batch_columns": self.batch_columns,
                "lr": self.lr,
                "processes": self.processes,
            }
        )
        return out


# -- distributed ----------------------------------------------------------------------
def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns (rank, world_size).

    Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) nothing is
    initialised and the answer is ``(0, 1)``. The backend is NCCL when the
    device is CUDA (each process on ``cuda:LOCAL_RANK``) and gloo on the CPU.
    Call it once, before :func:`fit_sampled`; the group is destroyed at exit.
    """
    import atexit

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_available():
        raise SfaError(f"torchrun started {os.environ['WORLD_SIZE']} processes but this torch has no torch.distributed")
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    atexit.register(_destroy_group)
    return dist.get_rank(), dist.get_world_size()


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(items: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of ``items`` (shares differ in size by at most one)."""
    k = len(items)
    return items[rank * k // world : (rank + 1) * k // world]


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


# -- columns of A ------------------------------------------------------------------
class _Columns:
    """Blocks A[:, J] as dense tensors, from a sparse matrix (held as CSC) or a dense array."""

    def __init__(self, A):
        if sp.issparse(A):
            self.A = sp.csc_matrix(A)
            data = self.A.data.astype(np.float64)
            counts = np.diff(self.A.indptr)
            self.sq_norms = np.bincount(np.repeat(np.arange(self.A.shape[1]), counts), weights=data * data,
                                        minlength=self.A.shape[1])
            self.trace = float(self.A.diagonal().astype(np.float64).sum())
        else:
            self.A = A if is_memory_mapped(A) else np.asarray(A)
            n = self.A.shape[1]
            self.sq_norms = np.zeros(n)
            for i in range(0, n, 1024):  # by rows: a memory map is read once, in order
                rows = self.A[i : i + 1024].astype(np.float64)
                self.sq_norms += np.einsum("ij,ij->j", rows, rows)
                release_pages(self.A)
            self.trace = mapped_trace(self.A)
        self.n = self.A.shape[0]

    def numpy(self, cols: np.ndarray) -> np.ndarray:
        if sp.issparse(self.A):
            return self.A[:, cols].toarray()
        return mapped_columns(self.A, cols)  # a memory map by blocks of rows whose pages go back

    def torch(self, cols: np.ndarray, device, dtype, scale: float) -> torch.Tensor:
        """A[:, cols] / scale as a dense (n, |cols|) tensor on `device`.

        A sparse block travels as its non-zeros and is scattered on the device:
        densifying on the host and copying the dense block made a GPU step several
        times slower than the chain itself (docs/performance.md).
        """
        if not sp.issparse(self.A):
            block = torch.from_numpy(np.ascontiguousarray(mapped_columns(self.A, cols))).to(device=device,
                                                                                             dtype=dtype)
            return block / scale if scale != 1.0 else block
        block = self.A[:, cols]
        counts = np.diff(block.indptr)
        out = torch.zeros((self.n, len(cols)), device=device, dtype=dtype)
        if block.nnz:
            rows = torch.from_numpy(block.indices.astype(np.int64)).to(device)
            where = torch.from_numpy(np.repeat(np.arange(len(cols), dtype=np.int64), counts)).to(device)
            data = torch.from_numpy(block.data).to(device=device, dtype=dtype)
            out.index_put_((rows, where), data / scale if scale != 1.0 else data, accumulate=True)
        return out


def _validated(A, name: str = "A"):
    """A checked by :func:`sfa_cli.io.as_square_matrix`; a CSC matrix is kept as it is (checked through
    its transpose, a CSR view: no copy), since the column blocks read it as CSC."""
    if sp.issparse(A) and A.format == "csc":
        as_square_matrix(A.T, name)
        return A
    return as_square_matrix(A, name)


def _rescaled(products: np.ndarray) -> tuple[float, np.ndarray]:
    """The least-squares output scale c = sum <T_j, P_j> / sum ||P_j||^2 and the residuals of c P.

    ||T_j - c P_j||^2 = r_j + 2 (1 - c) x_j + (c^2 - 1) p_j, written around c = 1 so
    that a good fit keeps the precision of the direct residual r_j. c <= 0 is not
    used (it would flip the sign of a factor): c = 1 then.
    """
    r, x, p = products
    sum_x, sum_p = float(x.sum()), float(p.sum())
    c = sum_x / sum_p if sum_p > 0 and sum_x > 0 else 1.0
    if not math.isfinite(c):
        c = 1.0
    return c, np.maximum(r + 2.0 * (1.0 - c) * x + (c * c - 1.0) * p, 0.0)


# -- error estimates ---------------------------------------------------------------
def sample_columns(n: int, sample: int, seed: int = 0) -> np.ndarray:
    """The seeded uniform sample of ``min(sample, n)`` distinct columns, sorted.

    The same (n, sample, seed) gives the same columns everywhere, so every
    method measured with the same seed is measured on the same sample.
    """
    sample = int(sample)
    if sample < 1:
        raise SfaError(f"the error sample needs at least 1 column; got {sample}")
    if sample >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng([int(seed), 0x5FA]).choice(n, size=sample, replace=False)).astype(np.int64)


def _estimate(r: np.ndarray, a: np.ndarray, n: int, a_total: float, confidence: float) -> dict:
    """Relative error and its CI from squared residuals r_j of a column sample.

    The total T = sum_j r_j over all n columns is estimated with the regression
    estimator on the known column norms a_j = ||A[:, j]||^2 (their total
    ``a_total`` is known exactly), which removes the variation of r_j that is
    only the variation of the columns' norms (a graph's degrees); its standard
    error uses the finite-population correction (1 - m/n). The interval
    T_hat +- z se is mapped to the relative-error scale sqrt(T / a_total).
    With every column in the sample the estimate is exact and the interval a point.
    """
    m = len(r)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    if m >= n:
        e = math.sqrt(max(float(r.sum()), 0.0) / a_total)
        return {"rel_error_estimate": e, "rel_error_ci": [e, e], "exact": True}
    r_mean, a_mean = float(r.mean()), float(a.mean())
    dr, da = r - r_mean, a - a_mean
    saa = float(da @ da)
    beta = float(da @ dr) / saa if m > 2 and saa > 1e-12 * float(a @ a) else 0.0
    total = n * (r_mean + beta * (a_total / n - a_mean))
    resid = dr - beta * da
    dof = m - (2 if beta else 1)
    var = float(resid @ resid) / dof if dof > 0 else math.inf
    # floor: float64 round-off of the sums, so that a perfect regression (P = 0) keeps a non-empty interval
    se = max(n * math.sqrt((1.0 - m / n) * var / m), 1e-9 * a_total)
    low, high = max(total - z * se, 0.0), max(total + z * se, 0.0)
    return {
        "rel_error_estimate": math.sqrt(max(total, 0.0) / a_total),
        "rel_error_ci": [math.sqrt(low / a_total), math.sqrt(high / a_total)],
        "exact": False,
    }


@validates_matrix(check=_validated)
def estimate_relative_error(
    A, approx, *, sample: int = SAMPLED_DEFAULTS["error_sample"], seed: int = 0,
    confidence: float = SAMPLED_DEFAULTS["confidence"], block: int | None = None,
) -> dict:
    """Estimate ||A - A_hat||_F / ||A||_F from a seeded sample of columns, with a confidence interval.

    Parameters
    ----------
    A : ndarray or scipy sparse matrix of shape (n, n)
    approx : Approximation
        Anything with ``n``, ``dtype`` and ``matmul`` (every sfa method).
    sample : int, default=1024
        Columns in the sample (all n columns when ``sample >= n``: then exact).
    seed : int, default=0
        Seed of the sample (:func:`sample_columns`); the same seed gives the
        same columns, so methods compared with one seed share the sample.
    confidence : float, default=0.95
    block : int, optional
        Columns per ``approx.columns(J)``; by default about 64 MiB of float64.

    Returns
    -------
    dict
        ``rel_error_estimate``, ``rel_error_ci`` ([low, high]), ``sample_columns``
        (columns used), ``n``, ``seed``, ``confidence`` and ``exact`` (True when
        the sample was every column; the CI is then the point itself).
    """
    n = A.shape[0]
    if approx.n != n:
        raise SfaError(f"the approximation is for n={approx.n} but the matrix has n={n}")
    if not 0 < confidence < 1:
        raise SfaError(f"confidence must be between 0 and 1; got {confidence}")
    columns = _Columns(A)
    a_total = float(columns.sq_norms.sum())
    if a_total == 0.0:
        raise SfaError("the matrix is all zeros; its relative error is undefined")
    cols = sample_columns(n, sample, seed)
    block = block or max(1, min(512, (64 << 20) // (8 * n)))
    r = np.empty(len(cols), dtype=np.float64)
    for i in range(0, len(cols), block):
        c = cols[i : i + block]
        D = columns.numpy(c).astype(np.float64) - np.asarray(approx.columns(c), dtype=np.float64)
        r[i : i + len(c)] = np.einsum("ij,ij->j", D, D)
    out = _estimate(r, columns.sq_norms[cols], n, a_total, confidence)
    return {**out, "sample_columns": len(cols), "n": n, "seed": int(seed), "confidence": confidence}


@validates_matrix(check=_validated)
def error_report(
    A, approx, *, exact_error: bool | None = None, sample: int = SAMPLED_DEFAULTS["error_sample"], seed: int = 0,
    confidence: float = SAMPLED_DEFAULTS["confidence"],
) -> dict:
    """The relative error as ``eval`` and ``compare`` report it: exact up to n = 8192, estimated above.

    Parameters
    ----------
    exact_error : bool or None
        True streams over all columns (:func:`sfa_cli.metrics.relative_error`),
        False estimates from ``sample`` columns; None picks exact when
        ``n <= EXACT_ERROR_UP_TO``.

    Returns
    -------
    dict
        ``rel_error`` (the number to show), ``rel_error_is_estimate``, and with
        an estimate ``rel_error_estimate``, ``rel_error_ci``, ``sample_columns``,
        ``confidence``, ``seed``.
    """
    n = A.shape[0]
    if exact_error is None:
        exact_error = n <= EXACT_ERROR_UP_TO
    if exact_error:
        from sfa_cli.metrics import relative_error

        return {"rel_error": relative_error.trusted(A, approx), "rel_error_is_estimate": False}
    est = estimate_relative_error.trusted(A, approx, sample=sample, seed=seed, confidence=confidence)
    return {
        "rel_error": est["rel_error_estimate"],
        "rel_error_is_estimate": not est["exact"],
        "rel_error_estimate": est["rel_error_estimate"],
        "rel_error_ci": est["rel_error_ci"],
        "sample_columns": est["sample_columns"],
        "confidence": confidence,
        "seed": int(seed),
    }


# -- the fit --------------------------------------------------------------------------


def default_lr(pattern: Pattern) -> float:
    """Adam's step size when none is given: 0.25 / (M K), K the non-zeros per row.

    Adam moves every value by about lr per step, and an entry of the product
    depends on M K values, so the step that keeps the product's change
    moderate shrinks with M K: 0.0016 at n = 4096 (Chord: M = 12, K = 13),
    0.0009 at n = 65536. Measured on grid Laplacians and sparse random graphs
    at n = 4096 and 8192 (docs/scale.md): twice this made the grid's error
    rise during the first epoch before it fell; random graphs gain from 3-6
    times this (``lr=``), the grid does not.
    """
    return 0.25 / (pattern.factors * pattern.nnz_per_row)


def _start_values(structs, n: int, start: str, seed: int, dtype, norm: float = 1.0) -> list[torch.Tensor]:
    """Initial factor values for A scaled to unit Frobenius norm (CPU tensors, CSR order).

    ``identity``: 1 on the self link and ``0.01 u`` (u ~ U[0, 1), seeded) elsewhere,
    all times (norm / sqrt(n))^(1/M), so the product is about norm * I / sqrt(n),
    of Frobenius norm ``norm``. Falls back to the paper's start when a factor
    has no self link.
    """
    has_self = all(bool((s.col == s.rows).sum() == n) for s in structs)
    if start == "paper" or not has_self:
        return initial_values(structs, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(int(seed))
    factor_scale = (norm / math.sqrt(n)) ** (1.0 / len(structs))
    out = []
    for s in structs:
        v = 0.01 * torch.rand(s.nnz, generator=gen, dtype=torch.float64)
        v[(s.col == s.rows).cpu()] = 1.0
        out.append((v * factor_scale).to(dtype))
    return out


def _memory_plan(n, structs, pat, tdtype, dev, A, chunk_wanted) -> tuple[int, int]:
    """(chunk columns, bytes needed on the device); refuses when the device lacks them."""
    item = torch.finfo(tdtype).bits // 8
    nnz = sum(s.nnz for s in structs)
    distinct = {id(s): s for s in structs}.values()
    struct_bytes = sum(8 * (6 * s.nnz + 2 * (n + 1)) for s in distinct)
    # values, their gradient, Adam's two moments, the best copy, the all-reduce buffer
    value_bytes = 6 * nnz * item
    per_column = 2 * (len(structs) + 4) * n * item
    chunk = int(max(1, min(chunk_wanted, CHUNK_COLUMNS, CHUNK_BYTES // per_column)))
    total = struct_bytes + value_bytes + chunk * per_column
    host = 0
    if sp.issparse(A):
        host = A.nnz * (A.data.itemsize + 8) if A.format != "csc" else 0
    where = f"the sampled fit of the {n} x {n} matrix ({pat.factors} factors, {nnz:,} values)"
    if dev.type == "cpu":
        require_memory(total + host, where, "use fewer --factors or --dtype float32", dtype=str(tdtype).replace("torch.", ""))
    else:
        require_memory(total, where, "use --device cpu, fewer --factors or --dtype float32", device=dev,
                       dtype=str(tdtype).replace("torch.", ""))
        require_memory(host, f"the CSC copy of the {n} x {n} matrix", "convert the file to CSC first")
    return chunk, total + host


@validates_matrix(check=_validated)
def fit_sampled(
    A,
    *,
    pattern: str | Pattern | PatternSpec = "chord",
    schedule: SampledSchedule | None = None,
    placement: Placement | None = None,
    time_limit: float | None = None,
    init: SparseFactors | None = None,
    callback=None,
    optimizer: str = "adam",
    factors: int | None = None,
    base: int | None = None,
    symmetric: bool | None = None,
    self_link: bool | None = None,
    permute: int | None = None,
    batch_columns: int | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    error_sample: int | None = None,
    exact_error: bool | None = None,
    confidence: float | None = None,
    start: str | None = None,
    seed: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> SampledFitResult:
    """Fit sparse factors to a large matrix from blocks of its columns, never forming n x n.

    Parameters
    ----------
    A : scipy sparse matrix or ndarray of shape (n, n)
        The target; a sparse A is used as CSC (copied once if it is not).
    pattern, factors, base, symmetric, self_link, permute
        As in :func:`sfa_cli.engine.fit.fit`.
    batch_columns : int, default=256
        Columns per step over all processes together (the global batch);
        results do not depend on how many processes share it.
    epochs : int, default=10
        Passes over all columns, each in a fresh seeded random order.
    lr : float, optional
        Adam's peak step size (default :func:`default_lr`: 0.25 / (M (L+1)),
        0.0016 at n = 4096), reached after a linear warm-up over the first 5%
        of the planned steps, then decayed along a cosine to 5% of it at the
        end of the planned ``epochs``.
    optimizer : {"adam"}
        The only choice: L-BFGS needs the exact objective, which a block of
        columns does not give.
    time_limit : float, optional
        Seconds; the fit stops after the first step past it.
    seed : int, default=0
        Seeds the initial noise, the column orders and the error sample.
    device : {"auto", "cpu", "cuda"}, default="auto"
    dtype : {"float32", "float64"}, default="float32"
    error_sample : int, default=1024
        Columns in the error sample evaluated after every epoch; the best
        factors by this estimate are returned, multiplied by the output
        scale c = <A, P> / ||P||^2 measured on the sample (a least-squares
        step along the product's scale, which never raises the error on the
        sample; ``history`` records it as ``output_scale``).
    exact_error : bool, default=False
        Also compute the exact error of the returned factors, streaming over
        all columns (about a third of an epoch); ``rel_error`` is then exact.
    confidence : float, default=0.95
        Level of ``rel_error_ci``.
    start : {"identity", "paper"}, default="identity"
        The initial factors: ``identity`` makes every factor the identity with
        1% noise on its other entries, scaled so that ||W(1)...W(M)||_F =
        ||A||_F; ``paper`` is the authors' row-averaging start of
        :func:`sfa_cli.engine.fit.fit`. From the averaging start Adam made slower
        progress on sparse graphs and Laplacians (docs/scale.md). A pattern
        without a self link always uses ``paper``.
    init : SparseFactors, optional
        Warm start with the pattern's structure (``start`` is then unused).
    callback : callable, optional
        ``callback(step: SampledFitStep)`` after every step and at each epoch
        end; returning True stops the fit.

    Returns
    -------
    SampledFitResult
        ``stopped_because`` is ``epochs``, ``time_limit``, ``callback``,
        ``exact``, ``diverged`` or ``interrupted`` (Ctrl-C returns the best
        factors so far).
    """
    if optimizer != "adam":
        raise SfaError(f"the sampled fit uses adam (a column block gives no exact objective for {optimizer!r})")
    schedule = typed_options(SampledSchedule, schedule, "fit_sampled", batch_columns=batch_columns, epochs=epochs,
                             lr=lr, error_sample=error_sample, exact_error=exact_error, confidence=confidence,
                             start=start)
    placement = typed_options(Placement, placement, "fit_sampled", seed=seed, device=device, dtype=dtype)
    StopRules(time_limit=time_limit)  # checks it
    pat = make_pattern(A.shape[0], pattern, factors=factors, base=base, symmetric=symmetric, self_link=self_link,
                       permute=permute)
    return _SampledFit(A, pat, schedule, placement).run(init, callback, time_limit)


class _SampledFit:
    """One sampled fit: the column source, the schedule, the error sample, Adam, and the ranks' agreement."""

    def __init__(self, A, pat: Pattern, schedule: SampledSchedule, placement: Placement):
        n = A.shape[0]
        self.n, self.pat, self.schedule, self.seed = n, pat, schedule, placement.seed
        self.batch_columns = min(schedule.batch_columns, n)
        self.rank, self.world = _rank_world()
        dev, self.dtype = resolve_device(placement.device), resolve_dtype(placement.dtype)
        if self.world > 1 and dev.type == "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        self.dev = dev
        self.lr = default_lr(pat) if schedule.lr is None else float(schedule.lr)
        self.structs, _ = pattern_structures(pat, dev)
        chunk, _ = _memory_plan(n, self.structs, pat, self.dtype, dev, A, -(-self.batch_columns // self.world))

        self.t0 = time.perf_counter()
        self.columns = _Columns(A)
        a_total = float(self.columns.sq_norms.sum())
        if a_total == 0.0:
            raise SfaError("the matrix is all zeros; there is nothing to approximate")
        self.scale = math.sqrt(a_total)
        # the fit works on A / ||A||_F: column norms in those units (their total is 1)
        self.a_scaled = self.columns.sq_norms / a_total
        self.objective = ColumnSetObjective(ColumnChain(self.structs, n, dev),
                                            lambda cols: self.columns.torch(cols, dev, self.dtype, self.scale), chunk)
        self.sample = sample_columns(n, schedule.error_sample, self.seed)
        self.steps_per_epoch = -(-n // self.batch_columns)
        self.total_steps = schedule.epochs * self.steps_per_epoch
        self.step = 0

    # -- pieces -------------------------------------------------------------------------
    def start_values(self, init: SparseFactors | None) -> list[torch.Tensor]:
        n, M = self.n, self.pat.factors
        if init is not None:
            if init.n != n or init.num_factors != M:
                raise SfaError(f"the warm start has n={init.n}, {init.num_factors} factors; "
                               f"the pattern needs n={n}, {M}")
            return [v.to(device=self.dev, dtype=self.dtype) / self.scale ** (1.0 / M)
                    for v in init.torch_chain(dtype=torch.float64)[1]]
        # The multiple of I closest to A has norm cos(A, I) = trace(A) / (||A||_F sqrt(n)); an
        # adjacency matrix (zero diagonal) would start at P = 0, Adam's saddle, hence the floor.
        norm = min(max(self.columns.trace / (self.scale * math.sqrt(n)), SAMPLED_DEFAULTS["start_norm_min"]), 1.0)
        return [v.to(self.dev) for v in _start_values(self.structs, n, self.schedule.start, self.seed, self.dtype,
                                                      norm)]

    def lr_at(self, step: int) -> float:
        """Linear warm-up over the first 5% of the steps, then a cosine down to 5% of lr."""
        warmup = SAMPLED_DEFAULTS["warmup_fraction"] * self.total_steps
        final = SAMPLED_DEFAULTS["final_lr_fraction"]
        if step < warmup:
            return self.lr * (step + 1) / (warmup + 1)
        t = min((step - warmup) / max(self.total_steps - warmup, 1), 1.0)
        return self.lr * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t)))

    def _reduce(self, values: list) -> list:
        """Sums over the ranks of a few float64 numbers (the step's loss, the stop flags)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_reduce_device(self.dev, self.world))
        return _all_reduce(t, self.world).tolist()

    def column_sums(self, values, cols: np.ndarray) -> np.ndarray:
        """:meth:`ColumnSetObjective.column_sums` for cols, the columns split over the ranks."""
        mine = _share(np.arange(len(cols)), self.rank, self.world)
        out = np.zeros((3, len(cols)), dtype=np.float64)
        out[:, mine] = self.objective.column_sums(values, cols[mine])
        if self.world > 1:
            out = _all_reduce(torch.from_numpy(out).to(_reduce_device(self.dev, self.world)), self.world).cpu().numpy()
        return out

    def estimate(self, values) -> dict:
        """Sample estimate of the factors with their best output scale (see :func:`_rescaled`)."""
        c, r = _rescaled(self.column_sums(values, self.sample))
        est = _estimate(r, self.a_scaled[self.sample], self.n, 1.0, self.schedule.confidence)
        return {**est, "output_scale": c}

    def checkpoint(self, run: Run, epoch: float, train_rel: float | None) -> dict:
        """Estimate the current factors' error, record it, and keep them when they are the best."""
        est = self.estimate(run.params)
        run.history.append({"epoch": epoch, "iteration": self.step, "evaluations": self.step, "seconds": run.seconds,
                            "rel_error": est["rel_error_estimate"], "rel_error_ci": est["rel_error_ci"],
                            "output_scale": est["output_scale"], "train_rel_error": train_rel})
        if run.keep_if_best(est["rel_error_estimate"]) or self.best_estimate is None:
            self.best_estimate = est
        return est

    def adam_step(self, run: Run, adam: Adam, block: np.ndarray) -> tuple[float, bool]:
        """One update from the columns ``block`` (this rank's share); returns (summed loss, time is up)."""
        params = run.params
        for p in params:
            p.grad = None
        loss, cross, power = self.objective(params, _share(block, self.rank, self.world), self.output_scale)
        for p in params:
            if p.grad is None:  # a rank with no columns this step
                p.grad = torch.zeros_like(p)
        _reduce_gradients(params, self.world, self.dev)
        loss, nonfinite, by_time, cross, power = self._reduce(
            [loss, not math.isfinite(loss), run.time_is_up(), cross, power])
        self.running = [SCALE_DECAY * self.running[0] + cross, SCALE_DECAY * self.running[1] + power]
        if self.running[0] > 0 and self.running[1] > 0:
            self.output_scale = self.running[0] / self.running[1]
        for p in params:
            p.grad.mul_(self.n / len(block))  # unbiased estimate of the full gradient
        adam.step(lr=self.lr_at(self.step))
        self.step += 1
        return (loss if nonfinite == 0 else math.nan), by_time > 0

    def _agree(self, **flags) -> str | None:
        """The first flag raised on any rank, seen by every rank (so that all stop at the same step)."""
        raised = self._reduce(list(flags.values()))
        return next((name for name, v in zip(flags, raised) if v > 0), None)

    # -- the loop -----------------------------------------------------------------------
    def run(self, init, callback, time_limit) -> SampledFitResult:
        n, epochs, steps = self.n, self.schedule.epochs, self.steps_per_epoch
        params = [v.clone().requires_grad_(True) for v in self.start_values(init)]
        run = Run(params, time_limit=time_limit)
        run.t0 = self.t0
        adam = Adam(params)
        self.best_estimate = None
        initial = self.checkpoint(run, 0, None)
        # The product is fitted as c W(1)...W(M), c = <A, P> / ||P||^2 tracked over the last steps'
        # blocks and held fixed within a step: a reparametrisation of the same objective (c^(1/M)
        # goes into every factor at the end) whose gradient lacks the component that only shrinks
        # P, the one that takes Adam to the saddle P = 0 (docs/scale.md).
        self.output_scale, self.running = initial["output_scale"], [0.0, 0.0]
        epochs_done, epoch, seen, train_rel = 0, 0, 0, None
        try:
            for epoch in range(1, epochs + 1):
                order = np.random.default_rng([int(self.seed), epoch]).permutation(n).astype(np.int64)
                train_sq, seen = 0.0, 0
                for k, first in enumerate(range(0, n, self.batch_columns)):
                    block = order[first : first + self.batch_columns]
                    loss, by_time = self.adam_step(run, adam, block)
                    train_sq += 2.0 * loss
                    seen += len(block)
                    # the blocks seen so far estimate ||A - cP||_F^2 / ||A||_F^2 as n / seen times their sum
                    train_rel = math.sqrt(max(train_sq * n / seen, 0.0)) if math.isfinite(train_sq) else math.nan
                    wants = callback is not None and bool(callback(SampledFitStep(
                        self.step, self.step, run.seconds, train_rel, run.best_rel, epoch, epochs, k + 1, steps)))
                    reason = self._agree(diverged=not math.isfinite(loss), callback=wants, time_limit=by_time)
                    if reason is not None:
                        if reason != "diverged":
                            self.checkpoint(run, epoch - 1 + seen / n, train_rel)
                        raise Stop(reason)
                epochs_done = epoch
                est = self.checkpoint(run, epoch, train_rel)
                wants = callback is not None and bool(callback(SampledFitStep(
                    self.step, self.step, run.seconds, est["rel_error_estimate"], run.best_rel, epoch, epochs,
                    steps, steps, True, tuple(est["rel_error_ci"]))))
                reason = self._agree(exact=run.best_rel <= EXACT_REL_ERROR, callback=wants)
                if reason is not None:
                    raise Stop(reason)
            run.stopped_because = "epochs"
        except Stop as stop:
            run.stopped_because = stop.reason
        except KeyboardInterrupt:
            run.stopped_because = "interrupted"
        return self.result(run, initial, epochs_done)

    def result(self, run: Run, initial: dict, epochs_done: int) -> SampledFitResult:
        chosen = self.best_estimate
        c, exact = chosen["output_scale"], None
        if self.schedule.exact_error and run.stopped_because != "interrupted":
            r, x, p = self.column_sums(run.best, np.arange(self.n, dtype=np.int64)).sum(axis=1)
            exact = math.sqrt(max(r + 2.0 * (1.0 - c) * x + (c * c - 1.0) * p, 0.0))
        # A's scale and the output scale back into the factors, evenly
        factor_scale = (self.scale * c) ** (1.0 / self.pat.factors)
        np_dtype = np.float32 if self.dtype == torch.float32 else np.float64
        values = [(v.detach().double() * factor_scale).cpu().numpy().astype(np_dtype) for v in run.best]
        return SampledFitResult(
            approximation=SparseFactors.from_pattern(self.pat, values),
            rel_error=exact if exact is not None else chosen["rel_error_estimate"],
            initial_rel_error=initial["rel_error_estimate"],
            iterations=self.step,
            evaluations=self.step,
            seconds=run.seconds,
            device=str(self.dev),
            dtype=str(self.dtype).replace("torch.", ""),
            optimizer="adam",
            stopped_because=run.stopped_because,
            history=run.history,
            rel_error_estimate=chosen["rel_error_estimate"],
            rel_error_ci=tuple(chosen["rel_error_ci"]),
            rel_error_is_estimate=exact is None and not chosen["exact"],
            confidence=self.schedule.confidence,
            error_sample=len(self.sample),
            epochs=epochs_done,
            steps_per_epoch=self.steps_per_epoch,
            batch_columns=self.batch_columns,
            lr=self.lr,
            processes=self.world,
            peak_memory_bytes=peak_rss_bytes(),
            peak_device_memory_bytes=peak_device_bytes(self.dev),
            exact_rel_error=exact,
        )


def _reduce_device(dev: torch.device, world: int) -> torch.device:
    """Where collective buffers live: NCCL needs CUDA tensors, gloo takes CPU ones."""
    if world > 1:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return dev
        return torch.device("cpu")
    return dev


def _reduce_gradients(params, world: int, dev) -> None:
    """Sum the gradients over the ranks, in one all-reduce of their own dtype."""
    if world == 1:
        return
    where = _reduce_device(dev, world)
    flat = torch.cat([p.grad.reshape(-1).to(where) for p in params])
    _all_reduce(flat, world)
    i = 0
    for p in params:
        k = p.numel()
        p.grad.copy_(flat[i : i + k].view_as(p.grad))
        i += k
