"""Issue 27's rules: the patience stop, the compile decision, honest short fits, SciPy's L-BFGS."""
import json

import numpy as np
import pytest
import torch

from sfa_cli.approximations import kernels
from sfa_cli.engine.optimize import Run, ScipyLBFGS, Stop


def _rbf(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, 3))
    return np.exp(-((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) / 2)


def test_patience_stops_a_run_that_no_longer_improves(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(Run, "seconds", property(lambda self: clock["t"]))
    run = Run([torch.zeros(1)], patience=0.005)
    run.history.append({"rel_error": 1.0})  # the start's evaluation
    errors = [1.0 / (1 + k) for k in range(50)] + [0.02] * 400  # improves, then flat
    with pytest.raises(Stop) as stop:
        for k, e in enumerate(errors):
            clock["t"] = 0.01 * k
            run.best_rel = min(run.best_rel, e)
            run.end_iteration()
    assert stop.value.reason == "patience"
    # not before the error had been flat for a quarter of the elapsed time, and not before PATIENCE_AFTER
    from sfa_cli.engine.optimize import PATIENCE_AFTER

    assert run.iteration * 0.01 >= PATIENCE_AFTER and run.iteration > 50 * 4 / 3


def test_patience_zero_and_a_steady_improvement_never_stop(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(Run, "seconds", property(lambda self: clock["t"]))
    for patience, errors in ((0.0, [0.5] * 400), (0.005, [0.99 ** k for k in range(400)])):
        run = Run([torch.zeros(1)], patience=patience)
        run.history.append({"rel_error": 1.0})
        for k, e in enumerate(errors):
            clock["t"] = 0.01 * k
            run.best_rel = e
            run.end_iteration()


def test_scipy_lbfgs_serves_one_flat_cpu_leaf_and_fits_a_quadratic():
    x = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
    assert ScipyLBFGS.serves([x]) and not ScipyLBFGS.serves([x, x]) and not ScipyLBFGS.serves([x.reshape(2, 1)])
    from sfa_cli.engine.optimize import minimize

    run = Run([x], max_iter=50)

    def objective():
        x.grad = 2 * x.detach()
        loss = float((x.detach() ** 2).sum())
        run.record(0.5 * loss)
        return loss

    reason = minimize(run, objective, "lbfgs")
    assert reason in ("exact", "tol") and run.best_rel < 1e-6 and run.iteration >= 1


def test_compiling_is_decided_by_the_expected_saving(monkeypatch, tmp_path):
    from sfa_cli.approximations.patterns import chord_pattern
    from sfa_cli.approximations.sparse_factors import pattern_structures

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiled", {})
    structs, _ = pattern_structures(chord_pattern(1024), "cpu")
    cold = kernels.compile_seconds(structs, 512, torch.float32)
    assert cold == pytest.approx(kernels.COMPILE_COLD_SECONDS * len({s.offsets for s in structs}))
    needed = kernels.COMPILE_REPAY * cold / kernels.COMPILE_SAVING
    assert not kernels.compiling_pays(structs, [512], torch.float32, "cpu", 0.9 * needed)
    assert kernels.compiling_pays(structs, [512], torch.float32, "cpu", 1.1 * needed)
    with kernels.csr_only():
        assert not kernels.compiling_pays(structs, [512], torch.float32, "cpu", 1e9)
    # in auto mode nothing compiles until a fit approves it
    with kernels.compile_decision() as decision:
        with kernels._setting("enabled", None):
            assert not kernels.compiled_kernels_usable()
            decision.approved = True
            assert kernels.compiled_kernels_usable()
    assert kernels.cache_root() == tmp_path / "sfa"


def test_a_short_default_fit_of_n_1024_does_not_compile(monkeypatch):
    from sfa_cli.engine.fit import fit

    monkeypatch.setattr(kernels, "_compiled", {})
    with kernels._setting("enabled", None):
        r = fit(_rbf(1024), max_iter=5)
    assert kernels._compiled == {} and r.iterations == 5


def test_a_fit_stopped_before_its_first_step_says_so(run_cli, tmp_path):
    path = tmp_path / "K.npy"
    np.save(path, _rbf(1024))
    report = tmp_path / "r.json"
    result = run_cli("fit", path, "-o", tmp_path / "F.npz", "--time-limit", "0.01", "--report", report)
    assert result.exit_code == 0, result.output
    facts = json.loads(report.read_text())
    assert facts["stopped_because"] == "time_limit_before_first_step" and facts["iterations"] == 0
    assert "no step made (the time limit came before the first step)" in result.stderr
    assert "give a longer --time-limit" in result.stderr and "--optimizer lbfgs" not in result.stderr


def test_compare_notes_a_chord_row_that_made_no_step(run_cli, tmp_path):
    path = tmp_path / "K.npy"
    np.save(path, _rbf(1024))
    result = run_cli("compare", path, "--methods", "chord,tsvd", "--time-limit", "0.01", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(result.stdout)["results"]}
    assert "no step made" in rows["chord"]["note"]


def test_compare_reuses_its_chord_fit_for_chord_plus_sparse(monkeypatch):
    import sfa_cli.engine.fit as fit_module
    from sfa_cli.methods.compare import compare
    from sfa_cli.io import load_matrix

    A = load_matrix("data/lesmis.mtx")
    calls = []
    real = fit_module.fit.trusted

    def counting(*args, **kwargs):
        calls.append(kwargs.get("init") is None)
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module.fit, "trusted", counting)
    c = compare(A, methods=["chord", "chord+sparse"], fit_options={"max_iter": 20}, keep=True)
    hybrid = [r for r in c.results if r.method == "chord+sparse"][0].approximation
    assert hybrid.info.get("reused_chord_fit") == [1.0]
    # chord: one fit; chord+sparse: split 0.5 fitted from scratch and refitted, split 1.0 only refitted
    assert calls.count(True) == 2 and len(calls) == 4


def test_chord_plus_sparse_keeps_to_its_time_limit():
    import time

    from sfa_cli.methods.chord_sparse import chord_plus_sparse

    A = _rbf(256)
    t0 = time.perf_counter()
    F = chord_plus_sparse(A, 20000, fit_options={"time_limit": 1.0, "max_iter": 100000, "tol": 0})
    assert time.perf_counter() - t0 < 1.0 + 1.0  # the fits share the second; the rest is top-k and residuals
    assert F.params <= 20000


def test_patience_never_judges_a_few_slow_iterations_or_the_start_plateau(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(Run, "seconds", property(lambda self: clock["t"]))
    for step_seconds, errors in ((0.2, [0.5] * 40), (0.01, [0.999] * 400)):  # slow iterations; the plateau
        run = Run([torch.zeros(1)], patience=0.005)
        run.history.append({"rel_error": 1.0})
        for k, e in enumerate(errors):
            clock["t"] = step_seconds * k
            run.best_rel = e
            run.end_iteration()


def test_the_patience_option_reaches_the_fit(run_cli, tmp_path):
    report = tmp_path / "r.json"
    result = run_cli("fit", "data/lesmis.mtx", "-o", tmp_path / "F.npz", "--patience", "0.5", "--report", report)
    assert result.exit_code == 0, result.output
    facts = json.loads(report.read_text())
    assert facts["stopped_because"] == "patience" and facts["seconds"] < 10


def test_compare_reports_the_steps_of_its_long_methods():
    from sfa_cli.io import load_matrix
    from sfa_cli.methods.compare import compare

    seen = {}
    compare(load_matrix("data/lesmis.mtx"), methods=["chord", "tsvd", "chord+sparse"], fit_options={"max_iter": 5},
            step_callback=lambda method, step: seen.setdefault(method, []).append(step.iteration))
    assert set(seen) == {"chord", "chord+sparse"} and len(seen["chord"]) >= 5
