"""`sfa compare`: equal budgets, reports, batches."""
import csv
import json

import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp

from sfa_cli.approximations.base import load_approximation
from sfa_cli.methods.compare import METHODS, chord_at_budget, compare, resolve_budget
from sfa_cli.errors import SfaError
from sfa_cli.metrics import relative_error
from sfa_cli.approximations.patterns import chord_budget

FAST = {"max_iter": 30}


def _graph(n, seed=0):
    rng = np.random.default_rng(seed)
    U = np.triu(rng.random((n, n)) < 4 / (n - 1), 1)
    return (U | U.T).astype(float)


def test_budget_resolution():
    assert resolve_budget(64) == chord_budget(64)["params"] == 6 * 64 * 7
    assert resolve_budget(100, 0.05) == 500
    assert resolve_budget(100, 1234) == 1234
    for bad in (0, -1, 12.5):
        with pytest.raises(SfaError):
            resolve_budget(100, bad)


def test_chord_sizes_itself_to_the_budget():
    n = 256
    assert chord_at_budget(n, chord_budget(n)["params"]) == ({"base": 2, "factors": 8}, "")
    opts, note = chord_at_budget(n, int(0.05 * n * n))
    assert opts["base"] > 2 and "base" in note
    opts, note = chord_at_budget(n, 3 * n * 9)
    assert opts["factors"] * n * 9 <= 3 * n * 9 or opts["base"] > 2


@pytest.mark.parametrize("budget", [None, 0.1, 0.03])
def test_every_method_respects_the_budget_and_errors_are_recomputable(budget):
    A = _graph(64) + np.eye(64)
    c = compare(A, budget=budget, fit_options=FAST, keep=True)
    assert [r.method for r in c.results] == list(METHODS)
    for r in c.results:
        if r.status == "ok":
            assert r.params <= c.budget["params"], r
            assert relative_error(A, r.approximation) == pytest.approx(r.rel_error)
        else:
            assert r.status == "not applicable" and r.note
    assert c.best().rel_error == min(r.rel_error for r in c.results if r.status == "ok")


def test_verdict_topk_exact_on_sparse_matrix():
    A = sp.csr_matrix(_graph(64))
    c = compare(A, methods=["tsvd", "topk"])
    assert c.best().method == "topk" and c.best().rel_error == 0
    assert c.verdict().startswith("topk is exact")


def test_sweep_gives_a_curve_per_method():
    A = np.random.default_rng(0).standard_normal((32, 32))
    c = compare(A, methods=["tsvd", "topk"], sweep=[0.1, 0.3, 0.6])
    assert c.budgets == [102, 307, 614]
    for method in ("tsvd", "topk"):
        errs = [r.rel_error for r in c.results if r.method == method]
        assert len(errs) == 3 and errs[0] >= errs[1] >= errs[2]


@pytest.fixture
def matrices(tmp_path):
    good1 = tmp_path / "graph.mtx"
    sio.mmwrite(good1, sp.csr_matrix(_graph(64)))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((4, 5)))
    good2 = tmp_path / "gauss.npz"
    np.savez(good2, A=np.random.default_rng(1).standard_normal((32, 32)))
    return good1, bad, good2


def test_cli_json_csv_and_a_bad_file_in_the_middle(run_cli, matrices, tmp_path):
    good1, bad, good2 = matrices
    out_csv = tmp_path / "r.csv"
    result = run_cli("compare", good1, bad, good2, "--methods", "chord,tsvd,topk", "--max-iter", "20", "--json",
                     "--csv", out_csv, "--quiet")
    assert result.exit_code == 1
    errors = [l for l in result.stderr.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "4 x 5" in errors[0]
    payload = json.loads(result.stdout)
    assert [p["path"] for p in payload] == [str(good1), str(bad), str(good2)]  # in input order, the failure too
    failed = payload.pop(1)
    assert set(failed) == {"path", "error"} and "4 x 5" in failed["error"] and str(bad) in failed["error"]
    for p in payload:
        assert {"path", "n", "budget", "results", "best"} <= p.keys() and "params" in p["budget"]
        for r in p["results"]:
            assert {"method", "params", "rel_error", "seconds", "note"} <= r.keys()
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 6 and {"path", "n", "method", "params", "rel_error", "seconds", "note"} <= rows[0].keys()
    topk = [r for r in rows if r["path"] == str(good1) and r["method"] == "topk"][0]
    assert float(topk["rel_error"]) == 0.0


def test_cli_table_verdict_and_save_dir(run_cli, matrices, tmp_path):
    good1, _, _ = matrices
    save = tmp_path / "saved"
    result = run_cli("compare", good1, "--methods", "tsvd,topk,monarch", "--save-dir", save, "--quiet")
    assert result.exit_code == 0, result.output
    assert "topk is exact" in result.stdout and "tsvd" in result.stdout
    saved = sorted(p.name for p in save.iterdir())
    assert saved == ["graph.monarch.npz", "graph.topk.npz", "graph.tsvd.npz"]
    assert load_approximation(save / "graph.tsvd.npz").method == "tsvd"


def test_cli_usage_errors(run_cli, matrices):
    good1, _, _ = matrices
    result = run_cli("compare", good1, "--methods", "chord,svd2")
    assert result.exit_code == 2 and "svd2" in result.output and "tsvd" in result.output
    assert run_cli("compare", good1, "--budget", "abc").exit_code == 2
    assert run_cli("compare", good1, "--sweep", "0.1,x").exit_code == 2


def test_cli_plot(run_cli, matrices, tmp_path):
    good1, _, good2 = matrices
    png = tmp_path / "errors.png"
    result = run_cli("compare", good1, good2, "--methods", "tsvd,topk", "--sweep", "0.05,0.2", "--plot", png, "--quiet")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.exit_code == 1 and "pip install" in result.stderr
        return
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_method_is_compares_code_path_with_method_options():
    from sfa_cli.methods.compare import run_method

    rng = np.random.default_rng(0)  # low rank plus the identity: learned factors beat the largest entries
    A = rng.standard_normal((32, 2)) @ rng.standard_normal((2, 32)) + np.eye(32)
    r = run_method(A, "sparse", 0.2, options={"factors": 3, "order": "hierarchical"})
    assert r.status == "ok" and r.budget == resolve_budget(32, 0.2) and r.params <= r.budget
    assert r.approximation.num_factors == 3 and r.approximation.pattern["order"] == "hierarchical"
    assert relative_error(A, r.approximation) == pytest.approx(r.rel_error)
    c = compare(A, methods=["sparse"], budget=0.2, method_options={"sparse": {"factors": 3, "order": "hierarchical"}})
    assert c.results[0].rel_error == pytest.approx(r.rel_error, rel=1e-6)
    na = run_method(np.eye(12) + 1, "butterfly")
    assert na.status == "not applicable" and "power of two" in na.note and na.approximation is None
    with pytest.raises(SfaError, match="no option 'order'"):
        run_method(A, "tsvd", options={"order": "joint"})
    with pytest.raises(SfaError, match="unknown method"):
        run_method(A, "svd")
