"""Synthetic square matrices of the paper's categories, for tests, benchmarks and examples.

>>> grid_laplacian(3).shape, random_graph(100, seed=1).nnz > 0
((9, 9), True)
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["grid_laplacian", "random_graph"]


def grid_laplacian(rows: int, cols: int | None = None) -> sp.csr_matrix:
    """Graph Laplacian D - A of the 4-neighbour rows x cols grid (free boundary); n = rows * cols."""
    cols = rows if cols is None else cols

    def path(k):
        return sp.diags([1.0, 1.0], [-1, 1], shape=(k, k))

    A = sp.kron(sp.eye(rows), path(cols)) + sp.kron(path(rows), sp.eye(cols))
    return (sp.diags(np.asarray(A.sum(axis=1)).ravel()) - A).tocsr()


def random_graph(n: int, degree: float = 5.0, seed: int = 0) -> sp.csr_matrix:
    """Symmetric 0/1 adjacency of a random graph with about ``degree`` edges per node, no self loops."""
    rng = np.random.default_rng(seed)
    m = int(n * degree / 2)
    i, j = rng.integers(0, n, m), rng.integers(0, n, m)
    keep = i != j
    U = sp.coo_matrix((np.ones(keep.sum()), (i[keep], j[keep])), shape=(n, n)).tocsr()
    A = (U + U.T).tocsr()
    A.data[:] = 1.0
    return A
