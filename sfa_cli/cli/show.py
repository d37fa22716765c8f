"""What `sfa show` computes: a saved approximation's structure, its error on a matrix, its picture.

:func:`show_approximation` is the command's one call: it reads the file, builds
the summary (:func:`sfa_cli.approximations.structure.structure`), measures the
relative error on MATRIX the way `sfa eval` does (:func:`sfa_cli.engine.sampled.error_report`
with its defaults: exact up to N = 8192, an estimate from a seeded column
sample above) and draws the plot (:func:`plot_structure`).

The plot never forms more than :data:`sfa_cli.limits.DISPLAY_N` squared cells per
panel: a support is binned from its index arrays (:meth:`Support.grid`), and A,
A_hat and |A - A_hat| are read in column blocks (``A_hat.columns(J)``), each
block's magnitudes reduced to the maximum over bins of rows and columns; above
N = 8192 (where the error is an estimate too) only one column per column bin is
read. Each block is sized to :data:`VIEW_BLOCK_BYTES` and checked with
:func:`sfa_cli.memory.require_memory` before it is formed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sfa_cli import limits
from sfa_cli.errors import SfaError, printable
from sfa_cli.memory import require_memory

__all__ = ["show_approximation", "measure", "matrix_views", "plot_structure", "PLOT_SUFFIXES", "VIEW_BLOCK_BYTES"]

#: What ``sfa show --plot`` writes (matplotlib picks the format from the extension).
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
#: Bytes a column block of the matrix views may take (A, A_hat, their difference and temporaries, float64).
VIEW_BLOCK_BYTES = 64 << 20


def measure(A, approx, *, factors: str = "FACTORS", matrix: str = "MATRIX", sample: int | None = None,
            seed: int = 0) -> dict:
    """The relative error of ``approx`` on ``A`` as `sfa eval` reports it (exact up to N = 8192, above
    an estimate from ``sample`` seeded columns, by default error_report's).

    Returns the dict of :func:`sfa_cli.engine.sampled.error_report` (``rel_error``,
    ``rel_error_is_estimate``, and for an estimate its interval and sample).

    Raises
    ------
    SfaError
        The sizes differ (naming both files), or the error cannot be measured.
    """
    from sfa_cli.engine.sampled import error_report

    if A.shape[0] != approx.n:
        raise SfaError(f"{printable(factors)}: the approximation is {approx.n} x {approx.n} but {printable(matrix)} "
                       f"is {A.shape[0]} x {A.shape[0]}")
    options = {"sample": sample} if sample is not None else {}
    return error_report.trusted(A, approx, seed=seed, **options)


def show_approximation(factors, matrix=None, *, plot=None, force: bool = False, display: int | None = None,
                       error_sample: int | None = None, seed: int = 0) -> dict:
    """Summary of a saved approximation; with ``matrix`` its error; with ``plot`` its picture, written.

    Parameters
    ----------
    factors : str or path-like
        Any file :func:`~sfa_cli.approximations.base.load_approximation` reads.
    matrix : str or path-like, optional
        A matrix file (:func:`~sfa_cli.io.load_matrix`) of the same n.
    plot : str or path-like, optional
        Where to write the picture (.png, .pdf or .svg; checked by the caller before).
    force : bool
        Passed to the atomic write of the plot.
    display : int, optional
        Cells per side of a panel.  [default: ``limits.DISPLAY_N``]
    error_sample, seed : int, optional
        The column sample of an estimated error (above N = 8192), as `sfa eval`'s.

    Returns
    -------
    dict
        ``file``, the :func:`~sfa_cli.approximations.structure.structure` fields and, with
        ``matrix``, ``path`` and the error fields of ``measure``; with ``plot``, ``plot``.
    """
    from sfa_cli.approximations.base import load_approximation
    from sfa_cli.approximations.structure import structure

    approx = load_approximation(factors)
    summary = {"file": str(factors), **structure(approx)}
    A = error = None
    if matrix is not None:
        from sfa_cli.io import load_matrix

        A = load_matrix(matrix)
        error = measure(A, approx, factors=str(factors), matrix=str(matrix), sample=error_sample, seed=seed)
        summary = {**summary, "path": str(matrix), **error}
    if plot is not None:
        plot_structure(plot, approx, A, error, force=force, display=display, title=Path(str(factors)).name)
        summary["plot"] = str(plot)
    return summary


def _bin_starts(length: int, bins: int) -> np.ndarray:
    """First index of each of ``bins`` contiguous bins of ``length`` indices (index i in bin i * bins // length)."""
    return -(-np.arange(bins, dtype=np.int64) * length // bins)


def matrix_views(A, approx, display: int | None = None, *, every_column: bool | None = None) -> dict:
    """|A|, |A_hat| and |A - A_hat| reduced to at most ``display`` x ``display`` cells (block maxima).

    Parameters
    ----------
    A : ndarray or sparse matrix of shape (n, n)
        Validated (as :func:`~sfa_cli.io.load_matrix` returns it).
    approx : Approximation of the same n
    display : int, optional
        Cells per side.  [default: ``limits.DISPLAY_N``]
    every_column : bool, optional
        Read every column (each cell the maximum over its block), or one column per column bin
        (each cell the maximum over its rows in that column). [default: every column up to
        ``limits.EXACT_ERROR_MAX_N``, where the error is exact too]

    Returns
    -------
    dict
        ``A``, ``A_hat``, ``residual`` (float64 arrays of shape (g, g), g = min(n, display)),
        ``exact`` (g == n: the magnitudes themselves), ``every_column``, ``cells`` (g).
    """
    from sfa_cli.metrics import column_block

    n = A.shape[0]
    g = max(1, min(n, int(display or limits.DISPLAY_N)))
    if every_column is None:
        every_column = n <= limits.EXACT_ERROR_MAX_N
    starts = _bin_starts(n, g)
    cols = np.arange(n, dtype=np.int64) if every_column or g == n else (starts + np.diff(np.append(starts, n)) // 2)
    per_column = 5 * n * 8  # float64 columns of A, A_hat, the residual and the magnitudes of one (with its copy)
    block = max(1, min(len(cols), VIEW_BLOCK_BYTES // per_column))
    require_memory(block * per_column + 3 * g * g * 8, f"drawing the {n} x {n} matrices ({block} columns at a time)",
                   "draw without MATRIX (the supports only)")
    views = {key: np.zeros((g, g)) for key in ("A", "A_hat", "residual")}
    for s in range(0, len(cols), block):
        J = cols[s:s + block]
        a = column_block(A, J)
        b = np.asarray(approx.columns(J), dtype=np.float64)
        bins = J * g // n
        first = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])  # J is sorted: each bin's first column
        touched = bins[first]
        for key, block_values in (("A", a), ("A_hat", b), ("residual", a - b)):
            reduced = np.maximum.reduceat(np.abs(block_values), starts, axis=0)
            reduced = np.maximum.reduceat(reduced, first, axis=1)
            views[key][:, touched] = np.maximum(views[key][:, touched], reduced)
    return {**views, "exact": g == n, "every_column": bool(every_column or g == n), "cells": g}


def _log_norm(colors, *arrays):
    """A log colour scale over the positive values of ``arrays`` (the largest 1e6 times the floor at most)."""
    positive = [a[a > 0] for a in arrays]
    positive = [p for p in positive if p.size]
    if not positive:
        return colors.LogNorm(vmin=1e-16, vmax=1.0)
    top = max(float(p.max()) for p in positive)
    bottom = max(min(float(p.min()) for p in positive), top * 1e-6)
    return colors.LogNorm(vmin=bottom if bottom < top else top / 10, vmax=top)


#: Inches per panel and the figure's resolution: a panel is about 330 pixels wide.
PANEL_INCHES, DPI = 4.0, 120
_PANEL_PIXELS = 330


def _interpolation(cells: int) -> dict:
    """Nearest cells when the panel has a pixel for each, else colours averaged (a one-cell line stays visible)."""
    if cells <= _PANEL_PIXELS:
        return {"interpolation": "nearest"}
    return {"interpolation": "antialiased", "interpolation_stage": "rgba"}


def _draw_support(ax, colors, support, display: int) -> None:
    counts, row_sizes, col_sizes = support.grid(display)
    rows, cols = support.shape
    aspect = "equal" if rows == cols else "auto"
    look = _interpolation(max(counts.shape))
    title = f"{support.name}\n{rows:,} x {cols:,}, {support.nnz:,} nnz"
    if rows * cols == 0:  # the empty low-rank half of a sum that kept no rank
        ax.set_title(title + "\n(empty)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if counts.shape == (rows, cols):
        ax.imshow(counts > 0, cmap="Greys", vmin=0, vmax=1, aspect=aspect, **look)
    else:
        density = counts / np.maximum(np.outer(row_sizes, col_sizes), 1)
        ax.imshow(np.ma.masked_equal(density, 0), cmap="Greys", norm=_log_norm(colors, density), aspect=aspect, **look)
        title += f"\n{counts.shape[0]} x {counts.shape[1]} bins, shade: share stored (log)"
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)


def _error_title(error: dict | None) -> str:
    if not error:
        return ""
    value = error["rel_error"]
    if error.get("rel_error_is_estimate"):
        low, high = error.get("rel_error_ci") or (value, value)
        return f"rel. error {value:.4g} (estimate, 95% CI [{low:.4g}, {high:.4g}])"
    return f"rel. error {value:.4g}"


def plot_structure(path, approx, A=None, error: dict | None = None, *, force: bool = True, display: int | None = None,
                   title: str = "") -> None:
    """Draw the supports of ``approx`` (one panel per stored matrix) and, with ``A``, a row with
    |A|, |A_hat| and |A - A_hat| on log colour scales; write the figure atomically to ``path``.

    Panels show at most ``display`` x ``display`` cells (default ``limits.DISPLAY_N``): larger supports
    are binned (each cell shaded by the share of its entries stored), larger matrices reduced to block
    maxima (:func:`matrix_views`). ``error`` (from :func:`measure`) goes into the titles.
    """
    from sfa_cli.approximations.structure import supports
    from sfa_cli.cli.report import require_matplotlib
    from sfa_cli.io import atomic_output

    plt = require_matplotlib()
    from matplotlib import colors

    display = max(1, int(display or limits.DISPLAY_N))
    parts = supports(approx)
    views = matrix_views(A, approx, display) if A is not None else None
    width = min(max(len(parts), 3 if views else 1), 6)
    support_rows = -(-len(parts) // width) if parts else 0
    rows = support_rows + (1 if views else 0)
    if rows == 0:
        raise SfaError(f"nothing to draw for a {approx.kind} approximation without MATRIX")
    fig, axes = plt.subplots(rows, width, figsize=(PANEL_INCHES * width, PANEL_INCHES * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, support in enumerate(parts):
        ax = axes[k // width][k % width]
        ax.set_axis_on()
        _draw_support(ax, colors, support, display)
    if views:
        cells = views["cells"]
        how = "" if views["exact"] else (f"\n{cells} x {cells} block maxima" if views["every_column"] else
                                          f"\n{cells} x {cells}: maxima over row blocks\nof one column in "
                                          f"{-(-approx.n // cells)}")
        norm = _log_norm(colors, views["A"], views["A_hat"])
        for k, (key, label) in enumerate((("A", "|A|"), ("A_hat", "|A_hat|"), ("residual", "|A - A_hat|"))):
            ax = axes[support_rows][k]
            ax.set_axis_on()
            image = ax.imshow(np.ma.masked_less_equal(views[key], 0), cmap="viridis",
                              norm=norm if key != "residual" else _log_norm(colors, views[key]), **_interpolation(cells))
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
            extra = f"\n{_error_title(error)}" if key == "residual" and error else ""
            ax.set_title(f"{label}{how}{extra}", fontsize=8)
            ax.tick_params(labelsize=6)
    heading = f"{title}: {approx.kind} ({approx.method}), n={approx.n}, {approx.params:,} params"
    if error:
        heading += f", {_error_title(error)}"
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_output(path, force=force) as tmp:
            fig.savefig(tmp, dpi=DPI)
    finally:
        plt.close(fig)
