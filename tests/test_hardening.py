"""Hostile inputs and safe outputs: a tiny corpus built at test time, one file per class of issue 16.

Each reader must refuse a false claim (declared sizes, compression, storage
outside the file, special files) before it allocates, in one line naming the
file; each writer must leave either the complete file or nothing.
"""
import errno
import gzip
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from sfa_cli import io as sfa_io
from sfa_cli import memory
from sfa_cli.methods.low_rank import truncated_svd
from sfa_cli.errors import SfaError, printable
from sfa_cli.io import atomic_output, check_output, load_array, load_matrix, save_matrix
from sfa_cli.io import guards as io_guards
from sfa_cli.io import output as io_output

MTX = "%%MatrixMarket matrix coordinate real general\n"


# ---------------------------------------------------------------------------
# The corpus: each builder writes one hostile file into a directory
# ---------------------------------------------------------------------------

def _npy_header_only(path, shape, descr="<f8", data=b"\0" * 80):
    """A .npy whose header declares `shape` but which holds only `data`."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": shape})
        fh.write(data)
    return path


def _zip_member_lying(path):
    with zipfile.ZipFile(path, "w") as archive, archive.open("A.npy", "w") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
        fh.write(b"\0" * 80)
    return path


def _zip_bomb(path, *, square: bool, mib: int = 300):
    """An .npz holding a small matrix A and a `mib` MiB member of zeros that deflates ~1000x."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("A.npy", "w") as fh:
            np.save(fh, np.eye(5))
        with archive.open("bomb.npy", "w", force_zip64=True) as fh:
            count = mib * 2**20 // 8
            shape = (int(count**0.5),) * 2 if square else (count,)
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": shape})
            left, chunk = int(np.prod(shape)) * 8, b"\0" * (8 << 20)
            while left:
                fh.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


def _sparse_npz_bad_indptr(path):
    np.savez(path, format=np.array("csr"), shape=np.array([10**9, 10**9]), data=np.ones(2),
             indices=np.array([0, 1]), indptr=np.array([0, 1, 2]))
    return path


def _h5_empty_chunked(path, shape=(60000, 60000)):
    with h5py.File(path, "w") as f:
        f.create_dataset("A", shape=shape, dtype="f8", chunks=(1000, 1000))
    return path


def _h5_external_storage(path):
    raw = path.with_suffix(".raw")
    raw.write_bytes(np.eye(4).tobytes())
    with h5py.File(path, "w") as f:
        f.create_dataset("A", shape=(4, 4), dtype="f8", external=[(str(raw), 0, 128)])
    return path


def _h5_other(directory):
    other = directory / "other.h5"
    with h5py.File(other, "w") as f:
        f["B"] = np.eye(3)
    return other


def _h5_external_link(path):
    _h5_other(path.parent)
    with h5py.File(path, "w") as f:
        f["A"] = np.eye(4)
        f["ext"] = h5py.ExternalLink("other.h5", "/B")
    return f"{path}:/ext"


def _h5_virtual(path):
    other = _h5_other(path.parent)
    layout = h5py.VirtualLayout(shape=(3, 3), dtype="f8")
    layout[:] = h5py.VirtualSource(str(other), "B", shape=(3, 3))
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("A", layout)
    return path


def _h5_soft_loop(path):
    with h5py.File(path, "w") as f:
        f["A"] = np.eye(4)
        f["loop"] = h5py.SoftLink("/loop")
    return f"{path}:/loop"


def _h5_csr_claim(path):
    with h5py.File(path, "w") as f:
        g = f.create_group("X")
        g["data"], g["indices"], g["indptr"] = np.ones(2), np.array([0, 1]), np.array([0, 1, 2])
        g.attrs["shape"] = (10**9, 10**9)
    return path


def _mat73_empty_chunked(path):
    with h5py.File(path, "w", userblock_size=512) as f:
        ds = f.create_dataset("A", shape=(60000, 60000), dtype="f8", chunks=(1000, 1000))
        ds.attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file")
    return path


def _mat5_element(mdtype: int, data: bytes) -> bytes:
    return struct.pack("<II", mdtype, len(data)) + data + b"\0" * (-len(data) % 8)


def _mat5_compressed_lying(path, *, dims=(2, 2), values=10**6):
    """A v5 .mat whose compressed variable declares `dims` but inflates to `values` doubles."""
    body = (_mat5_element(6, struct.pack("<II", 6, 0)) + _mat5_element(5, struct.pack("<ii", *dims))
            + _mat5_element(1, b"A") + _mat5_element(9, bytes(8 * values)))
    packed = zlib.compress(struct.pack("<II", 14, len(body)) + body, 1)
    header = b"MATLAB 5.0 MAT-file, sfa test".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    path.write_bytes(header + struct.pack("<II", 15, len(packed)) + packed)
    return path


def _fifo(path):
    os.mkfifo(path)
    return path


def _device(path):
    path.symlink_to("/dev/zero")
    return path


def _forged_names(path):
    np.savez(path, **{"x\nError: forged \x1b[31mred": np.arange(3.0)})
    return path


HOSTILE = [
    # (id, builder taking the directory, expected part of the one error line)
    ("mtx 10^7 x 10^7 with 3 entries",
     lambda d: _text(d / "big.mtx", MTX + "10000000 10000000 3\n1 1 1\n2 2 1\n3 3 1\n"),
     "the header declares 10000000 x 10000000 with 3 entries: most rows would be empty"),
    ("mtx 10^9 x 10^9",
     lambda d: _text(d / "huge.mtx", MTX + "1000000000 1000000000 3\n1 1 1\n2 2 1\n3 3 1\n"),
     "declares 1000000000 x 1000000000 with 3 entries"),
    ("mtx nnz 10^12", lambda d: _text(d / "nnz.mtx", MTX + "1000 1000 1000000000000\n1 1 1\n"),
     "with 1000000000000 entries, but only 6 bytes follow the header"),
    ("mtx dense array 10^6 x 10^6",
     lambda d: _text(d / "arr.mtx", "%%MatrixMarket matrix array real general\n1000000 1000000\n1\n2\n"),
     "1000000 x 1000000 with 1000000000000 entries, but only 4 bytes follow"),
    ("mtx.gz bomb", lambda d: _gz(d / "bomb.mtx.gz", MTX + "2 2 1\n1 1 1\n" + " " * (8 << 20) + "\n"),
     "decompresses to more than 1.0 MiB (the header declares 2 x 2 with 1 entry)"),
    ("npy header 7 TiB", lambda d: _npy_header_only(d / "big.npy", (10**6, 10**6)),
     "the header declares 1000000 x 1000000 float64 (7.3 TiB) but the file holds 80 bytes"),
    ("npz member header lying", lambda d: _zip_member_lying(d / "lie.npz"),
     "member A: its header declares 1000000 x 1000000 float64 (7.3 TiB) but the member holds"),
    ("npz sparse indptr", lambda d: _sparse_npz_bad_indptr(d / "s.npz"),
     "indptr holds 3 values; a 1000000000 x 1000000000 csr matrix needs 1000000001"),
    ("h5 empty chunked dataset", lambda d: _h5_empty_chunked(d / "e.h5"),
     "dataset /A declares 26.8 GiB stored in 0 B"),
    ("h5 empty chunked, not square", lambda d: _h5_empty_chunked(d / "r.h5", (60000, 40000)),
     "matrix is 60000 x 40000; sfa needs a square matrix"),
    ("h5 external raw storage", lambda d: _h5_external_storage(d / "x.h5"),
     "dataset /A keeps its data in external raw files"),
    ("h5 external link", lambda d: _h5_external_link(d / "l.h5"), "/ext is an external link to other.h5"),
    ("h5 virtual dataset", lambda d: _h5_virtual(d / "v.h5"), "dataset /A is virtual"),
    ("h5 soft link loop", lambda d: _h5_soft_loop(d / "loop.h5"), "soft links nested more than 16 deep"),
    ("h5 CSR group claim", lambda d: _h5_csr_claim(d / "c.h5"),
     "/X/indptr holds 3 values; a 1000000000 x 1000000000 matrix needs 1000000001"),
    ("mat v7.3 empty chunked", lambda d: _mat73_empty_chunked(d / "m.mat"), "dataset /A declares 26.8 GiB"),
    ("mat v5 inflating past its shape", lambda d: _mat5_compressed_lying(d / "z.mat"),
     "variable A inflates beyond the 4.0 KiB its declared shape allows"),
    ("FIFO", lambda d: _fifo(d / "p.npy"), "not a regular file (a FIFO (named pipe))"),
    ("device", lambda d: _device(d / "zero.npy"), "not a regular file (a character device)"),
    ("directory", lambda d: _mkdir(d / "dir.h5"), "not a regular file (a directory)"),
    ("forged member names", lambda d: _forged_names(d / "names.npz"),
     r"it holds: x\nError: forged \x1b[31mred (3)"),
]


def _text(path, text):
    path.write_text(text)
    return path


def _gz(path, text):
    with gzip.open(path, "wt", compresslevel=1) as fh:
        fh.write(text)
    return path


def _mkdir(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("make, expected", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_file_is_refused_in_one_line_naming_it(tmp_path, make, expected):
    spec = str(make(tmp_path))
    with pytest.raises(SfaError) as caught:
        load_matrix(spec)
    message = str(caught.value)
    assert expected in message
    assert message.startswith(printable(sfa_io.split_spec(spec)[0]))
    assert "\n" not in message and "\x1b" not in message


@pytest.mark.parametrize("make, expected", [c[1:] for c in HOSTILE[::4]], ids=[c[0] for c in HOSTILE[::4]])
def test_hostile_file_through_the_cli(tmp_path, cli_error, make, expected):
    spec = str(make(tmp_path))
    line = cli_error("info", spec)
    assert expected in line and sfa_io.split_spec(spec)[0] in line


# ---------------------------------------------------------------------------
# Sparse index arrays must hold integers (scipy would truncate 1.5 to 1)
# ---------------------------------------------------------------------------

_CSR = sp.csr_matrix(np.array([[1.0, 0, 2], [0, 3, 0], [4, 0, 5]]))
_HALF = np.array([0.0, 1.5, 2.0, 0.0, 2.0])  # indices with a fraction: column 1.5 does not exist


def _npz_members(path, fmt="csr", **members):
    """A scipy.sparse-layout .npz of _CSR (or its COO) with some members replaced."""
    A = _CSR.tocoo() if fmt == "coo" else _CSR
    names = ("data", "row", "col") if fmt == "coo" else ("data", "indices", "indptr")
    arrays = {name: members.get(name, getattr(A, name)) for name in names}
    np.savez(path, format=np.array(fmt), shape=np.array(A.shape), **arrays)
    return path


def _h5_csr_members(path, **members):
    """An HDF5 file whose CSR group /X holds _CSR with some datasets replaced."""
    with h5py.File(path, "w") as f:
        g = f.create_group("X")
        for name in ("data", "indices", "indptr"):
            g[name] = members.get(name, getattr(_CSR, name))
        g.attrs["shape"] = _CSR.shape
    return path


def _mat73_sparse_ir(path, ir):
    """A MATLAB v7.3 file whose sparse variable A stores its row indices `ir`."""
    csc = _CSR.tocsc()
    with h5py.File(path, "w", userblock_size=512) as f:
        g = f.create_group("A")
        g["data"], g["ir"], g["jc"] = csc.data, ir, csc.indptr.astype(np.uint64)
        g.attrs["MATLAB_class"] = np.bytes_("double")
        g.attrs["MATLAB_sparse"] = np.uint64(3)
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file")
    return path


FLOAT_INDICES = [
    # (id, builder taking the directory, the array named, its dtype)
    ("npz csr indices 1.5", lambda d: _npz_members(d / "m.npz", indices=_HALF), "indices", "float64"),
    ("npz csr indptr whole floats", lambda d: _npz_members(d / "p.npz", indptr=_CSR.indptr.astype(float)),
     "indptr", "float64"),
    ("npz coo row float32", lambda d: _npz_members(d / "c.npz", "coo", row=_CSR.tocoo().row.astype(np.float32)),
     "row", "float32"),
    ("npz coo col bool", lambda d: _npz_members(d / "b.npz", "coo", col=_CSR.tocoo().col.astype(bool)),
     "col", "bool"),
    ("h5 CSR indices 1.5", lambda d: _h5_csr_members(d / "m.h5", indices=_HALF), "/X/indices", "float64"),
    ("h5 CSR indptr whole floats", lambda d: _h5_csr_members(d / "p.h5", indptr=_CSR.indptr.astype(float)),
     "/X/indptr", "float64"),
    ("mat v7.3 sparse ir 1.5", lambda d: _mat73_sparse_ir(d / "s.mat", np.array([0.0, 2.5, 1.0, 0.0, 2.0])),
     "/A/ir", "float64"),
]


@pytest.mark.parametrize("make, array, dtype", [c[1:] for c in FLOAT_INDICES], ids=[c[0] for c in FLOAT_INDICES])
def test_sparse_indices_that_are_not_integers_are_refused(tmp_path, cli_error, make, array, dtype):
    path = make(tmp_path)
    line = cli_error("info", path)
    assert line == f"Error: {path}: '{array}' holds {dtype} values; sparse indices must be integers"


def test_float_indices_are_refused_by_fit_too(tmp_path, cli_error):
    path = _npz_members(tmp_path / "m.npz", indices=_HALF)
    line = cli_error("fit", path, "-o", tmp_path / "F.npz")
    assert line == f"Error: {path}: 'indices' holds float64 values; sparse indices must be integers"
    assert not (tmp_path / "F.npz").exists()


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.uint64])
def test_sparse_indices_of_every_integer_dtype_are_read(tmp_path, dtype):
    npz = _npz_members(tmp_path / "m.npz", indices=_CSR.indices.astype(dtype), indptr=_CSR.indptr.astype(dtype))
    h5 = _h5_csr_members(tmp_path / "m.h5", indices=_CSR.indices.astype(dtype), indptr=_CSR.indptr.astype(dtype))
    coo = _npz_members(tmp_path / "c.npz", "coo", row=_CSR.tocoo().row.astype(dtype))
    for path in (npz, h5, coo):
        np.testing.assert_array_equal(load_matrix(path).toarray(), _CSR.toarray())


def test_a_refused_file_does_not_stop_the_batch(tmp_path, run_cli):
    good = tmp_path / "good.npy"
    np.save(good, np.eye(4) + 1)
    bad = _text(tmp_path / "big.mtx", MTX + "10000000 10000000 3\n1 1 1\n2 2 1\n3 3 1\n")
    result = run_cli("info", good, bad, good, "--json")
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and str(bad) in result.stderr
    assert [entry["n"] for entry in json.loads(result.stdout)] == [4, 4]


def _peak_rss_mib(code: str) -> float:
    """Peak resident memory (MiB) of a fresh interpreter running `code` after importing sfa_cli.io."""
    script = ("import resource, sfa_cli.io as io\n" + code +
              "\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.split()[-1])


def test_an_unused_zip_bomb_member_is_never_inflated(tmp_path):
    bomb = _zip_bomb(tmp_path / "bomb.npz", square=True)
    assert bomb.stat().st_size < 3 << 20
    np.testing.assert_array_equal(load_matrix(f"{bomb}:A"), np.eye(5))
    with pytest.raises(SfaError, match=r"holds 2 matrices \(A, bomb\)"):
        load_matrix(bomb)
    with pytest.raises(SfaError, match=r"member bomb declares 299.9 MiB stored in 1.3 MiB; sfa refuses more than 200x inflation"):
        load_matrix(f"{bomb}:bomb")
    empty = _peak_rss_mib("pass")
    used = _peak_rss_mib(f"io.load_matrix({str(bomb) + ':A'!r})")
    assert used - empty < 100, (empty, used)  # the member is 300 MiB inflated


def test_a_tiny_file_declaring_a_huge_matrix_costs_no_memory(tmp_path):
    big = _text(tmp_path / "big.mtx", MTX + "10000000 10000000 3\n1 1 1\n2 2 1\n3 3 1\n")
    empty = _peak_rss_mib("pass")
    used = _peak_rss_mib(f"""
try:
    io.load_matrix({str(big)!r})
except io.SfaError:
    pass""")
    assert used - empty < 50, (empty, used)


def test_a_fifo_never_blocks_matrix_or_vector_reads(tmp_path):
    fifo = _fifo(tmp_path / "x.npy")
    code = (f"import sfa_cli.io as io\nfor read in (io.load_matrix, io.load_array):\n"
            f"    try:\n        read({str(fifo)!r})\n    except io.SfaError as e:\n        print(e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.count("not a regular file (a FIFO (named pipe))") == 2, proc.stdout + proc.stderr


def test_load_array_checks_its_header(tmp_path):
    with pytest.raises(SfaError, match=r"x.npy: cannot read as .npy: the header declares 1000000 x 1000000"):
        load_array(_npy_header_only(tmp_path / "x.npy", (10**6, 10**6)))
    X = np.arange(6.0).reshape(3, 2)
    np.save(tmp_path / "ok.npy", X)
    np.testing.assert_array_equal(load_array(tmp_path / "ok.npy"), X)
    with pytest.raises(SfaError, match=r"ok.npy: holds 3 x 2 values; the factors multiply vectors of length 8"):
        load_array(tmp_path / "ok.npy", rows=8)
    np.testing.assert_array_equal(load_array(tmp_path / "ok.npy", rows=3), X)
    X[1, 1] = np.inf
    np.save(tmp_path / "inf.npy", X)
    with pytest.raises(SfaError, match=r"inf.npy: 1 NaN or Inf entries"):
        load_array(tmp_path / "inf.npy")


def test_npy_is_memory_mapped_and_checked_block_by_block(tmp_path, monkeypatch):
    A = np.arange(64.0).reshape(8, 8)
    np.save(tmp_path / "m.npy", A)
    M = load_matrix(tmp_path / "m.npy")
    # read-only: the file can never change, and the pages read can be handed back without loss
    assert isinstance(M, np.memmap) and not M.flags.writeable
    with pytest.raises(ValueError):
        M *= 2
    sfa_io.release_pages(M)
    np.testing.assert_array_equal(M, A)  # read again from the page cache after the release
    assert sfa_io.is_memory_mapped(M[2:]) and not sfa_io.is_memory_mapped(np.array(M))
    monkeypatch.setattr(io_guards, "_BLOCK_BYTES", 64)  # one row per block
    A[6, 3], A[2, 5], A[7, 0] = np.nan, np.inf, np.nan
    np.save(tmp_path / "bad.npy", A)
    with pytest.raises(SfaError, match=r"bad.npy: matrix has 2 NaN and 1 Inf entries; the first is at \(row 2, col 5\)"):
        load_matrix(tmp_path / "bad.npy")


def test_mat5_compressed_variable_is_inflated_once_within_its_shape(tmp_path, monkeypatch):
    ok = _mat5_compressed_lying(tmp_path / "ok.mat", dims=(3, 3), values=9)
    calls = []
    real = zlib.decompressobj
    monkeypatch.setattr(zlib, "decompressobj", lambda *a: calls.append(1) or real(*a))
    np.testing.assert_array_equal(load_matrix(ok), np.zeros((3, 3)))
    assert len(calls) == 2  # one peek at the header, one capped inflation; scipy inflates nothing


# ---------------------------------------------------------------------------
# Names and messages
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    ("plain/name.npz", "plain/name.npz"),
    ("a\nError: forged", "a\\nError: forged"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("tab\there\r", "tab\\there\\r"),
    ("rtl\u202eoverride", "rtl\\u202eoverride"),
    ("matrice_été.mtx", "matrice_été.mtx"),
])
def test_printable(text, shown):
    assert printable(text) == shown


def test_sfa_error_is_always_one_line():
    assert str(SfaError("x.npz: line one\nError: line two")) == "x.npz: line one\\nError: line two"


def test_a_file_name_cannot_forge_an_output_line(tmp_path, cli_error):
    line = cli_error("info", tmp_path / "x\nError: forged.npz")
    assert line.endswith("x\\nError: forged.npz: no such file")


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------

def test_check_output_refuses_before_any_work(tmp_path):
    ok = check_output(tmp_path / "f.npz", suffixes=(".npz", ".h5"), force=False)
    assert ok == tmp_path / "f.npz" and list(tmp_path.iterdir()) == []  # the probe left nothing
    cases = [
        (tmp_path / "out.txt", {}, r"out.txt: unsupported output type; use .npz, .h5$"),
        (tmp_path / "out", {}, r"out: unsupported output type"),
        (tmp_path / "missing" / "dir" / "f.npz", {}, r"directory .*missing/dir does not exist \(sfa does not create it\)"),
        (Path("/proc/x.npz"), {}, r"/proc/x.npz: cannot write in /proc: "),
        (tmp_path / "r.npz", {"others": [None, str(tmp_path / "r.npz")]}, r"r.npz: given for two outputs"),
        (tmp_path / "." / "r.npz", {"others": [tmp_path / "sub" / ".." / "r.npz"]}, r"given for two outputs"),
    ]
    (tmp_path / "sub").mkdir()
    for path, extra, message in cases:
        with pytest.raises(SfaError, match=message):
            check_output(path, suffixes=(".npz", ".h5"), force=False, **extra)
    (tmp_path / "d.npz").mkdir()
    os.mkfifo(tmp_path / "p.npz")
    (tmp_path / "e.npz").write_bytes(b"")
    for name, message in [("d.npz", "is a directory"), ("p.npz", r"is a FIFO \(named pipe\); sfa writes regular files only")]:
        with pytest.raises(SfaError, match=message):
            check_output(tmp_path / name, suffixes=None, force=True)
    with pytest.raises(SfaError, match=r"e.npz exists; use --force to overwrite$"):
        check_output(tmp_path / "e.npz", suffixes=None, force=False)
    check_output(tmp_path / "e.npz", suffixes=None, force=True)


def test_a_second_writer_refuses_unless_force(tmp_path):
    final = tmp_path / "out.npz"
    with pytest.raises(SfaError, match=r"out.npz exists \(written meanwhile by another run\?\); use --force"):
        with atomic_output(final, force=False) as tmp:
            np.savez(tmp, A=np.eye(2))
            np.savez(final, A=np.ones(3))  # another run finishes first
    np.testing.assert_array_equal(np.load(final)["A"], np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]
    with atomic_output(final, force=True) as tmp:
        np.savez(tmp, A=np.eye(2))
    np.testing.assert_array_equal(np.load(final)["A"], np.eye(2))
    save_matrix(tmp_path / "new.mtx", np.eye(3), force=False)
    with pytest.raises(SfaError, match="exists"):
        save_matrix(tmp_path / "new.mtx", np.eye(3), force=False)


def test_temporaries_named_by_a_writer_are_removed(tmp_path):
    with pytest.raises(SfaError, match="y.out: the writer produced no file"):
        with atomic_output(tmp_path / "y.out") as tmp:
            np.save(tmp, np.eye(2))  # numpy appends .npy to the temporary's name
    assert list(tmp_path.iterdir()) == []


def test_a_writer_failing_with_enospc_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(tmp, A):
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(io_output._WRITERS, ".npz", full_disk)
    with pytest.raises(SfaError, match=r"^.*out.npz: cannot write: \[Errno 28\] No space left on device$"):
        save_matrix(tmp_path / "out.npz", np.eye(3))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only); skipped where it cannot be mounted."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, check=False) if os.geteuid() == 0 else None
    if made is None or made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("ext", sfa_io.SUPPORTED_EXTENSIONS)
def test_a_full_disk_fails_cleanly_for_every_format(tiny_disk, monkeypatch, ext):
    A = np.random.default_rng(0).standard_normal((120, 120))  # 112 KiB binary, more as text
    with pytest.raises(SfaError, match=r"needs at least 112.5 KiB of disk; .* free in" if ext != ".mtx.gz"
                       else r"cannot write: \[Errno 28\] No space left on device$"):
        save_matrix(tiny_disk / f"pre{ext}", A)  # refused before writing, when the size is known
    monkeypatch.setattr(io_output, "_require_disk", lambda path, nbytes: None)
    for matrix in (A, sp.random(400, 400, density=0.05, format="csr", random_state=0)):
        if ext == ".npy" and sp.issparse(matrix):
            continue
        with pytest.raises(SfaError, match=r"cannot write: (\[Errno 28\] No space left on device|.*written)$"):
            save_matrix(tiny_disk / f"out{ext}", matrix)
        assert list(tiny_disk.iterdir()) == []


def test_approximation_files_are_written_through_atomic_output(tiny_disk, monkeypatch):
    approx = truncated_svd(np.random.default_rng(0).standard_normal((150, 150)), 150 * 150 // 2)
    for ext in (".npz", ".h5"):
        with pytest.raises(SfaError, match="No space left on device"):
            approx.save(tiny_disk / f"F{ext}")
        assert list(tiny_disk.iterdir()) == []


@pytest.mark.parametrize("fmt", ["npy", "npy32", "npz sparse"])
def test_entries_whose_squares_overflow_are_refused(tmp_path, fmt):
    A = np.eye(4)
    A[1, 2] = 1e300 if fmt != "npy32" else 1e18
    path = tmp_path / ("m.npz" if fmt == "npz sparse" else "m.npy")
    if fmt == "npz sparse":
        sp.save_npz(path, sp.csr_matrix(A))
    else:
        np.save(path, A.astype(np.float32) if fmt == "npy32" else A)
    with pytest.raises(SfaError, match=r"m.np[yz]: entries up to 1e\+(300|18) in magnitude; at N = 4 in float(64|32)"):
        load_matrix(path)
    np.save(tmp_path / "fine.npy", np.eye(4) * 1e100)
    assert load_matrix(tmp_path / "fine.npy").max() == 1e100


@pytest.mark.parametrize("name, write, hint", [
    ("m.npz", lambda p: np.savez(p, A=np.eye(300)),
     "reading the 300 x 300 float64 member A needs 703.1 KiB; 1000 B available; "
     "extract it as .npy, which sfa reads memory-mapped: unzip -p {p} A.npy > A.npy"),
    ("m.mtx", lambda p: scipy.io.mmwrite(p, np.eye(300)),
     "available; convert it to .npy, which sfa reads memory-mapped"),
    ("m.mat", lambda p: scipy.io.savemat(p, {"A": np.eye(300)}),
     "reading variable A (300 x 300 double) needs"),
    ("m.h5", lambda p: save_matrix(p, np.eye(300)), "convert it to .npy, which sfa reads memory-mapped"),
])
def test_whole_read_formats_check_memory_and_say_what_to_convert_to(tmp_path, monkeypatch, name, write, hint):
    path = tmp_path / name
    write(path)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1000)
    with pytest.raises(SfaError) as caught:
        load_matrix(path)
    assert str(caught.value).startswith(f"{path}: reading ")
    assert hint.format(p=path) in str(caught.value)
    np.save(tmp_path / "big.npy", np.eye(300))  # memory-mapped: no memory needed up front
    assert load_matrix(tmp_path / "big.npy").shape == (300, 300)


def test_approximation_save_refuses_a_name_taken_meanwhile(tmp_path):
    approx = truncated_svd(np.random.default_rng(0).standard_normal((10, 10)), 40)
    approx.save(tmp_path / "F.npz", force=False)
    with pytest.raises(SfaError, match=r"F.npz exists \(written meanwhile by another run\?\)"):
        approx.save(tmp_path / "F.npz", force=False)
    approx.save(tmp_path / "F.npz")  # force by default, as before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F.npz"]


def _save_after(barrier, path, value, results):
    barrier.wait()
    try:
        save_matrix(path, np.full((300, 300), value), force=False)
        results.put((value, "written"))
    except SfaError as exc:
        results.put((value, str(exc)))


def test_two_processes_writing_one_name_one_refuses(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    path = tmp_path / "out.npz"
    workers = [ctx.Process(target=_save_after, args=(barrier, path, float(v), results)) for v in (1, 2)]
    for w in workers:
        w.start()
    outcomes = dict(results.get(timeout=60) for _ in workers)
    for w in workers:
        w.join(timeout=60)
    written = [v for v, outcome in outcomes.items() if outcome == "written"]
    assert len(written) == 1, outcomes
    loser = ({1.0, 2.0} - set(written)).pop()
    assert "out.npz exists (written meanwhile by another run?)" in outcomes[loser]
    np.testing.assert_array_equal(np.load(path)["A"], np.full((300, 300), written[0]))
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]
