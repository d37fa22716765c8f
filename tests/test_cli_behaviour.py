"""What a demanding user expects of the command line beyond the numbers: outputs checked before any work,
Ctrl-C at any stage keeps the fit, one named line per failed file in a batch, verdicts that say what they mean."""
import json

import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp

from sfa_cli.cli import jobs
from sfa_cli.approximations.base import load_approximation
from sfa_cli.methods.compare import Comparison, MethodResult


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.npz"
    np.savez(path, A=np.random.default_rng(0).standard_normal((32, 32)))
    return path


def test_ctrl_c_during_the_baseline_still_writes_the_fit(run_cli, small, tmp_path, monkeypatch):
    # pressed after the optimiser finished (about half the run at n = 2048-3000): the fit is kept
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "tsvd_baseline", interrupted)
    out, report = tmp_path / "F.npz", tmp_path / "fit.json"
    result = run_cli("fit", small, "-o", out, "--report", report, "--max-iter", "20", "--json")
    assert result.exit_code == 130, result.output
    summary = json.loads(result.stdout)
    assert "tsvd_rel_error" not in summary and summary["rel_error"] > 0
    F = load_approximation(out)
    assert F.info["rel_error"] == pytest.approx(summary["rel_error"])
    assert json.loads(report.read_text())["history"]
    assert "interrupted" in result.stderr


@pytest.mark.parametrize("method", ["chord", "tsvd"])
def test_ctrl_c_during_the_final_error_or_baseline_of_any_method(run_cli, small, tmp_path, monkeypatch, method):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "tsvd_baseline", interrupted)
    out = tmp_path / "F.npz"
    extra = ["--max-iter", "5"] if method == "chord" else ["--method", "topk"]
    result = run_cli("fit", small, "-o", out, *extra, "--quiet")
    assert result.exit_code == 130 and out.exists()


def test_outputs_are_checked_before_the_matrix_is_read(run_cli, cli_error, tmp_path):
    missing_matrix = tmp_path / "not_there.mtx"  # an output problem must be found first
    same = tmp_path / "same.npz"
    result = run_cli("fit", missing_matrix, "-o", same, "--report", same)
    assert result.exit_code == 2 and "--report" in result.stderr and not same.exists()
    result = run_cli("fit", missing_matrix, "-o", tmp_path / "out.txt")
    assert result.exit_code != 0 and "out.txt" in result.stderr and "not_there" not in result.stderr
    line = cli_error("fit", missing_matrix, "-o", tmp_path / "missing" / "dir" / "out.npz")
    assert "does not exist" in line and not (tmp_path / "missing").exists()


def test_a_file_that_fails_unexpectedly_does_not_abort_the_batch(run_cli, small, tmp_path, monkeypatch):
    import sfa_cli.info as info_module

    real = info_module.matrix_info.trusted  # the CLI calls the body: load_matrix validated A
    bad = tmp_path / "bad.npz"
    np.savez(bad, A=np.eye(4))

    def flaky(A, path=None, **kw):
        if path and path.endswith("bad.npz"):
            raise RuntimeError("vector::_M_default_append")
        return real(A, path=path, **kw)

    flaky.trusted = flaky
    monkeypatch.setattr(info_module, "matrix_info", flaky)
    result = run_cli("info", small, bad, small, "--json")
    assert result.exit_code == 1
    assert len(json.loads(result.stdout)) == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"Error: {bad}: RuntimeError")


def test_control_characters_in_names_cannot_forge_lines(run_cli, tmp_path):
    forged = tmp_path / "x\nError: all good\x1b[2K.npz"
    forged.write_bytes(b"not a zip file")
    result = run_cli("info", forged)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "\\n" in lines[0] and "\x1b" not in lines[0]


def _comparison(errors: dict, budgets=(100,)):
    results = [MethodResult(m, b, 10, e, 0.1, "ok") for b in budgets for m, e in errors[b].items()]
    return Comparison(n=10, nnz=50, budgets=list(budgets), results=results)


def test_a_tie_within_one_percent_is_called_a_tie():
    c = _comparison({100: {"chord": 0.99990, "tsvd": 0.99991, "topk": 1.5}})
    assert c.verdict().startswith("tie within 1%: chord, tsvd")
    c = _comparison({100: {"chord": 0.5, "tsvd": 0.9}})
    assert c.verdict().startswith("chord wins")


def test_sweep_has_a_verdict_per_budget_and_says_where_the_winner_changes():
    c = _comparison({10: {"topk": 0.2, "tsvd": 0.5}, 20: {"topk": 0.3, "tsvd": 0.1}}, budgets=(10, 20))
    lines = c.verdicts()
    assert lines[0].startswith("budget 10: topk wins") and lines[1].startswith("budget 20: tsvd wins")
    assert lines[2] == "the winner changes: topk -> tsvd at budget 20"
    assert [s["best"] for s in c.to_dict()["sweep"]] == ["topk", "tsvd"]


def test_save_dir_names_never_collide(run_cli, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        np.savez(tmp_path / sub / "x.npz", A=np.random.default_rng(len(sub)).standard_normal((16, 16)))
    saved = tmp_path / "saved"
    result = run_cli("compare", tmp_path / "a" / "x.npz", tmp_path / "b" / "x.npz", "--methods", "tsvd",
                     "--save-dir", saved, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in saved.iterdir()) == ["x-2.tsvd.npz", "x.tsvd.npz"]


def test_piped_tables_are_not_squeezed(run_cli, small):
    result = run_cli("compare", small, "--methods", "chord,topk", "--budget", "500", "--max-iter", "5", "--quiet")
    assert result.exit_code == 0, result.output
    note = [r for r in result.stdout.splitlines() if r.lstrip("│ ").startswith("chord")][0]
    assert "base 4, 3 factors: the base-2 pattern needs 960 > budget" in note


def test_compare_shows_each_method_as_it_finishes(run_cli, small):
    from rich.console import Console

    import sfa_cli.cli.commands as cli_module

    screen = __import__("io").StringIO()
    cli_module._consoles._err = Console(file=screen, force_terminal=True, width=200)
    try:
        result = run_cli("compare", small, "--methods", "tsvd,topk")
    finally:
        cli_module._consoles._err = None
    assert result.exit_code == 0
    shown = screen.getvalue()
    assert "tsvd (budget" in shown and "topk (budget" in shown and " s" in shown


def test_fit_says_when_storing_the_matrix_is_exact(run_cli, tmp_path):
    path = tmp_path / "sparse.mtx"
    sio.mmwrite(path, sp.eye(64, format="csr") * 2.0)
    result = run_cli("fit", path, "-o", tmp_path / "F.npz", "--max-iter", "5")
    assert result.exit_code == 0
    assert "storing them (--method topk) is exact" in result.stderr


def test_library_fit_matrix_decides_the_path_and_the_baseline():
    A = sp.random(40, 40, density=0.1, random_state=0, format="csr")
    outcome = jobs.fit_matrix(A, fit_options={"max_iter": 10}, path="A")
    assert outcome.summary["tsvd_rank"] == min(40, outcome.summary["params"] // 80)
    assert outcome.summary["method"] == "chord" and not outcome.interrupted
    assert outcome.facts["stopped_because"] == outcome.summary["stopped_because"]
    sampled = jobs.fit_matrix(A, sampled=True, schedule={"epochs": 1, "batch_columns": 20, "error_sample": 40},
                              path="A")
    assert sampled.summary["sampled"] and "rank" in sampled.summary


def test_no_method_reports_an_error_above_one(run_cli, tmp_path):
    # a fit stopped after one iteration is worse than the zero matrix here; what is reported is its best multiple
    from sfa_cli.methods.compare import compare
    from sfa_cli.engine.fit import fit
    from sfa_cli.metrics import relative_error

    A = np.random.default_rng(0).standard_normal((32, 32))
    raw = fit(A, max_iter=1, seed=0, pattern="chord", base=4, factors=3)
    assert relative_error(A, raw.approximation) > 1.0  # the case the guarantee is for
    c = compare(A, methods=["chord"], budget=500, fit_options={"max_iter": 1}, keep=True)
    r = c.results[0]
    assert r.rel_error <= 1.0 and "worse than the zero matrix" in r.note
    assert relative_error(A, r.approximation) == pytest.approx(r.rel_error, rel=1e-9)
    path = tmp_path / "g.npy"
    np.save(path, A)
    result = run_cli("fit", path, "-o", tmp_path / "F.npz", "--budget", "500", "--max-iter", "1", "--json", "--quiet")
    summary = json.loads(result.stdout)
    assert summary["rel_error"] <= 1.0 and "worse than the zero matrix" in summary["note"]
    assert load_approximation(tmp_path / "F.npz").info["rel_error"] == summary["rel_error"]


def test_butterfly_method_is_exact_on_hadamard(run_cli, tmp_path):
    import scipy.linalg

    path = tmp_path / "hadamard.npy"
    np.save(path, scipy.linalg.hadamard(64).astype(float))
    result = run_cli("compare", path, "--methods", "butterfly,tsvd", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(result.stdout)["results"]}
    assert rows["butterfly"]["rel_error"] < 1e-12 and rows["tsvd"]["rel_error"] > 0.5
    result = run_cli("fit", path, "-o", tmp_path / "B.npz", "--method", "butterfly", "--json", "--quiet")
    assert result.exit_code == 0 and json.loads(result.stdout)["rel_error"] < 1e-12
    assert load_approximation(tmp_path / "B.npz").pattern["name"] == "butterfly"


def test_a_huge_declared_pattern_is_refused_before_it_is_built():
    # 10^7 x 10^7 with ten entries passes a reader (it is honest), but the Chord pattern would need
    # hundreds of GiB: refused by the memory guard naming the pattern and the options that avoid it
    from sfa_cli.errors import SfaError

    A = sp.csr_matrix((np.ones(10), (np.arange(10), np.arange(10))), shape=(10**7, 10**7))
    with pytest.raises(SfaError, match=r"big: the chord pattern for n=10000000 .* needs .*--factors"):
        jobs.fit_matrix(A, path="big", baseline=False)


def test_a_second_writer_of_one_name_refuses_without_force(run_cli, small, tmp_path, monkeypatch):
    out = tmp_path / "F.npz"
    real = jobs.fit_matrix.trusted  # the CLI calls the body: load_matrix validated A

    def meanwhile(*args, **kwargs):  # another run writes the same name while this one fits
        outcome = real(*args, **kwargs)
        out.write_bytes(b"the other run's factors")
        return outcome

    meanwhile.trusted = meanwhile
    monkeypatch.setattr(jobs, "fit_matrix", meanwhile)
    result = run_cli("fit", small, "-o", out, "--max-iter", "3", "--quiet")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"the other run's factors"
    assert not list(tmp_path.glob("F.tmp-*"))


def test_the_start_follows_the_diagonal_and_lm_runs_through_the_cli(run_cli, tmp_path):
    from sfa_cli.engine.fit import fit
    from sfa_cli.synthetic import grid_laplacian, random_graph

    laplacian, adjacency = grid_laplacian(8), random_graph(64, seed=0)
    assert fit(laplacian, max_iter=5).start == "identity"  # the diagonal holds most of ||A||_F^2
    assert fit(adjacency, max_iter=5).start == "paper"  # a zero diagonal
    assert fit(laplacian, max_iter=5, start="paper").start == "paper"
    assert fit(laplacian, max_iter=5, self_link=False).start == "paper"  # no diagonal to start from
    path = tmp_path / "grid.mtx"
    sio.mmwrite(path, laplacian)
    result = run_cli("fit", path, "-o", tmp_path / "F.npz", "--optimizer", "lm", "--max-iter", "5", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["optimizer"] == "lm" and summary["start"] == "identity" and summary["rel_error"] < 1


def test_a_fit_that_ends_at_the_zero_matrix_says_so(run_cli, tmp_path):
    path = tmp_path / "g.npy"
    np.save(path, np.random.default_rng(0).standard_normal((32, 32)))
    result = run_cli("fit", path, "-o", tmp_path / "F.npz", "--optimizer", "adam", "--lr", "1e-9", "--max-iter", "3",
                     "--start", "paper")
    assert result.exit_code == 0
    assert "no better than the zero matrix" in result.stderr


def test_fit_points_at_a_better_method(run_cli, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "lowrank.npy"
    np.save(path, rng.standard_normal((64, 3)) @ rng.standard_normal((3, 64)))  # rank 3: TSVD is exact
    result = run_cli("fit", path, "-o", tmp_path / "F.npz", "--max-iter", "20")
    assert result.exit_code == 0
    assert "the truncated SVD at the same budget is better" in result.stderr and "--method tsvd" in result.stderr


def test_dense_inputs_take_the_column_block_path_when_large_or_short_of_memory(monkeypatch):
    from sfa_cli import limits, memory

    A = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    assert not jobs.uses_sampled_fit(A)
    monkeypatch.setattr(limits, "DENSE_FIT_MAX_N", 32)  # a dense input above the threshold
    assert jobs.uses_sampled_fit(A) and not jobs.uses_sampled_fit(A, False)
    monkeypatch.setattr(limits, "DENSE_FIT_MAX_N", 8192)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1000)  # n x n does not fit
    assert jobs.uses_sampled_fit(A)
    from sfa_cli.methods.compare import compare

    monkeypatch.setattr("sfa_cli.methods.compare.SCALE_ABOVE", 32)
    c = compare(A, methods=["tsvd", "monarch"], error_sample=16)
    assert c.scale and c.results[1].status == "not applicable" and c.results[0].rel_error_is_estimate


def test_the_learned_method_never_ends_worse_than_top_k(monkeypatch):
    import sfa_cli.methods.learned as learned
    from sfa_cli.methods.compare import run_method
    from sfa_cli.metrics import relative_error

    A = sp.random(64, 64, density=0.05, random_state=1, format="csr") + sp.eye(64)
    real = learned.learned_sparse

    def poor(*args, **kwargs):  # a learned fit that ended badly
        F = real(*args, **kwargs)
        return F.scaled(0.1)

    poor.trusted = poor  # the library calls the body of its own public functions
    monkeypatch.setattr(learned, "learned_sparse", poor)
    r = run_method(A, "sparse", 0.02)
    from sfa_cli.methods.sparse import top_k

    assert r.rel_error == pytest.approx(relative_error(A, top_k(A, r.budget)))
    assert "largest entries" in r.note and r.approximation.num_factors == 1
    monkeypatch.setattr(learned, "learned_sparse", real)
    good = run_method(A, "sparse", 0.02)
    assert good.rel_error <= r.rel_error + 1e-12


def test_dense_tsvd_above_the_lapack_size_is_randomized_and_says_so(monkeypatch):
    import sfa_cli.methods.low_rank as low_rank
    from sfa_cli.methods.low_rank import tsvd_at_rank
    from sfa_cli.metrics import relative_error

    rng = np.random.default_rng(0)
    A = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 200)) + 1e-3 * rng.standard_normal((200, 200))
    exact, fast = tsvd_at_rank(A, 8), tsvd_at_rank(A, 8, solver="randomized")
    assert relative_error(A, fast) == pytest.approx(relative_error(A, exact), rel=1e-3)
    monkeypatch.setattr(low_rank, "EXACT_SVD_LIMIT", 100)
    shown = jobs.tsvd_baseline(A, 2 * 200 * 8)
    assert shown["tsvd_solver"] == "randomized" and shown["tsvd_rank"] == 8
    assert shown["tsvd_rel_error"] == pytest.approx(relative_error(A, exact), rel=1e-3)


def test_a_memory_mapped_matrix_is_read_by_blocks_that_give_their_pages_back(tmp_path, monkeypatch):
    import sfa_cli.methods.low_rank as low_rank
    import sfa_cli.io as sfa_io
    from sfa_cli.methods.low_rank import randomized_svd
    from sfa_cli.io import load_matrix
    from sfa_cli.metrics import relative_error

    rng = np.random.default_rng(0)
    A = (rng.standard_normal((300, 6)) @ rng.standard_normal((6, 300)) + 1e-3 * rng.standard_normal((300, 300)))
    np.save(tmp_path / "a.npy", A.astype(np.float32))
    M = load_matrix(tmp_path / "a.npy")
    released = []
    real = sfa_io.release_pages
    monkeypatch.setattr(sfa_io, "release_pages", lambda X: (released.append(1), real(X)))
    monkeypatch.setattr(low_rank, "_BLOCK_ENTRIES", 300 * 64)  # blocks of 64 rows
    blocked = randomized_svd(M, 2 * 300 * 6)
    assert len(released) >= 5 * 6  # 5 blocks per pass, several passes
    in_memory = randomized_svd(np.array(M), 2 * 300 * 6)
    assert relative_error(A, blocked) == pytest.approx(relative_error(A, in_memory), rel=1e-3)
