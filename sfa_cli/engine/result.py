"""What a fit returns, and the pieces that the full and the sampled fit share.

``FitResult`` (the one result type of :func:`sfa_cli.engine.fit.fit`,
:func:`sfa_cli.engine.sampled.fit_sampled` and the LM engine), ``make_pattern`` (a Pattern from a
name, a ``PatternSpec`` or a Pattern) and ``typed_options``. Kept apart from ``fit`` so that the
optimisers (``gauss_newton``) and ``sampled`` import them without importing ``fit``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sfa_cli.errors import SfaError
from sfa_cli.approximations.patterns import Pattern
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.engine.options import PatternSpec

__all__ = ["FitResult", "make_pattern", "typed_options"]


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
        ``max_iter``, ``time_limit``, ``time_limit_before_first_step`` (the limit came during the
        first evaluation: the result is the start), ``tol``, ``patience``, ``exact``, ``callback``,
        ``diverged`` or ``interrupted``.
    peak_memory_bytes : int
        Peak resident memory of this process (host) when the fit ended, in bytes.
    start : str
        Which start the returned factors came from: ``paper``, ``identity``, ``lifted`` or ``warm``.
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
    start: str = ""

    @property
    def interrupted(self) -> bool:
        return self.stopped_because == "interrupted"

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
            "start": self.start,
            "stopped_because": self.stopped_because,
            "interrupted": self.interrupted,
            "pattern": self.approximation.pattern,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_device_memory_bytes": self.peak_device_memory_bytes,
        }
        if history:
            out["history"] = list(self.history)
        return out


def typed_options(cls, given, caller: str, **loose):
    """``given`` (an instance of the options dataclass ``cls``) or one built from the loose keywords.

    ``None`` keywords keep the class defaults; giving both the dataclass and a loose keyword of it
    is an error (which one would win is not obvious).
    """
    loose = {k: v for k, v in loose.items() if v is not None}
    if given is None:
        return cls(**loose)
    if not isinstance(given, cls):
        raise SfaError(f"{caller}: expected a {cls.__name__}; got {type(given).__name__}")
    if loose:
        raise SfaError(f"{caller}: give {', '.join(sorted(loose))} inside the {cls.__name__} or as keywords, not both")
    return given


def make_pattern(n: int, pattern: str | Pattern | PatternSpec = "chord", **options) -> Pattern:
    """A Pattern object for size n from a name and its options, a PatternSpec, or a Pattern.

    ``None`` options are left at their defaults.
    """
    if isinstance(pattern, Pattern):
        if pattern.n != n:
            raise SfaError(f"the pattern is for n={pattern.n} but the matrix has n={n}")
        extra = sorted(k for k, v in options.items() if v is not None)
        if extra:
            raise SfaError(f"a Pattern object takes no pattern options; got {extra}")
        return pattern
    if isinstance(pattern, PatternSpec):
        return typed_options(PatternSpec, pattern, "pattern", **options).build(n)
    return PatternSpec(name=pattern, **{k: v for k, v in options.items() if v is not None}).build(n)
