"""The sizes at which sfa changes its way of working, in one place (imports nothing heavy).

Each constant has one meaning; modules import it from here rather than keeping a copy.
Read at call time where tests need to lower them (``monkeypatch.setattr(limits, ...)``).
"""

__all__ = ["DENSE_FIT_MAX_N", "EXACT_ERROR_MAX_N", "SCALE_ABOVE", "DENSE_LIMIT", "EXACT_RANK_MAX_N", "DISPLAY_N"]

#: Largest n for which a sparse input is densified for the full-batch fit; above it the fit,
#: and ``compare``, work from column blocks (the sampled fit).
DENSE_FIT_MAX_N = 8192
#: Largest n for which ``eval`` and ``compare`` compute the exact error by default (a product with
#: every column); above it they estimate it from a seeded column sample.
EXACT_ERROR_MAX_N = 8192
#: A sparse input with n above this is compared at scale (nothing n x n formed).
SCALE_ABOVE = DENSE_FIT_MAX_N
#: Largest n for which ``to_dense`` / ``sfa reconstruct`` form the matrix by default (n^2 doubles = 2 GiB).
DENSE_LIMIT = 16384
#: Largest n whose rank ``sfa info`` computes by a full SVD.
EXACT_RANK_MAX_N = 4096
#: Cells per side of a panel of ``sfa show --plot``: a support or matrix with n above this is drawn
#: binned (counts, block maxima) into DISPLAY_N x DISPLAY_N cells, never formed n x n.
DISPLAY_N = 512
