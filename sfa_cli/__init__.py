"""sfa: sparse factorization of large square matrices.

Public API (re-exported names only); see the README for the command line.
The fitting and comparison functions live in their modules, whose names they
share: ``from sfa_cli.engine.fit import fit``, ``from sfa_cli.methods.compare import compare``.

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

__all__ = [
    "__version__", "SfaError", "Approximation", "load_approximation", "SparseFactors", "FitResult",
    "load_matrix", "save_matrix", "relative_error", "as_square_matrix", "chord_pattern", "butterfly_pattern",
]

# name -> module, imported on first access (PEP 562), so `import sfa_cli` stays light.
_LAZY = {
    "Approximation": "sfa_cli.approximations.base",
    "load_approximation": "sfa_cli.approximations.base",
    "relative_error": "sfa_cli.metrics",
    "as_square_matrix": "sfa_cli.validation",
    "chord_pattern": "sfa_cli.approximations.patterns",
    "butterfly_pattern": "sfa_cli.approximations.patterns",
    "SparseFactors": "sfa_cli.approximations.sparse_factors",
    "FitResult": "sfa_cli.engine.fit",
    "load_matrix": "sfa_cli.io",
    "save_matrix": "sfa_cli.io",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sfa_cli' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
