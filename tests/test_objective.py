"""The block objective and the run loop shared by every fit."""
from functools import reduce

import pytest
import torch

from sfa_cli.approximations.kernels import FactorStructure
from sfa_cli.engine.objective import BlockObjective, DenseColumns, column_blocks
from sfa_cli.engine.optimize import Adam, FitStep, Run, Stop, minimize
from sfa_cli.approximations.patterns import butterfly_pattern, chord_pattern


def _dense_factor(struct, values, n):
    return torch.zeros(n, n, dtype=values.dtype).index_put((struct.rows, struct.col), values)


def _dense_loss_and_grads(structs, values, T):
    """0.5 ||T - W(1)...W(M)||^2 and its gradient, by autograd through dense factors."""
    vs = [v.detach().clone().requires_grad_(True) for v in values]
    P = reduce(torch.matmul, [_dense_factor(s, v, T.shape[0]) for s, v in zip(structs, vs)])
    loss = 0.5 * ((T - P) ** 2).sum()
    return float(loss.detach()), torch.autograd.grad(loss, vs)


def _check_block_objective(pattern, blocks, gen):
    n = pattern.n
    structs = [FactorStructure.from_table(t)[0] for t in pattern.tables]
    T = torch.randn(n, n, dtype=torch.float64, generator=gen)
    objective = BlockObjective(structs, T, blocks)
    for _ in range(2):  # the second call reuses the blocks of the first with other values
        values = [torch.randn(s.nnz, dtype=torch.float64, generator=gen) for s in structs]
        want_loss, want_grads = _dense_loss_and_grads(structs, values, T)
        grads = [torch.full_like(v, 1.5) for v in values]  # added to, not overwritten
        assert objective(values, grads) == pytest.approx(want_loss, rel=1e-12)
        for g, w in zip(grads, want_grads):
            assert torch.allclose(g - 1.5, w, rtol=1e-10, atol=1e-10)
        leaves = [v.clone().requires_grad_(True) for v in values]  # without grads=: into .grad
        objective(leaves)
        for v, w in zip(leaves, want_grads):
            assert torch.allclose(v.grad, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", [chord_pattern(13), chord_pattern(16, symmetric=True, permute=3),
                                     butterfly_pattern(16), chord_pattern(12, factors=1)],
                         ids=["chord", "chord-permuted", "butterfly", "one-factor"])
def test_block_objective_matches_autograd_through_dense_factors(pattern):
    n = pattern.n
    blocks = [slice(0, 5), slice(5, 10), slice(10, n)]  # uneven widths: two sets of work blocks
    _check_block_objective(pattern, blocks, torch.Generator().manual_seed(3))


def test_block_objective_on_the_compiled_kernels(compiled_path):
    kernels = compiled_path
    _check_block_objective(chord_pattern(40), [slice(0, 16), slice(16, 32), slice(32, 40)],
                           torch.Generator().manual_seed(4))
    if not kernels.compiled_kernels_usable():
        pytest.skip("torch.compile is not usable here (no C++ compiler?); the CSR fallback ran")
    assert kernels._compiled, "the compiled path was not taken"


class _CountingColumns(DenseColumns):
    """A column source that counts the blocks it hands out (stands in for a file read by blocks)."""

    def __init__(self, T):
        super().__init__(T)
        self.reads = 0

    def block(self, cols):
        self.reads += 1
        return self.T[:, cols].clone()


def _chord_problem(n=24, seed=5):
    pattern = chord_pattern(n)
    structs = [FactorStructure.from_table(t)[0] for t in pattern.tables]
    gen = torch.Generator().manual_seed(seed)
    T = torch.randn(n, n, dtype=torch.float64, generator=gen)
    values = [torch.randn(s.nnz, dtype=torch.float64, generator=gen) for s in structs]
    return structs, T, values


def test_a_column_source_target_gives_the_dense_targets_loss_gradient_and_residual():
    structs, T, values = _chord_problem()
    blocks = column_blocks(24, 7)
    dense, source = BlockObjective(structs, T, blocks), _CountingColumns(T)
    sourced = BlockObjective(structs, source, blocks)
    g1, g2 = [torch.zeros_like(v) for v in values], [torch.zeros_like(v) for v in values]
    assert sourced(values, g2) == dense(values, g1)
    assert source.reads == len(blocks) == 4
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert sourced.loss(values) == pytest.approx(dense.loss(values), rel=1e-14)
    P = reduce(torch.matmul, [_dense_factor(s, v, 24) for s, v in zip(structs, values)])
    assert torch.allclose(sourced.residual(values), T - P, atol=1e-12)
    assert dense.loss(values) == pytest.approx(0.5 * float(((T - P) ** 2).sum()), rel=1e-12)


def test_the_check_runs_between_blocks_and_can_abandon_an_evaluation():
    structs, T, values = _chord_problem()
    objective = BlockObjective(structs, T, column_blocks(24, 5))
    calls = []
    objective(values, [torch.zeros_like(v) for v in values], check=lambda: calls.append(1))
    assert len(calls) == 4  # five blocks, a check between each two

    def stop():
        raise Stop("time_limit")

    with pytest.raises(Stop):
        objective.loss(values, check=stop)


def _quadratic_run(x, **rules):
    run = Run([x], **rules)

    def objective():
        x.grad = x.detach().clone()  # the gradient of 0.5 |x|^2
        loss = 0.5 * float((x.detach() ** 2).sum())
        run.record(loss)
        return loss

    return run, objective


def test_run_rules_max_iter_callback_and_the_best_iterate():
    x = torch.tensor([3.0, -4.0], dtype=torch.float64, requires_grad=True)
    run, objective = _quadratic_run(x, max_iter=7)
    assert minimize(run, objective, "adam", lr=0.1) == "max_iter"
    assert run.iteration == 7 and run.evaluations == 7
    assert run.best_rel == pytest.approx(min(h["rel_error"] for h in run.history))

    steps = []
    x = torch.tensor([3.0, -4.0], dtype=torch.float64, requires_grad=True)
    run, objective = _quadratic_run(x, max_iter=100, callback=lambda s: steps.append(s) or len(steps) == 3)
    assert minimize(run, objective, "lbfgs") in ("callback", "exact")
    assert all(isinstance(s, FitStep) for s in steps) and steps[-1].best_rel_error == run.best_rel


def test_run_tol_window_and_interrupt_keep_the_best():
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    run = Run([x], max_iter=1000, tol=1e-3, window=5)

    def flat():
        x.grad = torch.zeros_like(x)
        run.record(0.5)
        return 0.5

    assert minimize(run, flat, "adam") == "tol" and run.iteration == 6

    x = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    run, objective = _quadratic_run(x, max_iter=1000)

    def interrupted():
        if run.evaluations == 5:
            raise KeyboardInterrupt
        return objective()

    assert minimize(run, interrupted, "adam", lr=0.5) == "interrupted"
    assert run.best_rel == pytest.approx(min(h["rel_error"] for h in run.history))
    assert float(run.best[0]) != float(x.detach()) or run.best_rel == run.history[-1]["rel_error"]


def test_time_limit_is_checked_inside_an_evaluation_but_never_before_the_first():
    structs, T, values = _chord_problem()
    objective = BlockObjective(structs, T, column_blocks(24, 3))
    leaves = [v.clone().requires_grad_(True) for v in values]
    run = Run(leaves)
    checks = []

    def closure():
        for v in leaves:
            v.grad = None

        def check():
            checks.append(run.evaluations)
            run.check_time()

        loss = objective(leaves, check=check)
        run.record(loss)
        run.time_limit = 1e-9  # past from now on: the next evaluation must stop at its first check
        return loss

    assert minimize(run, closure, "lbfgs") == "time_limit_before_first_step"  # only the start was evaluated
    # the first evaluation runs whole (8 blocks, 7 checks); the second stops at its first check
    assert run.evaluations == 1 and checks == [0] * 7 + [1]


def test_adam_is_torch_adam():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, dtype=torch.float64, generator=gen)
    p, q = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    ours, theirs = Adam([p], lr=0.05), torch.optim.Adam([q], lr=0.05)
    for _ in range(20):
        for leaf in (p, q):
            leaf.grad = torch.sin(3 * leaf.detach()) + leaf.detach() ** 3
        ours.step()
        theirs.step()
    assert torch.allclose(p, q, rtol=1e-12, atol=1e-12)
