"""The sampled fit, error estimates at scale, memory guards and multi-process fitting."""
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sfa_cli import memory
from sfa_cli.methods.low_rank import truncated_svd
from sfa_cli.errors import SfaError
from sfa_cli.synthetic import grid_laplacian, random_graph
from sfa_cli.approximations.sparse_factors import pattern_structures
from sfa_cli.engine.fit import make_pattern
from sfa_cli.approximations.kernels import ColumnChain, chain_matmul
from sfa_cli.metrics import relative_error
from sfa_cli.engine.options import Placement, SampledSchedule
from sfa_cli.engine.sampled import (
    EXACT_ERROR_UP_TO,
    SampledFitResult,
    error_report,
    estimate_relative_error,
    fit_sampled,
    init_distributed,
    sample_columns,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid_fit():
    A = grid_laplacian(16)  # n = 256
    return A, fit_sampled(A, epochs=6, batch_columns=64, error_sample=96, device="cpu", seed=0)


# -- the fit --------------------------------------------------------------------------
def test_sampled_fit_lowers_the_error_and_its_ci_covers_the_exact_error(grid_fit):
    A, r = grid_fit
    assert isinstance(r, SampledFitResult)
    assert r.rel_error < 0.8 * r.initial_rel_error
    assert r.rel_error_is_estimate and r.rel_error == r.rel_error_estimate
    low, high = r.rel_error_ci
    exact = relative_error(A, r.approximation)
    assert low <= exact <= high
    assert r.epochs == 6 and r.steps_per_epoch == 4 and r.iterations == 24
    assert r.stopped_because == "epochs" and r.peak_memory_bytes > 0
    # one history entry per epoch (epoch 0 is the start); the result is the best of them
    assert [h["epoch"] for h in r.history] == list(range(7))
    assert r.rel_error == min(h["rel_error"] for h in r.history)
    d = r.to_dict()
    for key in ("rel_error_estimate", "rel_error_ci", "rel_error_is_estimate", "epochs", "batch_columns",
                "peak_memory_bytes", "rel_error", "stopped_because", "params"):
        assert key in d
    assert d["rel_error_ci"] == [low, high] and d["batch_columns"] == 64
    json.dumps(d)


def test_sampled_fit_on_a_random_graph_and_exact_error():
    A = random_graph(384, seed=1)
    r = fit_sampled(A, epochs=4, batch_columns=128, error_sample=128, exact_error=True, device="cpu")
    assert not r.rel_error_is_estimate
    assert r.rel_error == pytest.approx(relative_error(A, r.approximation), rel=1e-4)
    assert r.exact_rel_error == r.rel_error
    assert r.rel_error < r.initial_rel_error


def test_same_seed_same_factors_bitwise():
    A = grid_laplacian(8)
    runs = [fit_sampled(A, epochs=2, batch_columns=16, seed=s, device="cpu") for s in (3, 3, 4)]
    same = [np.array_equal(x.data, y.data) for x, y in zip(runs[0].approximation.factors, runs[1].approximation.factors)]
    other = [np.array_equal(x.data, y.data) for x, y in zip(runs[0].approximation.factors, runs[2].approximation.factors)]
    assert all(same) and not all(other)
    assert [h["rel_error"] for h in runs[0].history] == [h["rel_error"] for h in runs[1].history]


def test_dense_input_float64_and_paper_start():
    A = grid_laplacian(8).toarray()
    r = fit_sampled(A, epochs=3, batch_columns=16, dtype="float64", start="paper", device="cpu")
    assert r.dtype == "float64" and r.approximation.dtype == np.float64
    assert not r.rel_error_is_estimate  # error_sample >= n: the "estimate" is exact
    assert r.rel_error == pytest.approx(relative_error(A, r.approximation), rel=1e-9)


@pytest.mark.parametrize("options", [{"symmetric": True}, {"permute": 5}, {"self_link": False}, {"factors": 2}])
def test_other_chord_patterns(options):
    A = grid_laplacian(8)
    r = fit_sampled(A, epochs=2, batch_columns=16, device="cpu", **options)
    assert np.isfinite(r.rel_error)
    assert r.rel_error == pytest.approx(relative_error(A, r.approximation), rel=1e-4)


def test_stopping_rules_and_interrupt():
    A = grid_laplacian(8)
    seen = []
    r = fit_sampled(A, epochs=50, batch_columns=8, device="cpu",
                    callback=lambda step: seen.append(step) or step.iteration >= 5)
    assert r.stopped_because == "callback" and r.iterations == 5 and len(seen) == 5
    assert seen[0].steps_per_epoch == 8 and not seen[0].epoch_end
    r = fit_sampled(A, epochs=10_000, batch_columns=8, time_limit=0.3, device="cpu")
    assert r.stopped_because == "time_limit" and r.seconds < 5

    def interrupt(step):
        if step.iteration == 20:
            raise KeyboardInterrupt

    r = fit_sampled(A, epochs=50, batch_columns=8, device="cpu", callback=interrupt)
    assert r.stopped_because == "interrupted" and r.interrupted and r.epochs == 2
    assert r.rel_error == pytest.approx(relative_error(A, r.approximation), rel=1e-4)


def test_invalid_options():
    A = grid_laplacian(4)
    for kwargs, text in (({"optimizer": "lbfgs"}, "adam"), ({"batch_columns": 0}, "batch_columns"),
                         ({"start": "zeros"}, "start must be one of identity, paper"), ({"lr": -1.0}, "lr")):
        with pytest.raises(SfaError, match=text):
            fit_sampled(A, device="cpu", **kwargs)
    with pytest.raises(SfaError, match="all zeros"):
        fit_sampled(sp.csr_matrix((16, 16)), device="cpu")
    with pytest.raises(SfaError, match="square"):
        fit_sampled(np.ones((3, 4)), device="cpu")
    with pytest.raises(SfaError, match="A: matrix has 1 NaN"):
        bad = sp.csc_matrix(grid_laplacian(4))
        bad.data[3] = np.nan
        fit_sampled(bad, device="cpu")
    with pytest.raises(SfaError, match="not both"):
        fit_sampled(A, device="cpu", schedule=SampledSchedule(epochs=1), epochs=2)


def test_typed_schedule_gives_the_same_fit_as_loose_keywords():
    A = grid_laplacian(8)
    loose = fit_sampled(A, epochs=2, batch_columns=16, error_sample=32, seed=1, device="cpu")
    typed = fit_sampled(A, schedule=SampledSchedule(epochs=2, batch_columns=16, error_sample=32),
                        placement=Placement(device="cpu", seed=1))
    assert typed.rel_error == loose.rel_error and typed.iterations == loose.iterations == 8


def test_column_chain_with_sparse_start_matches_chain_matmul():
    n = 1024
    pat = make_pattern(n, "chord")
    structs, _ = pattern_structures(pat)
    chain = ColumnChain(structs, n, "cpu", max_fraction=0.3)
    assert len(chain.levels) >= 3  # the first factors act on a compact block
    gen = torch.Generator().manual_seed(0)
    values = [torch.rand(s.nnz, generator=gen, dtype=torch.float64).requires_grad_(True) for s in structs]
    J = torch.tensor([5, 1000, 17, 512, 0, 1023])
    E = torch.zeros(n, len(J), dtype=torch.float64)
    E[J, torch.arange(len(J))] = 1
    expected = chain_matmul(structs, values, E)
    got = chain(values, J)
    torch.testing.assert_close(got, expected)
    g_expected = torch.autograd.grad((expected**2).sum(), values)
    g_got = torch.autograd.grad((got**2).sum(), values)
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b)


# -- error estimates ------------------------------------------------------------------
def test_estimate_is_exact_with_every_column_and_covers_otherwise(grid_fit):
    A, r = grid_fit
    F = r.approximation
    exact = relative_error(A, F)
    full = estimate_relative_error(A, F, sample=A.shape[0])
    assert full["exact"] and full["sample_columns"] == 256
    assert full["rel_error_estimate"] == pytest.approx(exact, rel=1e-12)
    assert full["rel_error_ci"] == [full["rel_error_estimate"]] * 2
    covered = 0
    for seed in range(5):
        est = estimate_relative_error(A, F, sample=64, seed=seed)
        low, high = est["rel_error_ci"]
        assert not est["exact"] and est["sample_columns"] == 64 and low <= est["rel_error_estimate"] <= high
        covered += low <= exact <= high
    assert covered >= 4  # a 95% interval; these seeds all cover today


def test_estimate_works_for_any_method_and_dense_input():
    A = random_graph(300, seed=2)
    approx = truncated_svd(A, 300 * 20)
    exact = relative_error(A, approx)
    est = estimate_relative_error(A.toarray(), approx, sample=150, seed=1, block=7)
    assert est["rel_error_ci"][0] <= exact <= est["rel_error_ci"][1]
    other = estimate_relative_error(A, approx, sample=150, seed=1)  # sparse or dense: same numbers
    assert other["sample_columns"] == est["sample_columns"]
    assert other["rel_error_estimate"] == pytest.approx(est["rel_error_estimate"], rel=1e-12)
    assert other["rel_error_ci"] == pytest.approx(est["rel_error_ci"], rel=1e-12)


def test_error_report_is_exact_for_small_n_and_estimated_on_request(grid_fit):
    A, r = grid_fit
    assert A.shape[0] <= EXACT_ERROR_UP_TO
    exact = error_report(A, r.approximation)
    assert exact == {"rel_error": pytest.approx(relative_error(A, r.approximation)), "rel_error_is_estimate": False}
    est = error_report(A, r.approximation, exact_error=False, sample=100, seed=3)
    assert est["rel_error_is_estimate"] and est["sample_columns"] == 100 and est["seed"] == 3
    assert est["rel_error"] == est["rel_error_estimate"]
    assert est["rel_error_ci"][0] <= exact["rel_error"] <= est["rel_error_ci"][1]


def test_output_scale_never_raises_the_error():
    """A graph whose fit has barely started: the returned factors are rescaled to beat P = 0."""
    A = random_graph(512, seed=4)
    r = fit_sampled(A, epochs=1, batch_columns=256, device="cpu", exact_error=True, lr=1e-4)
    assert r.rel_error <= 1.0 + 1e-9
    assert all(h["output_scale"] > 0 for h in r.history)


def test_sample_columns_are_seeded_and_shared():
    a, b, c = sample_columns(1000, 100, 0), sample_columns(1000, 100, 0), sample_columns(1000, 100, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(sample_columns(50, 100, 0), np.arange(50))


# -- memory ---------------------------------------------------------------------------
def test_memory_guard_message(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 21.9 * 2**30)
    with pytest.raises(SfaError) as exc:
        memory.require_memory(100_000**2 * 4, "densifying data/big.mtx (n=100000)", "use --sampled", dtype="float32")
    assert str(exc.value) == "densifying data/big.mtx (n=100000) needs 37.3 GiB in float32; 21.9 GiB available; use --sampled"
    memory.require_memory(2**30, "a small thing", "unused")  # fits: no error
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1000)
    with pytest.raises(SfaError, match=r"^the sampled fit of the 64 x 64 matrix .* needs .*; 1000 B available; use "):
        fit_sampled(grid_laplacian(8), device="cpu")


def test_memory_helpers():
    assert memory.human_bytes(512) == "512 B"
    assert memory.human_bytes(1536) == "1.5 KiB"
    assert memory.human_bytes(3 * 2**40) == "3.0 TiB"
    assert memory.available_bytes() > 2**20
    assert memory.peak_rss_bytes() > 2**20
    assert memory.peak_device_bytes("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_fit_matches_cpu():
    A = grid_laplacian(16)
    cpu = fit_sampled(A, epochs=2, batch_columns=64, device="cpu", dtype="float64")
    gpu = fit_sampled(A, epochs=2, batch_columns=64, device="cuda", dtype="float64")
    assert gpu.device.startswith("cuda") and gpu.peak_device_memory_bytes > 0
    assert gpu.rel_error == pytest.approx(cpu.rel_error, rel=1e-6)
    assert memory.available_bytes("cuda") > 0


# -- several processes ------------------------------------------------------------------
FIT_OPTIONS = dict(epochs=3, batch_columns=96, error_sample=100, seed=7, device="cpu", exact_error=True)
HELPER = """
import json, sys
import numpy as np
import scipy.sparse as sp
from sfa_cli.engine.sampled import fit_sampled, init_distributed

rank, world = init_distributed("cpu")
A = sp.load_npz(sys.argv[1])
r = fit_sampled(A, **json.loads(sys.argv[4]))
if rank == 0:
    np.savez(sys.argv[2], *[W.data for W in r.approximation.factors])
    with open(sys.argv[3], "w") as f:
        json.dump({"world": world, "history": [h["rel_error"] for h in r.history],
                   "rel_error": r.rel_error, "processes": r.processes}, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_distributed_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == (0, 1)


def test_two_processes_reach_the_one_process_result(tmp_path):
    """torchrun with 2 gloo processes on the CPU against one process, same seed and global batch."""
    A = grid_laplacian(16)
    sp.save_npz(tmp_path / "A.npz", A)
    script = tmp_path / "fit_helper.py"
    script.write_text(textwrap.dedent(HELPER))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(script), str(tmp_path / "A.npz"), str(tmp_path / "F.npz"), str(tmp_path / "r.json"), json.dumps(FIT_OPTIONS)]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "r.json").read_text())
    F2 = np.load(tmp_path / "F.npz")

    one = fit_sampled(A, **FIT_OPTIONS)
    assert two["world"] == 2 and two["processes"] == 2 and one.processes == 1
    assert two["rel_error"] == pytest.approx(one.rel_error, rel=1e-5)
    np.testing.assert_allclose(two["history"], [h["rel_error"] for h in one.history], rtol=1e-5)
    for key, W in zip(F2.files, one.approximation.factors):
        np.testing.assert_allclose(F2[key], W.data, rtol=1e-4, atol=1e-4)  # Adam amplifies round-off of tiny entries
