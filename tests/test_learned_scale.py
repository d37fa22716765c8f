"""The learned-support method fitted from blocks of A (sfa_cli.methods.learned_scale): exact errors, the budget,
never worse than its starts or top-k, memory maps, options it refuses, the time limit, and the CLI."""
import json
import time

import numpy as np
import pytest
import scipy.sparse as sp

from sfa_cli.methods import learned
from sfa_cli.errors import NotApplicable
from sfa_cli.methods.low_rank import truncated_svd
from sfa_cli.methods.sparse import top_k
from sfa_cli.approximations.base import load_approximation
from sfa_cli.methods.learned import learned_sparse
from sfa_cli.methods.learned_scale import learned_at_scale
from sfa_cli.metrics import relative_error


def _kernel_plus_spikes(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 2))
    A = np.exp(-((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) / 0.02)
    A[rng.integers(0, n, n), rng.integers(0, n, n)] += 3.0
    return A


def test_at_scale_reports_its_exact_error_within_the_budget_and_beats_its_baselines():
    A = _kernel_plus_spikes()
    budget = int(0.05 * A.size)
    F = learned_at_scale(A, budget, seed=0)
    err = relative_error(A, F)
    assert F.params <= budget and F.pattern["at_scale"] and F.num_factors == 2
    assert abs(F.info["rel_error"] - err) < 1e-6 and F.info["rel_error_exact"]
    assert err <= relative_error(A, truncated_svd(A, budget)) + 1e-6
    assert err <= relative_error(A, top_k(A, budget)) + 1e-6
    assert err < 0.9 * F.info["start_rel_error"] and F.info["rounds"] >= 1  # the rounds moved the supports


def test_at_scale_is_never_worse_than_top_k():
    """A sparse matrix: its largest entries (top-k) beat any low-rank start, and are returned as one factor."""
    rng = np.random.default_rng(1)
    A = sp.random(300, 300, density=0.02, random_state=1, format="csr") + sp.eye(300) * rng.uniform(1, 2)
    budget = int(0.8 * A.nnz)
    F = learned_at_scale(A, budget, seed=0)
    assert relative_error(A, F) <= relative_error(A, top_k(A, budget)) + 1e-9
    assert F.params <= budget


def test_memory_map_and_in_memory_agree(tmp_path):
    """The same fit (the randomized SVD differs: row blocks of the map, torch.svd_lowrank in memory)."""
    A = _kernel_plus_spikes(200).astype(np.float32)
    np.save(tmp_path / "a.npy", A)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    F = learned_at_scale(mapped, 4000, seed=3, rounds=2)
    G = learned_at_scale(A, 4000, seed=3, rounds=2)
    assert max(F.params, G.params) <= 4000
    assert abs(F.info["rel_error"] - G.info["rel_error"]) < 0.01 * G.info["rel_error"]
    assert abs(F.info["rel_error"] - relative_error(mapped, F)) < 1e-5


def test_learned_sparse_goes_to_blocks_above_the_dense_limit(monkeypatch):
    A = _kernel_plus_spikes(160)
    monkeypatch.setattr(learned, "DENSE_FIT_LIMIT", 128)
    F = learned_sparse(A, 3000, seed=0, fit_options={"time_limit": 60})
    assert F.pattern["at_scale"] and F.params <= 3000
    with pytest.raises(NotApplicable, match="factors=3 needs dense n x n residuals"):
        learned_sparse(A, 3000, factors=3)
    with pytest.raises(NotApplicable, match="projection='row'"):
        learned_sparse(A, 3000, projection="row", at_scale=True)


def test_time_limit_returns_the_best_start():
    A = _kernel_plus_spikes(256)
    t0 = time.perf_counter()
    F = learned_at_scale(A, 6000, seed=0, time_limit=1e-3)
    assert time.perf_counter() - t0 < 30
    assert F.info["rounds"] == 0 and F.params <= 6000
    assert abs(F.info["rel_error"] - relative_error(A, F)) < 1e-6


def test_fit_cli_runs_the_method_from_blocks_above_the_limit(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(learned, "DENSE_FIT_LIMIT", 100)
    A = _kernel_plus_spikes(128).astype(np.float32)
    np.save(tmp_path / "k.npy", A)
    out = tmp_path / "f.npz"
    result = run_cli("fit", tmp_path / "k.npy", "-o", out, "--method", "sparse", "--budget", "0.05", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    F = load_approximation(out)
    assert payload["pattern"]["at_scale"] and F.params <= int(0.05 * 128 * 128)
    assert abs(payload["rel_error"] - relative_error(A, F)) < 1e-4


def test_running_top_k_keeps_exactly_the_largest():
    from sfa_cli.methods.learned_scale import _TopK

    rng = np.random.default_rng(4)
    scores = rng.random(50_000)
    for k in (1, 100, 7_000):
        top = _TopK(k)
        for batch in np.array_split(np.arange(len(scores)), 13):
            idx = top.worth(scores[batch])
            top.add(scores[batch][idx], batch[idx])
        assert sorted(top.payload[0]) == sorted(np.argsort(scores)[-k:])


@pytest.mark.parametrize("pair_limit", [None, 0])
def test_an_als_sweep_leaves_every_column_of_the_second_factor_optimal(monkeypatch, pair_limit):
    """Dense atoms (BLAS), sparse atoms sharing lines (indexed reads, Gram pairs): after a sweep each
    column of S(2) is the exact least-squares fit given S(1). With no Gram pairs allowed (pair_limit 0)
    the refit is Jacobi-like, and only the loss is checked (it is the rounds' acceptance test that guards)."""
    from sfa_cli.methods import learned_scale as L

    rng = np.random.default_rng(2)
    n = 40
    A = rng.standard_normal((n, n))
    S1 = sp.random(n, n, density=0.15, random_state=2, format="lil")
    S2 = sp.random(n, n, density=0.15, random_state=1, format="lil")
    for j in (0, 1):  # two dense atoms
        S1[:, j] = rng.standard_normal((n, 1))
        S2[j, :] = rng.standard_normal((1, n))
    pair = L._Pair(S1.tocsr(), S2.tocsr())
    blocks = L._Blocks(A, float("inf"))
    if pair_limit is not None:
        monkeypatch.setattr(L, "_PAIR_LIMIT", pair_limit)
    new = L._refit(blocks, pair, 1)
    assert L._loss(blocks, new) < L._loss(blocks, pair)
    assert np.array_equal(new.S1.indices, pair.S1.indices) and np.array_equal(new.S2.indices, pair.S2.indices)
    if pair_limit is None:
        S1d, S2d = new.S1.toarray(), new.S2.toarray()
        S2c = new.S2.tocsc()
        for col in range(n):
            K = S2c.indices[S2c.indptr[col]:S2c.indptr[col + 1]]
            x = np.linalg.lstsq(S1d[:, K], A[:, col], rcond=None)[0]
            assert np.allclose(S2d[K, col], x, atol=1e-6)


def test_lines_above_the_system_cap_keep_their_values(monkeypatch):
    from sfa_cli.methods import learned_scale as L

    rng = np.random.default_rng(3)
    n = 30
    A = rng.standard_normal((n, n))
    pair = L._Pair(sp.random(n, n, density=0.2, random_state=4, format="csr"),
                   sp.random(n, n, density=0.2, random_state=5, format="csr"))
    blocks = L._Blocks(A, float("inf"))
    monkeypatch.setattr(L, "_MAX_LINE", 5)
    new = L._refit(blocks, pair, 1)
    assert L._loss(blocks, new) < L._loss(blocks, pair)
    long_rows = np.nonzero(np.diff(pair.S1.indptr) > 5)[0]
    assert len(long_rows) and all(np.array_equal(new.S1[i].data, pair.S1[i].data) for i in long_rows)


def test_learned_sparse_goes_to_blocks_when_the_dense_fit_does_not_fit_in_memory(monkeypatch):
    A = _kernel_plus_spikes(128)
    assert not learned_sparse(A, 2000, seed=0).pattern.get("at_scale")
    monkeypatch.setattr(learned, "available_bytes", lambda device="cpu": 120 * 128 * 128 - 1)
    assert learned_sparse(A, 2000, seed=0).pattern["at_scale"]
