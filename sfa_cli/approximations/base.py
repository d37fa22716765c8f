"""The approximation protocol every method implements, and its file format.

An :class:`Approximation` of an n x n matrix A behaves as the matrix A_hat for
products: it has ``shape``, ``dtype`` and ``ndim``, multiplies with ``@`` on
either side (``A_hat @ x``, ``x @ A_hat``, ``A_hat.T @ x``), gives any block of
columns (``columns(cols)``) and the dense matrix when n is small enough
(``to_dense``), and passes for a scipy LinearOperator
(``scipy.sparse.linalg.aslinearoperator(A_hat)``). It also knows its method
name and parameter count and saves itself. ``compare`` and the reports treat
all methods alike through it, so adding a method touches one module.

Example
-------
>>> import numpy as np, scipy.sparse.linalg as sla
>>> from sfa_cli.approximations.kinds import LowRank
>>> A_hat = LowRank(np.ones((4, 1)), np.arange(4.0)[None, :], method="tsvd")
>>> A_hat.shape, A_hat.dtype
((4, 4), dtype('float64'))
>>> A_hat @ np.ones(4)
array([6., 6., 6., 6.])
>>> np.ones(4) @ A_hat                       # x^T A_hat
array([ 0.,  4.,  8., 12.])
>>> A_hat.columns([3])[:, 0]
array([3., 3., 3., 3.])
>>> sla.aslinearoperator(A_hat).matvec(np.ones(4))
array([6., 6., 6., 6.])

Files (``.npz`` or ``.h5``): named arrays plus a JSON ``meta`` record with at
least ``format`` ("sfa"), ``format_version``, ``kind``, ``method``, ``n``,
``params``, ``dtype`` and ``sfa_version``; docs/formats.md gives every kind's
layout with a numpy/scipy recipe. :func:`load_approximation` checks every
array (dtype, shape, index bounds, finite values) before scipy sees it, and
reads only the arrays its kind needs.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import stat
import struct
import zipfile
import zlib
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sfa_cli._version import __version__
from sfa_cli import limits
from sfa_cli.errors import SfaError
from sfa_cli.memory import require_memory
from sfa_cli.validation import check_csr_structure, check_index_array, check_values, printable

__all__ = [
    "Approximation", "load_approximation", "StoredArrays", "FORMAT_NAME", "FORMAT_VERSION", "DENSE_LIMIT", "KINDS",
    "MATERIALIZE_MAX_BYTES", "DENSE_FMA_RATE", "DENSE_BANDWIDTH", "CACHED_BANDWIDTH", "CACHED_BYTES", "SPARSE_FMA_RATE",
    "SPARSE_VECTOR_RATE", "CALL_SECONDS", "dense_bandwidth",
]

FORMAT_NAME = "sfa"
FORMAT_VERSION = 1
#: Largest n for which ``to_dense`` forms the matrix by default (n^2 doubles = 2 GiB).
DENSE_LIMIT = limits.DENSE_LIMIT  # the one definition is in sfa_cli/limits.py

#: Every kind a file can hold and the module that defines it: :func:`load_approximation`
#: imports the module on first use, so every kind loads whatever the caller imported.
KINDS = {
    "sparse_factors": "sfa_cli.approximations.sparse_factors",
    "low_rank": "sfa_cli.approximations.kinds",
    "sparse": "sfa_cli.approximations.kinds",
    "sum": "sfa_cli.approximations.kinds",
    "monarch": "sfa_cli.approximations.kinds",
}
_CLASSES: dict[str, type["Approximation"]] = {}

# -- the cost model of a product ------------------------------------------------------------
# ``A_hat @ X`` for X of b columns, in seconds on one core, float32 (docs/apply.md; rates measured
# on the 2-core EPYC dev machine by scripts/bench_apply.py). It decides when ``@`` multiplies by
# the materialized A_hat instead (:meth:`Approximation.prefers_dense`) and says from which b the
# factorization pays (:meth:`Approximation.pays_from`). It is a model, not a timing: it is the same
# on every machine, and its only effect is the path taken, never the result beyond rounding.
#: Multiply-adds per second of a BLAS product of an n x n matrix with n x b.
DENSE_FMA_RATE = 40e9
#: Bytes per second at which a product streams an array from memory (it bounds narrow blocks: b = 1 is
#: memory bound), and from the last-level cache for arrays up to CACHED_BYTES (a matrix used again and
#: again stays there: 4 MiB at n = 1024 in float32 streamed at ~70 GB/s, 64 MiB at ~22 GB/s).
DENSE_BANDWIDTH = 22e9
CACHED_BANDWIDTH = 70e9
CACHED_BYTES = 16 * 2**20
#: Multiply-adds per second of sparse products of blocks (torch's CSR product, shifted rows), and of a
#: random-support CSR matrix with one column (scipy's loop: an index and a scattered read per entry).
SPARSE_FMA_RATE = 10e9
SPARSE_VECTOR_RATE = 1.5e9
#: Fixed cost of one kernel call (Python, dispatch, a sparse handle).
CALL_SECONDS = 10e-6
#: ``@`` multiplies by the materialized A_hat (formed once, kept on the object) only when it takes at
#: most this many bytes, the memory guard allows it, and the model says it is faster. 0 turns it off.
MATERIALIZE_MAX_BYTES = 64 * 2**20


def dense_bandwidth(nbytes: float) -> float:
    """The streaming rate the model assumes for an array of ``nbytes`` read again and again."""
    return CACHED_BANDWIDTH if nbytes <= CACHED_BYTES else DENSE_BANDWIDTH


#: The block widths :meth:`Approximation.pays_from` tries.
_WIDTHS = tuple(2**k for k in range(13))


class _Operator:
    """What lets an approximation, or its transpose, stand in for the matrix in products.

    ``@`` on both sides, ``.T``, ``ndim``, and scipy's LinearOperator duck type
    (``shape``, ``dtype``, ``matvec``, ``rmatvec``, ``matmat``, ``rmatmat``), all
    through ``matmul``/``rmatmul``.
    """

    ndim = 2
    # numpy's matmul would treat the object as a 0-d array and fail; None makes
    # `ndarray @ A_hat` return NotImplemented there, so Python calls __rmatmul__.
    __array_ufunc__ = None

    def __matmul__(self, X):
        if isinstance(X, _Operator):
            return NotImplemented
        return self.matmul(X.toarray() if sp.issparse(X) else X)

    def __rmatmul__(self, X):
        """X @ A_hat for X of shape (n,) or (k, n): (A_hat^T X^T)^T."""
        X = X.toarray() if sp.issparse(X) else np.asarray(X)
        if X.ndim not in (1, 2) or X.shape[-1] != self.shape[0]:
            raise SfaError(f"dimension mismatch: x @ {self!r} needs x of shape ({self.shape[0]},) "
                           f"or (k, {self.shape[0]}); got {X.shape}")
        return self.rmatmul(X) if X.ndim == 1 else self.rmatmul(X.T).T

    def matvec(self, x) -> np.ndarray:
        """A_hat @ x for x of shape (n,) or (n, 1), as scipy's LinearOperator calls it."""
        return self.matmul(x)

    def rmatvec(self, x) -> np.ndarray:
        """A_hat^T @ x for x of shape (n,) or (n, 1)."""
        return self.rmatmul(x)

    def matmat(self, X) -> np.ndarray:
        """A_hat @ X for X of shape (n, k)."""
        return self.matmul(X)

    def rmatmat(self, X) -> np.ndarray:
        """A_hat^T @ X for X of shape (n, k)."""
        return self.rmatmul(X)

    @property
    def T(self):
        """The transpose as a view: products go through the other hook, nothing is copied."""
        return _Transposed(self)

    def as_linear_operator(self):
        """A scipy LinearOperator with all four products.

        ``scipy.sparse.linalg.aslinearoperator(A_hat)`` works too, but scipy passes
        no ``matmat`` for such objects and multiplies a block column by column.
        """
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=self.matmul, rmatvec=self.rmatmul, matmat=self.matmul,
                              rmatmat=self.rmatmul, dtype=self.dtype)


class _Transposed(_Operator):
    """A_hat^T of an approximation: ``@`` uses its ``rmatmul``; ``.T`` gives the approximation back."""

    def __init__(self, approx: "Approximation"):
        self._approx = approx
        self.shape = approx.shape[::-1]
        self.dtype = approx.dtype

    def matmul(self, X) -> np.ndarray:
        """A_hat^T @ X for X of shape (n,) or (n, k)."""
        return self._approx.rmatmul(X)

    def rmatmul(self, X) -> np.ndarray:
        """A_hat @ X for X of shape (n,) or (n, k)."""
        return self._approx.matmul(X)

    def columns(self, cols) -> np.ndarray:
        """Columns of A_hat^T (rows of A_hat, transposed), dense, of shape (n, len(cols))."""
        a = self._approx
        cols = a._column_indices(cols)
        return a._rmatmul(_unit_columns(a.n, cols, a.dtype))

    def to_dense(self, max_n: int = DENSE_LIMIT) -> np.ndarray:
        """The n x n matrix A_hat^T (see :meth:`Approximation.to_dense`)."""
        return self._approx.to_dense(max_n).T

    @property
    def T(self):
        return self._approx

    def __repr__(self) -> str:
        return f"<transpose of {self._approx!r}>"


class Approximation(_Operator, ABC):
    """An approximation A_hat of an n x n matrix, usable wherever a matrix is multiplied.

    Subclasses set ``kind`` (the file-format tag; add it to :data:`KINDS` with
    its module so that files of the kind load in any process), implement
    ``params``, ``_matmul``, ``_rmatmul``, ``_arrays`` and ``_from_file`` (which
    reads each array through :class:`StoredArrays`' checked accessors), and may
    override ``_columns`` and ``_to_dense`` with something faster than
    multiplying columns of the identity. Document the layout in docs/formats.md
    with a recipe; tests/test_formats.py runs it.

    Attributes
    ----------
    n : int
    shape : (n, n)
    dtype : numpy dtype (float32 or float64)
    method : str
        The method that produced it.
    info : dict
        Free-form facts recorded with the file (error reached, input, ...).
    """

    kind: str = ""

    def __init__(self, n: int, dtype, method: str, info: dict | None = None):
        self.n = int(n)
        self.dtype = np.dtype(dtype)
        self.method = method
        self.info = dict(info or {})

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind:
            _CLASSES[cls.kind] = cls

    # -- the protocol -----------------------------------------------------
    @property
    @abstractmethod
    def params(self) -> int:
        """Stored numbers (non-zeros plus dense factor entries), not bytes."""

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def matmul(self, X) -> np.ndarray:
        """A_hat @ X for X of shape (n,) or (n, k)."""
        return self._checked(X, transpose=False)

    def rmatmul(self, X) -> np.ndarray:
        """A_hat^T @ X for X of shape (n,) or (n, k)."""
        return self._checked(X, transpose=True)

    # -- what a product costs -------------------------------------------------------------
    def product_seconds(self, b: int) -> float:
        """Modelled seconds of ``A_hat @ X`` for X of b columns by this kind's own product (one core).

        The default: ``params * b`` multiply-adds at :data:`SPARSE_FMA_RATE` plus one call; kinds
        override it with their own products' shape.
        """
        return CALL_SECONDS + self.params * b / SPARSE_FMA_RATE

    def dense_seconds(self, b: int) -> float:
        """Modelled seconds of the dense product ``D @ X`` of the same size (D an n x n array)."""
        n2 = float(self.n) * self.n
        read = n2 * self.dtype.itemsize
        return CALL_SECONDS + max(n2 * b / DENSE_FMA_RATE, read / dense_bandwidth(read))

    def pays_from(self) -> int | None:
        """The smallest block width b (of 1, 2, 4, ..., 4096) from which this factorization's own product is
        modelled faster than the dense product of its size at every wider block; None when it is not
        at 4096 columns.

        From the cost model (:meth:`product_seconds` against :meth:`dense_seconds`), not timed.
        """
        start = None
        for b in reversed(_WIDTHS):
            if self.product_seconds(b) >= self.dense_seconds(b):
                break
            start = b
        return start

    def apply_profile(self) -> dict:
        """What the cost model says about products with this approximation: the flop ratio n^2 / params,
        :meth:`pays_from`, the modelled speedup over the dense product at a few widths, and whether
        ``@`` would multiply by the materialized matrix there."""
        widths = (1, 16, 64, 256)
        return {
            "flop_ratio": self.n**2 / max(self.params, 1),
            "pays_from": self.pays_from(),
            "modelled_speedup": {b: self.dense_seconds(b) / self.product_seconds(b) for b in widths},
            "materialized_at": [b for b in widths if self.prefers_dense(b)],
        }

    def prefers_dense(self, b: int) -> bool:
        """Whether ``@`` multiplies X of b columns by the materialized A_hat: it fits in
        :data:`MATERIALIZE_MAX_BYTES` and the model says the dense product is faster."""
        return (self.n * self.n * self.dtype.itemsize <= MATERIALIZE_MAX_BYTES
                and self.dense_seconds(b) < self.product_seconds(b))

    def _materialized(self) -> np.ndarray | None:
        """A_hat as an array, formed on first use and kept; None when the memory guard refuses it."""
        D = getattr(self, "_dense_cache", None)
        if D is None:
            try:
                require_memory(self.n * self.n * self.dtype.itemsize + self.dense_bytes(),
                               f"keeping the dense {self.n} x {self.n} matrix for products", "", dtype=self.dtype.name)
            except SfaError:
                return None
            D = self._dense_cache = np.ascontiguousarray(self._to_dense())
        return D

    def columns(self, cols) -> np.ndarray:
        """A_hat[:, cols] as a dense array of shape (n, len(cols)), without forming A_hat.

        Parameters
        ----------
        cols : sequence of int, integer ndarray or slice
            Column indices in [0, n), in any order, repeats allowed.
        """
        cols = self._column_indices(cols)
        D = getattr(self, "_dense_cache", None)  # formed for products already (see prefers_dense)
        return D[:, cols] if D is not None else self._columns(cols)

    def to_dense(self, max_n: int = DENSE_LIMIT) -> np.ndarray:
        """The n x n matrix A_hat; refuses when n > max_n or the memory for it is not available."""
        if self.n > max_n:
            raise SfaError(
                f"forming the dense {self.n} x {self.n} matrix needs {self.n**2 * self.dtype.itemsize / 2**30:.1f} GiB; "
                f"the limit is n <= {max_n} (use matmul on blocks instead)"
            )
        require_memory(self.dense_bytes(), f"forming the dense {self.n} x {self.n} matrix",
                       "use matmul on column blocks instead (sfa apply)", dtype=self.dtype.name)
        return self._to_dense()

    def dense_bytes(self) -> int:
        """Bytes :meth:`to_dense` allocates: the result and one n x n working array (the identity it multiplies)."""
        return 2 * self.n * self.n * self.dtype.itemsize

    def meta(self) -> dict:
        """The self-describing record stored with the arrays."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "sfa_version": __version__,
            "kind": self.kind,
            "method": self.method,
            "n": self.n,
            "params": self.params,
            "dtype": self.dtype.name,
            **self._meta(),
            **self.info,
        }

    def save(self, path, *, info: dict | None = None, force: bool = True) -> None:
        """Write to ``.npz`` or ``.h5``/``.hdf5`` atomically (temporary name, then rename).

        ``info`` adds facts to this file's meta record (error reached, input
        file, ...) without changing the object. ``force=False`` refuses when
        `path` exists by the time the file is complete.
        """
        from sfa_cli.io import atomic_output

        path = Path(path)
        writer = _writer_for(path)
        meta = self.meta()
        if info:
            meta.update(info)
        with atomic_output(path, force=force) as tmp:
            writer(tmp, self._arrays(), meta)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method} n={self.n} params={self.params} {self.dtype.name}>"

    def scaled(self, c: float) -> "Approximation":
        """c A_hat as a new approximation of the same kind (the same parameters, one number changed in each)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be scaled")

    # -- hooks --------------------------------------------------------------
    @abstractmethod
    def _matmul(self, X: np.ndarray) -> np.ndarray:
        """A_hat @ X for X of shape (n, k), already checked."""

    @abstractmethod
    def _rmatmul(self, X: np.ndarray) -> np.ndarray:
        """A_hat^T @ X for X of shape (n, k), already checked."""

    @abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]:
        """The arrays saved, by name (dotted names become HDF5 paths)."""

    @classmethod
    @abstractmethod
    def _from_file(cls, stored: "StoredArrays") -> "Approximation":
        """Rebuild from a file's arrays, reading each through ``stored``'s checked accessors."""

    def _meta(self) -> dict:
        return {}

    def _columns(self, cols: np.ndarray) -> np.ndarray:
        return self._matmul(_unit_columns(self.n, cols, self.dtype))

    def _to_dense(self) -> np.ndarray:
        return self._matmul(np.eye(self.n, dtype=self.dtype))

    def _checked(self, X, transpose: bool) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim not in (1, 2) or X.shape[0] != self.n:
            raise SfaError(f"dimension mismatch: {self!r} multiplies arrays of shape ({self.n},) or ({self.n}, k); got {X.shape}")
        vec = X.ndim == 1
        X2 = X.reshape(self.n, -1)
        # the materialized matrix only where it gives the same dtype (no float32 matrix for float64 X)
        D = (self._materialized() if np.result_type(X2.dtype, self.dtype) == self.dtype
             and self.prefers_dense(X2.shape[1]) else None)
        if D is not None:
            Y = (D.T if transpose else D) @ X2
        else:
            Y = self._rmatmul(X2) if transpose else self._matmul(X2)
        return Y[:, 0] if vec else Y

    def _column_indices(self, cols) -> np.ndarray:
        if isinstance(cols, slice):
            return np.arange(self.n)[cols]
        cols = np.atleast_1d(np.asarray(cols))
        if cols.ndim != 1 or cols.dtype == bool:
            raise SfaError(f"columns takes a 1-D array of column indices; got {cols.dtype} of shape {cols.shape}")
        return check_index_array(cols, "columns", upper=self.n)


def _unit_columns(n: int, cols: np.ndarray, dtype) -> np.ndarray:
    """Columns ``cols`` of the n x n identity, shape (n, len(cols))."""
    E = np.zeros((n, len(cols)), dtype=dtype)
    E[cols, np.arange(len(cols))] = 1
    return E


def kind_class(kind: str) -> type[Approximation]:
    """The class of a file kind, importing its module on first use."""
    if kind not in _CLASSES and kind in KINDS:
        importlib.import_module(KINDS[kind])
    if kind not in _CLASSES:
        raise SfaError(f"unknown approximation kind {kind!r}; known: {', '.join(sorted(set(KINDS) | set(_CLASSES)))}")
    return _CLASSES[kind]


def info_fields(meta: dict) -> dict:
    """The free-form facts of a meta record (everything the base class does not own)."""
    own = {"format", "format_version", "sfa_version", "kind", "method", "n", "params", "dtype"}
    return {k: v for k, v in meta.items() if k not in own}


# -- writing -------------------------------------------------------------------------
_FACTOR_KEY = re.compile(r"^factor(\d+)\.(.+)$")


def _h5_path(key: str) -> str:
    """HDF5 path of an array name: ``factor{m}.x`` -> ``factors/{m}/x``, other dots -> ``/``."""
    m = _FACTOR_KEY.match(key)
    if m:
        return f"factors/{m.group(1)}/{_h5_path(m.group(2))}"
    return key.replace(".", "/")


def _write_npz(path: Path, arrays: dict, meta: dict) -> None:
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def _write_h5(path: Path, arrays: dict, meta: dict) -> None:
    from sfa_cli.io import h5_output  # built in memory: HDF5 never meets a full disk

    with h5_output(path) as f:
        for key, a in arrays.items():
            f.create_dataset(_h5_path(key), data=a)
        f.attrs["meta"] = json.dumps(meta)
        for k, v in meta.items():
            if isinstance(v, (str, int, float, bool)):
                f.attrs[k] = v


def _writer_for(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _write_npz
    if suffix in (".h5", ".hdf5"):
        return _write_h5
    raise SfaError(f"{printable(path)}: approximations are saved as .npz or .h5/.hdf5; got '{path.suffix or path.name}'")


# -- reading -------------------------------------------------------------------------
#: Largest meta record read (JSON text); sfa writes a few KiB.
META_MAX_BYTES = 1 << 20
#: A stored array may expand to at most this many times its compressed size once past
#: ``_RATIO_FREE_BYTES`` (what sfa writes is uncompressed; index arrays gzip about 10x).
MAX_EXPANSION = 200
_RATIO_FREE_BYTES = 16 << 20
#: What numpy, zipfile and h5py raise on a truncated, corrupt or foreign file.
_READ_ERRORS = (
    OSError, EOFError, ValueError, KeyError, IndexError, TypeError, RuntimeError, OverflowError, MemoryError,
    RecursionError, NotImplementedError, zipfile.BadZipFile, zlib.error, struct.error,
)


class _NotSfa(Exception):
    """The container is not an sfa approximation file; the message says why."""


class _NpzStore:
    """The members of an ``.npz`` file, each read on demand with ``allow_pickle=False``.

    Reads the zip directly (never through ``np.load``, which falls back to
    unpickling a file that is not a zip): a member is inflated only when asked for,
    and never past the size its header declares.
    """

    def __init__(self, path: Path):
        self._fh = open(path, "rb")
        try:
            if self._fh.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
                raise _NotSfa("cannot read as .npz: not a zip archive")
            self._fh.seek(0)
            self._zip = zipfile.ZipFile(self._fh)
        except BaseException:
            self._fh.close()
            raise
        self._members = {i.filename[:-4]: i for i in self._zip.infolist() if i.filename.endswith(".npy")}

    def close(self) -> None:
        self._zip.close()
        self._fh.close()

    def meta_text(self) -> str:
        if "meta" not in self._members:
            raise _NotSfa(f"no 'meta' record; members: {_listing(self._members)}")
        shape, dtype, _ = self._header("meta")
        if shape != () or dtype.kind not in "US" or dtype.itemsize > META_MAX_BYTES:
            raise _NotSfa(f"'meta' is not a JSON string (dtype {dtype}, shape {shape})")
        value = self.read("meta")[()]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    def has(self, key: str) -> bool:
        return key in self._members

    def header(self, key: str) -> tuple[tuple, np.dtype]:
        shape, dtype, _ = self._header(key)
        return shape, dtype

    def _header(self, key: str):
        info = self._members[key]
        with self._zip.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise SfaError(f"array '{key}' has .npy format version {version}; sfa reads 1.0 and 2.0")
            offset = fp.tell()
        if dtype.hasobject:
            raise SfaError(f"array '{key}' holds Python objects; sfa never unpickles")
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if offset + declared > info.file_size:
            raise SfaError(f"array '{key}' declares shape {shape} ({declared} bytes) but holds {info.file_size - offset}")
        _check_expansion(key, declared, info.compress_size)
        return shape, dtype, declared

    def read(self, key: str) -> np.ndarray:
        with self._zip.open(self._members[key]) as fp:
            return np.lib.format.read_array(fp, allow_pickle=False)


class _H5Store:
    """The datasets of an ``.h5`` file, each read on demand; links out of the file and external storage refused."""

    def __init__(self, path: Path):
        import h5py

        self._h5py = h5py
        if not h5py.is_hdf5(path):
            raise _NotSfa("cannot read as .h5: not an HDF5 file")
        self._file = h5py.File(path, "r")

    def close(self) -> None:
        self._file.close()

    def meta_text(self) -> str:
        if "meta" not in self._file.attrs:
            raise _NotSfa("no 'meta' attribute")
        value = self._file.attrs["meta"]
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value[()]
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if not isinstance(value, str):
            raise _NotSfa(f"the 'meta' attribute is not a JSON string ({type(value).__name__})")
        return value

    def _dataset(self, key: str):
        path = _h5_path(key)
        parts = path.split("/")
        for i in range(len(parts)):
            link = self._file.get("/".join(parts[: i + 1]), getlink=True)
            if link is None:
                return None
            if isinstance(link, self._h5py.ExternalLink):
                raise SfaError(f"'{path}' links to another file; sfa reads factors from this file only")
        node = self._file[path]
        if not isinstance(node, self._h5py.Dataset):
            raise SfaError(f"'{path}' is a {type(node).__name__}, not a dataset")
        if node.external or node.is_virtual:
            raise SfaError(f"dataset '{path}' keeps its data outside the file (external or virtual storage); refused")
        return node

    def has(self, key: str) -> bool:
        return self._dataset(key) is not None

    def header(self, key: str) -> tuple[tuple, np.dtype]:
        d = self._dataset(key)
        declared = int(np.prod(d.shape, dtype=object)) * d.dtype.itemsize
        _check_expansion(_h5_path(key), declared, d.id.get_storage_size())
        return tuple(d.shape), d.dtype

    def read(self, key: str) -> np.ndarray:
        return np.asarray(self._dataset(key)[()])


def _check_expansion(key: str, declared: int, stored: int) -> None:
    """Refuse an array that would inflate far beyond what the file stores (a decompression bomb)."""
    if declared > _RATIO_FREE_BYTES and declared > MAX_EXPANSION * max(stored, 1):
        raise SfaError(f"array '{key}' would expand from {stored} stored bytes to {declared}; refused")


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(printable(k) for k in keys[:12])
    return shown + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "") if keys else "none"


class StoredArrays:
    """The arrays and meta record of one approximation in a file, read on demand and checked.

    A kind's ``_from_file`` asks for each array with the dtype family and shape
    it expects; the header is checked (and the memory for it) before anything
    is read, the values after. Problems raise :class:`SfaError` with a message
    that :func:`load_approximation` prefixes with the file name.

    Attributes
    ----------
    meta : dict
        This approximation's meta record (a part's own record inside a sum).
    n : int
    """

    def __init__(self, store, meta: dict, prefix: str = ""):
        self._store = store
        self.meta = meta
        self.n = meta["n"]
        self._prefix = prefix

    # -- meta fields ---------------------------------------------------------------
    def meta_int(self, key: str, *, minimum: int = 0) -> int:
        """An integer field of the meta record, at least ``minimum``."""
        value = self.meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise SfaError(f"meta field {self._where(key)} must be an integer >= {minimum}; got {value!r}")
        return value

    def meta_list(self, key: str) -> list:
        """A list field of the meta record."""
        value = self.meta.get(key)
        if not isinstance(value, list):
            raise SfaError(f"meta field {self._where(key)} must be a list; got {value!r}")
        return value

    def info(self, *own: str) -> dict:
        """The free-form facts of the meta record, less the kind's own fields ``own``."""
        return {k: v for k, v in info_fields(self.meta).items() if k not in own}

    def method(self, default: str) -> str:
        value = self.meta.get("method", default)
        if not isinstance(value, str):
            raise SfaError(f"meta field {self._where('method')} must be a string; got {value!r}")
        return value

    # -- arrays ---------------------------------------------------------------------
    def values(self, key: str, shape: tuple) -> np.ndarray:
        """A float32/float64 array of exactly ``shape`` with finite entries."""
        a = self._read(key, shape, "f", "real floating-point (float32 or float64)")
        if a.dtype.itemsize not in (4, 8):
            raise SfaError(f"array '{self._prefix}{key}' has dtype {a.dtype}; sfa stores float32 or float64")
        return check_values(a, f"array '{self._prefix}{key}'")

    def indices(self, key: str, shape: tuple, *, upper: int) -> np.ndarray:
        """An integer array of ``shape`` with every entry in [0, upper), as int64."""
        a = self._read(key, shape, "iu", "integer")
        return check_index_array(a, f"array '{self._prefix}{key}'", upper=upper)

    def csr(self, prefix: str, shape: tuple[int, int]) -> sp.csr_matrix:
        """A CSR matrix from ``{prefix}indptr``, ``{prefix}indices`` and ``{prefix}data``, checked."""
        rows, cols = shape
        indptr = self.indices(prefix + "indptr", (rows + 1,), upper=np.iinfo(np.int64).max)
        nnz = int(indptr[-1])
        indices = self._read(prefix + "indices", (nnz,), "iu", "integer")
        check_csr_structure(indptr, indices, shape, (self._prefix + prefix).rstrip(".") or "the CSR matrix")
        data = self.values(prefix + "data", (nnz,))
        return sp.csr_matrix((data, indices.astype(np.int64, copy=False), indptr), shape=shape)

    def part(self, i: int) -> "StoredArrays":
        """Part i of a sum: its arrays under ``part{i}.`` and its meta record ``meta["parts"][i]``."""
        parts = self.meta_list("parts")
        _check_meta(parts[i], where=f"parts[{i}]")
        if parts[i]["n"] != self.n:
            raise SfaError(f"meta parts[{i}] has n={parts[i]['n']}; the sum has n={self.n}")
        return StoredArrays(self._store, parts[i], f"{self._prefix}part{i}.")

    def _read(self, key: str, shape: tuple, kinds: str, what: str) -> np.ndarray:
        full = self._prefix + key
        if not self._store.has(full):
            raise SfaError(f"array '{full}' is missing")
        found, dtype = self._store.header(full)
        if dtype.kind not in kinds:
            raise SfaError(f"array '{full}' has dtype {dtype}; it must be {what}")
        if len(found) != len(shape) or any(want is not None and got != want for got, want in zip(found, shape)):
            expected = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
            raise SfaError(f"array '{full}' has shape {tuple(found)}; expected {expected}")
        nbytes = int(np.prod(found, dtype=object)) * dtype.itemsize
        if nbytes > _RATIO_FREE_BYTES:  # smaller reads cannot hurt; checking them would only add noise
            require_memory(nbytes, f"reading array '{full}'", "the file is damaged, or too large for this machine")
        return self._store.read(full)

    def _where(self, key: str) -> str:
        return f"'{key}'" if not self._prefix else f"'{key}' of {self._prefix[:-1]}"


def _check_meta(meta, where: str = "meta") -> None:
    """The fields every kind relies on: JSON types and values, before any array is read."""
    if not isinstance(meta, dict):
        raise (_NotSfa if where == "meta" else SfaError)(f"{where} is not a JSON object")
    if where == "meta" and meta.get("format") != FORMAT_NAME:
        raise _NotSfa(f"meta 'format' is {meta.get('format')!r}, not {FORMAT_NAME!r}")
    version = meta.get("format_version", FORMAT_VERSION if where != "meta" else None)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SfaError(f"{where} 'format_version' must be a positive integer; got {version!r}")
    if version > FORMAT_VERSION:
        raise SfaError(f"written by a newer sfa (format version {version}; this one reads {FORMAT_VERSION}); upgrade sfa")
    kind = meta.get("kind")
    if not isinstance(kind, str):
        raise SfaError(f"{where} 'kind' must be a string; got {kind!r}")
    kind_class(kind)
    n = meta.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SfaError(f"{where} 'n' must be a positive integer; got {n!r}")


def _check_regular_file(path: Path) -> None:
    """Refuse a missing path, a directory, a FIFO or a device before opening it (a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SfaError("file not found") from None
    except OSError as exc:
        raise SfaError(f"cannot open: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or special file"
        raise SfaError(f"not a regular file ({what})")


def load_approximation(path) -> Approximation:
    """Read any approximation written by :meth:`Approximation.save`, checking every array first.

    Parameters
    ----------
    path : str or path-like
        A ``.npz`` or ``.h5``/``.hdf5`` file of any kind in :data:`KINDS`.

    Raises
    ------
    SfaError
        One line naming the file: missing, not a regular file, not an sfa
        approximation file, written by a newer sfa, or invalid (wrong dtype or
        shape, index out of range, NaN/Inf, meta field of the wrong type).
    """
    path = Path(path)
    name = printable(path)
    suffix = path.suffix.lower()
    store_class = {".npz": _NpzStore, ".h5": _H5Store, ".hdf5": _H5Store}.get(suffix)
    kind = None
    try:
        if store_class is None:
            raise SfaError(f"approximations are .npz or .h5/.hdf5 files; got '{printable(path.suffix or path.name)}'")
        _check_regular_file(path)
        store = store_class(path)
        try:
            try:
                meta = json.loads(store.meta_text())
            except (ValueError, RecursionError) as exc:
                raise _NotSfa(f"its meta record is not valid JSON: {_reason(exc)}") from None
            _check_meta(meta)
            kind = meta["kind"]
            return kind_class(kind)._from_file(StoredArrays(store, meta))
        finally:
            store.close()
    except _NotSfa as exc:
        raise SfaError(f"{name}: not an sfa approximation file ({exc})") from None
    except SfaError as exc:
        raise SfaError(f"{name}: {exc}" if kind is None else f"{name}: invalid {kind} file: {exc}") from None
    except _READ_ERRORS as exc:
        if kind is None:
            raise SfaError(f"{name}: not an sfa approximation file (cannot read as {suffix}: {_reason(exc)})") from None
        raise SfaError(f"{name}: invalid {kind} file: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """First line of an exception message, printable and short; the type name if empty."""
    lines = str(exc).strip().splitlines()
    text = printable(lines[0].strip()) if lines else ""
    if not text:
        return type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
