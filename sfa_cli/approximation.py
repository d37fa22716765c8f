"""The approximation protocol every method implements, and its file format.

An :class:`Approximation` of an n x n matrix A knows its method name, its
parameter count (stored numbers), how to multiply a vector or block
(``matmul``/``rmatmul``), how to form the dense matrix when n is small enough
(``to_dense``), and how to save itself. ``compare`` and the reports treat all
methods alike through it, so adding a method touches one module.

File format (``.npz`` or ``.h5``): named arrays plus a JSON ``meta`` record
with at least ``format``, ``format_version``, ``kind``, ``method``, ``n``,
``params``, ``dtype`` and ``sfa_version``. In ``.npz`` the arrays are stored
under their names (``factor0.indptr``, ``U``, ...) and ``meta`` as a string;
in ``.h5`` a dotted name ``a.b`` becomes the path ``/a/b`` (``factor{m}.x``
becomes ``/factors/{m}/x``) and ``meta`` is a root attribute, with its scalar
fields also as attributes of their own.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from scipy.sparse.linalg import LinearOperator

from sfa_cli._version import __version__
from sfa_cli.errors import SfaError
from sfa_cli.memory import require_memory

__all__ = ["Approximation", "load_approximation", "FORMAT_NAME", "FORMAT_VERSION", "DENSE_LIMIT"]

FORMAT_NAME = "sfa"
FORMAT_VERSION = 1
#: Largest n for which ``to_dense`` forms the matrix by default (n^2 doubles = 2 GiB).
DENSE_LIMIT = 16384

_KINDS: dict[str, type["Approximation"]] = {}


class Approximation(ABC):
    """An approximation of an n x n matrix.

    Subclasses set ``kind`` (the file-format tag), implement ``params``,
    ``_matmul``, ``_rmatmul``, ``_arrays`` and ``_from_arrays``, and may
    override ``_to_dense`` with something faster than multiplying the identity.
    """

    kind: str = ""

    def __init__(self, n: int, dtype, method: str, info: dict | None = None):
        self.n = int(n)
        self.dtype = np.dtype(dtype)
        self.method = method
        #: Free-form facts recorded with the file (error reached, input, ...).
        self.info = dict(info or {})

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind:
            _KINDS[cls.kind] = cls

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
        return self._checked(X, self._matmul)

    def rmatmul(self, X) -> np.ndarray:
        """A_hat^T @ X for X of shape (n,) or (n, k)."""
        return self._checked(X, self._rmatmul)

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

    def as_linear_operator(self) -> LinearOperator:
        """A scipy LinearOperator view (matvec, rmatvec, matmat)."""
        return LinearOperator(
            self.shape, matvec=self.matmul, rmatvec=self.rmatmul, matmat=self.matmul, rmatmat=self.rmatmul, dtype=self.dtype
        )

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

    def save(self, path, info: dict | None = None) -> None:
        """Write to ``.npz`` or ``.h5``/``.hdf5`` atomically (temporary name, then rename).

        ``info``: facts to record in the file's metadata besides ``self.info`` (the error reached,
        the input's name, ...); the object itself is not changed.
        """
        from sfa_cli.io import atomic_output

        path = Path(path)
        writer = _writer_for(path)
        with atomic_output(path) as tmp:
            writer(tmp, self._arrays(), {**self.meta(), **(info or {})})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method} n={self.n} params={self.params} {self.dtype.name}>"

    # -- hooks --------------------------------------------------------------
    @abstractmethod
    def _matmul(self, X: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _rmatmul(self, X: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]: ...

    @classmethod
    @abstractmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict) -> "Approximation": ...

    def _meta(self) -> dict:
        return {}

    def _to_dense(self) -> np.ndarray:
        return self._matmul(np.eye(self.n, dtype=self.dtype))

    def _checked(self, X, op) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim not in (1, 2) or X.shape[0] != self.n:
            raise SfaError(f"dimension mismatch: {self!r} multiplies arrays of shape ({self.n},) or ({self.n}, k); got {X.shape}")
        vec = X.ndim == 1
        Y = op(X.reshape(self.n, -1))
        return Y[:, 0] if vec else Y


# -- files -------------------------------------------------------------------------
_FACTOR_KEY = re.compile(r"^factor(\d+)\.(.+)$")
_FACTOR_PATH = re.compile(r"^factors/(\d+)/(.+)$")


def _h5_path(key: str) -> str:
    m = _FACTOR_KEY.match(key)
    if m:
        return f"factors/{m.group(1)}/{_h5_path(m.group(2))}"
    return key.replace(".", "/")


def _key_from_h5(path: str) -> str:
    parts = path.strip("/").split("/")
    out = []
    while parts:
        if parts[0] == "factors" and len(parts) > 1 and parts[1].isdigit():
            out.append(f"factor{parts[1]}")
            parts = parts[2:]
        else:
            out.append(parts.pop(0))
    return ".".join(out)


def _write_npz(path: Path, arrays: dict, meta: dict) -> None:
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def _write_h5(path: Path, arrays: dict, meta: dict) -> None:
    import h5py

    with h5py.File(path, "w") as f:
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
    raise SfaError(f"{path}: approximations are saved as .npz or .h5/.hdf5; got '{path.suffix or path.name}'")


def _read(path: Path) -> tuple[dict, dict]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise SfaError(f"{path}: not an sfa file (no 'meta' record); keys: {', '.join(z.files)}")
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
        return arrays, meta
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            if "meta" not in f.attrs:
                raise SfaError(f"{path}: not an sfa file (no 'meta' attribute)")
            meta = json.loads(f.attrs["meta"])
            arrays: dict = {}
            f.visititems(lambda name, obj: arrays.__setitem__(_key_from_h5(name), obj[()]) if hasattr(obj, "shape") else None)
        return arrays, meta
    raise SfaError(f"{path}: sfa files are .npz or .h5/.hdf5; got '{path.suffix or path.name}'")


def load_approximation(path) -> Approximation:
    """Read any approximation written by :meth:`Approximation.save`."""
    import zipfile

    path = Path(path)
    if not path.exists():
        raise SfaError(f"{path}: file not found")
    try:
        arrays, meta = _read(path)
    except SfaError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as exc:
        raise SfaError(f"{path}: cannot read as an sfa file: {exc}") from None
    if meta.get("format") != FORMAT_NAME:
        raise SfaError(f"{path}: not an sfa file (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise SfaError(f"{path}: written by a newer sfa (format version {meta['format_version']}); upgrade sfa")
    cls = _KINDS.get(meta.get("kind"))
    if cls is None:
        raise SfaError(f"{path}: unknown approximation kind {meta.get('kind')!r}; known: {', '.join(sorted(_KINDS))}")
    try:
        return cls._from_arrays(arrays, meta)
    except (KeyError, ValueError, IndexError) as exc:
        raise SfaError(f"{path}: corrupt {meta.get('kind')} file: {exc}") from None


def info_fields(meta: dict) -> dict:
    """The free-form facts of a meta record (everything the base class does not own)."""
    own = {"format", "format_version", "sfa_version", "kind", "method", "n", "params", "dtype"}
    return {k: v for k, v in meta.items() if k not in own}
