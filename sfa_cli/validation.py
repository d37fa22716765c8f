"""Validation on entry: the one converter every public function calls, and checks of stored arrays.

:func:`as_square_matrix` turns whatever a caller passes as the matrix (ndarray,
``np.memmap``, scipy sparse matrix or array, torch tensor, nested list) into
the one type the library computes with, a float ndarray or a canonical CSR
matrix, or raises :class:`~sfa_cli.errors.SfaError` with a one-line message
that names it and says what is wrong. :func:`check_budget` does the same for
a parameter budget. The array checks (:func:`check_index_array`,
:func:`check_csr_structure`, :func:`check_values`) serve the factor-file
loader and the approximation constructors.

Example
-------
>>> import numpy as np
>>> as_square_matrix([[1, 2], [3, 4]]).dtype
dtype('float64')
>>> as_square_matrix(np.full((3, 3), np.nan), name="K")
Traceback (most recent call last):
...
sfa_cli.errors.SfaError: K: matrix has 9 NaN and 0 Inf entries; the first is at (row 0, col 0) (0-based)
"""
from __future__ import annotations

import functools
import mmap
import sys

import numpy as np
import scipy.sparse as sp

from sfa_cli.errors import SfaError, printable

__all__ = [
    "validates_matrix",
    "as_square_matrix",
    "as_csr",
    "check_budget",
    "check_index_array",
    "check_csr_structure",
    "check_values",
    "float_dtype",
    "printable",
]

#: Entries per slice when a dense matrix is checked for NaN/Inf, so that a memory-mapped
#: matrix is read once in pieces instead of copied whole into a mask (8 MiB of float64).
FINITE_CHECK_ENTRIES = 1 << 20


def as_square_matrix(obj, name: str = "A"):
    """Validate a square matrix and return it as a float ndarray or canonical CSR.

    Parameters
    ----------
    obj : ndarray, np.memmap, scipy sparse matrix or array (any format), torch.Tensor or array-like
        The matrix. Sparse input stays sparse; a float32/float64 ndarray (a
        memory map included) is returned as is, without a copy.
    name : str, default="A"
        What to call it in error messages (the file path when loading).

    Returns
    -------
    ndarray or scipy.sparse.csr_matrix of shape (n, n)
        float32 and float64 are kept; integers and booleans become float64,
        other floats float32 (float16) or float64 (longer). A CSR result has
        sorted indices and no duplicates.

    Raises
    ------
    SfaError
        Not 2-D, object, complex or non-numeric dtype, empty, not square,
        n < 2, or NaN/Inf entries (with their count and first position; for a
        sparse matrix only its stored values are read).
    """
    A = _to_array_or_sparse(obj, name)
    A = _as_float(A, name)
    _check_square(A.shape, name)
    _check_finite(A, name)
    return A


def validates_matrix(func=None, *, name_from: str | None = None, check=None):
    """Make ``func(A, ...)`` a public entry point that validates ``A`` once, on entry.

    The decorated function runs ``as_square_matrix(A)`` and then its body, which trusts ``A``.
    ``func.trusted(A, ...)`` is the body alone: the library calls it with a matrix it has
    validated already (as scikit-learn's ``check_input=False``), so one command reads a
    memory-mapped file for validation once, not once per function it passes through.
    ``name_from`` names the keyword argument that holds the matrix's name in messages (a path);
    ``check(A, name)`` replaces ``as_square_matrix`` where a function keeps another form.

    >>> @validates_matrix
    ... def trace(A):
    ...     return float(A.trace())
    >>> trace([[1, 2], [3, 4]]), trace.trusted(np.eye(2))
    (5.0, 2.0)
    """
    if func is None:
        return functools.partial(validates_matrix, name_from=name_from, check=check)
    convert = as_square_matrix if check is None else check

    @functools.wraps(func)
    def validated(A, *args, **kwargs):
        name = (kwargs.get(name_from) if name_from else None) or "A"
        return func(convert(A, name), *args, **kwargs)

    validated.trusted = func
    return validated


def check_budget(budget, name: str = "budget") -> int:
    """A parameter budget as an int; refuses booleans, fractions and values below 1."""
    try:
        whole = not isinstance(budget, bool) and int(budget) == budget and budget >= 1
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise SfaError(f"the {name} must be a positive integer number of parameters; got {budget!r}")
    return int(budget)


def float_dtype(dtype) -> np.dtype:
    """float32/float64 kept; ints and bools -> float64; float16 -> float32; longer -> float64."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize <= 4:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def as_csr(obj, name: str) -> sp.csr_matrix:
    """A sparse or dense 2-D matrix as CSR with real, finite float values; index arrays checked first.

    Unlike :func:`as_square_matrix` the shape is not checked and duplicates are
    kept (the caller decides); the caller's arrays may be shared.
    """
    if sp.issparse(obj):
        _check_sparse_structure(obj, name)
        csr = sp.csr_matrix(obj)
    else:
        dense = _to_array_or_sparse(obj, name)
        if sp.issparse(dense):  # a sparse torch tensor
            csr = dense
        else:
            if dense.ndim != 2:
                raise SfaError(f"{name}: expected a 2-D matrix, got shape {dense.shape}")
            _as_float(dense, name)  # its dtype message before scipy's
            csr = sp.csr_matrix(dense)
    data = check_values(csr.data, name)
    if data is not csr.data:
        csr = sp.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape)
    return csr


def check_index_array(a: np.ndarray, name: str, *, upper: int) -> np.ndarray:
    """An integer index array with every entry in [0, upper), as int64.

    Float indices are refused, not truncated; ``name`` says which array it is.
    """
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise SfaError(f"{name} must hold integers; got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= upper):
        raise SfaError(f"{name} has entries outside [0, {upper}): min {int(a.min())}, max {int(a.max())}")
    return a.astype(np.int64, copy=False)


def check_csr_structure(indptr: np.ndarray, indices: np.ndarray, shape: tuple[int, int], name: str) -> None:
    """Check CSR index arrays against a shape before scipy sees them.

    indptr of length rows + 1, integer, starting at 0, non-decreasing, ending at
    len(indices); indices integer, in [0, cols). scipy's constructors check little,
    and a product with out-of-range indices crashes the interpreter in compiled code.
    """
    rows, cols = shape
    indptr, indices = np.asarray(indptr), np.asarray(indices)
    if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        raise SfaError(f"{name}: indptr and indices must hold integers; got {indptr.dtype} and {indices.dtype}")
    if indptr.shape != (rows + 1,) or indices.ndim != 1:
        raise SfaError(f"{name}: indptr has shape {indptr.shape} and indices {indices.shape}; "
                       f"a {rows} x {cols} CSR matrix needs ({rows + 1},) and (nnz,)")
    if int(indptr[0]) != 0 or int(indptr[-1]) != indices.size:
        raise SfaError(f"{name}: indptr runs from {int(indptr[0])} to {int(indptr[-1])}; "
                       f"it must run from 0 to the {indices.size} stored entries")
    if rows and np.any(indptr[1:] < indptr[:-1]):
        raise SfaError(f"{name}: indptr decreases at row {int(np.argmax(indptr[1:] < indptr[:-1]))}")
    check_index_array(indices, f"{name}: indices", upper=cols)


def check_values(a, name: str) -> np.ndarray:
    """Real, finite numbers as float32/float64 (integers and booleans become float64)."""
    a = np.asarray(a)
    if a.dtype.kind == "c":
        raise SfaError(f"{name}: complex values are not supported; got dtype {a.dtype}")
    if a.dtype.kind not in "biuf":
        raise SfaError(f"{name}: expected real numbers; got dtype {a.dtype}")
    a = a.astype(float_dtype(a.dtype), copy=False)
    if not _all_finite(a):
        nan, bad = int(np.isnan(a).sum()), int((~np.isfinite(a)).sum())
        raise SfaError(f"{name}: {nan} NaN and {bad - nan} Inf values; sfa needs finite numbers")
    return a


# -- the converter's steps ------------------------------------------------------------
def _to_array_or_sparse(obj, name: str):
    """An ndarray or canonical CSR from any supported input, without densifying."""
    if sp.issparse(obj):
        _check_sparse_structure(obj, name)
        return _canonical_csr(obj)
    torch = sys.modules.get("torch")  # no tensor can exist unless torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return _from_tensor(obj, torch, name)
    try:
        return np.asarray(obj)
    except (ValueError, TypeError) as exc:
        raise SfaError(f"{name}: cannot convert to an array: {_short_reason(exc)}") from exc


def _check_sparse_structure(obj, name: str) -> None:
    """Reject a compressed sparse matrix (CSR, CSC, BSR) with inconsistent index arrays.

    scipy's constructors check little (and ``check_format(full_check=True)``
    misses a negative last ``indptr``); converting such a matrix crashes the
    interpreter inside scipy's compiled code.
    """
    if obj.format not in ("csr", "csc", "bsr"):
        return  # COO checks its indices on construction; the others are built safely
    rows, cols = obj.shape
    block_rows, block_cols = obj.blocksize if obj.format == "bsr" else (1, 1)
    major, minor = (cols, rows) if obj.format == "csc" else (rows // block_rows, cols // block_cols)
    indptr, indices = np.asarray(obj.indptr), np.asarray(obj.indices)
    valid = (
        len(indptr) == major + 1
        and indptr[0] == 0
        and indptr[-1] == len(indices) == len(obj.data)
        and bool(np.all(np.diff(indptr) >= 0))
        and (indices.size == 0 or (indices.min() >= 0 and indices.max() < minor))
    )
    if not valid:
        raise SfaError(f"{name}: invalid sparse matrix (index arrays out of range or inconsistent)")


def _canonical_csr(obj) -> sp.csr_matrix:
    """CSR matrix with sorted indices and summed duplicates (input left untouched)."""
    csr = sp.csr_matrix(obj)
    if not csr.has_canonical_format:
        csr = csr.copy()  # its arrays may be the caller's, and sum_duplicates works in place
        csr.sum_duplicates()
    return csr


def _from_tensor(tensor, torch, name: str):
    """A torch tensor as ndarray, or as CSR when the tensor is sparse."""
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    if t.layout == torch.strided:
        return t.numpy()
    if t.ndim != 2:
        raise SfaError(f"{name}: expected a 2-D matrix, got a {t.ndim}-D sparse tensor")
    coo = t.to_sparse_coo().coalesce()
    rows, cols = coo.indices().numpy()
    return _canonical_csr(sp.coo_matrix((coo.values().numpy(), (rows, cols)), shape=tuple(t.shape)))


def _as_float(A, name: str):
    """The matrix with sfa's dtype rules applied (see :func:`as_square_matrix`)."""
    dtype = A.dtype
    if dtype.kind == "c":
        raise SfaError(f"{name}: complex matrices are not supported yet")
    if dtype.kind == "O":
        raise SfaError(f"{name}: holds Python objects (dtype object), not numbers")
    if dtype.kind not in "biuf":
        raise SfaError(f"{name}: unsupported dtype {dtype}; sfa needs real numbers")
    if A.ndim != 2:
        raise SfaError(f"{name}: expected a 2-D matrix, got a {A.ndim}-D array of shape {A.shape}")
    target = float_dtype(dtype)
    return A if dtype == target else A.astype(target)


def _check_square(shape: tuple, name: str) -> None:
    """Reject empty, non-square and 1 x 1 shapes."""
    rows, cols = shape
    if rows == 0 or cols == 0:
        raise SfaError(f"{name}: matrix is empty ({rows} x {cols})")
    if rows != cols:
        raise SfaError(f"{name}: matrix is {rows} x {cols}; sfa needs a square matrix")
    if rows < 2:
        raise SfaError(f"{name}: matrix is {rows} x {cols}; sfa needs N >= 2")


def _read_only_map(A):
    """The ``mmap`` object behind a read-only ``np.memmap`` that A is (or views), else None."""
    base = A
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    if base is None or getattr(base, "mode", None) != "r":
        return None
    return getattr(base, "_mmap", None)


def release_pages(A) -> None:
    """Hand back to the kernel the pages of a read-only memory-mapped array that were read.

    They stay in the page cache (the next read is a minor fault, not a disk read), but no longer
    count toward this process's resident memory, so passes over a ``.npy`` larger than memory keep
    it flat. Does nothing for other arrays (a writable or copy-on-write map could lose writes).
    """
    mapped = _read_only_map(A)
    if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapped.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


#: Rows read at a time from a memory map before its pages are handed back (the kernel maps the pages
#: around every page it faults in, so even a few columns of every row would map the whole file).
MAPPED_ROWS = 1024


def mapped_columns(A, cols) -> np.ndarray:
    """A[:, cols] as a new array; from a read-only memory map by blocks of rows, each block's pages
    handed back before the next (:func:`release_pages`), so the resident set stays at one block."""
    if not is_memory_mapped(A):
        return np.asarray(A[:, cols])
    cols = np.asarray(cols)
    out = np.empty((A.shape[0], len(cols)), dtype=A.dtype)
    for i in range(0, A.shape[0], MAPPED_ROWS):
        out[i:i + MAPPED_ROWS] = A[i:i + MAPPED_ROWS][:, cols]
        release_pages(A)
    return out


def mapped_trace(A) -> float:
    """The trace in float64, by blocks of rows for a memory map (see :func:`mapped_columns`)."""
    total = 0.0
    for i in range(0, A.shape[0], MAPPED_ROWS):
        total += float(np.trace(A[i:i + MAPPED_ROWS, i:i + MAPPED_ROWS], dtype=np.float64))
        release_pages(A)
    return total


def count_nonzero(A) -> int:
    """Non-zero entries (stored ones for a sparse matrix), by blocks of rows for a memory map."""
    if sp.issparse(A):
        return int(A.nnz)
    total = 0
    for i in range(0, A.shape[0], MAPPED_ROWS):
        total += int(np.count_nonzero(A[i:i + MAPPED_ROWS]))
        release_pages(A)
    return total


def is_memory_mapped(A) -> bool:
    """Whether A is (a view of) a read-only memory-mapped array (its passes release their pages)."""
    return _read_only_map(A) is not None


def _all_finite(values: np.ndarray) -> bool:
    """True when no entry is NaN or Inf, reading a large array in slices (no full-size mask)."""
    if values.size <= FINITE_CHECK_ENTRIES:
        return bool(np.isfinite(values).all())
    flat = values.reshape(-1) if values.flags.c_contiguous else None
    if flat is None:  # a strided view: slice along the first axis instead
        step = max(1, FINITE_CHECK_ENTRIES // max(1, values[0].size))
        slices = (values[i:i + step] for i in range(0, values.shape[0], step))
    else:
        slices = (flat[i:i + FINITE_CHECK_ENTRIES] for i in range(0, flat.size, FINITE_CHECK_ENTRIES))
    for part in slices:
        finite = bool(np.isfinite(part).all())
        release_pages(values)  # a memory map's pages go back after each slice
        if not finite:
            return False
    return True


def _check_finite(A, name: str) -> None:
    """Reject NaN and Inf entries, giving their counts and the first position."""
    values = A.data if sp.issparse(A) else A
    if _all_finite(values):
        return
    bad = ~np.isfinite(values)
    nan = int(np.isnan(values).sum())
    row, col = _first_position(A, bad)
    raise SfaError(
        f"{name}: matrix has {nan} NaN and {int(bad.sum()) - nan} Inf entries; "
        f"the first is at (row {row}, col {col}) (0-based)"
    )


def _first_position(A, bad: np.ndarray) -> tuple[int, int]:
    """(row, col) of the first flagged entry in row-major order."""
    if sp.issparse(A):
        k = int(np.argmax(bad))
        row = int(np.searchsorted(A.indptr, k, side="right")) - 1
        return row, int(A.indices[k])
    row, col = np.unravel_index(int(np.argmax(bad)), bad.shape)
    return int(row), int(col)


def _short_reason(exc: BaseException) -> str:
    """First line of an exception message, shortened; the type name if empty."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not text:
        return type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."

