"""`sfa show`: the structure of every kind of saved approximation, its error on a matrix, its plot."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import sfa_cli
from sfa_cli import limits
from sfa_cli.approximations.base import Approximation, load_approximation
from sfa_cli.approximations.structure import structure, supports
from sfa_cli.cli.commands import cli
from sfa_cli.io import load_matrix, save_matrix

LESMIS = Path(__file__).resolve().parents[1] / "data" / "lesmis.mtx"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KINDS = {"chord": "sparse_factors", "tsvd": "low_rank", "topk": "sparse", "monarch": "monarch", "lps": "sum"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One file of every kind, fitted to lesmis (N = 77 = 7 x 11): the Chord factors by `sfa fit`."""
    d = tmp_path_factory.mktemp("show")
    result = CliRunner().invoke(cli, ["fit", str(LESMIS), "--max-iter", "20", "-o", str(d / "chord.npz"), "--quiet",
                                      "--no-baseline"])
    assert result.exit_code == 0, result.output
    A = load_matrix(LESMIS)
    budget = 1500
    sfa_cli.truncated_svd(A, budget).save(d / "tsvd.npz")
    sfa_cli.top_k(A, budget).save(d / "topk.npz")
    sfa_cli.monarch(A, budget).save(d / "monarch.npz")
    sfa_cli.lowrank_plus_sparse(A, budget).save(d / "lps.h5")
    return {name: d / (f"{name}.h5" if name == "lps" else f"{name}.npz") for name in KINDS}


def _is_png(path: Path) -> tuple:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and path.stat().st_size > 0
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    return image.shape


@pytest.mark.parametrize("name", sorted(KINDS))
def test_text_summary_of_every_kind(run_cli, saved, name):
    result = run_cli("show", saved[name])
    assert result.exit_code == 0, result.output
    approx = load_approximation(saved[name])
    out = result.stdout
    assert KINDS[name] in out and approx.method in out and "compression" in out and f"{approx.params}" in out
    assert "nnz/row min" in out
    for s in supports(approx):
        assert s.name in out
    if name == "chord":
        assert "name=chord" in out and "recorded in the file" in out and "stopped_because" in out
    if name == "monarch":
        assert "[7, 11]" in out or "[11, 7]" in out
    assert result.stderr == ""


@pytest.mark.parametrize("name", sorted(KINDS))
def test_json_of_every_kind(run_cli, saved, name):
    result = run_cli("show", saved[name], "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    approx = load_approximation(saved[name])
    assert row["file"] == str(saved[name]) and row["kind"] == KINDS[name] == approx.kind
    assert (row["n"], row["dtype"], row["method"], row["params"]) == (77, approx.dtype.name, approx.method, approx.params)
    assert row["compression"] == pytest.approx(77 * 77 / approx.params)
    assert sum(s["nnz"] for s in row["supports"]) == approx.params  # every stored number is in one support
    for s in row["supports"]:
        rows, cols = s["shape"]
        assert s["density"] == pytest.approx(s["nnz"] / (rows * cols) if rows * cols else 0.0)  # rank 0: (77, 0)
        per_row = s["nnz_per_row"]
        assert per_row["min"] <= per_row["mean"] <= per_row["max"]
        assert per_row["mean"] == pytest.approx(s["nnz"] / rows if rows else 0.0)
    assert "rel_error" not in row and "path" not in row and "plot" not in row
    if name == "chord":
        assert row["factors"] == approx.num_factors == len(row["supports"])
        assert row["pattern"] == approx.pattern and row["pattern"]["name"] == "chord"
        assert row["info"]["stopped_because"] == "max_iter"
        for s, W in zip(row["supports"], approx.factors):
            counts = np.diff(W.indptr)
            assert s["nnz_per_row"] == {"min": int(counts.min()), "mean": float(counts.mean()), "max": int(counts.max())}
    if name == "tsvd":
        r = approx.rank
        assert row["rank"] == r and [s["shape"] for s in row["supports"]] == [[77, r], [r, 77]]
    if name == "monarch":
        assert row["blocks"] == [approx.s0, approx.s1]
        assert [s["nnz_per_row"]["max"] for s in row["supports"]] == [approx.s0, approx.s1]
    if name == "lps":
        assert [p["kind"] for p in row["parts"]] == [p.kind for p in approx.parts]
        assert sum(p["params"] for p in row["parts"]) == approx.params
        assert all(s["name"].startswith("part") for s in row["supports"])


def test_matrix_adds_the_error_as_sfa_eval_measures_it(run_cli, saved):
    shown = json.loads(run_cli("show", saved["chord"], LESMIS, "--json").stdout)
    evaluated = json.loads(run_cli("eval", saved["chord"], LESMIS, "--json").stdout)
    assert shown["path"] == str(LESMIS)
    assert shown["rel_error"] == evaluated["rel_error"] and shown["rel_error_is_estimate"] is False
    text = run_cli("show", saved["tsvd"], LESMIS)
    assert text.exit_code == 0 and "rel_error" in text.stdout


def test_matrix_above_the_exact_size_gives_an_estimate(run_cli, saved, monkeypatch):
    import sfa_cli.engine.sampled as sampled

    monkeypatch.setattr(sampled, "EXACT_ERROR_UP_TO", 50)  # as `sfa eval` above N = 8192
    sample = ("--error-sample", 20, "--seed", 3)
    shown = json.loads(run_cli("show", saved["tsvd"], LESMIS, "--json", *sample).stdout)
    evaluated = json.loads(run_cli("eval", saved["tsvd"], LESMIS, "--json", *sample).stdout)
    assert shown["rel_error_is_estimate"] is True is evaluated["rel_error_is_estimate"]
    for key in ("rel_error", "rel_error_ci", "sample_columns", "seed", "confidence"):
        assert shown[key] == evaluated[key], key
    assert shown["sample_columns"] == 20 and shown["seed"] == 3
    text = run_cli("show", saved["tsvd"], LESMIS, *sample).stdout
    assert "rel_error (estimate)" in text and "20 of 77 columns, seed 3" in text


@pytest.mark.parametrize("name", ["chord", "lps"])
def test_plot_without_and_with_the_matrix(run_cli, saved, tmp_path, name):
    alone, both = tmp_path / "supports.png", tmp_path / "both.png"
    result = run_cli("show", saved[name], "--plot", alone, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plot"] == str(alone)
    small = _is_png(alone)
    result = run_cli("show", saved[name], LESMIS, "--plot", both)
    assert result.exit_code == 0, result.output
    assert _is_png(both)[0] > small[0]  # the row of A, A_hat, |A - A_hat| below the supports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.png", "supports.png"]  # no temporaries left


def test_plot_as_svg(run_cli, saved, tmp_path):
    for name in ("tsvd", "monarch"):
        out = tmp_path / f"{name}.svg"
        result = run_cli("show", saved[name], LESMIS, "--plot", out)
        assert result.exit_code == 0, result.output
        assert out.read_text().lstrip().startswith("<?xml")


def test_mismatched_matrix_is_one_error_line(cli_error, saved, tmp_path):
    other = tmp_path / "small.npy"
    save_matrix(other, np.eye(10))
    line = cli_error("show", saved["chord"], other)
    assert "77 x 77" in line and "10 x 10" in line
    out = tmp_path / "p.png"
    cli_error("show", saved["chord"], other, "--plot", out)
    assert not out.exists()


def test_bad_plot_outputs_are_refused_before_the_work(cli_error, run_cli, saved, tmp_path, monkeypatch):
    import sfa_cli.cli.show as show

    def no_work(*a, **k):
        raise AssertionError("the output must be checked before any work")

    bad = tmp_path / "plot.txt"
    monkeypatch.setattr(show, "show_approximation", no_work)
    assert "unsupported output type" in cli_error("show", saved["chord"], "--plot", bad)
    assert "does not exist" in cli_error("show", saved["chord"], "--plot", tmp_path / "missing" / "p.png")
    existing = tmp_path / "old.png"
    existing.write_bytes(b"old")
    assert "--force" in cli_error("show", saved["chord"], "--plot", existing)
    assert existing.read_bytes() == b"old" and not bad.exists()
    monkeypatch.undo()
    assert run_cli("show", saved["chord"], "--plot", existing, "--force").exit_code == 0
    _is_png(existing)


def test_missing_or_foreign_files_are_one_error_line(cli_error, tmp_path):
    assert "file not found" in cli_error("show", tmp_path / "none.npz")
    foreign = tmp_path / "a.npz"
    np.savez(foreign, A=np.eye(3))
    assert "not an sfa approximation file" in cli_error("show", foreign)


def test_usage_errors_exit_2(run_cli, saved):
    assert run_cli("show").exit_code == 2
    assert run_cli("show", saved["chord"], LESMIS, "extra").exit_code == 2


# -- large N: downsampled views, nothing n x n --------------------------------------------------
def _block_max(M: np.ndarray, g: int) -> np.ndarray:
    """Reference: the maximum of |M| over g x g contiguous bins (row i in bin i * g // n)."""
    n = M.shape[0]
    bins = np.arange(n) * g // n
    out = np.zeros((g, g))
    np.maximum.at(out, (bins[:, None], bins[None, :]), np.abs(M))
    return out


def test_large_n_is_drawn_from_binned_views(run_cli, saved, tmp_path, monkeypatch):
    import sfa_cli.cli.show as show

    monkeypatch.setattr(limits, "DISPLAY_N", 16)
    monkeypatch.setattr(show, "VIEW_BLOCK_BYTES", 5 * 77 * 8 * 5)  # 5 columns per block: bins span blocks

    def refuse(self, *a, **k):
        raise AssertionError("sfa show formed a dense n x n matrix")

    monkeypatch.setattr(Approximation, "to_dense", refuse)
    for name in KINDS:
        out = tmp_path / f"{name}.png"
        result = run_cli("show", saved[name], LESMIS, "--plot", out)
        assert result.exit_code == 0, result.output
        _is_png(out)
    monkeypatch.setattr(limits, "EXACT_ERROR_MAX_N", 50)  # above it: one column per bin
    out = tmp_path / "strided.png"
    assert run_cli("show", saved["chord"], LESMIS, "--plot", out).exit_code == 0
    _is_png(out)


@pytest.mark.parametrize("every_column", [True, False])
def test_matrix_views_are_block_maxima(saved, monkeypatch, every_column):
    import sfa_cli.cli.show as show

    monkeypatch.setattr(show, "VIEW_BLOCK_BYTES", 5 * 77 * 8 * 5)
    A = load_matrix(LESMIS)
    approx = load_approximation(saved["chord"])
    views = show.matrix_views(A, approx, 16, every_column=every_column)
    dense_A, dense_hat = A.toarray(), approx.to_dense()
    assert views["cells"] == 16 and not views["exact"] and views["every_column"] is every_column
    if every_column:
        cols = np.arange(77)
    else:  # one column per bin, the middle one
        starts = -(-np.arange(16) * 77 // 16)
        cols = starts + np.diff(np.append(starts, 77)) // 2
    mask = np.zeros((77, 77), dtype=bool)
    mask[:, cols] = True
    for key, M in (("A", dense_A), ("A_hat", dense_hat), ("residual", dense_A - dense_hat)):
        assert views[key].shape == (16, 16)
        np.testing.assert_allclose(views[key], _block_max(np.where(mask, M, 0.0), 16), rtol=1e-6)
    exact = show.matrix_views(A, approx, 512)
    assert exact["exact"] and exact["cells"] == 77
    np.testing.assert_allclose(exact["A"], np.abs(dense_A))


def test_matrix_views_respect_the_memory_guard(cli_error, saved, tmp_path, monkeypatch):
    import sfa_cli.memory as memory

    out = tmp_path / "p.png"
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 200_000)
    line = cli_error("show", saved["chord"], LESMIS, "--plot", out)
    assert "drawing the 77 x 77 matrices" in line and not out.exists()


def test_support_grids_bin_the_index_arrays(saved, monkeypatch):
    import sfa_cli.approximations.structure as structure_module

    monkeypatch.setattr(structure_module, "GRID_CHUNK_ENTRIES", 50)  # many chunks of rows
    for name in KINDS:
        approx = load_approximation(saved[name])
        for s in supports(approx):
            counts, row_sizes, col_sizes = s.grid(16)
            rows, cols = s.shape
            assert counts.shape == (min(rows, 16), min(cols, 16)) and counts.sum() == s.nnz
            assert row_sizes.sum() == rows and col_sizes.sum() == cols
            assert (counts <= np.outer(row_sizes, col_sizes)).all()
            exact, _, _ = s.grid(512)
            assert exact.shape == (rows, cols) and exact.max(initial=0) <= 1 and exact.sum() == s.nnz
    W = load_approximation(saved["chord"]).factors[0]
    grid, _, _ = supports(load_approximation(saved["chord"]))[0].grid(512)
    np.testing.assert_array_equal(grid, (W.toarray() != 0).astype(int))


def test_monarch_supports_are_the_two_factors():
    # A_hat = L R with L[(i0, i1), (j0, i1)] = u[i1, j0, i0] and R[(j0, i1), (j0, j1)] = v[i1, j0, j1]
    rng = np.random.default_rng(0)
    s0, s1 = 3, 4
    m = sfa_cli.Monarch(rng.standard_normal((s1, s0, s0)), rng.standard_normal((s1, s0, s1)))
    n = s0 * s1
    L, R = np.zeros((n, n)), np.zeros((n, n))
    for i1 in range(s1):
        for j0 in range(s0):
            for i0 in range(s0):
                L[i0 * s1 + i1, j0 * s1 + i1] = m.u[i1, j0, i0]
            for j1 in range(s1):
                R[j0 * s1 + i1, j0 * s1 + j1] = m.v[i1, j0, j1]
    np.testing.assert_allclose(L @ R, m.to_dense())
    left, right = supports(m)
    np.testing.assert_array_equal(left.grid(n)[0], (L != 0).astype(int))
    np.testing.assert_array_equal(right.grid(n)[0], (R != 0).astype(int))
    assert structure(m)["blocks"] == [s0, s1]
