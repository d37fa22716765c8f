"""HDF5 (``.h5``/``.hdf5``): 2-D datasets and sparse CSR/CSC groups, read only from data stored in the file.

Also the HDF5 helpers MATLAB v7.3 files share (they are HDF5) and
:func:`h5_output`, which builds a file in memory so HDF5 never meets a full disk.
"""
from __future__ import annotations

import contextlib
import io

import h5py
import numpy as np
import scipy.sparse as sp

from sfa_cli.errors import SfaError, printable
from sfa_cli.memory import human_bytes
from sfa_cli.io.guards import (
    _HINT_NPY, _check_index_dtype, _check_inflation, _check_matrix_claim, _check_sparse_claim,
    _dense_read_bytes, _describe, _entries, _nbytes, _pick, _require_read_memory,
)

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
    for name in ("indices", "indptr"):  # scipy would cast float indices to integers, 1.5 to 1
        _check_index_dtype(shown, fields[name].name, fields[name].dtype)
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
