"""MATLAB ``.mat`` reader: v4 and v5-v7 through scipy.io (only the chosen variable parsed), v7.3 through h5py."""
from __future__ import annotations

import io
import math
import struct
import zlib

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp

from sfa_cli.errors import SfaError, printable
from sfa_cli.memory import human_bytes
from sfa_cli.io.guards import (
    _HINT_NPY, _check_index_dtype, _check_inflation, _check_matrix_claim, _check_sparse_claim,
    _dense_read_bytes, _describe, _nbytes, _pick, _require_read_memory,
)
from sfa_cli.io.hdf5 import _attr_str, _h5_check_dataset, _h5_claimed_dtype, _h5_small, _h5_values

_MATLAB_NUMERIC = frozenset(
    "double single int8 uint8 int16 uint16 int32 uint32 int64 uint64 logical sparse".split()
)


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
        for name in ("jc", "ir"):
            if name in fields:
                _check_index_dtype(shown, fields[name].name, fields[name].dtype)
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
