"""Read and write square matrices: every file sfa reads or writes passes through this package.

:func:`load_matrix` reads a dense or sparse matrix from ``.npz``, ``.npy``,
``.mtx``, ``.mtx.gz``, ``.h5``/``.hdf5`` or ``.mat`` (a key after a colon,
``weights.npz:A``, picks one array of several) and refuses every problem a user
can fix with one :class:`~sfa_cli.errors.SfaError` line naming the file. This
module holds the reader registry, :func:`load_matrix`, :func:`load_array` and
:func:`split_spec`, and re-exports the public names; the readers live in one
module per format family (``numpy_files``, ``matrix_market``, ``hdf5``,
``matlab``), the checks they share before any data is read in ``guards`` (no
declared size is trusted), the writers in ``output`` (every file written
atomically). Layer rule: io imports only the top-level foundation modules
``sfa_cli.errors``, ``limits``, ``memory`` and ``validation``, never
approximations, engine, methods or cli; inside io, modules import ``guards``
(``matlab`` and ``output`` also import ``hdf5``), never the package itself.
"""
from __future__ import annotations

import os

import numpy as np

from sfa_cli.errors import SfaError, printable
from sfa_cli.memory import require_memory
from sfa_cli.validation import _check_square, as_csr, as_square_matrix, float_dtype, is_memory_mapped, release_pages  # noqa: F401 (re-exported)
from sfa_cli.io.guards import (
    SUPPORTED_EXTENSIONS, _READ_ERRORS, _check_magnitude, _checked_memmap, _count_non_finite, _describe,
    _extension, _short_reason, require_regular_file,
)
from sfa_cli.io.hdf5 import _read_h5, h5_output  # noqa: F401 (h5_output re-exported)
from sfa_cli.io.matlab import _read_mat
from sfa_cli.io.matrix_market import _read_mtx
from sfa_cli.io.numpy_files import _npy_header_of_file, _read_npy, _read_npz
from sfa_cli.io.output import atomic_output, check_output, check_writable, save_matrix  # noqa: F401 (re-exported)

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "split_spec",
    "load_matrix",
    "load_array",
    "as_square_matrix",
    "require_regular_file",
    "atomic_output",
    "h5_output",
    "check_output",
    "check_writable",
    "save_matrix",
]


# The reader of each extension: (format name for messages, reader(path, key, size)).
_READERS = {
    ".npz": ("NumPy .npz", _read_npz),
    ".npy": ("NumPy .npy", _read_npy),
    ".mtx": ("Matrix Market", _read_mtx),
    ".mtx.gz": ("Matrix Market", _read_mtx),
    ".h5": ("HDF5", _read_h5),
    ".hdf5": ("HDF5", _read_h5),
    ".mat": ("MATLAB", _read_mat),
}


# ---------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------

def split_spec(spec) -> tuple[str, str | None]:
    """Split ``file.ext:key`` into the file path and the key (None when absent).

    Only a colon right after a supported extension separates a key, so Windows
    drive letters and colons in directory names are left alone. When several
    such colons occur, the first whose prefix is an existing file wins, else
    the first.

    Parameters
    ----------
    spec : str or path-like
        ``matrix.npz``, ``matrix.npz:A``, ``data.h5:/group/name``, ...

    Returns
    -------
    path : str
    key : str or None
    """
    spec = os.fspath(spec)
    lower = spec.lower()
    cuts = sorted(
        i + len(ext)
        for ext in SUPPORTED_EXTENSIONS
        for i in _find_all(lower, ext + ":")
    )
    if not cuts:
        return spec, None
    cut = next((c for c in cuts if os.path.isfile(spec[:c])), cuts[0])
    path, key = spec[:cut], spec[cut + 1:]
    if not key:
        raise SfaError(f"{printable(path)}: empty key after ':' in '{printable(spec)}'")
    return path, key


def _find_all(text: str, sub: str) -> list[int]:
    """Start positions of every occurrence of `sub` in `text`."""
    found, i = [], text.find(sub)
    while i >= 0:
        found.append(i)
        i = text.find(sub, i + 1)
    return found


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def load_matrix(spec):
    """Read a square matrix from a file, keeping sparse input sparse.

    Parameters
    ----------
    spec : str or path-like
        A file path, optionally followed by ``:key`` to choose one array of a
        ``.npz``, ``.h5``/``.hdf5`` or ``.mat`` file holding several.

    Returns
    -------
    ndarray or scipy.sparse.csr_matrix of shape (n, n)
        float32 or float64 (integer and boolean data become float64). A
        float32/float64 ``.npy`` comes back as a read-only ``numpy.memmap``
        (validated block by block, never read whole; copy it to write into it).

    Raises
    ------
    SfaError
        The file is missing, not a regular file, unreadable, declares more
        than it holds or than memory allows, holds no (or several) matrices
        and no key, or its matrix fails :func:`as_square_matrix`.
    """
    path, key = split_spec(spec)
    shown = printable(path)
    ext = _extension(path)
    if ext is None:
        raise SfaError(f"{shown}: unknown file type; sfa reads {', '.join(SUPPORTED_EXTENSIONS)}")
    size = require_regular_file(path).st_size
    fmt, reader = _READERS[ext]
    try:
        raw = reader(path, key, size)
    except _READ_ERRORS as exc:
        raise SfaError(f"{shown}: cannot read as {fmt}: {_short_reason(exc)}") from exc
    if isinstance(raw, np.memmap):
        largest = _checked_memmap(raw, shown)
        _check_magnitude(raw, shown, largest)
        return raw
    A = as_square_matrix(raw, name=shown)
    _check_magnitude(A, shown)
    return A


def load_array(path, *, rows: int | None = None) -> np.ndarray:
    """A vector or block of vectors from a ``.npy`` file, as float64 (or float32).

    Used by ``sfa apply``; the array need not be square, but must be 1-D or
    2-D, real and finite. Its header is checked against the file's size and
    the memory available before anything is allocated.

    Parameters
    ----------
    path : str or path-like
    rows : int, optional
        The length the vectors must have (the factors' n); checked from the
        header, before the data is read.

    Returns
    -------
    ndarray of shape (rows,) or (rows, k)
    """
    path = os.fspath(path)
    shown = printable(path)
    size = require_regular_file(path).st_size
    if not path.lower().endswith(".npy"):
        raise SfaError(f"{shown}: vectors are read from .npy files")
    try:
        header = _npy_header_of_file(path, size)
    except _READ_ERRORS as exc:
        raise SfaError(f"{shown}: cannot read as .npy: {_short_reason(exc)}") from exc
    if len(header.shape) not in (1, 2) or header.count == 0:
        raise SfaError(f"{shown}: expected a vector or a 2-D block; got shape {header.shape}")
    if rows is not None and header.shape[0] != rows:
        raise SfaError(f"{shown}: holds {_describe(header.shape)} values; the factors multiply vectors of "
                       f"length {rows} (shape ({rows},) or ({rows}, k))")
    dtype = header.dtype
    if not (dtype.kind in "biuf"):
        raise SfaError(f"{shown}: expected real numbers; got dtype {dtype}")
    target = float_dtype(dtype)
    require_memory(header.count * target.itemsize, f"{shown}: reading its {_describe(header.shape)} {dtype} array",
                   "apply the factors to fewer columns at a time")
    try:
        X = np.array(np.load(path, mmap_mode="r", allow_pickle=False), dtype=target)
    except _READ_ERRORS as exc:
        raise SfaError(f"{shown}: cannot read as .npy: {_short_reason(exc)}") from exc
    bad = _count_non_finite(X)
    if bad:
        raise SfaError(f"{shown}: {bad} NaN or Inf entries")
    return X
