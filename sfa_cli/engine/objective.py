"""The block objective of every fit: 0.5 ||T - W(1)...W(M)||_F^2 and its gradient, over column blocks of T.

The loss is a sum over columns, so it is evaluated block by block: W(M)'s
columns of the block, the other M - 1 products (:mod:`sfa_cli.approximations.kernels`), the
residual, and the backward pass by hand; nothing n x n is formed. The factor
structures may be any :class:`~sfa_cli.approximations.kernels.FactorStructure` (the fixed
Chord and butterfly patterns, or the learned method's free CSR supports), and
the target T either a dense (n, n) tensor or a *column source*: anything with
``shape`` and ``block(cols) -> (n, |cols|) tensor`` (:class:`DenseColumns` is the
dense one), so a sampled or out-of-core input only has to hand out its blocks.

Example
-------
>>> import torch
>>> from sfa_cli.approximations.sparse_factors import initial_values, pattern_structures
>>> from sfa_cli.approximations.patterns import chord_pattern
>>> structs, _ = pattern_structures(chord_pattern(16), "cpu")
>>> values = initial_values(structs, seed=0, dtype=torch.float64)
>>> objective = BlockObjective(structs, torch.eye(16, dtype=torch.float64))
>>> grads = [torch.zeros_like(v) for v in values]
>>> objective(values, grads) == objective.loss(values)
True
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from sfa_cli.approximations.kernels import chain_backward, chain_forward, column_entries, factor_columns

__all__ = ["BlockObjective", "DenseChainObjective", "DENSE_CHAIN_MAX_N", "ColumnSetObjective", "ColumnSource", "DenseColumns", "block_columns", "column_blocks"]


def block_columns(n: int) -> int:
    """Columns per block: about 2^19 elements of n x b, so a block's chain stays in cache."""
    return int(min(n, max(64, (1 << 19) // n)))


def column_blocks(n: int, b: int | None = None) -> list[slice]:
    """Consecutive column slices of width ``b`` (default :func:`block_columns`) covering 0..n-1."""
    b = block_columns(n) if b is None else b
    return [slice(j, min(j + b, n)) for j in range(0, n, b)]


class ColumnSource(Protocol):
    """A target handed out by column blocks (a dense tensor, a memory-mapped file, a sampler)."""

    shape: tuple

    def block(self, cols: slice) -> torch.Tensor:
        """T[:, cols] as an (n, |cols|) tensor on the fit's device and in its dtype."""


def _add_gradients(values, grads, parts) -> None:
    """Add each factor's gradient ``parts[i]`` into ``grads[i]``, or without ``grads`` into the values' ``.grad``."""
    for i, (v, g) in enumerate(zip(values, parts)):
        if grads is not None:
            grads[i].add_(g)
        elif v.grad is None:
            v.grad = g
        else:
            v.grad.add_(g)


class DenseColumns:
    """The :class:`ColumnSource` of a dense (n, n) tensor: its column slices, without copies."""

    def __init__(self, T: torch.Tensor):
        self.T = T
        self.shape = tuple(T.shape)

    def block(self, cols: slice) -> torch.Tensor:
        return self.T[:, cols]


class BlockObjective:
    """0.5 ||T - W(1)...W(M)||_F^2 over column blocks, and its gradient in the factor values.

    Parameters
    ----------
    structs : sequence of FactorStructure
        The M factors' structures (W(1) first), on the target's device.
    target : Tensor of shape (n, n), or ColumnSource
    blocks : list of slice, optional
        The column blocks (default :func:`column_blocks`).

    For each block J: W(M)'s columns J scattered (kernels.factor_columns), the other M - 1
    products (kernels.chain_forward), the residual R, whose loss gradient is R itself, and the
    backward pass by hand (kernels.chain_backward). These are the products autograd would run,
    without its graph and into M + 2 blocks of n x b that live as long as the objective: fresh
    blocks at every evaluation cost page faults (glibc hands large freed blocks back to the
    system). Measured against autograd in docs/performance.md.
    """

    def __init__(self, structs, target, blocks=None):
        self.structs = list(structs)
        self.columns = DenseColumns(target) if isinstance(target, torch.Tensor) else target
        n = self.columns.shape[0]
        self.n = n
        self.blocks = column_blocks(n) if blocks is None else blocks
        self._work: dict[int, list[torch.Tensor]] = {}

    @property
    def target(self) -> torch.Tensor:
        """The dense target (only when built from one)."""
        return self.columns.T

    def _blocks_of(self, width: int, like: torch.Tensor) -> list[torch.Tensor]:
        work = self._work.get(width)
        if work is None:
            work = [like.new_empty((self.n, width)) for _ in range(len(self.structs) + 2)]
            self._work[width] = work
        return work

    def _residual(self, values, cols: slice, work):
        """R = W(1)...W(M)[:, cols] - T[:, cols] in work[M], with the forward pass kept for the backward."""
        structs, M = self.structs, len(self.structs)
        # work: [0] W(M)'s columns, [1..M-1] the products, [M] R, [M-1] and [M+1] the backward pass
        X = factor_columns(structs[-1], values[-1], cols, out=work[0])
        order, inputs, Y = chain_forward(structs[:-1], values[:-1], X, outs=work[1:M])
        R = torch.sub(Y, self.columns.block(cols), out=work[M])
        return order, inputs, R

    @staticmethod
    def _half_square(R: torch.Tensor) -> float:
        # row norms (one pass, no n x b temporary), squared and summed in float64: as accurate as a
        # cascade sum over the block
        return 0.5 * float(torch.linalg.vector_norm(R, dim=1).double().square().sum())

    def __call__(self, values, grads=None, check=None) -> float:
        """The loss at ``values`` (one tensor per factor); adds its gradient into ``grads``.

        ``grads``: tensors shaped like ``values``; without them the gradient goes into the values'
        ``.grad``. ``check()`` is called between column blocks and may raise to abandon the
        evaluation (the run's time limit), so one evaluation overruns it by at most a block.
        """
        structs, M = self.structs, len(self.structs)
        block_sums = [None] * M
        total = 0.0
        with torch.no_grad():
            for i, cols in enumerate(self.blocks):
                if check is not None and i:
                    check()
                work = self._blocks_of(cols.stop - cols.start, values[-1])
                order, inputs, R = self._residual(values, cols, work)
                total += self._half_square(R)
                block_grads, G = chain_backward(structs[:-1], values[:-1], order, inputs, R, False, [True] * (M - 1),
                                                True, outs=(work[M - 1], work[M + 1]))
                sel, pos = column_entries(structs[-1], cols)  # W(M)'s gradient: G at its entries
                block_grads.append(values[-1].new_zeros(values[-1].shape).index_add_(0, sel, G.view(-1)[pos]))
                block_sums = [g if acc is None else acc.add_(g) for acc, g in zip(block_sums, block_grads)]
        _add_gradients(values, grads, block_sums)
        return total

    def loss(self, values, check=None) -> float:
        """The loss alone (the forward passes, no gradient)."""
        total = 0.0
        with torch.no_grad():
            values = [v.detach() for v in values]
            for i, cols in enumerate(self.blocks):
                if check is not None and i:
                    check()
                _, _, R = self._residual(values, cols, self._blocks_of(cols.stop - cols.start, values[-1]))
                total += self._half_square(R)
        return total

    def residual(self, values) -> torch.Tensor:
        """T - W(1)...W(M) as a dense (n, n) tensor (n * nnz work)."""
        with torch.no_grad():
            values = [v.detach() for v in values]
            out = values[-1].new_empty((self.n, self.n))
            for cols in self.blocks:
                _, _, R = self._residual(values, cols, self._blocks_of(cols.stop - cols.start, values[-1]))
                out[:, cols].copy_(R).neg_()
        return out


class ColumnSetObjective:
    """0.5 ||c W(1)...W(M)[:, J] - T[:, J]||_F^2 for any set of columns J, with its gradient: the sampled fit's.

    Parameters
    ----------
    chain : kernels.ColumnChain
        The product's columns for any column set, differentiable in the values.
    take : callable
        ``take(cols)`` -> T[:, cols] as an (n, |cols|) tensor (cols an int64 ndarray).
    chunk : int
        Columns per product (bounds the working memory).

    Not :class:`BlockObjective`: the columns are any set (a step's random block, the error sample),
    not consecutive slices; the rightmost factors act in ColumnChain's compact form, whose products
    have no hand-written backward pass (autograd runs it); and the product carries the output
    scale c of the sampled fit. The targets' protocol and the kernels are shared.
    """

    def __init__(self, chain, take, chunk: int):
        self.chain, self.take, self.chunk = chain, take, int(chunk)

    def _chunks(self, cols: np.ndarray):
        for i in range(0, len(cols), self.chunk):
            yield cols[i : i + self.chunk]

    def __call__(self, values, cols: np.ndarray, output_scale: float = 1.0) -> tuple[float, float, float]:
        """The loss over ``cols``, its gradient added into the values' ``.grad``, and <T_J, P_J>, ||P_J||^2."""
        loss, cross, power = 0.0, 0.0, 0.0
        device = values[0].device
        for c in self._chunks(cols):
            P = self.chain(values, torch.from_numpy(c).to(device))
            T = self.take(c)
            R = output_scale * P - T
            part = 0.5 * (R * R).sum()
            part.backward()
            loss += float(part.detach())
            with torch.no_grad():
                cross += float((T * P).sum(dtype=torch.float64))
                power += float((P * P).sum(dtype=torch.float64))
        return loss, cross, power

    def column_sums(self, values, cols: np.ndarray) -> np.ndarray:
        """Per column j of cols: ||T_j - P_j||^2, <T_j, P_j> and ||P_j||^2, float64, shape (3, |cols|)."""
        out = np.empty((3, len(cols)), dtype=np.float64)
        device = values[0].device
        with torch.no_grad():
            i = 0
            for c in self._chunks(cols):
                P = self.chain(values, torch.from_numpy(c).to(device))
                T = self.take(c)
                R = P - T
                sums = torch.stack([(R * R).sum(0, dtype=torch.float64), (T * P).sum(0, dtype=torch.float64),
                                    (P * P).sum(0, dtype=torch.float64)])
                out[:, i : i + len(c)] = sums.cpu().numpy()
                i += len(c)
        return out


#: Up to this n the full fit on the CPU holds the factors as dense blocks (:class:`DenseChainObjective`).
DENSE_CHAIN_MAX_N = 64


class DenseChainObjective:
    """The loss and gradient of :class:`BlockObjective` with the factors held as dense n x n blocks.

    For small n a chain of sparse products is a few dozen tiny kernel calls whose fixed cost dwarfs
    their arithmetic; as dense matrices the same evaluation is 3 (M - 1) BLAS products of n x n
    (forward prefixes, then the residual carried back) and one scatter and one gather per factor.
    Used by the full fit up to :data:`DENSE_CHAIN_MAX_N` (measured in docs/performance.md, "Dense
    factor blocks at small n"); the values, the loss and the gradient are those of :class:`BlockObjective` (same order, same
    dtype), so the optimisers cannot tell them apart.
    """

    def __init__(self, structs, target: torch.Tensor):
        self.structs = list(structs)
        self.n = n = target.shape[0]
        self.target = target
        M = len(self.structs)
        like = target
        self.index = [(s.rows * n + s.col).to(target.device) for s in self.structs]
        self.W = like.new_zeros((M, n, n))  # the factors; only their supports are ever written
        self.prefix = like.new_empty((M, n, n))  # W(1) ... W(m)
        # the residual carried back through W(M), W(M-1), ... (two buffers, alternating), and G
        self.carried = [like.new_empty((n, n)), like.new_empty((n, n))]
        self.products = like.new_empty((n, n))

    def _forward(self, values) -> torch.Tensor:
        W, P = self.W, self.prefix
        for m, (idx, v) in enumerate(zip(self.index, values)):
            W[m].view(-1).index_copy_(0, idx, v.detach())
        P[0].copy_(W[0])
        for m in range(1, len(values)):
            torch.mm(P[m - 1], W[m], out=P[m])
        return torch.sub(P[-1], self.target, out=self.products)

    def __call__(self, values, grads=None, check=None) -> float:  # noqa: ARG002 - one block: nothing to check
        with torch.no_grad():
            R = self._forward(values)
            loss = 0.5 * float(torch.linalg.vector_norm(R).double().square())
            W, P, M = self.W, self.prefix, len(values)
            first, second = self.carried
            Q, G = R, first  # R lives in self.products until the first carry
            out = []
            for m in range(M - 1, -1, -1):
                # d loss / d W(m) = (W(1)...W(m-1))^T Q with Q = R (W(m+1)...W(M))^T, read on W(m)'s support
                if m:
                    torch.mm(P[m - 1].T, Q, out=G)
                    out.append(G.view(-1).index_select(0, self.index[m]))
                    Q, G = torch.mm(Q, W[m].T, out=G), Q  # G's buffer takes the new Q; the old Q's is free
                else:
                    out.append(Q.reshape(-1).index_select(0, self.index[0]))
            out.reverse()
        _add_gradients(values, grads, out)
        return loss

    def loss(self, values, check=None) -> float:  # noqa: ARG002
        with torch.no_grad():
            return 0.5 * float(torch.linalg.vector_norm(self._forward(values)).double().square())

    def residual(self, values) -> torch.Tensor:
        """T - W(1)...W(M) as a dense (n, n) tensor."""
        with torch.no_grad():
            return self._forward(values).neg()
