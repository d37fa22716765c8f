"""Approximation files: the documented recipes rebuild A_hat, and damaged files are refused in one named line."""
import json
import os
import re
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sfa_cli.approximations.base import KINDS, load_approximation
from sfa_cli.approximations.kinds import LowRank, Monarch, SparseMatrix, SumApproximation
from sfa_cli.errors import SfaError
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.io import save_matrix
from sfa_cli.approximations.patterns import butterfly_pattern, chord_pattern

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
N = 16


def _examples() -> dict:
    rng = np.random.default_rng(11)
    chord = SparseFactors.from_pattern(chord_pattern(N), seed=0)
    low = LowRank(rng.standard_normal((N, 3)), rng.standard_normal((3, N)), method="tsvd")
    sparse = SparseMatrix(sp.random(N, N, density=0.2, random_state=5), method="topk")
    mon = Monarch(rng.standard_normal((4, 4, 4)), rng.standard_normal((4, 4, 4)))
    butterfly = SparseFactors.from_pattern(butterfly_pattern(N), [rng.standard_normal(2 * N) for _ in range(4)])
    total = SumApproximation([low, sparse, butterfly, mon], method="lowrank+sparse", info={"note": "all kinds"})
    return {"sparse_factors": chord, "low_rank": low, "sparse": sparse, "monarch": mon, "sum": total}


EXAMPLES = _examples()


# -- the documented recipes -------------------------------------------------------------------
def _recipes() -> list[tuple[str, str, str]]:
    """(kind, extension, code) of every ```python block of docs/formats.md marked ``# recipe: KIND .EXT``."""
    out = []
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        marker = re.match(r"# recipe: (\w+) (\.\w+)\n", block)
        assert marker, f"a python block in {DOC.name} has no '# recipe: KIND .EXT' line:\n{block}"
        out.append((marker[1], marker[2], block))
    return out


RECIPES = _recipes()


def test_every_kind_has_a_documented_npz_recipe():
    assert {kind for kind, ext, _ in RECIPES if ext == ".npz"} == set(KINDS)


@pytest.mark.parametrize("kind, ext, code", RECIPES, ids=[f"{k}{e}-{i}" for i, (k, e, _) in enumerate(RECIPES)])
def test_documented_recipe_rebuilds_the_matrix(kind, ext, code, tmp_path):
    approx = EXAMPLES[kind]
    path = tmp_path / f"approx{ext}"
    approx.save(path)
    scope = {"path": str(path)}
    exec(compile(code, f"{DOC.name}:{kind}{ext}", "exec"), scope)
    A_hat = scope["A_hat"]
    A_hat = A_hat.toarray() if sp.issparse(A_hat) else np.asarray(A_hat)
    assert np.allclose(A_hat, approx.to_dense(), atol=1e-12)
    if "y" in scope:  # a product with the ones vector, as the recipe shows it
        assert np.allclose(scope["y"], approx @ np.ones(N))


@pytest.mark.parametrize("ext", [".npz", ".h5"])
def test_documented_keys_and_h5_paths_are_what_sfa_writes(ext, tmp_path):
    """Every array key / dataset path sfa writes for a kind appears, with m or i for the number, in the doc."""
    import h5py

    doc = DOC.read_text()
    for kind, approx in EXAMPLES.items():
        path = tmp_path / f"{kind}{ext}"
        approx.save(path)
        if ext == ".npz":
            with np.load(path) as z:
                names = [k for k in z.files if k != "meta"]
        else:
            with h5py.File(path, "r") as f:
                names = []
                f.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            generic = re.sub(r"(factors/|factor)\d+", lambda m: m[1] + "{m}", name)
            generic = re.sub(r"part\d+", "part{i}", generic)
            last = generic.replace("part{i}.", "").replace("/part{i}/", "/")
            assert f"`{generic}`" in doc or f"`{last}`" in doc, (kind, name)


def test_a_sparse_kind_file_is_a_scipy_sparse_file(tmp_path):
    path = tmp_path / "topk.npz"
    EXAMPLES["sparse"].save(path)
    S = sp.load_npz(path)
    assert S.format == "csr" and S.shape == (N, N)
    assert np.array_equal(S.toarray(), EXAMPLES["sparse"].to_dense())


def test_files_written_before_format_and_shape_still_load(tmp_path):
    """A kind "sparse" file as older sfa wrote it: no format/shape arrays."""
    S = EXAMPLES["sparse"].matrix
    meta = {**EXAMPLES["sparse"].meta(), "sfa_version": "0.0.9"}
    path = tmp_path / "old.npz"
    np.savez(path, meta=np.array(json.dumps(meta)), indptr=S.indptr, indices=S.indices, data=S.data)
    assert np.array_equal(load_approximation(path).to_dense(), S.toarray())


# -- damaged files ------------------------------------------------------------------------------
def _stored(kind):
    """(arrays, meta) of a valid file of a kind, as numpy reads them back."""
    approx = EXAMPLES[kind]
    arrays = {k: np.array(v) for k, v in approx._arrays().items()}
    return arrays, json.loads(json.dumps(approx.meta()))


def _write_npz(path, arrays, meta):
    np.savez(path, meta=np.array(meta if isinstance(meta, str) else json.dumps(meta)), **arrays)
    return path


def _set(key, fn):
    def mutate(arrays, meta):
        arrays[key] = fn(arrays[key])
    return mutate


def _poke(key, position, value):
    def fn(a):
        a = a.copy()
        a[position] = value
        return a
    return _set(key, fn)


def _meta(**fields):
    def mutate(arrays, meta):
        for k, v in fields.items():
            if v is _DROP:
                meta.pop(k, None)
            else:
                meta[k] = v
    return mutate


def _drop(key):
    def mutate(arrays, meta):
        del arrays[key]
    return mutate


_DROP = object()

CORRUPT = {
    # integer index dtypes, bounds, monotone indptr starting at 0 and ending at nnz
    "float_indices": ("sparse_factors", _set("factor1.indices", lambda a: a.astype(np.float64)),
                      r"array 'factor1.indices' has dtype float64; it must be integer"),
    "float_indptr": ("sparse", _set("indptr", lambda a: a.astype(np.float32)), r"'indptr' has dtype float32"),
    "negative_index": ("sparse_factors", _poke("factor2.indices", 5, -1), r"factor2: indices has entries outside \[0, 16\)"),
    "index_past_n": ("sparse_factors", _poke("factor0.indices", 0, N), r"outside \[0, 16\): min 0, max 16"),
    "topk_index_out_of_range": ("sparse", _poke("indices", 0, 10**6), r"the CSR matrix: indices has entries outside \[0, 16\)"),
    "topk_negative_index": ("sparse", _poke("indices", 1, -7), r"outside \[0, 16\)"),
    "indptr_decreases": ("sparse_factors", _poke("factor0.indptr", 5, 0), r"indptr decreases at row 4"),
    "indptr_not_from_zero": ("sparse", _poke("indptr", 0, 1), r"indptr runs from 1"),
    "indptr_too_short": ("sparse_factors", _set("factor3.indptr", lambda a: a[:-1]),
                         r"array 'factor3.indptr' has shape \(16,\); expected \(17,\)"),
    "indptr_end_not_nnz": ("sparse", _set("indptr", lambda a: np.append(a[:-1], a[-1] + 3)),
                           r"array 'indices' has shape \(\d+,\); expected \(\d+,\)"),
    "indices_2d": ("sparse_factors", _set("factor0.indices", lambda a: a.reshape(-1, 1)), r"'factor0.indices' has shape"),
    "part_index_out_of_range": ("sum", _poke("part1.indices", 0, 99), r"part1: indices has entries outside"),
    # values: real floating point, finite
    "complex_values": ("sparse_factors", _set("factor0.data", lambda a: a.astype(np.complex128)),
                       r"'factor0.data' has dtype complex128; it must be real floating-point"),
    "integer_values": ("low_rank", _set("left", lambda a: a.astype(np.int64)), r"'left' has dtype int64"),
    "float16_values": ("monarch", _set("u", lambda a: a.astype(np.float16)), r"'u' has dtype float16; sfa stores"),
    "nan_value": ("low_rank", _poke("right", (0, 3), np.nan), r"array 'right': 1 NaN and 0 Inf values"),
    "inf_value": ("sparse_factors", _poke("factor1.data", 2, np.inf), r"'factor1.data': 0 NaN and 1 Inf"),
    "object_values": ("low_rank", _set("left", lambda a: a.astype(object)), r"'left' holds Python objects"),
    "text_values": ("monarch", _set("v", lambda a: np.full(a.shape, "x")), r"'v' has dtype <U1"),
    # shapes against meta
    "rank_disagrees": ("low_rank", _meta(rank=4), r"'left' has shape \(16, 3\); expected \(16, 4\)"),
    "n_disagrees": ("low_rank", _meta(n=17), r"'left' has shape \(16, 3\); expected \(17, 3\)"),
    "u_wrong_shape": ("monarch", _set("u", lambda a: a[:, :, :2]), r"'u' has shape \(4, 4, 2\); expected \(4, 4, 4\)"),
    "missing_array": ("sparse_factors", _drop("factor2.data"), r"array 'factor2.data' is missing"),
    "more_factors_than_stored": ("sparse_factors", _meta(factors=5), r"array 'factor4.indptr' is missing"),
    # meta types and values
    "n_null": ("sparse_factors", _meta(n=None), r"'n' must be a positive integer; got None"),
    "n_text": ("low_rank", _meta(n="16"), r"'n' must be a positive integer; got '16'"),
    "n_float": ("sparse", _meta(n=16.0), r"'n' must be a positive integer; got 16.0"),
    "n_bool": ("monarch", _meta(n=True), r"'n' must be a positive integer; got True"),
    "n_zero": ("sparse", _meta(n=0), r"'n' must be a positive integer; got 0"),
    "n_missing": ("sum", _meta(n=_DROP), r"'n' must be a positive integer; got None"),
    "version_text": ("sparse_factors", _meta(format_version="1"), r"'format_version' must be a positive integer; got '1'"),
    "version_newer": ("low_rank", _meta(format_version=2), r"newer sfa \(format version 2"),
    "kind_unknown": ("sparse", _meta(kind="tensor_train"), r"unknown approximation kind 'tensor_train'; known: low_rank"),
    "kind_number": ("sparse", _meta(kind=3), r"'kind' must be a string; got 3"),
    "factors_text": ("sparse_factors", _meta(factors="4"), r"'factors' must be an integer >= 1; got '4'"),
    "factors_zero": ("sparse_factors", _meta(factors=0), r"'factors' must be an integer >= 1; got 0"),
    "rank_missing": ("low_rank", _meta(rank=_DROP), r"'rank' must be an integer >= 0; got None"),
    "pattern_number": ("sparse_factors", _meta(pattern=5), r"'pattern' must be an object or null"),
    "method_number": ("low_rank", _meta(method=7), r"'method' must be a string; got 7"),
    "blocks_wrong_product": ("monarch", _meta(blocks=[3, 5]), r"'blocks' must be two positive integers"),
    "blocks_text": ("monarch", _meta(blocks="4x4"), r"'blocks' must be a list"),
    "parts_not_list": ("sum", _meta(parts={"kind": "sparse"}), r"'parts' must be a list"),
    "parts_empty": ("sum", _meta(parts=[]), r"'parts' is empty"),
    "part_not_object": ("sum", lambda a, m: m["parts"].__setitem__(0, "low_rank"), r"parts\[0\] is not a JSON object"),
    "part_n_disagrees": ("sum", lambda a, m: m["parts"][1].__setitem__("n", 8), r"parts\[1\] has n=8; the sum has n=16"),
    "part_kind_unknown": ("sum", lambda a, m: m["parts"][2].__setitem__("kind", "x"), r"unknown approximation kind 'x'"),
    "part_rank_text": ("sum", lambda a, m: m["parts"][0].__setitem__("rank", "3"),
                       r"meta field 'rank' of part0 must be an integer >= 0; got '3'"),
    # not sfa files at all
    "format_not_sfa": ("low_rank", _meta(format="other"), r"not an sfa approximation file \(meta 'format' is 'other'"),
    "meta_is_a_list": ("sparse", lambda a, m: (m.clear(), m.setdefault("as_list", True)),
                       r"not an sfa approximation file"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_damaged_npz_is_refused_naming_the_file(case, tmp_path):
    kind, mutate, message = CORRUPT[case]
    arrays, meta = _stored(kind)
    mutate(arrays, meta)
    if case == "meta_is_a_list":
        meta = json.dumps([1, 2])
    path = _write_npz(tmp_path / f"{case}.npz", arrays, meta)
    error = _refusal(path)
    assert re.search(message, error), error


@pytest.mark.parametrize("case", ["float_indices", "topk_index_out_of_range", "indptr_decreases", "complex_values",
                                  "nan_value", "n_null", "rank_disagrees", "part_index_out_of_range", "version_text"])
def test_damaged_h5_is_refused_naming_the_file(case, tmp_path):
    import h5py

    from sfa_cli.approximations.base import _h5_path

    kind, mutate, message = CORRUPT[case]
    arrays, meta = _stored(kind)
    mutate(arrays, meta)
    path = tmp_path / f"{case}.h5"
    with h5py.File(path, "w") as f:
        for key, a in arrays.items():
            f.create_dataset(_h5_path(key), data=a)
        f.attrs["meta"] = json.dumps(meta)
    error = _refusal(path)
    assert re.search(message, error), error


def _refusal(path) -> str:
    """load_approximation's one-line SfaError for path, checked to name the file and never mention pickle."""
    with pytest.raises(SfaError) as info:
        load_approximation(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and "allow_pickle" not in message
    return message


def _valid_npz_bytes(tmp_path) -> bytes:
    path = tmp_path / "valid.npz"
    EXAMPLES["sparse_factors"].save(path)
    return path.read_bytes()


GARBAGE = {
    "random_bytes.npz": (lambda tmp: np.random.default_rng(0).bytes(300), r"not a zip archive"),
    "empty.npz": (lambda tmp: b"", r"not a zip archive"),
    "pickle.npz": (lambda tmp: __import__("pickle").dumps({"meta": 1}), r"not an sfa approximation file"),
    "npy_renamed.npz": (lambda tmp: b"\x93NUMPY\x01\x00" + b" " * 100, r"not a zip archive"),
    "truncated.npz": (lambda tmp: _valid_npz_bytes(tmp)[:700], r"not an sfa approximation file \(cannot read as .npz"),
    "text.h5": (lambda tmp: b"just text\n" * 20, r"not an HDF5 file"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_is_not_an_sfa_approximation_file(name, tmp_path):
    make, message = GARBAGE[name]
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    error = _refusal(path)
    assert "not an sfa approximation file" in error and re.search(message, error), error


def test_containers_without_an_sfa_record(tmp_path):
    import h5py

    np.savez(tmp_path / "plain.npz", A=np.eye(3))
    assert "no 'meta' record; members: A" in _refusal(tmp_path / "plain.npz")
    np.savez(tmp_path / "int_meta.npz", meta=np.arange(3))
    assert "'meta' is not a JSON string" in _refusal(tmp_path / "int_meta.npz")
    _write_npz(tmp_path / "bad_json.npz", {}, "{not json")
    assert "meta record is not valid JSON" in _refusal(tmp_path / "bad_json.npz")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["A"] = np.eye(3)
    assert "no 'meta' attribute" in _refusal(tmp_path / "plain.h5")


def test_a_member_declaring_more_than_it_holds_is_refused(tmp_path):
    """An .npy header may claim any shape; the member's size is checked before anything is allocated."""
    import io
    import zipfile

    arrays, meta = _stored("low_rank")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (16, 10**9)})
    path = tmp_path / "lying.npz"
    _write_npz(path, {"right": arrays["right"]}, {**meta, "rank": 10**9})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("left.npy", header.getvalue() + b"\0" * 64)
    assert re.search(r"'left' declares shape \(16, 1000000000\) \(128000000000 bytes\) but holds 64", _refusal(path))


@contextmanager
def _deadline(seconds):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expire(*_):
        raise TimeoutError("blocked: the FIFO was opened")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_special_files_are_refused_before_opening(tmp_path):
    fifo = tmp_path / "F.npz"
    os.mkfifo(fifo)
    with _deadline(10):
        assert _refusal(fifo).endswith("not a regular file (a FIFO)")
    (tmp_path / "D.h5").mkdir()
    assert _refusal(tmp_path / "D.h5").endswith("not a regular file (a directory)")
    device = tmp_path / "null.npz"
    device.symlink_to("/dev/null")
    assert _refusal(device).endswith("not a regular file (a device or special file)")
    assert _refusal(tmp_path / "missing.npz").endswith("file not found")
    assert "approximations are .npz or .h5/.hdf5 files; got '.txt'" in _refusal(tmp_path / "F.txt")


def test_a_name_with_control_characters_stays_on_one_line(tmp_path):
    path = tmp_path / "evil\nError: forged\x1b[31m.npz"
    path.write_bytes(b"junk")
    with pytest.raises(SfaError) as info:
        load_approximation(path)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert "evil\\nError: forged\\x1b[31m.npz" in str(info.value)


# -- HDF5: only the datasets the kind needs, all inside the file -----------------------------
def _h5(path, kind="low_rank", **extra):
    """A valid .h5 file of a kind, plus extra datasets or links set by a callback."""
    import h5py

    EXAMPLES[kind].save(path)
    with h5py.File(path, "a") as f:
        for name, make in extra.items():
            make(f, name)
    return path


def test_an_unused_huge_dataset_is_never_read(tmp_path):
    path = _h5(tmp_path / "F.h5", junk=lambda f, name: f.create_dataset(name, shape=(10**6, 10**6), chunks=(1000, 1000),
                                                                    dtype="f8"))
    assert np.allclose(load_approximation(path).to_dense(), EXAMPLES["low_rank"].to_dense())


def test_a_needed_dataset_that_would_inflate_from_nothing_is_refused(tmp_path):
    import h5py

    path = tmp_path / "bomb.h5"
    meta = {**EXAMPLES["low_rank"].meta(), "n": 10**6, "rank": 1000}
    with h5py.File(path, "w") as f:
        f.create_dataset("left", shape=(10**6, 1000), chunks=(1000, 1000), dtype="f8")
        f.create_dataset("right", shape=(1000, 10**6), chunks=(1000, 1000), dtype="f8")
        f.attrs["meta"] = json.dumps(meta)
    assert re.search(r"array 'left' would expand from 0 stored bytes to 8000000000; refused", _refusal(path))


def test_external_storage_and_external_links_are_refused(tmp_path):
    import h5py

    raw = tmp_path / "elsewhere.bin"
    raw.write_bytes(np.ones((16, 3)).tobytes())
    path = tmp_path / "external.h5"
    left = EXAMPLES["low_rank"].left
    with h5py.File(path, "w") as f:
        f.create_dataset("left", shape=left.shape, dtype="f8", external=[(str(raw), 0, left.nbytes)])
        f["right"] = EXAMPLES["low_rank"].right
        f.attrs["meta"] = json.dumps(EXAMPLES["low_rank"].meta())
    assert "dataset 'left' keeps its data outside the file (external or virtual storage); refused" in _refusal(path)

    other = _h5(tmp_path / "other.h5")
    linked = tmp_path / "linked.h5"
    with h5py.File(linked, "w") as f:
        f["left"] = EXAMPLES["low_rank"].left
        f["right"] = h5py.ExternalLink(str(other), "/right")
        f.attrs["meta"] = json.dumps(EXAMPLES["low_rank"].meta())
    assert "'right' links to another file" in _refusal(linked)

    grouped = tmp_path / "grouped.h5"
    with h5py.File(grouped, "w") as f:
        f.create_group("left")
        f["right"] = EXAMPLES["low_rank"].right
        f.attrs["meta"] = json.dumps(EXAMPLES["low_rank"].meta())
    assert "'left' is a Group, not a dataset" in _refusal(grouped)


# -- through the command line ----------------------------------------------------------------
@pytest.fixture
def damaged(tmp_path):
    """A few damaged factor files (one per class) and valid inputs for eval/apply."""
    files = {}
    for case in ("topk_index_out_of_range", "float_indices", "n_null", "complex_values"):
        kind, mutate, _ = CORRUPT[case]
        arrays, meta = _stored(kind)
        mutate(arrays, meta)
        files[case] = _write_npz(tmp_path / f"{case}.npz", arrays, meta)
    files["garbage"] = tmp_path / "garbage.npz"
    files["garbage"].write_bytes(b"\x80\x04junk")
    files["fifo"] = tmp_path / "fifo.npz"
    os.mkfifo(files["fifo"])
    save_matrix(tmp_path / "A.mtx", np.random.default_rng(0).standard_normal((N, N)))
    np.save(tmp_path / "x.npy", np.ones(N))
    return files


@pytest.mark.parametrize("command", ["eval", "apply", "reconstruct"])
def test_commands_refuse_damaged_factor_files_in_one_line(cli_error, damaged, tmp_path, command):
    for case, path in damaged.items():
        args = {"eval": [path, tmp_path / "A.mtx"], "apply": [path, tmp_path / "x.npy", "-o", tmp_path / "y.npy"],
                "reconstruct": [path, "-o", tmp_path / "d.npz"]}[command]
        with _deadline(20):
            line = cli_error(command, *args)
        assert line.startswith(f"Error: {path}: "), (case, line)
        assert not (tmp_path / "y.npy").exists() and not (tmp_path / "d.npz").exists()


def test_large_reads_are_checked_against_the_memory_available(tmp_path, monkeypatch):
    from sfa_cli import memory
    from sfa_cli.approximations import base as approximation

    path = tmp_path / "L.npz"
    EXAMPLES["low_rank"].save(path)
    monkeypatch.setattr(approximation, "_RATIO_FREE_BYTES", 0)  # every read counts as large here
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 100)
    assert re.search(r"reading array 'left' needs 384 B; 100 B available; the file is damaged", _refusal(path))
