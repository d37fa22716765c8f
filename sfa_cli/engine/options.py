"""Typed options of the fits: the sparsity pattern, the stopping rules, the optimiser, the
column-block schedule and where to compute.

Each is a frozen dataclass checked when it is built (an impossible value raises
:class:`~sfa_cli.errors.SfaError` naming the option), so a function that receives one
can trust it. ``None`` means "the documented default for this n".

Example
-------
>>> PatternSpec("chord", factors=3).build(16).factors
3
>>> StopRules(max_iter=0)
Traceback (most recent call last):
...
sfa_cli.errors.SfaError: max_iter must be an integer >= 1; got 0
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

from sfa_cli.errors import SfaError

__all__ = ["PatternSpec", "StopRules", "OptimizerSpec", "Placement", "SampledSchedule",
           "PATTERN_NAMES", "OPTIMIZERS", "FIT_STARTS", "DEVICES", "DTYPES", "SAMPLED_STARTS"]

PATTERN_NAMES = ("chord", "butterfly")
OPTIMIZERS = ("lbfgs", "adam", "lm")
FIT_STARTS = ("auto", "paper", "identity", "lifted")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")
SAMPLED_STARTS = ("identity", "paper")
#: Patterns needing more than this are checked against the memory available before they are built.
_PATTERN_GUARD_FROM = 256 << 20


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise SfaError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _int_at_least(name: str, value, low: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise SfaError(f"{name} must be an integer >= {low}; got {value!r}")


def _positive(name: str, value, optional: bool = True, allow_zero: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise SfaError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number; got {value!r}")


class _Options:
    """Shared helpers: ``replace`` with checks, ``to_dict``, and building from loose keywords."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, options: dict | None, *, ignore_none: bool = True):
        """Take the keys this class has from ``options`` (``None`` values keep the defaults)."""
        options = options or {}
        return cls(**{k: v for k, v in options.items() if k in cls.names() and not (ignore_none and v is None)})


@dataclass(frozen=True)
class PatternSpec(_Options):
    """Which fixed sparsity pattern the factors have.

    Parameters
    ----------
    name : {"chord", "butterfly"}, default="chord"
    factors : int, optional
        M; default ceil(log_base n) for Chord, log2 n for butterfly.
    base : int, optional
        Chord offsets are powers of it (default 2).
    symmetric : bool, default=False
        Chord offsets +b^k and -b^k.
    self_link : bool, default=True
        Chord rows hold the diagonal.
    permute : int, optional
        Relabel the nodes by the permutation drawn from this seed.
    """

    name: str = "chord"
    factors: int | None = None
    base: int | None = None
    symmetric: bool = False
    self_link: bool = True
    permute: int | None = None

    def __post_init__(self):
        _choice("pattern", self.name, PATTERN_NAMES)
        _int_at_least("factors", self.factors, 1)
        _int_at_least("base", self.base, 2)
        if self.name == "butterfly" and (self.base is not None or self.symmetric or not self.self_link
                                         or self.permute is not None):
            raise SfaError("the butterfly pattern takes no options but the number of factors")

    def entries(self, n: int) -> tuple[int, int]:
        """(factors M, non-zeros per row k) of the pattern for size n, computed without building it."""
        from sfa_cli.approximations.patterns import _ceil_log, chord_offsets

        if self.name == "butterfly":
            return (self.factors or max(1, int(n).bit_length() - 1)), 2
        base = self.base or 2
        k = len(chord_offsets(n, base, symmetric=self.symmetric, self_link=self.self_link))
        return (self.factors or _ceil_log(n, base)), max(1, k)

    def build(self, n: int):
        """The :class:`~sfa_cli.approximations.patterns.Pattern` for size n (its memory checked first: a file that
        declares a huge n must not make the pattern's index tables before anything refuses it)."""
        from sfa_cli.memory import require_memory
        from sfa_cli.approximations.patterns import butterfly_pattern, chord_pattern

        M, k = self.entries(n)
        # the shared index table (int64), and per non-zero its CSR index, its structure's gather
        # indices, the value, its gradient and the optimiser's two moments (float32): about 40 bytes.
        # Only a pattern of hundreds of MiB can be a danger; the fits' own guards plan the rest.
        need = 8.0 * n * k + 40.0 * M * n * k
        if need > _PATTERN_GUARD_FROM:
            require_memory(need, f"the {self.name} pattern for n={n} ({M} factors x {k} non-zeros per row)",
                           "give fewer factors (--factors) or a budget (--budget)")
        if self.name == "butterfly":
            return butterfly_pattern(n, factors=self.factors)
        options = {"factors": self.factors, "base": self.base, "permute": self.permute}
        return chord_pattern(n, symmetric=self.symmetric, self_link=self.self_link,
                             **{k: v for k, v in options.items() if v is not None})


@dataclass(frozen=True)
class StopRules(_Options):
    """When an optimiser loop stops (the best iterate is kept whichever rule fires).

    Parameters
    ----------
    max_iter : int, optional
        Iterations; default :func:`sfa_cli.engine.fit.default_max_iter` of n.
    time_limit : float, optional
        Seconds of fitting.
    tol : float, default=1e-5
        Stop when the best relative error improved by less than this fraction
        over the last ``window`` iterations.
    window : int, default=50
    patience : float, default=0.001
        Stop when the best relative error improved by less than this fraction of itself over
        the last quarter of the seconds the run has taken (checked from
        :data:`sfa_cli.engine.optimize.PATIENCE_AFTER` seconds on, over at least ``window``
        iterations, once the error left the start's plateau): continuing would cost more than it
        is worth. ``0`` turns the rule off.
    """

    max_iter: int | None = None
    time_limit: float | None = None
    tol: float = 1e-5
    window: int = 50
    patience: float = 0.001

    def __post_init__(self):
        _int_at_least("max_iter", self.max_iter, 1)
        _positive("time_limit", self.time_limit)
        _positive("tol", self.tol, optional=False, allow_zero=True)
        _int_at_least("window", self.window, 1, optional=False)
        _positive("patience", self.patience, optional=False, allow_zero=True)


@dataclass(frozen=True)
class OptimizerSpec(_Options):
    """The optimiser of a full-batch fit.

    Parameters
    ----------
    optimizer : {"lbfgs", "adam", "lm"}, default="lbfgs"
        L-BFGS, Adam, or Levenberg-Marquardt with matrix-free CG (:mod:`sfa_cli.engine.gauss_newton`).
    lr : float, optional
        Step size: 1 for L-BFGS (its line search scales it), 0.01 for Adam (unused by lm).
    history_size : int, default=20
        L-BFGS memory.
    start : {"auto", "paper", "identity", "lifted"}, default="auto"
        The factors' start: the paper's row averages with 1% noise; every factor the identity plus
        small noise (the product scaled to unit norm; needs the self link); ``lifted`` the factors
        read off projections (RAAR) on the product's paths (:mod:`sfa_cli.engine.lifted`: exact on
        products of 2-5 Chord factors; its sweeps take at most half the time limit; refused above
        :data:`sfa_cli.engine.lifted.MAX_PATHS` paths);
        ``auto`` the identity start when A's diagonal holds at least a quarter of ||A||_F^2
        (Laplacians, covariances, kernels) and the pattern has the self link, else the paper's. A
        warm start (``init``) replaces it.
    """

    optimizer: str = "lbfgs"
    lr: float | None = None
    history_size: int = 20
    start: str = "auto"

    def __post_init__(self):
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("start", self.start, FIT_STARTS)
        _positive("lr", self.lr)
        _int_at_least("history_size", self.history_size, 1, optional=False)


@dataclass(frozen=True)
class Placement(_Options):
    """Where and in what precision to compute, and the seed of everything random.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}, default="auto"
    dtype : {"float32", "float64"}, default="float32"
    seed : int, default=0
    """

    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _int_at_least("seed", self.seed, 0, optional=False)


@dataclass(frozen=True)
class SampledSchedule(_Options):
    """The column-block (sampled) fit's schedule and its error sample.

    Parameters
    ----------
    batch_columns : int, default=256
        Columns per step over all processes.
    epochs : int, default=10
        Passes over all columns.
    lr : float, optional
        Adam's peak step size (default :func:`sfa_cli.engine.sampled.default_lr`).
    error_sample : int, default=1024
        Columns of the seeded sample that estimates the error.
    confidence : float, default=0.95
        Level of the error's interval.
    exact_error : bool, default=False
        Also stream over every column for the exact error at the end.
    start : {"identity", "paper"}, default="identity"
    """

    batch_columns: int = 256
    epochs: int = 10
    lr: float | None = None
    error_sample: int = 1024
    confidence: float = 0.95
    exact_error: bool = False
    start: str = "identity"

    def __post_init__(self):
        _int_at_least("batch_columns", self.batch_columns, 1, optional=False)
        _int_at_least("epochs", self.epochs, 1, optional=False)
        _positive("lr", self.lr)
        _int_at_least("error_sample", self.error_sample, 1, optional=False)
        if not (isinstance(self.confidence, numbers.Real) and 0 < self.confidence < 1):
            raise SfaError(f"confidence must be a number between 0 and 1; got {self.confidence!r}")
        _choice("start", self.start, SAMPLED_STARTS)
