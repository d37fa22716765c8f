"""matrix_info and `sfa info`: figures checked against numpy / scipy computed here."""
import json
import math

import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp

import sfa_cli.info
from sfa_cli.info import matrix_info


def _low_rank(n, rank, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, n))


def _expected(A: np.ndarray) -> dict:
    """The figures of matrix_info, computed independently with numpy."""
    n = A.shape[0]
    M, L = math.ceil(math.log2(n)), math.floor(math.log2(n))
    r = min(n, math.ceil(M * M / 2))
    s = np.linalg.svd(A, compute_uv=False)
    return {
        "n": n,
        "nnz": int(np.count_nonzero(A)),
        "fro_norm": pytest.approx(np.linalg.norm(A), rel=1e-12),
        "rank": int(np.linalg.matrix_rank(A)),
        "budget": {"factors": M, "nnz_per_row": L + 1, "params": M * n * (L + 1), "tsvd_rank": r},
        "tsvd_energy": pytest.approx(np.sum(s[:r] ** 2) / np.sum(A * A), rel=1e-10),
    }


def _subset(info: dict, keys) -> dict:
    return {k: info[k] for k in keys}


def test_dense_low_rank_matches_numpy():
    A = _low_rank(40, 7)
    info = matrix_info(A, path="x.npy")
    expected = _expected(A)
    assert _subset(info, expected) == expected
    assert info["rank"] == 7 and not info["rank_is_estimate"]
    assert (info["path"], info["storage"], info["dtype"]) == ("x.npy", "dense", "float64")
    assert info["density"] == 1.0 and not info["symmetric"] and not info["sparse_is_exact"]


def test_sparse_symmetric_is_exact_and_stays_sparse():
    S = sp.random(60, 60, density=0.05, format="csr", random_state=1)
    S = S + S.T
    info = matrix_info(S)
    expected = _expected(S.toarray())
    assert _subset(info, expected) == expected
    assert info["storage"] == "sparse" and info["symmetric"] and info["sparse_is_exact"]
    assert info["density"] == S.nnz / 3600


def test_symmetry_tolerance_is_relative():
    A = _low_rank(20, 20) * 1e6
    A = A + A.T
    assert matrix_info(A)["symmetric"]
    A[3, 5] += 1e-3  # 1e-9 relative: not symmetric
    assert not matrix_info(A)["symmetric"]


def test_zero_and_float32_matrices():
    info = matrix_info(np.zeros((4, 4), dtype=np.float32))
    assert (info["rank"], info["tsvd_energy"], info["nnz"], info["dtype"]) == (0, 1.0, 0, "float32")


def test_large_n_estimates_rank_from_leading_singular_values(monkeypatch):
    monkeypatch.setattr(sfa_cli.info, "EXACT_RANK_MAX_N", 50)
    A = _low_rank(80, 5)
    info = matrix_info(A)
    assert info["rank_is_estimate"] and info["rank"] == 5 and not info["rank_is_lower_bound"]
    assert info["tsvd_energy"] == pytest.approx(1.0)
    full = matrix_info(sp.eye(80, format="csr"))
    # k = 64 leading values, all above the tolerance: the rank is at least 64, and said so
    assert full["rank"] == 64 and full["rank_is_estimate"] and full["rank_is_lower_bound"]


def _rbf_kernel(n, seed=0, dtype=np.float64):
    X = np.random.default_rng(seed).standard_normal((n, 3))
    d2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / 2).astype(dtype)


def _geometric_spectrum(n, ratio, seed=0):
    """U diag(ratio^i) V^T: singular values known, well apart at every tolerance."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return (U * ratio ** np.arange(n)) @ V.T


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_randomized_values_match_the_exact_ones(monkeypatch, dtype):
    """Above the exact limit, rank and TSVD energy of a decaying spectrum agree with numpy's."""
    A = _geometric_spectrum(300, 0.6).astype(dtype)  # rank 59 in float64, 20 in float32; k = 80
    exact = matrix_info(A)
    monkeypatch.setattr(sfa_cli.info, "EXACT_RANK_MAX_N", 100)
    estimated = matrix_info(A)
    assert not exact["rank_is_estimate"] and estimated["rank_is_estimate"]
    assert exact["rank"] == estimated["rank"] == np.linalg.matrix_rank(A) < 80
    assert not estimated["rank_is_lower_bound"]  # the spectrum falls below the tolerance within k
    assert estimated["tsvd_energy"] == pytest.approx(exact["tsvd_energy"], rel=1e-5)


def test_rank_above_the_leading_values_is_a_lower_bound(monkeypatch):
    A = _rbf_kernel(300, dtype=np.float32)  # numerical rank 133 > the 80 leading values computed
    monkeypatch.setattr(sfa_cli.info, "EXACT_RANK_MAX_N", 100)
    info = matrix_info(A)
    assert info["rank_is_lower_bound"] and info["rank"] == 80 <= np.linalg.matrix_rank(A)
    s = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    exact_energy = np.sum(s[:40] ** 2) / np.sum(s ** 2)
    assert info["tsvd_energy"] == pytest.approx(exact_energy, rel=1e-4)
    assert info["tsvd_energy"] <= exact_energy * (1 + 1e-6)  # the leading values err low


def test_symmetric_indefinite_matrix_uses_magnitudes():
    """The eigenvalue path for symmetric matrices: negative eigenvalues count as singular values."""
    rng = np.random.default_rng(3)
    Q = np.linalg.qr(rng.standard_normal((50, 50)))[0]
    eigenvalues = np.zeros(50)
    eigenvalues[:6] = [9.0, -8.0, 5.0, -3.0, 1.0, -0.5]
    A = (Q * eigenvalues) @ Q.T
    A = (A + A.T) / 2
    info = matrix_info(A)
    assert info["symmetric"] and info["rank"] == 6 == np.linalg.matrix_rank(A)
    expected = _expected(A)
    assert _subset(info, expected) == expected


def test_callback_reports_every_stage_in_order(monkeypatch):
    monkeypatch.setattr(sfa_cli.info, "_ROW_BLOCK", 16)  # several blocks of rows at n = 70
    seen = []
    for limit in (100, 50):  # the exact path, then the randomized one
        monkeypatch.setattr(sfa_cli.info, "EXACT_RANK_MAX_N", limit)
        seen.clear()
        matrix_info(_low_rank(70, 3), callback=lambda stage, fraction: seen.append((stage, fraction)))
        assert [stage for stage, _ in seen if _ in (0.0, None)] == list(sfa_cli.info.STAGES)
        for stage in sfa_cli.info.STAGES:
            fractions = [f for s, f in seen if s == stage]
            assert fractions[-1] == 1.0 and fractions.count(1.0) == 1
            known = [f for f in fractions if f is not None]
            assert known == sorted(known) and all(0.0 <= f <= 1.0 for f in known)
        blocks = [f for s, f in seen if s == "norm"]
        assert blocks == [0.0, 16 / 70, 32 / 70, 48 / 70, 64 / 70, 1.0]
    passes = [f for s, f in seen if s == "singular values"]
    assert len(passes) == 2 * sfa_cli.info.POWER_ITERATIONS + 3  # the start, then one per pass over A


def test_asymmetric_dense_matrix_stops_at_the_first_failing_block(monkeypatch):
    monkeypatch.setattr(sfa_cli.info, "_ROW_BLOCK", 10)
    A = _low_rank(60, 60)
    A = A + A.T
    A[2, 7] += 1.0
    seen = []
    assert not matrix_info(A, callback=lambda s, f: seen.append((s, f)))["symmetric"]
    assert [f for s, f in seen if s == "symmetry"] == [0.0, 1.0]


def test_memory_mapped_input_gives_the_same_figures(tmp_path):
    A = _rbf_kernel(64, dtype=np.float32)
    np.save(tmp_path / "k.npy", A)
    mapped = np.load(tmp_path / "k.npy", mmap_mode="r")
    assert matrix_info(mapped) == matrix_info(A)


def test_cli_json_matches_numpy(tmp_path, run_cli):
    A = _low_rank(33, 4)
    np.save(tmp_path / "a.npy", A)
    result = run_cli("info", tmp_path / "a.npy", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    expected = _expected(A)
    assert _subset(info, expected) == expected
    assert set(info) == {
        "path", "n", "nnz", "density", "dtype", "storage", "symmetric", "fro_norm",
        "rank", "rank_is_estimate", "rank_is_lower_bound", "budget", "tsvd_energy", "sparse_is_exact",
    }


def test_cli_batch_keeps_going_after_a_bad_file(tmp_path, run_cli):
    good1, good2, bad = tmp_path / "g1.npy", tmp_path / "g2.mtx", tmp_path / "bad.npy"
    np.save(good1, np.eye(3))
    sio.mmwrite(good2, sp.eye(5, format="coo"))
    np.save(bad, np.ones((2, 3)))
    result = run_cli("info", good1, bad, good2, "--json")
    assert result.exit_code == 1
    infos = json.loads(result.stdout)
    assert [(i["path"], i["n"]) for i in infos] == [(str(good1), 3), (str(good2), 5)]
    assert result.stderr.splitlines() == [f"Error: {bad}: matrix is 2 x 3; sfa needs a square matrix"]


def test_cli_table(tmp_path, run_cli):
    sio.mmwrite(tmp_path / "g[1].mtx", sp.eye(10, format="coo"))
    np.save(tmp_path / "d.npy", _low_rank(40, 3))  # 1600 nonzeros > budget 1440
    result = run_cli("info", tmp_path / "g[1].mtx", tmp_path / "d.npy")
    assert result.exit_code == 0, result.output
    for text in ("g[1].mtx", "d.npy", "Frobenius norm", "TSVD energy", "factors M", "sparse", "dense"):
        assert text in result.stdout
    assert "storing g[1].mtx as sparse is already exact: nnz <= budget" in result.stdout
    assert "storing d.npy" not in result.stdout


def test_many_matrices_get_several_tables(tmp_path, run_cli):
    paths = [tmp_path / f"m{k}.npy" for k in range(6)]
    for k, p in enumerate(paths):
        np.save(p, np.eye(k + 2))
    result = run_cli("info", *paths)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Matrix info") == 2
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    first_rows = [line for line in result.stdout.splitlines() if line.startswith("│ N ")]
    assert [cell.strip() for cell in first_rows[1].split("│")[2:-1]] == ["6", "7"]


def test_cli_table_marks_estimated_rank(tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(sfa_cli.info, "EXACT_RANK_MAX_N", 50)
    np.save(tmp_path / "big.npy", _low_rank(70, 3))
    result = run_cli("info", tmp_path / "big.npy")
    assert result.exit_code == 0, result.output
    assert "~3 (estimate)" in result.stdout


def test_cli_help_has_example(run_cli):
    result = run_cli("info", "--help")
    assert result.exit_code == 0
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert lines[lines.index("Example:") + 1] == "sfa info data/lesmis.mtx"


def test_thin_qr_runs_on_one_blas_thread():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with sfa_cli.info._one_blas_thread():
        counts = {pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"}
    assert counts <= {1}
