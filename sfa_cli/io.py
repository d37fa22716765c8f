"""Read and write square matrices, and validate them.

``load_matrix(spec)`` reads a dense or sparse matrix from ``.npz``, ``.npy``,
``.mtx``, ``.mtx.gz``, ``.h5``/``.hdf5`` or ``.mat`` and returns a float
ndarray or a canonical ``scipy.sparse.csr_matrix`` (a sparse file is never
densified). A file holding several arrays takes a key after a colon:
``weights.npz:A``, ``graph.h5:/layer1/adjacency``, ``model.mat:K``.
Every problem a user can fix raises :class:`~sfa_cli.errors.SfaError` with a
one-line message that names the file.

Everything sfa writes goes through :func:`atomic_output`, so an interrupted
run never leaves a half-written file under the final name.

Example
-------
>>> A = load_matrix("data/lesmis.mtx")            # doctest: +SKIP
>>> A.shape, A.format                              # doctest: +SKIP
((77, 77), 'csr')
"""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import secrets
import struct
import sys
import tokenize
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp
from scipy.io.matlab import MatReadError

from sfa_cli.errors import SfaError
from sfa_cli.validation import as_square_matrix

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "split_spec",
    "load_matrix",
    "load_array",
    "as_square_matrix",
    "atomic_output",
    "check_writable",
    "save_matrix",
]

SUPPORTED_EXTENSIONS = (".npz", ".npy", ".mtx", ".mtx.gz", ".h5", ".hdf5", ".mat")

# What the third-party readers raise on a truncated, corrupt or foreign file
# (numpy parses a .npy header with tokenize and ast).
_READ_ERRORS = (
    OSError, EOFError, ValueError, KeyError, IndexError, TypeError, RuntimeError, OverflowError,
    NotImplementedError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile,
    zlib.error, struct.error, MatReadError,
)

_MATLAB_NUMERIC = frozenset(
    "double single int8 uint8 int16 uint16 int32 uint32 int64 uint64 logical sparse".split()
)
_LISTED_MAX = 12


# ---------------------------------------------------------------------------
# Specs and extensions
# ---------------------------------------------------------------------------

def _extension(path: str) -> str | None:
    """The supported extension `path` ends with (case-insensitive), or None."""
    lower = str(path).lower()
    matches = [ext for ext in SUPPORTED_EXTENSIONS if lower.endswith(ext)]
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
        raise SfaError(f"{path}: empty key after ':' in '{spec}'")
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
        float32 or float64 (integer and boolean data become float64).

    Raises
    ------
    SfaError
        The file is missing, unreadable, holds no (or several) matrices and no
        key, or its matrix fails :func:`as_square_matrix`.
    """
    path, key = split_spec(spec)
    ext = _extension(path)
    if ext is None:
        raise SfaError(
            f"{path}: unknown file type; sfa reads {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not os.path.exists(path):
        raise SfaError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise SfaError(f"{path}: not a regular file")
    fmt, reader = _READERS[ext]
    try:
        raw = reader(path, key)
    except _READ_ERRORS as exc:
        raise SfaError(f"{path}: cannot read as {fmt}: {_short_reason(exc)}") from exc
    return as_square_matrix(raw, name=path)


def load_array(path) -> np.ndarray:
    """A vector or block of vectors from a ``.npy`` file, as float64 (or float32).

    Used by ``sfa apply``; the array need not be square, but must be 1-D or
    2-D, real and finite.
    """
    path = str(path)
    if not os.path.exists(path):
        raise SfaError(f"{path}: no such file")
    if not path.lower().endswith(".npy"):
        raise SfaError(f"{path}: vectors are read from .npy files")
    try:
        X = _read_npy(path, None)
    except _READ_ERRORS as exc:
        raise SfaError(f"{path}: cannot read as .npy: {_short_reason(exc)}") from exc
    if X.ndim not in (1, 2) or X.size == 0:
        raise SfaError(f"{path}: expected a vector or a 2-D block; got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool) or np.iscomplexobj(X):
        raise SfaError(f"{path}: expected real numbers; got dtype {X.dtype}")
    X = X.astype(_float_dtype(X.dtype), copy=False)
    if not np.isfinite(X).all():
        raise SfaError(f"{path}: {int((~np.isfinite(X)).sum())} NaN or Inf entries")
    return X


def _short_reason(exc: BaseException) -> str:
    """First line of an exception message, shortened; the type name if empty."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not text:
        return type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _no_key(path: str, key: str | None, what: str) -> None:
    """Reject a key for a format that holds a single matrix."""
    if key is not None:
        raise SfaError(f"{path}: {what} file holds one matrix; remove ':{key}'")


def _describe(shape) -> str:
    """``20 x 20`` for a shape; ``scalar`` for ()."""
    return " x ".join(str(d) for d in shape) if len(shape) else "scalar"


def _listing(contents: dict) -> str:
    """``it holds: A (20 x 20), v (3)`` for error messages (one line, capped)."""
    if not contents:
        return "it holds nothing"
    items = [f"{name} ({_describe(shape)})" for name, shape in contents.items()]
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
    if key is not None:
        if key in contents:
            return key
        raise SfaError(f"{path}: no entry '{key}'; {_listing(contents)}")
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SfaError(f"{path}: no 2-D matrix found; {_listing(contents)}")
    raise SfaError(
        f"{path}: holds {len(candidates)} matrices ({', '.join(candidates)}); "
        f"choose one as {path}:NAME"
    )


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _check_magic(path: str, magics: tuple[bytes, ...], what: str) -> None:
    """Raise ValueError unless the file starts with one of `magics`.

    Without this, np.load takes any other file for a pickle and says so.
    """
    with open(path, "rb") as fh:
        head = fh.read(max(len(m) for m in magics))
    if not any(head.startswith(m) for m in magics):
        raise ValueError(f"not {what} (unexpected first bytes {head[:6]!r})")


def _read_npy(path: str, key: str | None):
    """A ``.npy`` array (pickled object arrays refused, never unpickled)."""
    _no_key(path, key, "a .npy")
    _check_magic(path, (_NPY_MAGIC,), "a .npy file")
    return np.load(path, allow_pickle=False)


def _read_npz(path: str, key: str | None):
    """An array of a ``numpy.savez`` file, or a ``scipy.sparse.save_npz`` matrix."""
    _check_magic(path, _ZIP_MAGIC + (_NPY_MAGIC,), "a zip archive")
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):  # a .npy file under a .npz name
        _no_key(path, key, "a .npy")
        return loaded
    with loaded as archive:
        names = archive.files
        if {"format", "shape", "data"} <= set(names):
            _no_key(path, key, "a scipy.sparse .npz")
            return sp.load_npz(path)
        if key is not None and key in names:
            return archive[key]
        arrays = {name: archive[name] for name in names}
    contents = {name: a.shape for name, a in arrays.items()}
    candidates = [name for name, a in arrays.items() if a.ndim == 2]
    return arrays[_pick(path, key, contents, candidates)]


def _read_mtx(path: str, key: str | None):
    """A Matrix Market file (``.mtx`` or gzip-compressed ``.mtx.gz``)."""
    _no_key(path, key, "a Matrix Market")
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        text = fh.read()
    # scipy's fast_matrix_market parser (scipy >= 1.12) reads past its buffer
    # and can kill the interpreter (SIGSEGV) on a body holding NUL bytes, or
    # on a last line that does not end in a newline (a truncated file).
    if b"\x00" in text:
        raise ValueError("the file holds NUL bytes (binary or corrupt)")
    if not text.endswith(b"\n"):
        text += b"\n"
    return scipy.io.mmread(io.BytesIO(text))


def _attr_str(node, name: str) -> str:
    """An HDF5 attribute as str ('' when absent); h5py may return bytes."""
    value = node.attrs.get(name, "")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_csr_group(node) -> bool:
    """An HDF5 group holding a compressed sparse matrix (anndata / 10x / sfa layout)."""
    return isinstance(node, h5py.Group) and {"data", "indices", "indptr"} <= set(node.keys())


def _csr_group_shape(group) -> tuple:
    """The ``shape`` attribute or dataset of a sparse group."""
    shape = group.attrs.get("shape")
    if shape is None and "shape" in group:
        shape = group["shape"][()]
    if shape is None:
        raise ValueError(f"sparse group {group.name} has no 'shape' attribute or dataset")
    return tuple(int(d) for d in np.ravel(shape))


def _read_csr_group(group):
    """CSR (or CSC, when the group says so or its indptr fits the columns) matrix."""
    shape = _csr_group_shape(group)
    arrays = (_h5_values(group["data"][()]), group["indices"][()], group["indptr"][()])
    encoding = (_attr_str(group, "encoding-type") or _attr_str(group, "h5sparse_format")).lower()
    columns_major = encoding.startswith("csc") or (
        len(arrays[2]) - 1 == shape[1] != shape[0]
    )
    kind = sp.csc_matrix if columns_major else sp.csr_matrix
    return kind(arrays, shape=shape)


def _h5_contents(group, contents: dict, candidates: list) -> None:
    """Walk an HDF5 group: every dataset and sparse group with its shape."""
    for node in group.values():
        if _is_csr_group(node):
            contents[node.name] = _csr_group_shape(node)
            candidates.append(node.name)
        elif isinstance(node, h5py.Group):
            _h5_contents(node, contents, candidates)
        elif isinstance(node, h5py.Dataset):
            contents[node.name] = node.shape
            if node.ndim == 2 and node.dtype.kind in "biuf":
                candidates.append(node.name)


def _read_h5(path: str, key: str | None):
    """A 2-D dataset or a sparse group of an HDF5 file (``file.h5:/path`` selects)."""
    with h5py.File(path, "r") as f:
        node = None if key is None else f.get(key)
        if isinstance(node, (h5py.Dataset, h5py.Group)):
            return _read_h5_node(path, node)
        contents, candidates = {}, []
        _h5_contents(f, contents, candidates)
        # No key: the only candidate. A key naming nothing: _pick lists the contents.
        name = _pick(path, None if key is None else "/" + key.lstrip("/"), contents, candidates)
        return _read_h5_node(path, f[name])


def _read_h5_node(path: str, node):
    """The matrix held by one HDF5 dataset or sparse group."""
    if _is_csr_group(node):
        return _read_csr_group(node)
    if isinstance(node, h5py.Group):
        raise SfaError(
            f"{path}: {node.name} is a group without data/indices/indptr; "
            f"name a dataset inside it"
        )
    return node[()]


def _read_mat(path: str, key: str | None):
    """A MATLAB variable: v4-v7 through scipy.io, v7.3 (HDF5 based) through h5py."""
    if h5py.is_hdf5(path):
        return _read_mat73(path, key)
    listed = scipy.io.whosmat(path)
    contents = {name: shape for name, shape, _ in listed}
    classes = {name: cls for name, _, cls in listed}
    candidates = [
        name for name, shape, cls in listed
        if cls in _MATLAB_NUMERIC and _is_matlab_matrix(shape)
    ]
    name = _pick(path, key, contents, candidates)
    _check_matlab_class(path, name, classes[name])
    if scipy.io.matlab.matfile_version(path)[0] == 1:
        _check_mat5_elements(path)
    return scipy.io.loadmat(path, variable_names=[name])[name]


# Data types a MATLAB v5 element tag may name (miINT8 .. miUTF32; 8, 10, 11 are reserved).
_MAT5_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 14, 15, 16, 17, 18})
_MAT5_MATRIX, _MAT5_COMPRESSED = 14, 15


def _check_mat5_elements(path: str) -> None:
    """Raise ValueError if a MATLAB v5 file holds an element tag with an invalid type.

    scipy's reader looks the type code up in a C array without a bounds
    check, so one corrupt tag crashes the interpreter instead of raising.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    order = "<" if data[126:128] == b"IM" else ">"
    _check_mat5_tags(data, 128, order)


def _check_mat5_tags(buf: bytes, pos: int, order: str) -> None:
    """Walk the tagged elements of `buf` from `pos`, into matrices and compressed blocks."""
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
            _check_mat5_tags(zlib.decompress(body), 0, order)
        elif mdtype == _MAT5_MATRIX:
            _check_mat5_tags(body, 0, order)
        pos += size


def _check_matlab_class(path: str, name: str, cls: str) -> None:
    """Reject a chosen MATLAB variable that is not numeric (char, cell, struct...)."""
    if cls not in _MATLAB_NUMERIC:
        raise SfaError(
            f"{path}: variable '{name}' is a MATLAB {cls or 'object'}, not a numeric matrix"
        )


def _is_matlab_matrix(shape) -> bool:
    """A MATLAB shape that is a matrix: MATLAB stores scalars and vectors as 2-D too."""
    return len(shape) == 2 and min(shape) > 1


def _mat73_shape(node) -> tuple:
    """MATLAB's shape of a v7.3 variable (HDF5 stores it transposed)."""
    if "MATLAB_sparse" in node.attrs:
        return int(node.attrs["MATLAB_sparse"]), len(node["jc"]) - 1
    if isinstance(node, h5py.Dataset) and node.attrs.get("MATLAB_empty", 0):
        return tuple(int(d) for d in node[()].ravel()[::-1])
    return tuple(reversed(node.shape)) if isinstance(node, h5py.Dataset) else ()


def _mat73_class(node) -> str:
    """MATLAB class of a v7.3 variable ('sparse' for a sparse one)."""
    return "sparse" if "MATLAB_sparse" in node.attrs else _attr_str(node, "MATLAB_class")


def _read_mat73(path: str, key: str | None):
    """A variable of a MATLAB v7.3 file (HDF5 with MATLAB's layout)."""
    with h5py.File(path, "r") as f:
        variables = {name: node for name, node in f.items() if not name.startswith("#")}
        contents = {name: _mat73_shape(node) for name, node in variables.items()}
        candidates = [
            name for name, node in variables.items()
            if _mat73_class(node) in _MATLAB_NUMERIC and _is_matlab_matrix(contents[name])
        ]
        name = _pick(path, None if key is None else key.lstrip("/"), contents, candidates)
        _check_matlab_class(path, name, _mat73_class(variables[name]))
        return _read_mat73_variable(variables[name], contents[name])


def _read_mat73_variable(node, shape: tuple):
    """Dense (stored column-major, so transposed back) or sparse (CSC) variable."""
    if "MATLAB_sparse" in node.attrs:
        jc = node["jc"][()]
        ir = node["ir"][()] if "ir" in node else np.zeros(0, np.int64)
        data = node["data"][()] if "data" in node else np.zeros(0)
        return sp.csc_matrix((_h5_values(data), ir, jc), shape=shape)
    if node.attrs.get("MATLAB_empty", 0):
        return np.zeros(shape)
    return _h5_values(node[()]).T


def _h5_values(values: np.ndarray) -> np.ndarray:
    """Stored HDF5 values in a dtype numpy and scipy.sparse take.

    MATLAB stores complex data as a compound of 'real' and 'imag' (made
    complex here, so validation can reject it); scipy.sparse has no float16.
    """
    if values.dtype.names and {"real", "imag"} <= set(values.dtype.names):
        return values["real"] + 1j * values["imag"]
    return values.astype(np.float32) if values.dtype == np.float16 else values


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
# Validation
# ---------------------------------------------------------------------------

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
    misses a negative last ``indptr``); index arrays read from a corrupt file
    can point out of bounds, and converting such a matrix crashes the
    interpreter inside scipy's C++ code.
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
    target = _float_dtype(dtype)
    return A if dtype == target else A.astype(target)


def _float_dtype(dtype: np.dtype) -> np.dtype:
    """float32/float64 kept; ints and bools -> float64; float16 -> float32; longer -> float64."""
    if dtype.kind == "f" and dtype.itemsize <= 4:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _check_square(shape: tuple, name: str) -> None:
    """Reject empty, non-square and 1 x 1 shapes."""
    rows, cols = shape
    if rows == 0 or cols == 0:
        raise SfaError(f"{name}: matrix is empty ({rows} x {cols})")
    if rows != cols:
        raise SfaError(f"{name}: matrix is {rows} x {cols}; sfa needs a square matrix")
    if rows < 2:
        raise SfaError(f"{name}: matrix is {rows} x {cols}; sfa needs N >= 2")


def _check_finite(A, name: str) -> None:
    """Reject NaN and Inf entries, giving their counts and the first position."""
    values = A.data if sp.issparse(A) else A
    bad = ~np.isfinite(values)
    if not bad.any():
        return
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


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def check_writable(path, force: bool) -> None:
    """Refuse to overwrite an existing file unless `force`, and never a directory.

    Raises
    ------
    SfaError
        ``<path> exists; use --force to overwrite``.
    """
    path = Path(path)
    if path.is_dir():
        raise SfaError(f"{path} is a directory; give a file name")
    if path.exists() and not force:
        raise SfaError(f"{path} exists; use --force to overwrite")


@contextlib.contextmanager
def atomic_output(path):
    """Write to a temporary file next to `path`, renamed onto it on success.

    The temporary name keeps the extension (``name.tmp-1a2b3c4d.npz``) so
    writers that dispatch on it work. It is deleted when the body raises,
    KeyboardInterrupt included. Parent directories are created.

    Yields
    ------
    pathlib.Path
        The temporary path to write (not created yet).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _extension(path.name) or path.suffix
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f"{stem}.tmp-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_matrix(path, A) -> None:
    """Write a dense or sparse matrix, atomically, in the format of its extension.

    Parameters
    ----------
    path : str or path-like
        ``.npz`` (dense: ``numpy.savez`` key ``A``; sparse: ``scipy.sparse.save_npz``),
        ``.npy`` (dense only), ``.mtx``/``.mtx.gz``, ``.h5``/``.hdf5`` (dataset
        ``A``, or CSR group ``A`` with data/indices/indptr and a ``shape``
        attribute) or ``.mat`` (variable ``A``).
    A : ndarray or scipy sparse matrix of shape (n, m)
    """
    ext = _extension(path)
    if ext is None:
        raise SfaError(
            f"{path}: unknown file type; sfa writes {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    A = _canonical_csr(A) if sp.issparse(A) else np.asarray(A)
    if ext == ".npy" and sp.issparse(A):
        raise SfaError(
            f"{path}: .npy holds dense arrays only; use .npz, .mtx or .h5 for a sparse matrix"
        )
    with atomic_output(path) as tmp:
        _WRITERS[ext](tmp, A)


def _write_npz(tmp: Path, A) -> None:
    """Dense: ``numpy.savez`` with key ``A``; sparse: ``scipy.sparse.save_npz``."""
    if sp.issparse(A):
        sp.save_npz(tmp, A)
    else:
        np.savez(tmp, A=A)


def _write_mtx(tmp: Path, A) -> None:
    """Matrix Market (coordinate for sparse, array for dense), gzipped for ``.gz``."""
    if tmp.name.lower().endswith(".gz"):
        with gzip.open(tmp, "wb") as fh:
            scipy.io.mmwrite(fh, A)
    else:
        scipy.io.mmwrite(tmp, A)


def _write_h5(tmp: Path, A) -> None:
    """Dataset ``A``, or a CSR group ``A`` that :func:`load_matrix` and anndata read."""
    with h5py.File(tmp, "w") as f:
        if not sp.issparse(A):
            f.create_dataset("A", data=A)
            return
        group = f.create_group("A")
        for field in ("data", "indices", "indptr"):
            group.create_dataset(field, data=getattr(A, field))
        group.attrs["shape"] = np.asarray(A.shape, dtype=np.int64)
        group.attrs["encoding-type"] = "csr_matrix"


_WRITERS = {
    ".npz": _write_npz,
    ".npy": lambda tmp, A: np.save(tmp, A),
    ".mtx": _write_mtx,
    ".mtx.gz": _write_mtx,
    ".h5": _write_h5,
    ".hdf5": _write_h5,
    ".mat": lambda tmp, A: scipy.io.savemat(tmp, {"A": A}),
}
