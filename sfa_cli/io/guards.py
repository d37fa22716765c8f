"""What every reader of sfa_cli.io shares: the checks that come before any data is read.

No declared size is trusted: a reader checks what a header claims (shape, entry
count, member and dataset sizes) against the bytes the file really holds and
against the memory available *before* it allocates (:func:`_check_inflation`,
:func:`_check_sparse_claim`, :func:`_check_matrix_claim`,
:func:`_require_read_memory`), and :func:`require_regular_file` refuses FIFOs,
devices and directories before anything opens them. Also here: the messages'
shared wording (:func:`_short_reason`, :func:`_listing`, :func:`_pick`), the
supported extensions, and the checks of values once read (NaN/Inf of a memory
map block by block, entries whose squares overflow).
"""
from __future__ import annotations

import math
import os
import stat
import struct
import tokenize
import zipfile
import zlib

import numpy as np
import scipy.sparse as sp
from scipy.io.matlab import MatReadError

from sfa_cli.errors import SfaError, printable
from sfa_cli.memory import human_bytes, require_memory
from sfa_cli.validation import _check_square, float_dtype, release_pages

SUPPORTED_EXTENSIONS = (".npz", ".npy", ".mtx", ".mtx.gz", ".h5", ".hdf5", ".mat")

# What the third-party readers raise on a truncated, corrupt or foreign file
# (numpy parses a .npy header with tokenize and ast).
_READ_ERRORS = (
    OSError, EOFError, ValueError, KeyError, IndexError, TypeError, RuntimeError, OverflowError,
    NotImplementedError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile,
    zlib.error, struct.error, MatReadError, MemoryError, RecursionError,
)

_LISTED_MAX = 12  # entries a listing names before "and N more"

# A stored (compressed) block may inflate this many times, and any block up to
# _INFLATE_FREE bytes: real numbers compress 1-3x, index arrays ~10x, while a
# zlib bomb reaches ~1000x. Beyond both, a tiny file is claiming a huge array.
_INFLATE_RATIO = 200
_INFLATE_FREE = 256 << 20
# A sparse matrix with N at least this large and fewer entries than N / 2 is a
# header claim, not data: its row pointers alone would cost 8 N bytes.
_EMPTY_ROWS_FROM = 1 << 20
_HINT_NPY = "convert it to .npy, which sfa reads memory-mapped"
# Passes over a memory map take blocks of rows of about this many bytes.
_BLOCK_BYTES = 64 << 20


# ---------------------------------------------------------------------------
# Extensions
# ---------------------------------------------------------------------------

def _extension(path: str, extensions=SUPPORTED_EXTENSIONS) -> str | None:
    """The extension of `extensions` that `path` ends with (case-insensitive, longest), or None."""
    lower = str(path).lower()
    matches = [ext for ext in extensions if lower.endswith(ext.lower())]
    return max(matches, key=len) if matches else None


# ---------------------------------------------------------------------------
# Input files: regular files only
# ---------------------------------------------------------------------------

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
)


def _file_kind(mode: int) -> str:
    """``'a FIFO (named pipe)'`` etc. for a stat mode that is not a regular file."""
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def require_regular_file(path) -> os.stat_result:
    """Stat `path` (following links) and refuse anything but an existing regular file.

    Checked before any open: opening a FIFO for reading blocks until a writer
    comes, and a device can be read for ever.

    Returns
    -------
    os.stat_result
        ``st_size`` bounds what the file can hold.

    Raises
    ------
    SfaError
        ``<path>: no such file``, ``<path>: not a regular file (a FIFO (named pipe))``, or the
        operating system's reason (permission, symlink loop, ...).
    """
    shown = printable(os.fspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SfaError(f"{shown}: no such file") from None
    except (OSError, ValueError) as exc:
        raise SfaError(f"{shown}: cannot open: {_short_reason(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SfaError(f"{shown}: not a regular file ({_file_kind(st.st_mode)})")
    return st


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------

def _short_reason(exc: BaseException) -> str:
    """First line of an exception message, shortened and escaped; the type name if empty."""
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not text:
        return type(exc).__name__
    text = printable(text)
    return text if len(text) <= 200 else text[:197] + "..."


def _no_key(path: str, key: str | None, what: str) -> None:
    """Reject a key for a format that holds a single matrix."""
    if key is not None:
        raise SfaError(f"{printable(path)}: {what} file holds one matrix; remove ':{printable(key)}'")


def _describe(shape) -> str:
    """``20 x 20`` for a shape; ``scalar`` for ()."""
    return " x ".join(str(d) for d in shape) if len(shape) else "scalar"


def _listing(contents: dict) -> str:
    """``it holds: A (20 x 20), v (3)`` for error messages (one line, capped)."""
    if not contents:
        return "it holds nothing"
    items = [f"{printable(name)} ({_describe(shape)})" for name, shape in contents.items()]
    if len(items) > _LISTED_MAX:
        items = items[:_LISTED_MAX] + [f"and {len(items) - _LISTED_MAX} more"]
    return "it holds: " + ", ".join(items)


def _pick(path: str, key: str | None, contents: dict, candidates: list[str]) -> str:
    """Name of the entry to load: the key if given, else the only candidate.

    Parameters
    ----------
    contents : dict of str to tuple
        Every entry of the file and its shape (for messages and key lookup).
    candidates : list of str
        The entries that look like a matrix.
    """
    shown = printable(path)
    if key is not None:
        if key in contents:
            return key
        raise SfaError(f"{shown}: no entry '{printable(key)}'; {_listing(contents)}")
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SfaError(f"{shown}: no 2-D matrix found; {_listing(contents)}")
    raise SfaError(
        f"{shown}: holds {len(candidates)} matrices ({', '.join(printable(c) for c in candidates)}); "
        f"choose one as {shown}:NAME"
    )



# ---------------------------------------------------------------------------
# Declared sizes
# ---------------------------------------------------------------------------

def _nbytes(shape, itemsize: int) -> int:
    """Bytes of an array of `shape` (exact Python integers: no overflow)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def _check_inflation(where: str, inflated: int, stored: int) -> None:
    """Refuse a compressed block that would inflate far beyond what it stores (a compression bomb)."""
    if inflated > max(_INFLATE_FREE, _INFLATE_RATIO * stored):
        raise ValueError(
            f"{where} declares {human_bytes(inflated)} stored in {human_bytes(stored)}; "
            f"sfa refuses more than {_INFLATE_RATIO}x inflation above {human_bytes(_INFLATE_FREE)}"
        )


def _check_sparse_claim(where: str, shape: tuple, entries: int) -> None:
    """Refuse a huge sparse shape whose declared entries leave most rows empty."""
    n = max(int(d) for d in shape) if shape else 0
    if n >= _EMPTY_ROWS_FROM and 2 * entries < n:
        raise ValueError(
            f"{where} declares {_describe(shape)} with {_entries(entries)}: most rows would be empty "
            f"(sfa needs at least N/2 entries above N = {_EMPTY_ROWS_FROM})"
        )


def _entries(count: int) -> str:
    """``'1 entry'``, ``'3 entries'``."""
    return f"{count} entry" if count == 1 else f"{count} entries"


def _require_read_memory(shown: str, what: str, nbytes: int, hint: str) -> None:
    """require_memory for reading `what` of file `shown` (the claim named in the refusal)."""
    require_memory(nbytes, f"{shown}: reading {what}", hint)


def _check_matrix_claim(shown: str, shape: tuple, dtype: np.dtype) -> None:
    """Shape and dtype checks of a declared dense matrix, before any of it is read.

    Worded as :func:`as_square_matrix` words them, which runs again on what is read.
    """
    if dtype.hasobject:
        raise SfaError(f"{shown}: holds Python objects (dtype object), not numbers")
    if dtype.kind == "c":
        raise SfaError(f"{shown}: complex matrices are not supported yet")
    if dtype.kind not in "biuf":
        raise SfaError(f"{shown}: unsupported dtype {dtype}; sfa needs real numbers")
    if len(shape) != 2:
        raise SfaError(f"{shown}: expected a 2-D matrix, got a {len(shape)}-D array of shape {tuple(shape)}")
    _check_square(tuple(shape), shown)


def _dense_read_bytes(shape: tuple, dtype: np.dtype) -> int:
    """Memory to read a dense array and convert it to sfa's float dtype."""
    stored = _nbytes(shape, dtype.itemsize)
    target = float_dtype(dtype) if dtype.kind in "biuf" else dtype
    return stored + (0 if target == dtype else _nbytes(shape, target.itemsize))


def _check_index_dtype(shown: str, name: str, dtype) -> None:
    """Refuse a sparse index array (indices, indptr, row, col, ...) whose dtype is not an integer kind.

    scipy.sparse casts index arrays to integers, so a stored 1.5 would silently become 1.
    """
    if np.dtype(dtype).kind not in "iu":
        raise SfaError(f"{shown}: '{printable(name)}' holds {dtype} values; sparse indices must be integers")


# ---------------------------------------------------------------------------
# Values read: NaN/Inf by blocks, magnitudes
# ---------------------------------------------------------------------------

def _check_magnitude(A, shown: str, largest: float | None = None) -> None:
    """Refuse entries so large that ||A||_F^2 overflows the matrix's dtype.

    Every method measures errors through sums of squares; at this size they
    become Inf and every result NaN, with warnings instead of an answer.
    `largest` is max |a| when already known (one pass over a memory map).
    """
    values = A.data if sp.issparse(A) else A
    if values.size == 0:
        return
    if largest is None:
        largest = max(float(np.abs(block).max()) for block in _row_blocks(values))
    limit = float(np.sqrt(np.finfo(values.dtype).max)) / (16 * A.shape[0])
    if largest > limit:
        raise SfaError(
            f"{shown}: entries up to {largest:.3g} in magnitude; at N = {A.shape[0]} in {values.dtype}, "
            f"sums of squares overflow above {limit:.3g}: rescale the matrix (divide it by {largest / limit * 16:.3g})"
        )


def _checked_memmap(A: np.memmap, shown: str) -> float:
    """Check a memory-mapped float matrix for NaN/Inf one block of rows at a time; return max |a|."""
    bad, largest = 0, 0.0
    for block in _row_blocks(A):
        bad += int(block.size - np.count_nonzero(np.isfinite(block)))
        if not bad:
            largest = max(largest, float(np.abs(block).max()))
    if bad:
        nan = sum(int(np.isnan(block).sum()) for block in _row_blocks(A))
        row, col = _first_non_finite(A)
        raise SfaError(
            f"{shown}: matrix has {nan} NaN and {bad - nan} Inf entries; "
            f"the first is at (row {row}, col {col}) (0-based)"
        )
    return largest


def _row_blocks(A: np.ndarray):
    """Views of consecutive row blocks (of a 1-D or 2-D array) of about _BLOCK_BYTES each; a read-only
    memory map's pages are handed back after each block (:func:`release_pages`)."""
    rows = max(1, _BLOCK_BYTES // max(1, A[:1].nbytes))
    for start in range(0, A.shape[0], rows):
        yield A[start:start + rows]
        release_pages(A)


def _count_non_finite(A: np.ndarray) -> int:
    """Number of NaN/Inf entries, counted one block of rows at a time."""
    return sum(int(block.size - np.isfinite(block).sum()) for block in _row_blocks(A))


def _first_non_finite(A: np.ndarray) -> tuple[int, int]:
    """(row, col) of the first NaN/Inf in row-major order."""
    start = 0
    for block in _row_blocks(A):
        bad = ~np.isfinite(block)
        if bad.any():
            row, col = np.unravel_index(int(np.argmax(bad)), bad.shape)
            return start + int(row), int(col)
        start += block.shape[0]
    raise AssertionError("no NaN or Inf entry")
