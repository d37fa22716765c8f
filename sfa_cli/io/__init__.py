"""Read and write square matrices, and validate them.

``load_matrix(spec)`` reads a dense or sparse matrix from ``.npz``, ``.npy``,
``.mtx``, ``.mtx.gz``, ``.h5``/``.hdf5`` or ``.mat`` and returns a float
ndarray or a canonical ``scipy.sparse.csr_matrix`` (a sparse file is never
densified). A file holding several arrays takes a key after a colon:
``weights.npz:A``, ``graph.h5:/layer1/adjacency``, ``model.mat:K``.
Every problem a user can fix raises :class:`~sfa_cli.errors.SfaError` with a
one-line message that names the file.

No declared size is trusted: every reader checks what a header claims (shape,
entry count, member and dataset sizes) against the bytes the file really
holds and against the memory available *before* it allocates, inflates only
the member it needs and caps that by the declared shape, and refuses what it
cannot confine (FIFOs and devices, HDF5 external storage and external links).
A dense ``.npy`` is memory-mapped read-only, so it is never read whole (passes over it hand their pages back).

Everything sfa writes goes through :func:`atomic_output`: a temporary name in
the target directory, flushed and fsynced, then renamed, so an interrupted or
failed write (a full disk included) never leaves a file under the final name.
:func:`check_output` checks an output path before any work.

Example
-------
>>> A = load_matrix("data/lesmis.mtx")            # doctest: +SKIP
>>> A.shape, A.format                              # doctest: +SKIP
((77, 77), 'csr')
"""
from __future__ import annotations

import contextlib
import gc
import gzip
import io
import math
import os
import re
import secrets
import stat
import struct
import sys
import tokenize
import traceback
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp
from scipy.io.matlab import MatReadError

from sfa_cli.errors import SfaError, printable
from sfa_cli.memory import available_bytes, human_bytes, require_memory
from sfa_cli.validation import _check_square, as_csr, as_square_matrix, float_dtype, is_memory_mapped, release_pages  # noqa: F401 (re-exported)

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

SUPPORTED_EXTENSIONS = (".npz", ".npy", ".mtx", ".mtx.gz", ".h5", ".hdf5", ".mat")

# What the third-party readers raise on a truncated, corrupt or foreign file
# (numpy parses a .npy header with tokenize and ast).
_READ_ERRORS = (
    OSError, EOFError, ValueError, KeyError, IndexError, TypeError, RuntimeError, OverflowError,
    NotImplementedError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile,
    zlib.error, struct.error, MatReadError, MemoryError, RecursionError,
)

_MATLAB_NUMERIC = frozenset(
    "double single int8 uint8 int16 uint16 int32 uint32 int64 uint64 logical sparse".split()
)
_LISTED_MAX = 12

# A stored (compressed) block may inflate this many times, and any block up to
# _INFLATE_FREE bytes: real numbers compress 1-3x, index arrays ~10x, while a
# zlib bomb reaches ~1000x. Beyond both, a tiny file is claiming a huge array.
_INFLATE_RATIO = 200
_INFLATE_FREE = 256 << 20
# A sparse matrix with N at least this large and fewer entries than N / 2 is a
# header claim, not data: its row pointers alone would cost 8 N bytes.
_EMPTY_ROWS_FROM = 1 << 20
_HINT_NPY = "convert it to .npy, which sfa reads memory-mapped"


# ---------------------------------------------------------------------------
# Specs and extensions
# ---------------------------------------------------------------------------

def _extension(path: str, extensions=SUPPORTED_EXTENSIONS) -> str | None:
    """The extension of `extensions` that `path` ends with (case-insensitive, longest), or None."""
    lower = str(path).lower()
    matches = [ext for ext in extensions if lower.endswith(ext.lower())]
    return max(matches, key=len) if matches else None


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


# ---------------------------------------------------------------------------
# NumPy .npy and .npz
# ---------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_BLOCK_BYTES = 64 << 20


class _NpyHeader:
    """What a ``.npy`` header declares: shape, dtype, Fortran order and where the data starts."""

    def __init__(self, shape, dtype, fortran: bool, offset: int):
        self.shape, self.dtype, self.fortran, self.offset = tuple(shape), np.dtype(dtype), fortran, offset
        self.count = math.prod(int(d) for d in self.shape)
        self.nbytes = self.count * self.dtype.itemsize

    def claim(self) -> str:
        """``'1000000 x 1000000 float64 (7.3 TiB)'``."""
        return f"{_describe(self.shape)} {self.dtype} ({human_bytes(self.nbytes)})"


def _read_npy_header(fh) -> _NpyHeader:
    """Parse a ``.npy`` header from a binary stream positioned at its start (reads only the header)."""
    magic = fh.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        raise ValueError(f"not a .npy file (unexpected first bytes {magic[:6]!r})")
    version = tuple(fh.read(2))
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version in ((2, 0), (3, 0)):
        # 3.0 differs from 2.0 only in allowing UTF-8 field names, which matrices do not have.
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return _NpyHeader(shape, dtype, fortran, fh.tell())


def _npy_header_of_file(path: str, size: int) -> _NpyHeader:
    """The header of a .npy file, checked against the bytes the file holds."""
    with open(path, "rb") as fh:
        header = _read_npy_header(fh)
    if header.dtype.hasobject:
        raise ValueError("holds Python objects (a pickled object array); sfa never unpickles")
    held = size - header.offset
    if header.nbytes > held:
        raise ValueError(f"the header declares {header.claim()} but the file holds {held} bytes of data")
    return header


def _read_npy(path: str, key: str | None, size: int):
    """A ``.npy`` array, memory-mapped when it is float32/float64 (pickles never loaded)."""
    _no_key(path, key, "a .npy")
    shown = printable(path)
    header = _npy_header_of_file(path, size)
    _check_matrix_claim(shown, header.shape, header.dtype)
    if header.dtype.kind == "f" and header.dtype.itemsize in (4, 8) and header.dtype.isnative:
        # Read-only: never read whole, and the pages read can be handed back (release_pages) without
        # losing anything, so a pass over a file larger than memory does not grow the resident set.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    _require_read_memory(shown, f"the {_describe(header.shape)} {header.dtype} matrix",
                         _dense_read_bytes(header.shape, header.dtype),
                         "save it as float32 or float64, which sfa reads memory-mapped")
    return np.load(path, allow_pickle=False)


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


def _check_magic(path: str, magics: tuple[bytes, ...], what: str) -> bytes:
    """Raise ValueError unless the file starts with one of `magics`; return the first bytes.

    Without this, np.load takes any other file for a pickle and says so.
    """
    with open(path, "rb") as fh:
        head = fh.read(max(len(m) for m in magics))
    if not any(head.startswith(m) for m in magics):
        raise ValueError(f"not {what} (unexpected first bytes {head[:6]!r})")
    return head


class _Npz:
    """The members of a ``.npz`` archive, by name, with their headers read but no data.

    Reading a header inflates only its first bytes; a member's data is
    inflated only when asked for, and never beyond what its header declares.
    """

    def __init__(self, path: str, archive: zipfile.ZipFile):
        self.path, self.shown, self.archive = path, printable(path), archive
        self.infos = {
            (info.filename[:-4] if info.filename.endswith(".npy") else info.filename): info
            for info in archive.infolist()
        }
        self._headers: dict[str, _NpyHeader] = {}

    def header(self, name: str) -> _NpyHeader:
        """The checked header of member `name`."""
        if name not in self._headers:
            info = self.infos[name]
            where = f"member {printable(name)}"
            try:
                with self.archive.open(info) as fh:
                    header = _read_npy_header(fh)
            except _READ_ERRORS as exc:
                raise ValueError(f"{where}: {_short_reason(exc)}") from exc
            if header.dtype.hasobject:
                raise SfaError(f"{self.shown}: {where} holds Python objects (a pickled object array); "
                               f"sfa never unpickles")
            if header.offset + header.nbytes > info.file_size:
                raise ValueError(f"{where}: its header declares {header.claim()} "
                                 f"but the member holds {info.file_size} bytes")
            self._headers[name] = header
        return self._headers[name]

    def shape_or_none(self, name: str):
        """Member `name`'s declared shape for a listing; None when its header is unreadable.

        A broken member that is not asked for does not stop the others being read.
        """
        try:
            return self.header(name).shape
        except (ValueError, SfaError):
            return None

    def read(self, name: str, hint: str) -> np.ndarray:
        """Member `name`'s array: inflated up to its declared size, after bomb and memory checks."""
        header = self.header(name)
        info = self.infos[name]
        _check_inflation(f"member {printable(name)}", info.file_size, info.compress_size)
        _require_read_memory(self.shown, f"the {_describe(header.shape)} {header.dtype} member {printable(name)}",
                             _dense_read_bytes(header.shape, header.dtype), hint)
        with self.archive.open(self.infos[name]) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)


_SPARSE_NPZ_MEMBERS = {
    "csr": ("data", "indices", "indptr"), "csc": ("data", "indices", "indptr"),
    "bsr": ("data", "indices", "indptr"), "coo": ("data", "row", "col"), "dia": ("data", "offsets"),
}


def _read_npz(path: str, key: str | None, size: int):
    """An array of a ``numpy.savez`` file, or a ``scipy.sparse.save_npz`` matrix."""
    head = _check_magic(path, _ZIP_MAGIC + (_NPY_MAGIC,), "a zip archive")
    if head.startswith(_NPY_MAGIC):  # a .npy file under a .npz name
        _no_key(path, key, "a .npy")
        return _read_npy(path, None, size)
    shown = printable(path)
    with zipfile.ZipFile(path) as archive:
        npz = _Npz(path, archive)
        if {"format", "shape", "data"} <= set(npz.infos):
            _no_key(path, key, "a scipy.sparse .npz")
            return _read_sparse_npz(npz)
        if key is not None and key in npz.infos:
            name = key
        else:
            shapes = {name: npz.shape_or_none(name) for name in npz.infos}
            contents = {name: ("unreadable",) if shape is None else shape for name, shape in shapes.items()}
            candidates = [name for name, shape in shapes.items() if shape is not None and len(shape) == 2]
            broken = [name for name, shape in shapes.items() if shape is None]
            if key is None and not candidates and broken:
                npz.header(broken[0])  # raises the reason the member cannot be read
            name = _pick(path, key, contents, candidates)
        header = npz.header(name)
        _check_matrix_claim(f"{shown}:{printable(name)}", header.shape, header.dtype)
        return npz.read(name, f"extract it as .npy, which sfa reads memory-mapped: "
                              f"unzip -p {shown} {printable(npz.infos[name].filename)} > {printable(name)}.npy")


def _read_sparse_npz(npz: _Npz):
    """A scipy.sparse .npz: every member's declared size checked before scipy reads any."""
    fmt = npz.read("format", "") if npz.header("format").nbytes <= 64 else None
    fmt = fmt.item() if isinstance(fmt, np.ndarray) and fmt.size == 1 else fmt
    fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
    if fmt not in _SPARSE_NPZ_MEMBERS:
        raise ValueError(f"unknown sparse format {printable(fmt)[:20]!r}")
    if npz.header("shape").count != 2:
        raise ValueError(f"member shape declares {_describe(npz.header('shape').shape)} values, not 2")
    shape = tuple(int(d) for d in npz.read("shape", ""))
    if min(shape) < 0:
        raise ValueError(f"negative shape {shape}")
    missing = [m for m in _SPARSE_NPZ_MEMBERS[fmt] if m not in npz.infos]
    if missing:
        raise ValueError(f"{fmt} matrix without member {missing[0]}")
    headers = {m: npz.header(m) for m in _SPARSE_NPZ_MEMBERS[fmt]}
    for member in headers:
        _check_inflation(f"member {member}", npz.infos[member].file_size, npz.infos[member].compress_size)
    entries = headers["data"].count
    if fmt in ("csr", "csc"):
        major = shape[0] if fmt == "csr" else shape[1]
        if headers["indptr"].shape != (major + 1,):
            raise ValueError(f"indptr holds {_describe(headers['indptr'].shape)} values; "
                             f"a {_describe(shape)} {fmt} matrix needs {major + 1}")
        if headers["indices"].count != entries:
            raise ValueError(f"{entries} values but {headers['indices'].count} indices")
    if fmt == "coo" and not headers["row"].count == headers["col"].count == entries:
        raise ValueError("coo members data, row and col differ in length")
    if fmt != "dia":
        _check_sparse_claim("the file", shape, entries)
    stored = sum(h.nbytes for h in headers.values())
    # scipy reads the members, then sfa makes canonical CSR (up to two more copies).
    _require_read_memory(npz.shown, f"a {_describe(shape)} sparse matrix with {_entries(entries)}",
                         3 * stored + 8 * (max(shape) + 1), "free memory or use a machine with more")
    return sp.load_npz(npz.path)


# ---------------------------------------------------------------------------
# Matrix Market
# ---------------------------------------------------------------------------

_MTX_HEADER_MAX = 1 << 20  # banner, comments and size line


class _MtxHeader:
    """What a Matrix Market header declares."""

    def __init__(self, layout: str, field: str, symmetry: str, sizes: list[int], raw: bytes):
        self.layout, self.field, self.symmetry, self.raw = layout, field, symmetry, raw
        self.length = len(raw)
        self.shape = tuple(sizes[:2])
        rows, cols = self.shape
        if layout == "coordinate":
            self.entries = sizes[2]
        elif symmetry == "general":
            self.entries = rows * cols
        else:  # array storage keeps one triangle (without the diagonal when skew)
            n = min(rows, cols)
            self.entries = n * (n + 1) // 2 - (n if symmetry == "skew-symmetric" else 0)

    def min_entry_bytes(self) -> int:
        """Fewest bytes one entry line can take ('1 1\\n', '1 1 1\\n', '1\\n', ...)."""
        values = {"pattern": 0, "complex": 2}.get(self.field, 1)
        indices = 2 if self.layout == "coordinate" else 0
        return 2 * (indices + values)


def _read_mtx_header(fh) -> _MtxHeader:
    """Parse the banner, comments and size line (reads at most _MTX_HEADER_MAX bytes)."""
    banner = fh.readline(_MTX_HEADER_MAX)
    words = banner.decode("ascii", "replace").lower().split()
    if len(words) != 5 or words[0] != "%%matrixmarket" or words[1] != "matrix":
        raise ValueError("the first line is not a '%%MatrixMarket matrix ...' banner")
    _, _, layout, field, symmetry = words
    if layout not in ("coordinate", "array"):
        raise ValueError(f"unknown layout {printable(layout)[:20]!r}")
    lines = [banner]
    while sum(map(len, lines)) < _MTX_HEADER_MAX:
        line = fh.readline(_MTX_HEADER_MAX)
        if not line:
            raise ValueError("no size line after the banner")
        lines.append(line)
        text = line.strip()
        if not text or text.startswith(b"%"):
            continue
        parts = text.split()
        expected = 3 if layout == "coordinate" else 2
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            sizes = []
        if len(sizes) != expected or min(sizes) < 0:
            raise ValueError(f"the size line is not {expected} non-negative integers")
        return _MtxHeader(layout, field, symmetry, sizes, b"".join(lines))
    raise ValueError("no size line in the first 1 MiB")


def _read_mtx(path: str, key: str | None, size: int):
    """A Matrix Market file (``.mtx`` or gzip-compressed ``.mtx.gz``), its header checked first."""
    _no_key(path, key, "a Matrix Market")
    shown = printable(path)
    compressed = path.lower().endswith(".gz")
    opener = gzip.open if compressed else open
    with opener(path, "rb") as fh:
        header = _read_mtx_header(fh)
        claim = f"the header declares {_describe(header.shape)} with {_entries(header.entries)}"
        body_min = header.entries * header.min_entry_bytes() - 1
        if not compressed and body_min > size - header.length:
            raise ValueError(f"{claim}, but only {size - header.length} bytes follow the header "
                             f"(an entry takes at least {header.min_entry_bytes()})")
        if header.layout == "coordinate":
            _check_sparse_claim("the header", header.shape, header.entries)
            stored = 1 if header.symmetry == "general" else 2
            # text + scipy's COO arrays + canonical CSR arrays, and the row pointers.
            estimate = size + 40 * stored * header.entries + 16 * (max(header.shape) + 1)
            hint = "a sparse file is read whole: free memory or use a machine with more"
        else:
            estimate = size + 16 * math.prod(header.shape)
            hint = _HINT_NPY
        # For .gz the text is unknown yet: its cap below keeps it within the estimate.
        _require_read_memory(shown, f"the {_describe(header.shape)} matrix with {_entries(header.entries)} its header declares",
                             estimate, hint)
        if compressed:
            cap = max(_MTX_HEADER_MAX, header.length + 256 * header.entries)
            cap = min(cap, max(_INFLATE_FREE, _INFLATE_RATIO * size), available_bytes() // 2)
            body = fh.read(cap + 1)
            if len(body) > cap:
                raise ValueError(f"decompresses to more than {human_bytes(cap)} ({claim})")
        else:
            body = fh.read()
    text = header.raw + body
    # scipy's fast_matrix_market parser (scipy >= 1.12) reads past its buffer
    # and can kill the interpreter (SIGSEGV) on a body holding NUL bytes, or
    # on a last line that does not end in a newline (a truncated file).
    if b"\x00" in text:
        raise ValueError("the file holds NUL bytes (binary or corrupt)")
    if not text.endswith(b"\n"):
        text += b"\n"
    return scipy.io.mmread(io.BytesIO(text))


# ---------------------------------------------------------------------------
# HDF5
# ---------------------------------------------------------------------------

_H5_LINK_DEPTH = 16
_H5_SMALL = 16  # values a 'shape' or MATLAB_empty dataset may hold


def _attr_str(node, name: str) -> str:
    """An HDF5 attribute as str ('' when absent); h5py may return bytes."""
    value = node.attrs.get(name, "")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _is_csr_group(node) -> bool:
    """An HDF5 group holding a compressed sparse matrix (anndata / 10x / sfa layout)."""
    return isinstance(node, h5py.Group) and {"data", "indices", "indptr"} <= set(node.keys())


def _h5_small(node, what: str) -> np.ndarray:
    """A small dataset's values (a shape, a MATLAB empty marker), refused when it is not small."""
    if not isinstance(node, h5py.Dataset) or node.size is None or node.size > _H5_SMALL:
        raise ValueError(f"{what} is not a small dataset")
    return np.ravel(node[()])


def _csr_group_shape(group) -> tuple:
    """The ``shape`` attribute or dataset of a sparse group."""
    shape = group.attrs.get("shape")
    if shape is None and "shape" in group:
        shape = _h5_small(group["shape"], f"{printable(group.name)}/shape")
    if shape is None:
        raise ValueError(f"sparse group {printable(group.name)} has no 'shape' attribute or dataset")
    shape = tuple(int(d) for d in np.ravel(shape))
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"sparse group {printable(group.name)} has shape {shape}")
    return shape


def _h5_check_dataset(node, size: int) -> int:
    """Refuse data stored outside the file or claiming more than it stores; return its bytes."""
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{printable(node.name)} is not a dataset")
    where = f"dataset {printable(node.name)}"
    if node.is_virtual:
        raise ValueError(f"{where} is virtual (its data lives in other files); sfa reads only data stored in the file")
    if node.external:
        raise ValueError(f"{where} keeps its data in external raw files; sfa reads only data stored in the file")
    nbytes = _nbytes(node.shape or (), node.dtype.itemsize)
    stored = node.id.get_storage_size()
    offset = None if node.chunks is not None else node.id.get_offset()
    if offset is not None and offset + nbytes > size:
        raise ValueError(f"{where} declares {_describe(node.shape)} {node.dtype} ({human_bytes(nbytes)}) "
                         f"at byte {offset}, past the end of the file ({size} bytes)")
    if offset is None:  # chunked (compressed, or chunks never written: read as fill value) or compact
        _check_inflation(where, nbytes, stored)
    return nbytes


def _h5_resolve(f, key: str, depth: int = 0):
    """The object at `key`, following hard and soft links only; None when nothing is there."""
    if depth > _H5_LINK_DEPTH:
        raise ValueError(f"soft links nested more than {_H5_LINK_DEPTH} deep")
    node, walked = f, ""
    for part in [p for p in key.split("/") if p]:
        if not isinstance(node, h5py.Group):
            return None
        link = node.get(part, getlink=True)
        walked = f"{walked}/{part}"
        if link is None:
            return None
        if isinstance(link, h5py.ExternalLink):
            raise ValueError(f"{printable(walked)} is an external link to {printable(link.filename)}; "
                             f"sfa reads only data stored in the file")
        if isinstance(link, h5py.SoftLink):
            target = link.path if link.path.startswith("/") else f"{node.name.rstrip('/')}/{link.path}"
            node = _h5_resolve(f, target, depth + 1)
            if node is None:
                return None
        else:
            node = node.get(part)
    return node


def _h5_contents(f) -> tuple[dict, list]:
    """Every dataset and sparse group with its shape, and those that look like a matrix.

    Walks hard links only (each object once: no loops, no other files).
    """
    contents, candidates, sparse_groups = {}, [], []

    def visit(name, node):
        full = "/" + name
        if any(full.startswith(g + "/") for g in sparse_groups):
            return None
        if _is_csr_group(node):
            sparse_groups.append(full)
            contents[full] = _csr_group_shape(node)
            candidates.append(full)
        elif isinstance(node, h5py.Dataset):
            contents[full] = node.shape or ()
            if node.ndim == 2 and node.dtype.kind in "biuf":
                candidates.append(full)
        return None

    f.visititems(visit)
    return contents, candidates


def _read_h5(path: str, key: str | None, size: int):
    """A 2-D dataset or a sparse group of an HDF5 file (``file.h5:/path`` selects)."""
    with h5py.File(path, "r") as f:
        node = None if key is None else _h5_resolve(f, key)
        if isinstance(node, (h5py.Dataset, h5py.Group)):
            return _read_h5_node(path, size, node)
        contents, candidates = _h5_contents(f)
        # No key: the only candidate. A key naming nothing: _pick lists the contents.
        name = _pick(path, None if key is None else "/" + key.lstrip("/"), contents, candidates)
        return _read_h5_node(path, size, f[name])


def _read_h5_node(path: str, size: int, node):
    """The matrix held by one HDF5 dataset or sparse group, its claims checked first."""
    shown = printable(path)
    if _is_csr_group(node):
        return _read_csr_group(path, size, node)
    if isinstance(node, h5py.Group):
        raise SfaError(f"{shown}: {printable(node.name)} is a group without data/indices/indptr; "
                       f"name a dataset inside it")
    _check_matrix_claim(shown, node.shape or (), _h5_claimed_dtype(shown, node.dtype))
    _h5_check_dataset(node, size)
    _require_read_memory(shown, f"dataset {printable(node.name)} ({_describe(node.shape)} {node.dtype})",
                         _dense_read_bytes(node.shape, node.dtype), _HINT_NPY)
    return _h5_values(node[()])


def _h5_claimed_dtype(shown: str, dtype: np.dtype) -> np.dtype:
    """The dtype to judge a dataset by: MATLAB's real/imag compound is complex."""
    if dtype.names and {"real", "imag"} <= set(dtype.names):
        raise SfaError(f"{shown}: complex matrices are not supported yet")
    return dtype


def _read_csr_group(path: str, size: int, group):
    """CSR (or CSC, when the group says so or its indptr fits the columns) matrix."""
    shown = printable(path)
    shape = _csr_group_shape(group)
    fields = {name: group[name] for name in ("data", "indices", "indptr")}
    for node in fields.values():
        _h5_check_dataset(node, size)
        if node.ndim != 1:
            raise ValueError(f"{printable(node.name)} is {_describe(node.shape)}, not 1-D")
    _check_matrix_claim(shown, shape, _h5_claimed_dtype(shown, fields["data"].dtype))
    encoding = (_attr_str(group, "encoding-type") or _attr_str(group, "h5sparse_format")).lower()
    pointers = fields["indptr"].shape[0]
    columns_major = encoding.startswith("csc") or (pointers - 1 == shape[1] != shape[0])
    major = shape[1] if columns_major else shape[0]
    entries = fields["data"].shape[0]
    if pointers != major + 1:
        raise ValueError(f"{printable(group.name)}/indptr holds {pointers} values; "
                         f"a {_describe(shape)} matrix needs {major + 1}")
    if fields["indices"].shape[0] != entries:
        raise ValueError(f"{printable(group.name)} holds {entries} values but {fields['indices'].shape[0]} indices")
    _check_sparse_claim(f"group {printable(group.name)}", shape, entries)
    stored = sum(_nbytes(node.shape, node.dtype.itemsize) for node in fields.values())
    _require_read_memory(shown, f"the {_describe(shape)} sparse matrix with {_entries(entries)} of "
                         f"{printable(group.name)}", 3 * stored, "free memory or use a machine with more")
    arrays = (_h5_values(fields["data"][()]), fields["indices"][()], fields["indptr"][()])
    kind = sp.csc_matrix if columns_major else sp.csr_matrix
    return kind(arrays, shape=shape)


def _h5_values(values: np.ndarray) -> np.ndarray:
    """Stored HDF5 values in a dtype numpy and scipy.sparse take.

    MATLAB stores complex data as a compound of 'real' and 'imag' (made
    complex here, so validation can reject it); scipy.sparse has no float16.
    """
    if values.dtype.names and {"real", "imag"} <= set(values.dtype.names):
        return values["real"] + 1j * values["imag"]
    return values.astype(np.float32) if values.dtype == np.float16 else values


# ---------------------------------------------------------------------------
# MATLAB
# ---------------------------------------------------------------------------

def _read_mat(path: str, key: str | None, size: int):
    """A MATLAB variable: v4 and v5-v7 through scipy.io, v7.3 (HDF5 based) through h5py."""
    if h5py.is_hdf5(path):
        return _read_mat73(path, key, size)
    if scipy.io.matlab.matfile_version(path)[0] == 0:
        return _read_mat4(path, key, size)
    return _read_mat5(path, key, size)


def _matlab_pick(path: str, key: str | None, listed: dict) -> str:
    """The variable to load, from ``{name: (shape, class)}``, and its class checked."""
    contents = {name: shape for name, (shape, _) in listed.items()}
    candidates = [name for name, (shape, cls) in listed.items()
                  if cls in _MATLAB_NUMERIC and _is_matlab_matrix(shape)]
    name = _pick(path, key, contents, candidates)
    _check_matlab_class(path, name, listed[name][1])
    return name


def _read_mat4(path: str, key: str | None, size: int):
    """A MATLAB v4 variable (uncompressed: its declared size must fit in the file)."""
    listed = {name: (shape, cls) for name, shape, cls in scipy.io.whosmat(path)}
    name = _matlab_pick(path, key, listed)
    shape, _ = listed[name]
    if math.prod(shape) > size:  # v4 stores at least one byte per value
        raise ValueError(f"variable {printable(name)} declares {_describe(shape)} values in a {size}-byte file")
    _require_read_memory(printable(path), f"variable {printable(name)} ({_describe(shape)})",
                         16 * math.prod(shape), _HINT_NPY)
    return scipy.io.loadmat(path, variable_names=[name])[name]


# Data types a MATLAB v5 element tag may name (miINT8 .. miUTF32; 8, 10, 11 are reserved).
_MAT5_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 14, 15, 16, 17, 18})
_MAT5_MATRIX, _MAT5_COMPRESSED = 14, 15
# mxCLASS codes, as whosmat names them; itemsize of the values.
_MAT5_CLASSES = {
    1: ("cell", 8), 2: ("struct", 8), 3: ("object", 8), 4: ("char", 2), 5: ("sparse", 8),
    6: ("double", 8), 7: ("single", 4), 8: ("int8", 1), 9: ("uint8", 1), 10: ("int16", 2),
    11: ("uint16", 2), 12: ("int32", 4), 13: ("uint32", 4), 14: ("int64", 8), 15: ("uint64", 8),
    16: ("function", 8), 17: ("opaque", 8),
}
_MAT5_PEEK = 4096


class _Mat5Variable:
    """One top-level variable of a v5 file: where its element lies and what its header declares."""

    def __init__(self, pos: int, length: int, compressed: bool, header: bytes, order: str):
        self.pos, self.length, self.compressed = pos, length, compressed
        fields = list(_mat5_subelements(header, 8, order, 3))
        if len(fields) < 3:
            raise ValueError(f"variable header at byte {pos} is truncated")
        (_, flags), (_, dims), (_, name) = fields
        if len(flags) < 8:
            raise ValueError(f"variable header at byte {pos}: array flags are truncated")
        word, self.nzmax = struct.unpack(order + "II", flags[:8])
        self.cls, self.itemsize = _MAT5_CLASSES.get(word & 0xFF, ("unknown", 8))
        if word & 0x200 and self.cls == "uint8":
            self.cls = "logical"
        self.complex = bool(word & 0x800)
        self.shape = tuple(struct.unpack(f"{order}{len(dims) // 4}i", dims[: len(dims) // 4 * 4]))
        self.name = name.decode("latin-1")
        if min(self.shape, default=0) < 0:
            raise ValueError(f"variable {printable(self.name)} has negative dimensions {self.shape}")

    def inflated_bound(self) -> int:
        """Most bytes the variable's element can take, by its declared shape."""
        if self.cls == "sparse":
            cols = self.shape[1] if len(self.shape) > 1 else 1
            values = self.nzmax * 8 * (2 if self.complex else 1)
            return _MAT5_PEEK + self.nzmax * 8 + (cols + 1) * 8 + values
        return _MAT5_PEEK + math.prod(self.shape) * self.itemsize * (2 if self.complex else 1)


def _mat5_subelements(buf: bytes, pos: int, order: str, count: int):
    """The first `count` (type, data) sub-elements of `buf` from `pos`, their types checked."""
    for _ in range(count):
        if pos + 8 > len(buf):
            return
        mdtype, nbytes = struct.unpack_from(order + "II", buf, pos)
        if mdtype >> 16:  # small data element: tag and up to 4 bytes in 8 bytes
            mdtype, nbytes = mdtype & 0xFFFF, mdtype >> 16
            data, pos = buf[pos + 4: pos + 4 + nbytes], pos + 8
        else:
            data, pos = buf[pos + 8: pos + 8 + nbytes], pos + 8 + nbytes + (-nbytes % 8)
        if mdtype not in _MAT5_TYPES:
            raise ValueError(f"invalid element type {mdtype}")
        yield mdtype, data


def _mat5_variables(fh, size: int, order: str) -> dict[str, _Mat5Variable]:
    """Every top-level variable, from its tag and the first bytes of its header only."""
    variables, pos = {}, 128
    while pos + 8 <= size:
        fh.seek(pos)
        mdtype, count = struct.unpack(order + "II", fh.read(8))
        if mdtype not in (_MAT5_MATRIX, _MAT5_COMPRESSED):
            raise ValueError(f"invalid element type {mdtype}" if mdtype not in _MAT5_TYPES
                             else f"element at byte {pos} of type {mdtype} is not a variable")
        if count > size - pos - 8:
            raise ValueError(f"element at byte {pos} declares {count} bytes; the file ends {size - pos - 8} later")
        if mdtype == _MAT5_COMPRESSED:
            header = zlib.decompressobj().decompress(fh.read(min(count, _MAT5_PEEK)), _MAT5_PEEK)
            if struct.unpack_from(order + "I", header.ljust(4, b"\0"))[0] != _MAT5_MATRIX:
                raise ValueError(f"compressed element at byte {pos} holds no variable")
        else:
            header = struct.pack(order + "II", mdtype, count) + fh.read(min(count, _MAT5_PEEK))
        length = 8 + count + (0 if mdtype == _MAT5_COMPRESSED else -count % 8)
        variable = _Mat5Variable(pos, length, mdtype == _MAT5_COMPRESSED, header, order)
        variables.setdefault(variable.name, variable)  # MATLAB keeps the first of a repeated name
        pos += length
    return variables


def _read_mat5(path: str, key: str | None, size: int):
    """A MATLAB v5-v7 variable: only its element is read (and inflated, capped by its declared shape)."""
    shown = printable(path)
    with open(path, "rb") as fh:
        head = fh.read(128)
        order = "<" if head[126:128] == b"IM" else ">"
        variables = _mat5_variables(fh, size, order)
        listed = {name: (v.shape, v.cls) for name, v in variables.items()}
        name = _matlab_pick(path, key, listed)
        variable = variables[name]
        if variable.complex:
            raise SfaError(f"{shown}: complex matrices are not supported yet")
        bound = variable.inflated_bound()
        _require_read_memory(shown, f"variable {printable(name)} ({_describe(variable.shape)} {variable.cls})",
                             bound + 8 * math.prod(variable.shape[:2]) * (variable.cls != "sparse"),
                             _HINT_NPY)
        fh.seek(variable.pos)
        element = fh.read(variable.length)
    if variable.compressed:
        where = f"variable {printable(name)}"
        _check_inflation(where, bound, variable.length)
        element = _inflate_capped(element[8:], bound, where)
    _check_mat5_tags(element, 0, order)
    # scipy sees a file holding this one variable: nothing else is parsed or inflated.
    loaded = scipy.io.loadmat(io.BytesIO(head + element))
    return next(value for key_, value in loaded.items() if not key_.startswith("__"))


def _inflate_capped(data: bytes, cap: int, where: str) -> bytes:
    """zlib-inflate `data`, refusing output beyond `cap` bytes (never produced)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, cap + 1)
    if len(out) > cap:
        raise ValueError(f"{where} inflates beyond the {human_bytes(cap)} its declared shape allows")
    return out


def _check_mat5_tags(buf: bytes, pos: int, order: str) -> None:
    """Walk the tagged elements of `buf` from `pos`, into matrices and compressed blocks.

    scipy's reader looks the type code up in a C array without a bounds
    check, so one corrupt tag crashes the interpreter instead of raising.
    """
    while pos + 8 <= len(buf):
        mdtype, count = struct.unpack_from(order + "II", buf, pos)
        if mdtype >> 16:  # small data element: tag and up to 4 bytes in 8 bytes
            mdtype, count, size = mdtype & 0xFFFF, mdtype >> 16, 8
        else:
            size = 8 + count + (0 if mdtype == _MAT5_COMPRESSED else -count % 8)
        if mdtype not in _MAT5_TYPES:
            raise ValueError(f"invalid element type {mdtype}")
        body = buf[pos + 8: pos + 8 + count]
        if mdtype == _MAT5_COMPRESSED:
            raise ValueError("a compressed element nested inside a variable")
        if mdtype == _MAT5_MATRIX:
            _check_mat5_tags(body, 0, order)
        pos += size


def _check_matlab_class(path: str, name: str, cls: str) -> None:
    """Reject a chosen MATLAB variable that is not numeric (char, cell, struct...)."""
    if cls not in _MATLAB_NUMERIC:
        raise SfaError(
            f"{printable(path)}: variable '{printable(name)}' is a MATLAB {cls or 'object'}, not a numeric matrix"
        )


def _is_matlab_matrix(shape) -> bool:
    """A MATLAB shape that is a matrix: MATLAB stores scalars and vectors as 2-D too."""
    return len(shape) == 2 and min(shape) > 1


def _mat73_shape(node) -> tuple:
    """MATLAB's shape of a v7.3 variable (HDF5 stores it transposed)."""
    if "MATLAB_sparse" in node.attrs:
        jc = node.get("jc") if isinstance(node, h5py.Group) else None
        if not isinstance(jc, h5py.Dataset) or jc.ndim != 1:
            raise ValueError(f"sparse variable {printable(node.name)} has no jc dataset")
        return int(node.attrs["MATLAB_sparse"]), jc.shape[0] - 1
    if isinstance(node, h5py.Dataset) and node.attrs.get("MATLAB_empty", 0):
        return tuple(int(d) for d in _h5_small(node, printable(node.name))[::-1])
    return tuple(reversed(node.shape or ())) if isinstance(node, h5py.Dataset) else ()


def _mat73_class(node) -> str:
    """MATLAB class of a v7.3 variable ('sparse' for a sparse one)."""
    return "sparse" if "MATLAB_sparse" in node.attrs else _attr_str(node, "MATLAB_class")


def _read_mat73(path: str, key: str | None, size: int):
    """A variable of a MATLAB v7.3 file (HDF5 with MATLAB's layout); external links skipped."""
    with h5py.File(path, "r") as f:
        variables = {
            name: f[name] for name in f.keys()
            if not name.startswith("#") and isinstance(f.get(name, getlink=True), h5py.HardLink)
        }
        listed = {name: (_mat73_shape(node), _mat73_class(node)) for name, node in variables.items()}
        name = _matlab_pick(path, None if key is None else key.lstrip("/"), listed)
        return _read_mat73_variable(path, size, variables[name], listed[name][0])


def _read_mat73_variable(path: str, size: int, node, shape: tuple):
    """Dense (stored column-major, so transposed back) or sparse (CSC) variable, claims checked first."""
    shown = printable(path)
    if "MATLAB_sparse" in node.attrs:
        fields = {name: node[name] for name in ("jc", "ir", "data") if name in node}
        for field in fields.values():
            _h5_check_dataset(field, size)
        entries = fields["ir"].shape[0] if "ir" in fields else 0
        if entries != (fields["data"].shape[0] if "data" in fields else 0):
            raise ValueError(f"sparse variable {printable(node.name)}: ir and data differ in length")
        if "data" in fields:
            _h5_claimed_dtype(shown, fields["data"].dtype)
        _check_sparse_claim(f"variable {printable(node.name)}", shape, entries)
        stored = sum(_nbytes(d.shape, d.dtype.itemsize) for d in fields.values())
        _require_read_memory(shown, f"the {_describe(shape)} sparse variable {printable(node.name)}",
                             3 * stored, "free memory or use a machine with more")
        jc = fields["jc"][()]
        ir = fields["ir"][()] if "ir" in fields else np.zeros(0, np.int64)
        data = fields["data"][()] if "data" in fields else np.zeros(0)
        return sp.csc_matrix((_h5_values(data), ir, jc), shape=shape)
    if node.attrs.get("MATLAB_empty", 0):
        _check_matrix_claim(shown, shape, np.dtype(np.float64))
        return np.zeros(shape)
    _check_matrix_claim(shown, shape, _h5_claimed_dtype(shown, node.dtype))
    _h5_check_dataset(node, size)
    _require_read_memory(shown, f"variable {printable(node.name)} ({_describe(shape)} {node.dtype})",
                         _dense_read_bytes(shape, node.dtype), _HINT_NPY)
    return _h5_values(node[()]).T


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
# Writing
# ---------------------------------------------------------------------------

def check_output(path, *, suffixes, force: bool, others=()) -> Path:
    """Check an output path before any work is done for it.

    Parameters
    ----------
    path : str or path-like
        Where the output will be written.
    suffixes : sequence of str or None
        The extensions its writer supports (``(".npz", ".h5", ".hdf5")``);
        None accepts any name.
    force : bool
        Whether an existing regular file may be replaced (``--force``).
    others : sequence of str or path-like or None
        The command's other outputs (None entries ignored): `path` must differ
        from each, so ``-o out.npz --report out.npz`` is refused.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    SfaError
        Unsupported extension; missing directory (never created silently), not
        a directory or not writable; `path` is a directory, a FIFO or a device
        (refused even with force); it exists and not `force`; or it is also
        another output. The CLI shows it as one ``Error:`` line, exit 1.
    """
    raw = os.fspath(path)
    shown = printable(raw)
    if suffixes is not None and _extension(raw, suffixes) is None:
        raise SfaError(f"{shown}: unsupported output type; use {', '.join(suffixes)}")
    target = Path(raw)
    parent = target.parent
    if not parent.exists():
        raise SfaError(f"{shown}: directory {printable(parent)} does not exist (sfa does not create it)")
    if not parent.is_dir():
        raise SfaError(f"{shown}: {printable(parent)} is not a directory")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise SfaError(f"{shown}: cannot write: {_short_reason(exc)}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise SfaError(f"{shown} is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise SfaError(f"{shown} is {_file_kind(st.st_mode)}; sfa writes regular files only")
        if not force:
            raise SfaError(f"{shown} exists; use --force to overwrite")
    _probe_directory(parent, shown)
    for other in others:
        if other is not None and _same_path(raw, os.fspath(other)):
            raise SfaError(f"{shown}: given for two outputs; give each output its own file")
    return target


def check_writable(path, force: bool) -> None:
    """Refuse to overwrite an existing file unless `force`, and never a directory or special file.

    :func:`check_output` without an extension check (kept for existing callers).

    Raises
    ------
    SfaError
        ``<path> exists; use --force to overwrite``, and the refusals of :func:`check_output`.
    """
    check_output(path, suffixes=None, force=force)


def _same_path(a: str, b: str) -> bool:
    """Whether two output names lead to the same file (links and ``..`` resolved)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _probe_directory(directory: Path, shown: str) -> None:
    """Create and remove a file in `directory`: the one honest test that writing there works."""
    probe = directory / f".sfa-probe-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise SfaError(f"{shown}: cannot write in {printable(directory)}: {_short_reason(exc)}") from None


@contextlib.contextmanager
def atomic_output(path, *, force: bool = True):
    """Write to a temporary file next to `path`; fsync it and move it onto `path` on success.

    The temporary name keeps the extension (``name.tmp-1a2b3c4d.npz``) so
    writers that dispatch on it work. On any failure (the body raising,
    KeyboardInterrupt, a full disk) the temporary (and any name a writer
    derived from it, such as ``np.save``'s added ``.npy``) is removed and
    nothing appears under `path`. The directory must exist.

    Parameters
    ----------
    path : str or path-like
        The final name.
    force : bool, default=True
        True replaces whatever `path` holds when the write completes. False
        commits with an exclusive link: if `path` appeared meanwhile (another
        run writing the same output), the write is refused and removed.

    Yields
    ------
    pathlib.Path
        The temporary path to write (not created yet).

    Raises
    ------
    SfaError
        The write failed (``out.npz: cannot write: [Errno 28] No space left
        on device``), the writer produced no file, or `path` exists and not `force`.
    """
    path = Path(path)
    shown = printable(path)
    if not path.parent.is_dir():
        raise SfaError(f"{shown}: directory {printable(path.parent)} does not exist (sfa does not create it)")
    suffix = _extension(path.name) or path.suffix
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f"{stem}.tmp-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        if not tmp.is_file():
            raise SfaError(f"{shown}: the writer produced no file")
        _fsync(tmp)
        _commit(tmp, path, force, shown)
    except BaseException as exc:
        reason = _write_failure(exc)
        if reason is None:
            _remove_temporaries(tmp)
            raise
        _release_writer(exc)
        _remove_temporaries(tmp)
        raise SfaError(f"{shown}: cannot write: {reason}") from None


def _write_failure(exc: BaseException) -> str | None:
    """``'[Errno 28] No space left on device'`` for a failed write; None for other exceptions.

    HDF5 reports a failed write as a RuntimeError holding ``errno = 28`` in
    several lines of detail; the errno's own words replace them.
    """
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if isinstance(exc, RuntimeError):
        found = re.search(r"errno = (\d+)", str(exc))
        if found is None:
            return None
        code = int(found.group(1))
    elif not isinstance(exc, OSError):
        return None
    return f"[Errno {code}] {os.strerror(code)}" if code else _short_reason(exc)


def _release_writer(exc: BaseException) -> None:
    """Free what a failed writer still holds (h5py handles), its complaints kept off stderr.

    The writer's frames live on in the traceback; h5py objects freed later try
    to flush to the full disk and print "Exception ignored" lines. Freed here,
    while those complaints are dropped, the error stays one line.
    """
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        seen = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            traceback.clear_frames(exc.__traceback__)
            exc.__traceback__ = None
            exc = exc.__context__
        gc.collect()
    finally:
        sys.unraisablehook = previous


def _fsync(path: Path) -> None:
    """Flush a file's data to the device (errors a write-back cache kept surface here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path, force: bool, shown: str) -> None:
    """Move the finished temporary onto `path`: replacing it, or only if `path` does not exist."""
    if force:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # atomic, and fails if `path` exists
        except FileExistsError:
            raise SfaError(f"{shown} exists (written meanwhile by another run?); use --force to overwrite") from None
        except OSError:  # no hard links here: claim the name exclusively, then replace the claim
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                raise SfaError(f"{shown} exists (written meanwhile by another run?); "
                               f"use --force to overwrite") from None
            os.replace(tmp, path)
        else:
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_temporaries(tmp: Path) -> None:
    """Remove `tmp` and any file a writer named after it (``tmp.npy``); never raises."""
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp.parent):
            if name.startswith(tmp.name):
                with contextlib.suppress(OSError):
                    os.unlink(tmp.parent / name)


def _require_disk(path: Path, nbytes: int) -> None:
    """Refuse before writing when the directory's filesystem has less than `nbytes` free."""
    try:
        st = os.statvfs(path.parent)
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise SfaError(f"{printable(path)}: needs at least {human_bytes(nbytes)} of disk; "
                       f"{human_bytes(free)} free in {printable(path.parent)}")


def save_matrix(path, A, *, force: bool = True) -> None:
    """Write a dense or sparse matrix, atomically, in the format of its extension.

    Parameters
    ----------
    path : str or path-like
        ``.npz`` (dense: ``numpy.savez`` key ``A``; sparse: ``scipy.sparse.save_npz``),
        ``.npy`` (dense only), ``.mtx``/``.mtx.gz``, ``.h5``/``.hdf5`` (dataset
        ``A``, or CSR group ``A`` with data/indices/indptr and a ``shape``
        attribute) or ``.mat`` (variable ``A``).
    A : ndarray or scipy sparse matrix of shape (n, m)
    force : bool, default=True
        Passed to :func:`atomic_output`: False refuses when `path` exists at the end.
    """
    path = Path(path)
    ext = _extension(path)
    if ext is None:
        raise SfaError(
            f"{printable(path)}: unknown file type; sfa writes {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    A = as_csr(A, printable(path)) if sp.issparse(A) else np.asarray(A)
    if ext == ".npy" and sp.issparse(A):
        raise SfaError(
            f"{printable(path)}: .npy holds dense arrays only; use .npz, .mtx or .h5 for a sparse matrix"
        )
    stored = A.data.nbytes + A.indices.nbytes + A.indptr.nbytes if sp.issparse(A) else A.nbytes
    _require_disk(path, 0 if ext == ".mtx.gz" else stored)
    with atomic_output(path, force=force) as tmp:
        _WRITERS[ext](tmp, A)


class _CountingWriter:
    """A binary file that counts the bytes it is given, so a short write can be caught."""

    def __init__(self, fh):
        self.fh, self.count = fh, 0

    def write(self, data) -> int:
        written = self.fh.write(data)
        self.count += len(data)
        return written

    def __getattr__(self, name):
        return getattr(self.fh, name)


def _write_npz(tmp: Path, A) -> None:
    """Dense: ``numpy.savez`` with key ``A``; sparse: ``scipy.sparse.save_npz``."""
    with open(tmp, "xb") as fh:  # Python file objects raise on a failed write
        if sp.issparse(A):
            sp.save_npz(fh, A)
        else:
            np.savez(fh, A=A)


def _write_npy(tmp: Path, A) -> None:
    """``numpy.save`` to exactly `tmp` (numpy would append ``.npy`` to a path)."""
    with open(tmp, "xb") as fh:
        np.save(fh, A)


def _write_mtx(tmp: Path, A) -> None:
    """Matrix Market (coordinate for sparse, array for dense), gzipped for ``.gz``.

    scipy's writer given a path ignores a full disk and reports success, so it
    writes through a Python file object, which raises, and the byte count is
    checked against the file.
    """
    with open(tmp, "xb") as raw:
        counting = _CountingWriter(raw)
        if tmp.name.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=counting, mode="wb") as fh:
                scipy.io.mmwrite(fh, A)
        else:
            scipy.io.mmwrite(counting, A)
        raw.flush()
        size = os.fstat(raw.fileno()).st_size
    if size != counting.count:
        raise OSError(f"wrote {size} of {counting.count} bytes")


@contextlib.contextmanager
def h5_output(path):
    """An HDF5 file built in memory, written to `path` (created, never replaced) when the block ends.

    HDF5 that meets a full disk while writing can leave its library state
    broken and crash the interpreter when its objects are freed; built in
    memory it never meets the disk, and Python's own write then raises a
    clean OSError. Use inside :func:`atomic_output`::

        with atomic_output(path) as tmp, h5_output(tmp) as f:
            f.create_dataset("A", data=A)

    Yields
    ------
    h5py.File
        Open for writing; the file image costs its size in memory.
    """
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        yield f
    with open(path, "xb") as fh:
        fh.write(image.getbuffer())


def _write_h5(tmp: Path, A) -> None:
    """Dataset ``A``, or a CSR group ``A`` that :func:`load_matrix` and anndata read."""
    with h5_output(tmp) as f:
        if not sp.issparse(A):
            f.create_dataset("A", data=A)
            return
        group = f.create_group("A")
        for field in ("data", "indices", "indptr"):
            group.create_dataset(field, data=getattr(A, field))
        group.attrs["shape"] = np.asarray(A.shape, dtype=np.int64)
        group.attrs["encoding-type"] = "csr_matrix"


def _write_mat(tmp: Path, A) -> None:
    """Variable ``A`` of a MATLAB v5 file."""
    with open(tmp, "xb") as fh:
        scipy.io.savemat(fh, {"A": A})


_WRITERS = {
    ".npz": _write_npz,
    ".npy": _write_npy,
    ".mtx": _write_mtx,
    ".mtx.gz": _write_mtx,
    ".h5": _write_h5,
    ".hdf5": _write_h5,
    ".mat": _write_mat,
}
