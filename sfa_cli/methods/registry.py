"""The methods sfa fits and compares, as data: one record per method.

A :class:`MethodRecord` names the method, says in one line what it is and what its
parameters count, lists the options it takes (the shared fitting options by name, and
its own options with their types, defaults and help), whether it needs dense n x n work
(then ``compare`` reports it "not applicable" at scale), and where its function lives.
The CLI's ``--method``/``--methods`` choices, its option checks and help, ``compare``'s
dispatch and the README's method table are all read from :data:`METHODS`.

Adding a method is one module with a function ``run(A, budget, *, seed, options, scale,
schedule) -> (Approximation, note)`` plus one record here.

Importing this module imports neither torch nor any method: functions are resolved
when a method first runs.

Example
-------
>>> METHODS["tsvd"].parameters
'2 N r'
>>> METHODS["sparse"].takes("order"), METHODS["topk"].takes("max_iter")
(True, False)
>>> method_record("svd2")
Traceback (most recent call last):
...
sfa_cli.errors.SfaError: unknown method 'svd2'; choose from chord, butterfly, tsvd, rsvd, topk, monarch, lowrank+sparse, sparse, chord+sparse
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from sfa_cli.errors import SfaError

__all__ = ["MethodRecord", "MethodOption", "METHODS", "method_record", "check_methods", "FIT_OPTIONS",
           "VARIANT_OPTIONS", "PATTERN_OPTIONS", "SAMPLED_OPTIONS", "method_table"]

#: The shared options of the gradient fits (sfa_cli.engine.options.StopRules, OptimizerSpec, Placement).
FIT_OPTIONS = ("optimizer", "lr", "max_iter", "time_limit", "tol", "patience", "device", "dtype", "start")
#: Chord variants a method sized by chord_at_budget can take.
VARIANT_OPTIONS = ("symmetric", "self_link")
#: The pattern's own size options (the Chord fit of `sfa fit`; a budget replaces factors and base).
PATTERN_OPTIONS = ("pattern", "factors", "base", "permute")
#: The column-block fit's schedule (sfa_cli.engine.options.SampledSchedule).
SAMPLED_OPTIONS = ("sampled", "batch_columns", "epochs", "exact_error")


@dataclass(frozen=True)
class MethodOption:
    """An option that belongs to one method (beyond the shared fitting options)."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple | None = None

    def check(self, method: str, value):
        """The value, checked; raises SfaError naming the method and the option."""
        if value is None:
            return self.default
        if self.choices is not None and value not in self.choices:
            raise SfaError(f"method {method}: {self.name} must be one of {', '.join(map(str, self.choices))}; "
                           f"got {value!r}")
        if self.type is int and (isinstance(value, bool) or int(value) != value or value < 1):
            raise SfaError(f"method {method}: {self.name} must be a positive integer; got {value!r}")
        return self.type(value)


@dataclass(frozen=True)
class MethodRecord:
    """One method: what it is, what it takes, and where its function lives.

    Attributes
    ----------
    name : str
        As on the command line (``--method``, ``--methods``).
    function : str
        ``"module:attribute"`` of ``run(A, budget, *, seed, options, scale, schedule) -> (approx, note)``,
        imported when the method first runs.
    description : str
        One line for help texts and the README table.
    parameters : str
        What the method's parameter count counts.
    shared : tuple of str
        Names of the shared options it takes (from FIT_OPTIONS, VARIANT_OPTIONS, PATTERN_OPTIONS,
        SAMPLED_OPTIONS); ``seed`` is taken by every method.
    own : tuple of MethodOption
        Options of its own.
    dense_only : str or None
        Why it needs dense n x n work (then it is not run at scale), or None.
    """

    name: str
    function: str
    description: str
    parameters: str
    shared: tuple = ()
    own: tuple = field(default=())
    dense_only: str | None = None

    def takes(self, option: str) -> bool:
        """Whether the method uses ``option`` (a shared or an own option name)."""
        return option == "seed" or option in self.shared or any(o.name == option for o in self.own)

    def own_option(self, name: str) -> MethodOption | None:
        return next((o for o in self.own if o.name == name), None)

    def check_options(self, options: dict | None) -> dict:
        """The method's own options, checked, with defaults for those not given."""
        options = dict(options or {})
        unknown = [k for k in options if self.own_option(k) is None]
        if unknown:
            allowed = ", ".join(o.name for o in self.own) or "none"
            raise SfaError(f"method {self.name} has no option {unknown[0]!r} (its options: {allowed})")
        return {o.name: o.check(self.name, options.get(o.name)) for o in self.own if options.get(o.name) is not None}

    @property
    def run(self):
        """The method's function (imported on first use)."""
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(module), attribute)


_ORDER = MethodOption("order", str, "joint", "joint supports, or FAuST's hierarchy of two-factor splits",
                      ("joint", "hierarchical"))
_SPARSE_FACTORS = MethodOption("factors", int, 2, "number of sparse factors M")

_RECORDS = (
    MethodRecord("chord", "sfa_cli.methods.runs:chord",
                 "the paper's sparse factorization (fewer factors or a larger base when the budget is smaller; "
                 "the note says which)", "non-zeros of the factors",
                 shared=FIT_OPTIONS + VARIANT_OPTIONS + PATTERN_OPTIONS + SAMPLED_OPTIONS),
    MethodRecord("butterfly", "sfa_cli.methods.runs:butterfly",
                 "closed-form hierarchical butterfly (Le, Zheng, Riccietti, Gribonval 2022; N a power of two), "
                 "exact on butterfly products, then an L-BFGS polish (`--max-iter`, the fit's default)", "2 N log2 N",
                 shared=FIT_OPTIONS + SAMPLED_OPTIONS),
    MethodRecord("tsvd", "sfa_cli.methods.runs:tsvd",
                 "truncated SVD, rank floor(budget / 2N) (LAPACK up to N = 4096; above, `svds` for a sparse "
                 "matrix, a randomized range finder with 4 power iterations for a dense one)", "2 N r"),
    MethodRecord("rsvd", "sfa_cli.methods.runs:rsvd",
                 "randomized SVD at the same rank (`torch.svd_lowrank`)", "2 N r"),
    MethodRecord("topk", "sfa_cli.methods.runs:topk",
                 "the `budget` largest-magnitude entries (exact when nnz <= budget)", "k"),
    MethodRecord("monarch", "sfa_cli.methods.runs:monarch",
                 "closed-form Monarch projection (Dao et al. 2022), N = s0 s1", "N (s0 + s1)",
                 dense_only="reads all n^2 entries of A as dense blocks"),
    MethodRecord("lowrank+sparse", "sfa_cli.methods.runs:lowrank_plus_sparse",
                 "TSVD plus the largest entries of the residual, alternated, best split of the budget", "2 N r + k",
                 dense_only="reads all n^2 entries of A - L"),
    MethodRecord("sparse", "sfa_cli.methods.runs:learned_sparse",
                 "learned-support sparse factors: the fit also chooses where the non-zeros go (projected steps on "
                 "the structured kernels; `sfa_cli/methods/learned.py`, see docs/quality.md; above N = 8192 two "
                 "factors fitted from blocks of A, `sfa_cli/methods/learned_scale.py`)", "non-zeros of the factors",
                 shared=("max_iter", "time_limit", "device", "dtype"), own=(_SPARSE_FACTORS, _ORDER)),
    MethodRecord("chord+sparse", "sfa_cli.methods.runs:chord_plus_sparse",
                 "Chord factors on part of the budget plus the largest entries of the residual",
                 "non-zeros + k", shared=FIT_OPTIONS + VARIANT_OPTIONS,
                 dense_only="needs all n^2 entries of A - P"),
)

#: name -> MethodRecord, in the order compare runs and reports them.
METHODS: dict[str, MethodRecord] = {r.name: r for r in _RECORDS}


def method_record(name: str) -> MethodRecord:
    """The record of a method; an unknown name gets the list of choices."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise SfaError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def check_methods(methods) -> list[str]:
    """Validate method names against the registry (all of them when ``methods`` is empty)."""
    names = list(METHODS) if not methods else list(methods)
    for name in names:
        method_record(name)
    return names


def method_table() -> str:
    """The README's method table (Markdown), made from the records."""
    lines = ["| method | what it is | parameters |", "|---|---|---|"]
    lines += [f"| `{r.name}` | {r.description} | {r.parameters} |" for r in _RECORDS]
    return "\n".join(lines)
