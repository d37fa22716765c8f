"""sfa: sparse factorization of large square matrices.

The public API: what a scientist calls, re-exported here so that ``import sfa_cli`` is all
one needs (``sfa_cli.fit(A)``, ``sfa_cli.compare(A)``, ``sfa_cli.load_matrix(path)``); the
command line is described in the README. The modules behind these names live in folders by
layer (``cli``, ``methods``, ``engine``, ``approximations``, ``io``; docs/architecture.md).

Importing the package is light (no numpy, scipy or torch): every name is
imported on first use. :func:`load_approximation` reads files of every kind
in a fresh process (each kind's module is imported when a file needs it).
"""
import os

# OpenMP threads that spin while waiting made a fit 3-4x slower whenever another
# process shared the cores (a batch run, a second job); passive waiting costs
# little on an idle machine. Set before torch is imported; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sfa_cli._version import __version__  # noqa: E402
from sfa_cli.errors import SfaError  # noqa: E402

# name -> module, imported on first access (PEP 562), so `import sfa_cli` stays light.
_LAZY = {
    # reading, writing, measuring
    "load_matrix": "sfa_cli.io",
    "save_matrix": "sfa_cli.io",
    "as_square_matrix": "sfa_cli.validation",
    "relative_error": "sfa_cli.metrics",
    "best_scale": "sfa_cli.metrics",
    "error_report": "sfa_cli.engine.sampled",
    "matrix_info": "sfa_cli.info",
    # approximations
    "Approximation": "sfa_cli.approximations.base",
    "load_approximation": "sfa_cli.approximations.base",
    "SparseFactors": "sfa_cli.approximations.sparse_factors",
    "LowRank": "sfa_cli.approximations.kinds",
    "SparseMatrix": "sfa_cli.approximations.kinds",
    "Monarch": "sfa_cli.approximations.kinds",
    "SumApproximation": "sfa_cli.approximations.kinds",
    "chord_pattern": "sfa_cli.approximations.patterns",
    "butterfly_pattern": "sfa_cli.approximations.patterns",
    # fitting sparse factors
    "fit": "sfa_cli.engine.fit",
    "fit_sampled": "sfa_cli.engine.sampled",
    "lifted_start": "sfa_cli.engine.lifted",
    "FitResult": "sfa_cli.engine.result",
    "PatternSpec": "sfa_cli.engine.options",
    "StopRules": "sfa_cli.engine.options",
    "OptimizerSpec": "sfa_cli.engine.options",
    "Placement": "sfa_cli.engine.options",
    "SampledSchedule": "sfa_cli.engine.options",
    # the methods sfa compares
    "compare": "sfa_cli.methods.compare",
    "run_method": "sfa_cli.methods.compare",
    "truncated_svd": "sfa_cli.methods.low_rank",
    "randomized_svd": "sfa_cli.methods.low_rank",
    "top_k": "sfa_cli.methods.sparse",
    "lowrank_plus_sparse": "sfa_cli.methods.sparse",
    "monarch": "sfa_cli.methods.monarch",
    "butterfly_closed_form": "sfa_cli.methods.butterfly",
    "learned_sparse": "sfa_cli.methods.learned",
    "learned_at_scale": "sfa_cli.methods.learned_scale",
    "chord_plus_sparse": "sfa_cli.methods.chord_sparse",
    # torch modules
    "ChordMixing": "sfa_cli.nn",
    "FactorizedLinear": "sfa_cli.nn",
}

__all__ = ["__version__", "SfaError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sfa_cli' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
