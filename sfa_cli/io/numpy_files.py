"""NumPy ``.npy`` and ``.npz`` readers (``numpy.savez`` archives and ``scipy.sparse.save_npz`` matrices).

A float32/float64 ``.npy`` is memory-mapped read-only, so it is never read
whole; a ``.npz`` member is inflated only when it is the one asked for, and
never beyond what its header declares. Pickles are never loaded.
"""
from __future__ import annotations

import math
import zipfile

import numpy as np
import scipy.sparse as sp

from sfa_cli.errors import SfaError, printable
from sfa_cli.memory import human_bytes
from sfa_cli.io.guards import (
    _READ_ERRORS, _check_index_dtype, _check_inflation, _check_matrix_claim, _check_sparse_claim,
    _dense_read_bytes, _describe, _entries, _no_key, _pick, _require_read_memory, _short_reason,
)

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


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
    for member, header in headers.items():
        if member != "data":  # scipy would cast float indices to integers, 1.5 to 1
            _check_index_dtype(npz.shown, member, header.dtype)
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
