"""sfa: sparse factorization of large square matrices.

Public API (re-exported names only); see the README for the command line.
"""
from sfa_cli._version import __version__
from sfa_cli.errors import SfaError

__all__ = ["__version__", "SfaError"]
