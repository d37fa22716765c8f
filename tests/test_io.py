"""Reading, validating and writing matrices: every format, variant and error case."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp
import torch

from sfa_cli.errors import SfaError
from sfa_cli.io import (
    SUPPORTED_EXTENSIONS,
    as_square_matrix,
    atomic_output,
    check_writable,
    load_matrix,
    save_matrix,
    split_spec,
)

REAL_DATA = Path(__file__).parents[2] / "shared" / "data" / "real"

DENSE = np.arange(25.0).reshape(5, 5) - 12.0  # negatives, one zero, not symmetric
SPARSE = sp.random(6, 6, density=0.3, format="csr", random_state=0)


def _assert_dense(A, expected):
    assert isinstance(A, np.ndarray)
    np.testing.assert_array_equal(A, expected)


def _assert_sparse(A, expected):
    assert isinstance(A, sp.csr_matrix) and A.has_canonical_format
    np.testing.assert_array_equal(A.toarray(), expected.toarray())


def _write_mtx(path, body: str, header: str, size: str) -> Path:
    """A hand-written Matrix Market file (to pin symmetric / pattern / integer variants)."""
    path.write_text(f"%%MatrixMarket matrix {header}\n% test\n{size}\n{body}")
    return path


def _write_mat73(path, variables: dict) -> Path:
    """A MATLAB v7.3 file laid out as MATLAB writes it (512-byte userblock, column-major)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, A in variables.items():
            if sp.issparse(A):
                csc = sp.csc_matrix(A)
                g = f.create_group(name)
                g.create_dataset("data", data=csc.data)
                g.create_dataset("ir", data=csc.indices.astype(np.uint64))
                g.create_dataset("jc", data=csc.indptr.astype(np.uint64))
                g.attrs["MATLAB_class"] = np.bytes_("double")
                g.attrs["MATLAB_sparse"] = np.uint64(A.shape[0])
            else:
                ds = f.create_dataset(name, data=np.asarray(A).T)
                ds.attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")
    return path


# ---------------------------------------------------------------------------
# split_spec
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spec, expected",
    [
        ("m.npz", ("m.npz", None)),
        ("m.npz:A", ("m.npz", "A")),
        ("d.h5:/group/name", ("d.h5", "/group/name")),
        ("k.MAT:A", ("k.MAT", "A")),
        ("m.mtx.gz", ("m.mtx.gz", None)),
        (r"C:\data\m.npz", (r"C:\data\m.npz", None)),
        (r"C:\data\m.npz:A", (r"C:\data\m.npz", "A")),
        ("runs:2024/x.npz.d/m.h5:/a:b", ("runs:2024/x.npz.d/m.h5", "/a:b")),
    ],
)
def test_split_spec(spec, expected):
    assert split_spec(spec) == expected


def test_split_spec_prefers_an_existing_file(tmp_path):
    weird = tmp_path / "a.npz:dir"
    weird.mkdir()
    target = weird / "m.npz"
    np.savez(target, A=DENSE)
    assert split_spec(f"{target}:A") == (str(target), "A")
    _assert_dense(load_matrix(f"{target}:A"), DENSE)


# ---------------------------------------------------------------------------
# Every format round trip
# ---------------------------------------------------------------------------

def test_npz_savez_single_array(tmp_path):
    np.savez(tmp_path / "m.npz", M=DENSE)
    _assert_dense(load_matrix(tmp_path / "m.npz"), DENSE)


def test_npz_picks_the_only_2d_array_and_keys_select(tmp_path):
    p = tmp_path / "m.npz"
    np.savez(p, A=DENSE, v=np.arange(3.0))
    _assert_dense(load_matrix(p), DENSE)
    np.savez(p, A=DENSE, B=2 * DENSE)
    _assert_dense(load_matrix(f"{p}:B"), 2 * DENSE)
    _assert_dense(load_matrix(f"{p}:A"), DENSE)


@pytest.mark.parametrize("fmt", ["csr", "coo", "csc"])
def test_npz_scipy_sparse_stays_sparse(tmp_path, fmt):
    sp.save_npz(tmp_path / "s.npz", SPARSE.asformat(fmt))
    _assert_sparse(load_matrix(tmp_path / "s.npz"), SPARSE)


def test_npy(tmp_path):
    np.save(tmp_path / "m.npy", DENSE)
    _assert_dense(load_matrix(tmp_path / "m.npy"), DENSE)


def test_mtx_coordinate_general_is_sparse(tmp_path):
    sio.mmwrite(tmp_path / "m.mtx", SPARSE)
    _assert_sparse(load_matrix(tmp_path / "m.mtx"), SPARSE)


def test_mtx_symmetric_is_mirrored(tmp_path):
    p = _write_mtx(tmp_path / "s.mtx", "1 1 4\n2 1 -1.5\n3 2 2e-1\n", "coordinate real symmetric", "3 3 3")
    expected = np.array([[4, -1.5, 0], [-1.5, 0, 0.2], [0, 0.2, 0]])
    _assert_sparse(load_matrix(p), sp.csr_matrix(expected))


def test_mtx_skew_symmetric_is_mirrored_negated(tmp_path):
    p = _write_mtx(tmp_path / "k.mtx", "2 1 3\n3 1 -2\n", "coordinate real skew-symmetric", "3 3 2")
    expected = np.array([[0, -3, 2], [3, 0, 0], [-2, 0, 0]], dtype=float)
    _assert_sparse(load_matrix(p), sp.csr_matrix(expected))


def test_mtx_pattern_is_ones(tmp_path):
    p = _write_mtx(tmp_path / "p.mtx", "1 2\n2 1\n3 3\n", "coordinate pattern general", "3 3 3")
    A = load_matrix(p)
    assert A.dtype == np.float64
    _assert_sparse(A, sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])))


def test_mtx_integer_becomes_float64(tmp_path):
    p = _write_mtx(tmp_path / "i.mtx", "1 1 7\n2 2 -3\n", "coordinate integer general", "2 2 2")
    A = load_matrix(p)
    assert A.dtype == np.float64
    _assert_sparse(A, sp.csr_matrix(np.diag([7.0, -3.0])))


def test_mtx_array_is_dense(tmp_path):
    sio.mmwrite(tmp_path / "a.mtx", DENSE)
    _assert_dense(load_matrix(tmp_path / "a.mtx"), DENSE)


def test_mtx_gz_and_no_final_newline(tmp_path):
    p = _write_mtx(tmp_path / "m.mtx", "1 1 2.5\n2 2 1E-1", "coordinate real general", "2 2 2")
    with gzip.open(tmp_path / "m.mtx.gz", "wb") as fh:
        fh.write(p.read_bytes())
    expected = sp.csr_matrix(np.diag([2.5, 0.1]))
    _assert_sparse(load_matrix(p), expected)
    _assert_sparse(load_matrix(tmp_path / "m.mtx.gz"), expected)


def test_h5_single_dataset(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["data/M"] = DENSE
        f["labels"] = np.arange(5)
    _assert_dense(load_matrix(tmp_path / "d.h5"), DENSE)


def test_h5_several_datasets_need_a_key(tmp_path):
    p = tmp_path / "d.hdf5"
    with h5py.File(p, "w") as f:
        f["A"] = DENSE
        f["g/B"] = 2 * DENSE
    _assert_dense(load_matrix(f"{p}:/g/B"), 2 * DENSE)
    _assert_dense(load_matrix(f"{p}:g/B"), 2 * DENSE)
    with pytest.raises(SfaError, match=r"holds 2 matrices \(/A, /g/B\); choose one as .*d.hdf5:NAME"):
        load_matrix(p)


@pytest.mark.parametrize("shape_as", ["attribute", "dataset"])
def test_h5_csr_group(tmp_path, shape_as):
    p = tmp_path / "g.h5"
    with h5py.File(p, "w") as f:
        g = f.create_group("X")
        for field in ("data", "indices", "indptr"):
            g[field] = getattr(SPARSE, field)
        if shape_as == "attribute":
            g.attrs["shape"] = SPARSE.shape
        else:
            g["shape"] = np.array(SPARSE.shape)
        f["obs_names"] = np.arange(6)
    _assert_sparse(load_matrix(p), SPARSE)
    _assert_sparse(load_matrix(f"{p}:/X"), SPARSE)


def test_h5_csc_group_by_encoding_type(tmp_path):
    p = tmp_path / "c.h5"
    csc = SPARSE.tocsc()
    with h5py.File(p, "w") as f:
        g = f.create_group("X")
        for field in ("data", "indices", "indptr"):
            g[field] = getattr(csc, field)
        g.attrs["shape"] = csc.shape
        g.attrs["encoding-type"] = "csc_matrix"
    _assert_sparse(load_matrix(p), SPARSE)


def test_mat_v5_dense_sparse_and_key(tmp_path):
    p = tmp_path / "m.mat"
    sio.savemat(p, {"A": DENSE, "n": 5, "v": np.arange(3.0), "name": "test"})
    _assert_dense(load_matrix(p), DENSE)  # scalars, vectors and text are skipped
    sio.savemat(p, {"A": DENSE, "S": SPARSE.tocsc()})
    _assert_dense(load_matrix(f"{p}:A"), DENSE)
    _assert_sparse(load_matrix(f"{p}:S"), SPARSE)


def test_mat_v73_dense_is_transposed_back_and_sparse_kept(tmp_path):
    p = _write_mat73(tmp_path / "m.mat", {"A": DENSE, "S": SPARSE})
    _assert_dense(load_matrix(f"{p}:A"), DENSE)
    _assert_sparse(load_matrix(f"{p}:S"), SPARSE)
    with pytest.raises(SfaError, match="holds 2 matrices"):
        load_matrix(p)
    p1 = _write_mat73(tmp_path / "one.mat", {"A": DENSE})
    _assert_dense(load_matrix(p1), DENSE)


@pytest.mark.parametrize(
    "dtype, expected",
    [(np.int32, np.float64), (np.uint8, np.float64), (np.bool_, np.float64),
     (np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)],
)
def test_dtype_rules(tmp_path, dtype, expected):
    np.save(tmp_path / "m.npy", (np.eye(3) * 2 > 1).astype(dtype))
    assert load_matrix(tmp_path / "m.npy").dtype == expected
    if dtype != np.float16:  # scipy.sparse has no float16
        sp.save_npz(tmp_path / "s.npz", sp.csr_matrix(np.eye(3).astype(dtype)))
        assert load_matrix(tmp_path / "s.npz").dtype == expected


def test_real_data_sizes_match_stats(tmp_path):
    if not REAL_DATA.is_dir():
        pytest.skip(f"{REAL_DATA} not present")
    stats = json.loads((REAL_DATA / "stats.json").read_text())
    for entry in stats:
        A = load_matrix(REAL_DATA / entry["file"])
        nnz = A.count_nonzero() if sp.issparse(A) else np.count_nonzero(A)
        assert (A.shape, nnz) == ((entry["N"], entry["N"]), entry["nnz"]), entry["file"]


# ---------------------------------------------------------------------------
# as_square_matrix
# ---------------------------------------------------------------------------

def test_as_square_matrix_sums_duplicates_without_touching_the_input():
    arrays = ([1.0, 2.0, 3.0], [1, 1, 0], [0, 2, 3])  # row 0 holds column 1 twice
    expected = sp.csr_matrix(np.array([[0, 3.0], [3.0, 0]]))
    for fmt in ("csr", "csc"):
        original = getattr(sp, f"{fmt}_matrix")(tuple(np.array(a) for a in arrays), shape=(2, 2))
        before = [a.copy() for a in (original.data, original.indices, original.indptr)]
        _assert_sparse(as_square_matrix(original), expected if fmt == "csr" else expected.T)
        for a, b in zip((original.data, original.indices, original.indptr), before):
            np.testing.assert_array_equal(a, b)


def test_as_square_matrix_takes_tensors_and_lists():
    _assert_dense(as_square_matrix(torch.tensor(DENSE, dtype=torch.float32)), DENSE.astype(np.float32))
    _assert_sparse(as_square_matrix(torch.tensor(SPARSE.toarray()).to_sparse()), SPARSE)
    _assert_dense(as_square_matrix([[1, 2], [3, 4]]), np.array([[1.0, 2], [3, 4]]))


@pytest.mark.parametrize(
    "obj, message",
    [
        (np.zeros(4), r"^M: expected a 2-D matrix, got a 1-D array of shape \(4,\)$"),
        (np.zeros((3, 2)), r"^M: matrix is 3 x 2; sfa needs a square matrix$"),
        (np.zeros((0, 0)), r"^M: matrix is empty \(0 x 0\)$"),
        (np.ones((1, 1)), r"^M: matrix is 1 x 1; sfa needs N >= 2$"),
        (np.eye(2, dtype=complex), r"^M: complex matrices are not supported yet$"),
        (np.array([[None, 1], [2, 3]]), r"^M: holds Python objects"),
        (np.array([["a", "b"], ["c", "d"]]), r"^M: unsupported dtype <U1"),
        ([[1, 2], [3]], r"^M: cannot convert to an array"),
    ],
)
def test_as_square_matrix_rejects(obj, message):
    with pytest.raises(SfaError, match=message):
        as_square_matrix(obj, name="M")


def test_non_finite_count_and_first_position():
    A = np.zeros((4, 4))
    A[3, 0], A[1, 2], A[2, 2] = np.inf, np.nan, np.nan
    for M in (A, sp.csr_matrix(A)):
        with pytest.raises(SfaError, match=r"2 NaN and 1 Inf entries; the first is at \(row 1, col 2\)"):
            as_square_matrix(M)


# ---------------------------------------------------------------------------
# Errors through the command line: one line, exit 1, the file named
# ---------------------------------------------------------------------------

def _garbage(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\x00\x01garbage, not a matrix\xff" * 20)
    return p


def _truncated(p: Path, keep: float = 0.5) -> Path:
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    return p


def _savez(p, **arrays):
    np.savez(p, **arrays)
    return p


def _npy(p, A, **kw):
    np.save(p, A, **kw)
    return p


def _h5(p, A):
    with h5py.File(p, "w") as f:
        f["A"] = A
    return p


def _mat(p, A=DENSE, **variables):
    sio.savemat(p, {"A": A, **variables})
    return p


def _h5_csr(p, indptr):
    with h5py.File(p, "w") as f:
        g = f.create_group("X")
        g["data"], g["indices"], g["indptr"] = np.ones(2), np.array([0, 1]), np.array(indptr)
        g.attrs["shape"] = (3, 3)
    return p


def _mat_bad_tag(p):
    """A v5 file whose data element claims type 180: scipy would index past a C array."""
    _mat(p, np.eye(3))
    data = bytearray(p.read_bytes())
    assert data[176] == 9  # miDOUBLE tag of the values, after flags, dims and name
    data[176] = 180
    p.write_bytes(bytes(data))
    return p


def _directory(p):
    p.mkdir()
    return p


_MTX = "coordinate real general"

ERROR_CASES = [
    # (case id, makes the file and returns its spec, expected part of the message)
    ("missing", lambda t: t / "absent.npz", "no such file"),
    ("unknown extension", lambda t: _garbage(t, "m.csv"),
     "unknown file type; sfa reads .npz, .npy, .mtx"),
    ("directory", lambda t: _directory(t / "d.npz"), "not a regular file"),
    ("garbage npz", lambda t: _garbage(t, "g.npz"), "cannot read as NumPy .npz: not a zip archive"),
    ("garbage npy", lambda t: _garbage(t, "g.npy"), "cannot read as NumPy .npy: not a .npy file"),
    ("garbage mtx", lambda t: _garbage(t, "g.mtx"), "cannot read as Matrix Market: "),
    ("garbage mtx.gz", lambda t: _garbage(t, "g.mtx.gz"), "cannot read as Matrix Market: "),
    ("garbage h5", lambda t: _garbage(t, "g.h5"), "cannot read as HDF5: "),
    ("garbage mat", lambda t: _garbage(t, "g.mat"), "cannot read as MATLAB: "),
    ("truncated npz", lambda t: _truncated(_savez(t / "t.npz", A=DENSE)), "cannot read as NumPy .npz: "),
    ("truncated npy", lambda t: _truncated(_npy(t / "t.npy", DENSE)), "cannot read as NumPy .npy: "),
    ("truncated h5", lambda t: _truncated(_h5(t / "t.h5", np.eye(300))), "cannot read as HDF5: "),
    ("truncated mat", lambda t: _truncated(_mat(t / "t.mat", DENSE)), "cannot read as MATLAB: "),
    # The next four crash the interpreter inside scipy unless sfa checks first.
    ("mat bad element type", lambda t: _mat_bad_tag(t / "b.mat"),
     "cannot read as MATLAB: invalid element type 180"),
    ("truncated mtx", lambda t: _write_mtx(t / "t.mtx", "1 1 2.5\n2 2 1E", _MTX, "2 2 3"),
     "cannot read as Matrix Market: "),
    ("mtx with NUL", lambda t: _write_mtx(t / "z.mtx", "1 1 2.5\x00\n", _MTX, "2 2 1"),
     "cannot read as Matrix Market: the file holds NUL bytes"),
    ("sparse index out of range",
     lambda t: _savez(t / "i.npz", format="csr", shape=(3, 3), data=np.ones(2),
                      indices=np.array([0, 7]), indptr=np.array([0, 1, 2, 2])),
     "invalid sparse matrix"),
    ("sparse negative indptr", lambda t: _h5_csr(t / "p.h5", [0, 1, 2, -5]), "invalid sparse matrix"),
    ("no 2-D array", lambda t: _savez(t / "v.npz", v=np.arange(3.0), s=np.float64(1)),
     "no 2-D matrix found; it holds: v (3), s (scalar)"),
    ("several arrays", lambda t: _savez(t / "s.npz", A=DENSE, B=DENSE),
     "holds 2 matrices (A, B); choose one as"),
    ("key not found", lambda t: f"{_savez(t / 'k.npz', A=DENSE, B=DENSE)}:Z",
     "no entry 'Z'; it holds: A (5 x 5), B (5 x 5)"),
    ("h5 key not found", lambda t: f"{_h5(t / 'k.h5', DENSE)}:/nope",
     "no entry '/nope'; it holds: /A (5 x 5)"),
    ("key on mtx", lambda t: f"{_write_mtx(t / 'k.mtx', '', _MTX, '2 2 0')}:A", "remove ':A'"),
    ("mat char variable", lambda t: f"{_mat(t / 'c.mat', s='text')}:s",
     "variable 's' is a MATLAB char, not a numeric matrix"),
    ("not square", lambda t: _npy(t / "r.npy", np.ones((300, 200))),
     "matrix is 300 x 200; sfa needs a square matrix"),
    ("empty", lambda t: _npy(t / "e.npy", np.zeros((0, 0))), "matrix is empty (0 x 0)"),
    ("N = 1", lambda t: _npy(t / "one.npy", np.ones((1, 1))), "matrix is 1 x 1; sfa needs N >= 2"),
    ("NaN and Inf",
     lambda t: _npy(t / "n.npy", np.where(np.eye(3) > 0, np.nan, [[0, 0, np.inf]] * 3)),
     "3 NaN and 2 Inf entries; the first is at (row 0, col 0)"),
    ("sparse NaN", lambda t: _write_mtx(t / "n.mtx", "1 1 1\n2 3 nan\n", _MTX, "3 3 2"),
     "1 NaN and 0 Inf entries; the first is at (row 1, col 2)"),
    ("complex npy", lambda t: _npy(t / "c.npy", np.eye(2) * 1j), "complex matrices are not supported yet"),
    ("complex mtx",
     lambda t: _write_mtx(t / "c.mtx", "1 1 1 2\n", "coordinate complex general", "2 2 1"),
     "complex matrices are not supported yet"),
]


@pytest.mark.parametrize("make, expected", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_cli_error_is_one_line_naming_the_file(tmp_path, cli_error, make, expected):
    spec = str(make(tmp_path))
    line = cli_error("info", spec)
    assert split_spec(spec)[0] in line
    assert expected in line


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was (wrongly) loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("ext", ["npy", "npz"])
def test_pickled_object_arrays_are_never_unpickled(tmp_path, cli_error, ext):
    marker = tmp_path / "unpickled"
    objects = np.array([[_Tripwire(marker), 1], [2, 3]], dtype=object)
    p = tmp_path / f"o.{ext}"
    if ext == "npy":
        np.save(p, objects, allow_pickle=True)
    else:
        np.savez(p, A=objects)
    line = cli_error("info", p)
    assert "holds Python objects (a pickled object array); sfa never unpickles" in line
    assert "allow_pickle" not in line
    assert not marker.exists()


def test_debug_shows_the_traceback(tmp_path, run_cli):
    missing = tmp_path / "absent.npz"
    result = run_cli("--debug", "info", missing)
    assert result.exit_code == 1 and isinstance(result.exception, SfaError)
    proc = subprocess.run(
        [sys.executable, "-m", "sfa_cli", "--debug", "info", str(missing)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "SfaError: " in proc.stderr


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def test_atomic_output_success_and_failure(tmp_path):
    with pytest.raises(SfaError, match=r"sub/out.npz: directory .*sub does not exist \(sfa does not create it\)$"):
        with atomic_output(tmp_path / "sub" / "out.npz"):
            pass
    (tmp_path / "sub").mkdir()
    final = tmp_path / "sub" / "out.npz"
    with atomic_output(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.endswith(".npz") and not tmp.exists()
        np.savez(tmp, A=DENSE)
    _assert_dense(np.load(final)["A"], DENSE)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        other = tmp_path / "sub" / "never.npz"
        with pytest.raises(type(exc)):
            with atomic_output(other) as tmp:
                np.savez(tmp, A=DENSE)
                raise exc
        assert not other.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["out.npz"]


def test_check_writable(tmp_path):
    p = tmp_path / "x.npz"
    check_writable(p, force=False)
    p.write_bytes(b"")
    with pytest.raises(SfaError, match=r"x.npz exists; use --force to overwrite$"):
        check_writable(p, force=False)
    check_writable(p, force=True)
    with pytest.raises(SfaError, match="is a directory"):
        check_writable(tmp_path, force=True)


@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
@pytest.mark.parametrize("sparse", [False, True])
def test_save_matrix_round_trip(tmp_path, ext, sparse):
    A = SPARSE if sparse else SPARSE.toarray()
    p = tmp_path / f"m{ext}"
    if sparse and ext == ".npy":
        with pytest.raises(SfaError, match="dense arrays only"):
            save_matrix(p, A)
        return
    save_matrix(p, A)
    B = load_matrix(p)
    assert sp.issparse(B) == sparse
    np.testing.assert_array_equal(B.toarray() if sp.issparse(B) else B, SPARSE.toarray())
    assert [q.name for q in tmp_path.iterdir()] == [p.name]
