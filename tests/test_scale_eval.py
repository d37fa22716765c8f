"""Error at scale in `sfa eval` and `sfa compare`, memory guards, peak memory and progress of the fit."""
import csv
import io
import json

import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp
import torch
from rich.console import Console

from sfa_cli.cli import commands as cli_module
from sfa_cli.methods import compare as compare_module
from sfa_cli import memory
from sfa_cli.engine import sampled
from sfa_cli.approximations.base import load_approximation
from sfa_cli.methods.compare import DENSE_ONLY, compare
from sfa_cli.errors import SfaError
from sfa_cli.engine.fit import _dense_target, dense_target_bytes, fit
from sfa_cli.metrics import relative_error
from sfa_cli.engine.sampled import estimate_relative_error
from sfa_cli.synthetic import grid_laplacian, random_graph


@pytest.fixture
def graph(tmp_path):
    """A sparse random graph with n = 300 in a .mtx file, and a Chord fit of it saved as .npz."""
    A = random_graph(300, seed=3) + sp.eye(300)
    path = tmp_path / "graph.mtx"
    sio.mmwrite(path, A.tocsr())
    F = tmp_path / "F.npz"
    fit(A, max_iter=5, seed=0).approximation.save(F)
    return path, sp.csr_matrix(sio.mmread(path)), F


@pytest.fixture
def no_dense_n_by_n(monkeypatch):
    """Make any scipy sparse n x n -> dense conversion fail (column blocks are still allowed)."""

    def forbid(cls):
        original = cls.toarray

        def toarray(self, *a, **kw):
            if self.shape[0] == self.shape[1] and self.shape[0] > 64:
                raise AssertionError(f"densified a {self.shape} sparse matrix")
            return original(self, *a, **kw)

        monkeypatch.setattr(cls, "toarray", toarray)

    for cls in (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix):
        forbid(cls)


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- sfa eval -------------------------------------------------------------------------
def test_eval_estimate_on_request_labelled_with_its_interval(run_cli, graph):
    path, A, F = graph
    approx = load_approximation(F)
    exact = relative_error(A, approx)
    row = _json(run_cli("eval", F, path, "--sampled", "--error-sample", "120", "--seed", "4", "--json"))
    assert row["rel_error_is_estimate"] is True and row["sample_columns"] == 120 and row["seed"] == 4
    low, high = row["rel_error_ci"]
    assert low <= row["rel_error_estimate"] == row["rel_error"] <= high
    assert low <= exact <= high
    # the same machinery as the library: the same columns, the same numbers
    est = estimate_relative_error(A, approx, sample=120, seed=4)
    assert row["rel_error_estimate"] == pytest.approx(est["rel_error_estimate"], rel=1e-12)
    table = run_cli("eval", F, path, "--sampled", "--error-sample", "120", "--seed", "4")
    assert table.exit_code == 0, table.output
    assert "rel_error (estimate)" in table.stdout and f"[{low:.4g}, {high:.4g}]" in table.stdout
    assert "120 of 300 columns, seed 4, 95% CI" in table.stdout


def test_eval_estimates_above_the_threshold_and_exact_error_streams(run_cli, graph, monkeypatch):
    path, A, F = graph
    exact = relative_error(A, load_approximation(F))
    below = _json(run_cli("eval", F, path, "--json"))
    assert below["rel_error"] == pytest.approx(exact, rel=1e-12) and below["rel_error_is_estimate"] is False
    assert "rel_error_ci" not in below
    monkeypatch.setattr(sampled, "EXACT_ERROR_UP_TO", 256)
    above = _json(run_cli("eval", F, path, "--json", "--error-sample", "100"))
    assert above["rel_error_is_estimate"] is True and above["sample_columns"] == 100 and above["seed"] == 0
    assert above["rel_error_ci"][0] <= exact <= above["rel_error_ci"][1]
    streamed = _json(run_cli("eval", F, path, "--json", "--exact-error"))
    assert streamed["rel_error_is_estimate"] is False and streamed["rel_error"] == pytest.approx(exact, rel=1e-12)
    # the whole sample is every column: exact, and said so
    whole = _json(run_cli("eval", F, path, "--json", "--error-sample", "5000"))
    assert whole["rel_error_is_estimate"] is False and whole["rel_error_ci"] == [whole["rel_error"]] * 2


def test_eval_usage_errors(run_cli, graph):
    path, _, F = graph
    result = run_cli("eval", F, path, "--sampled", "--exact-error")
    assert result.exit_code == 2 and "exclude" in result.output
    assert run_cli("eval", F, path, "--error-sample", "0").exit_code == 2


# -- sfa compare at scale -------------------------------------------------------------
def test_compare_at_scale_measures_every_method_on_one_sample(graph, monkeypatch, no_dense_n_by_n):
    _, A, _ = graph
    monkeypatch.setattr(compare_module, "SCALE_ABOVE", 256)
    c = compare(A, keep=True, sampled_options={"epochs": 1, "batch_columns": 150}, error_sample=100, seed=2)
    assert c.scale and c.error == {"estimate": True, "sample_columns": 100, "seed": 2, "confidence": 0.95}
    by = {r.method: r for r in c.results}
    for name, reason in DENSE_ONLY.items():
        assert by[name].status == "not applicable" and reason in by[name].note
    assert by["butterfly"].status == "not applicable" and "power of two" in by["butterfly"].note
    ok = [r for r in c.results if r.status == "ok"]
    assert sorted(r.method for r in ok) == ["chord", "rsvd", "sparse", "topk", "tsvd"]
    for r in ok:
        assert r.rel_error_is_estimate and r.sample_columns == 100 and r.params <= c.budget["params"]
        low, high = r.rel_error_ci
        assert low <= r.rel_error <= high
        same = estimate_relative_error(A, r.approximation, sample=100, seed=2)
        assert r.rel_error == pytest.approx(same["rel_error_estimate"], rel=1e-9, abs=1e-12)
    assert by["topk"].rel_error == 0 and by["topk"].approximation.matrix.nnz == A.nnz
    assert "svds" in by["tsvd"].note and "sampled fit, 1 epoch x 150 columns" in by["chord"].note
    assert by["chord"].rel_error < 1.0 and by["tsvd"].rel_error < 1.0
    assert c.best().method == "topk" and c.verdict().startswith("topk is exact")
    d = c.to_dict()
    assert d["at_scale"] is True and d["rel_error_is_estimate"] is True
    assert (d["error_sample"], d["seed"], d["confidence"]) == (100, 2, 0.95)
    keys = {tuple(sorted(r)) for r in d["results"]}
    assert len(keys) == 1 and {"rel_error_estimate", "rel_error_ci", "rel_error_is_estimate"} <= set(keys.pop())


def test_compare_at_scale_through_the_cli(run_cli, graph, monkeypatch, tmp_path, no_dense_n_by_n):
    path, A, _ = graph
    monkeypatch.setattr(compare_module, "SCALE_ABOVE", 256)
    out_csv = tmp_path / "r.csv"
    options = ("--methods", "chord,tsvd,topk,monarch,sparse", "--epochs", "1", "--batch-columns", "150",
               "--error-sample", "100", "--quiet")
    payload = _json(run_cli("compare", path, *options, "--json", "--csv", out_csv))
    assert payload["at_scale"] and payload["error_sample"] == 100 and payload["seed"] == 0
    status = {r["method"]: r["status"] for r in payload["results"]}
    assert status == {"chord": "ok", "tsvd": "ok", "topk": "ok", "monarch": "not applicable", "sparse": "ok"}
    for r in payload["results"]:
        if r["status"] == "ok":
            assert r["rel_error_is_estimate"] and r["rel_error_estimate"] == r["rel_error"]
            assert r["rel_error_ci"][0] <= r["rel_error"] <= r["rel_error_ci"][1]
    rows = list(csv.DictReader(out_csv.open()))
    assert {"rel_error_is_estimate", "rel_error_ci_low", "rel_error_ci_high", "sample_columns"} <= rows[0].keys()
    table = run_cli("compare", path, *options)
    assert table.exit_code == 0, table.output
    assert "(estimate)" in table.stdout and "same 100 sampled columns (seed 0)" in table.stdout
    assert "n/a" in table.stdout and "scale" in table.stdout


def test_compare_at_scale_with_exact_error(run_cli, graph, monkeypatch):
    path, _, _ = graph
    monkeypatch.setattr(compare_module, "SCALE_ABOVE", 256)
    exact = _json(run_cli("compare", path, "--methods", "chord,topk", "--epochs", "1", "--json", "-q", "--exact-error"))
    assert not exact["rel_error_is_estimate"] and exact["at_scale"]
    topk = [r for r in exact["results"] if r["method"] == "topk"][0]
    assert topk["rel_error"] == 0 and topk["rel_error_ci"] is None


def test_compare_below_the_threshold_is_unchanged_and_sampled_forces_scale(graph):
    _, A, _ = graph
    c = compare(A, methods=["tsvd", "topk"])
    assert not c.scale and not c.error["estimate"]
    assert all(not r.rel_error_is_estimate and r.rel_error_ci is None for r in c.results)
    assert c.to_dict()["error_sample"] is None and c.to_dict()["confidence"] is None
    forced = compare(A, methods=["tsvd", "monarch"], scale=True, error_sample=90)
    assert forced.results[0].rel_error_is_estimate and forced.results[0].sample_columns == 90
    assert forced.results[1].status == "not applicable"


def test_butterfly_at_scale_uses_the_sampled_fit():
    A = grid_laplacian(16)  # n = 256, a power of two
    c = compare(A, methods=["butterfly"], scale=True, sampled_options={"epochs": 1, "batch_columns": 128},
                error_sample=64)
    r = c.results[0]
    assert r.status == "ok" and "sampled fit" in r.note and r.rel_error_is_estimate and r.rel_error < 1


# -- memory guards --------------------------------------------------------------------
def _available(cpu=1000, device=1000):
    return lambda device_name="cpu": cpu if str(device_name) == "cpu" else device


def test_fit_refuses_to_densify_without_the_memory(run_cli, cli_error, graph, monkeypatch, tmp_path):
    path, _, _ = graph
    # Enough to read the sparse file (about 90 KiB), not to densify it.
    monkeypatch.setattr(memory, "available_bytes", _available(cpu=200_000))
    out = tmp_path / "G.npz"
    # by default a matrix whose n x n copies do not fit goes to the column-block fit; --no-sampled insists
    line = cli_error("fit", path, "-o", out, "--max-iter", "2", "--quiet", "--no-sampled")
    assert line.startswith(f"Error: {path}: densifying the 300 x 300 matrix for the full-batch fit needs ")
    host, _ = dense_target_bytes(sp.csr_matrix((300, 300)), "cpu", torch.float32)
    assert f"needs {memory.human_bytes(host)} in float32; 195.3 KiB available; use --sampled" in line
    assert not out.exists()


def test_moving_the_target_to_the_gpu_is_guarded(monkeypatch):
    A = grid_laplacian(8)
    host, device = dense_target_bytes(A, torch.device("cuda"), torch.float32)
    assert (host, device) == (64 * 64 * 8 + 64 * 64 * 4, 2 * 64 * 64 * 4)
    assert dense_target_bytes(A.toarray().astype(np.float32), "cpu", torch.float32) == (2 * 64 * 64 * 4, 0)
    monkeypatch.setattr(memory, "available_bytes", _available(cpu=1 << 40, device=1000))
    with pytest.raises(SfaError) as exc:  # refused before anything touches the device
        _dense_target(A, torch.device("cuda"), torch.float32)
    assert str(exc.value) == ("moving the 64 x 64 matrix to cuda needs 32.0 KiB in float32; 1000 B available on cuda; "
                              "use --device cpu or --sampled")


def test_reconstruct_and_to_dense_are_guarded(run_cli, cli_error, graph, monkeypatch, tmp_path):
    _, _, F = graph
    approx = load_approximation(F)
    assert approx.dense_bytes() == 2 * 300 * 300 * approx.dtype.itemsize
    monkeypatch.setattr(memory, "available_bytes", _available(cpu=1000))
    line = cli_error("reconstruct", F, "-o", tmp_path / "dense.npz")
    assert line == (f"Error: forming the dense 300 x 300 matrix needs {memory.human_bytes(approx.dense_bytes())} in "
                    "float32; 1000 B available; use matmul on column blocks instead (sfa apply)")
    assert not (tmp_path / "dense.npz").exists()
    with pytest.raises(SfaError, match="forming the dense 300 x 300 matrix"):
        approx.to_dense()
    monkeypatch.setattr(memory, "available_bytes", _available(cpu=1 << 40))
    assert approx.to_dense().shape == (300, 300)


# -- the fit summary: peak memory; progress of the sampled fit ------------------------------
def test_full_fit_reports_peak_memory(run_cli, graph, tmp_path):
    path, _, _ = graph
    summary = _json(run_cli("fit", path, "-o", tmp_path / "G.npz", "--max-iter", "3", "--no-baseline", "--json", "-q"))
    assert summary["peak_memory_bytes"] > 2**20 and summary["peak_device_memory_bytes"] is None
    table = run_cli("fit", path, "-o", tmp_path / "H.npz", "--max-iter", "3", "--no-baseline", "-q")
    assert table.exit_code == 0 and "peak_memory" in table.stdout and "MiB" in table.stdout


def test_sampled_fit_shows_progress_by_steps_on_a_terminal(run_cli, monkeypatch, tmp_path):
    path = tmp_path / "grid.mtx"
    sio.mmwrite(path, grid_laplacian(12))  # n = 144: 3 steps of 48 columns per epoch
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=140)
    monkeypatch.setattr(cli_module._consoles, "_err", terminal)
    result = run_cli("fit", path, "-o", tmp_path / "F.npz", "--sampled", "--epochs", "2", "--batch-columns", "48",
                     "--error-sample", "100")
    assert result.exit_code == 0, result.output
    shown = screen.getvalue()
    assert "fitting" in shown and "2 epochs of 3 steps x 48 columns" in shown
    assert "step     6/6" in shown and "epoch 2/2" in shown
    assert "rel_error (estimate)" in result.stdout and "100 of 144 columns, seed 0, 95% CI" in result.stdout
    assert "tsvd_rel_error (estimate)" in result.stdout and "peak_memory" in result.stdout
