"""The baselines' approximations: low rank, one sparse matrix, Monarch, and sums of them.

Each is an :class:`~sfa_cli.approximations.base.Approximation`: ``A_hat @ x``,
``A_hat.T``, ``columns(cols)``, ``to_dense()``, ``save(path)``; the methods
that build them live in :mod:`sfa_cli.methods.low_rank`, :mod:`sfa_cli.methods.sparse`
and :mod:`sfa_cli.methods.monarch`. The chain of sparse factors
is :class:`~sfa_cli.approximations.sparse_factors.SparseFactors`.

Example
-------
>>> import numpy as np
>>> L = LowRank(np.ones((3, 1)), np.ones((1, 3)), method="tsvd")
>>> S = SparseMatrix(np.eye(3), method="topk")
>>> SumApproximation([L, S], method="lowrank+sparse").to_dense()
array([[2., 1., 1.],
       [1., 2., 1.],
       [1., 1., 2.]])
"""
from __future__ import annotations

import numpy as np

from sfa_cli.approximations.base import (CALL_SECONDS, DENSE_FMA_RATE, SPARSE_FMA_RATE, SPARSE_VECTOR_RATE,
                                         Approximation, StoredArrays, dense_bandwidth, kind_class)
from sfa_cli.errors import SfaError
from sfa_cli.validation import as_csr, check_values

__all__ = ["LowRank", "SparseMatrix", "SumApproximation", "Monarch"]


class LowRank(Approximation):
    """A_hat = left @ right, a rank-r matrix with the singular values folded into ``left``.

    Parameters
    ----------
    left : ndarray of shape (n, r)
    right : ndarray of shape (r, n)
        Real and finite; r may be 0 (the empty part of a sum).
    method : str
        The method that produced it (``tsvd``, ``rsvd``, ...).
    info : dict, optional
        Facts stored with the file.
    """

    kind = "low_rank"

    def __init__(self, left, right, *, method: str, info: dict | None = None):
        left, right = check_values(left, "left"), check_values(right, "right")
        if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0] or left.shape[0] != right.shape[1]:
            raise SfaError(f"a low-rank pair needs shapes (n, r) and (r, n); got {left.shape} and {right.shape}")
        dtype = np.result_type(left.dtype, right.dtype)
        super().__init__(left.shape[0], dtype, method, info)
        # C order, so that a saved and reloaded copy multiplies bit for bit alike
        self.left = np.ascontiguousarray(left, dtype=dtype)
        self.right = np.ascontiguousarray(right, dtype=dtype)

    def scaled(self, c: float) -> "LowRank":
        return LowRank(self.left * c, self.right, method=self.method, info=self.info)

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def params(self) -> int:
        return int(self.left.size + self.right.size)

    def product_seconds(self, b: int) -> float:
        """Two BLAS products (of n x r and r x n): like the dense product of the same multiply-adds."""
        work = 2.0 * self.n * self.rank
        read = work * self.dtype.itemsize
        return 2 * CALL_SECONDS + max(work * b / DENSE_FMA_RATE, read / dense_bandwidth(read))

    def _matmul(self, X):
        return self.left @ (self.right @ X)

    def _rmatmul(self, X):
        return self.right.T @ (self.left.T @ X)

    def _columns(self, cols):
        return self.left @ self.right[:, cols]

    def _to_dense(self):
        return self.left @ self.right

    def _meta(self) -> dict:
        return {"rank": self.rank}

    def _arrays(self) -> dict:
        return {"left": self.left, "right": self.right}

    @classmethod
    def _from_file(cls, stored: StoredArrays) -> "LowRank":
        n, r = stored.n, stored.meta_int("rank")
        left, right = stored.values("left", (n, r)), stored.values("right", (r, n))
        return cls(left, right, method=stored.method("tsvd"), info=stored.info("rank"))

    def __repr__(self) -> str:
        return f"<LowRank {self.method} n={self.n} rank={self.rank} params={self.params} {self.dtype.name}>"


class SparseMatrix(Approximation):
    """A_hat = S, one sparse matrix stored as CSR; params = its stored entries.

    Parameters
    ----------
    S : sparse matrix or ndarray of shape (n, n)
        Real and finite; duplicates are summed.
    method : str
        The method that produced it (``topk``, ...).
    info : dict, optional
        Facts stored with the file.

    Notes
    -----
    Its file is also a ``scipy.sparse.save_npz`` file: ``scipy.sparse.load_npz``
    reads a ``.npz`` of this kind as the matrix S.
    """

    kind = "sparse"

    def __init__(self, S, *, method: str, info: dict | None = None):
        S = as_csr(S, "the sparse matrix")
        if S.shape[0] != S.shape[1]:
            raise SfaError(f"a sparse approximation must be square; got {S.shape}")
        if not S.has_canonical_format:
            S = S.copy()  # the caller's arrays stay as they are
            S.sum_duplicates()
        super().__init__(S.shape[0], S.dtype, method, info)
        self.matrix = S
        self._csc = None
        self._torch: dict = {}  # (transpose, dtype) -> S or S^T as a torch CSR tensor
        self._transposed = None  # S^T as scipy CSR: its products run row by row, like S's

    def scaled(self, c: float) -> "SparseMatrix":
        return SparseMatrix(self.matrix * c, method=self.method, info=self.info)

    @property
    def params(self) -> int:
        return int(self.matrix.nnz)

    def product_seconds(self, b: int) -> float:
        """One sparse product: nnz * b multiply-adds at SPARSE_FMA_RATE (SPARSE_VECTOR_RATE for one column)."""
        return CALL_SECONDS + self.params * b / (SPARSE_VECTOR_RATE if b <= 1 else SPARSE_FMA_RATE)

    def _matmul(self, X):
        return self._product(X, transpose=False)

    def _rmatmul(self, X):
        return self._product(X, transpose=True)

    def _product(self, X, transpose: bool):
        """S X or S^T X: one column by scipy's compiled loop; a block by torch's CSR product (MKL, every
        core; scipy's uses one), S^T kept as its own CSR tensor so both run row by row."""
        dtype = np.result_type(X.dtype, self.dtype)
        if transpose and self._transposed is None:
            self._transposed = self.matrix.T.tocsr()
        S = self._transposed if transpose else self.matrix
        if X.shape[1] == 1 or dtype not in (np.float32, np.float64) or self.matrix.nnz == 0:
            return np.asarray(S @ X)
        import torch

        from sfa_cli.approximations.kernels import torch_csr

        key = (transpose, dtype)
        if key not in self._torch:
            self._torch[key] = torch_csr(S.indptr, S.indices, S.data.astype(dtype, copy=False), self.n)
        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=dtype))
        return torch.mm(self._torch[key], Xt).numpy()

    def _columns(self, cols):
        if self._csc is None:  # column slices of CSC touch only those columns' entries
            self._csc = self.matrix.tocsc()
        return self._csc[:, cols].toarray()

    def _to_dense(self):
        return self.matrix.toarray()

    def _meta(self) -> dict:
        return {"nnz": self.params}

    def _arrays(self) -> dict:
        # format and shape make the file one that scipy.sparse.load_npz reads as S
        return {"indptr": self.matrix.indptr, "indices": self.matrix.indices, "data": self.matrix.data,
                "format": np.array(b"csr"), "shape": np.array(self.matrix.shape, dtype=np.int64)}

    @classmethod
    def _from_file(cls, stored: StoredArrays) -> "SparseMatrix":
        S = stored.csr("", (stored.n, stored.n))
        return cls(S, method=stored.method("topk"), info=stored.info("nnz"))


class SumApproximation(Approximation):
    """A_hat = sum of several approximations of the same n (e.g. low rank plus sparse).

    Parameters
    ----------
    parts : list of Approximation
        All of the same n; params is the sum of theirs.
    method : str
        The method that produced the sum (``lowrank+sparse``, ...).
    info : dict, optional
        Facts stored with the file.

    Notes
    -----
    In a file, part i's arrays are stored under the prefix ``part{i}.`` and its
    meta record in ``meta["parts"][i]``.
    """

    kind = "sum"

    def __init__(self, parts, *, method: str, info: dict | None = None):
        parts = list(parts)
        if not parts:
            raise SfaError("a sum approximation needs at least one part")
        for i, p in enumerate(parts):
            if not isinstance(p, Approximation):
                raise SfaError(f"part {i} of a sum is a {type(p).__name__}, not an Approximation")
        n = parts[0].n
        for i, p in enumerate(parts):
            if p.n != n:
                raise SfaError(f"part {i} of a sum has n={p.n}; part 0 has n={n}")
        super().__init__(n, np.result_type(*(p.dtype for p in parts)), method, info)
        self.parts = parts

    def scaled(self, c: float) -> "SumApproximation":
        return SumApproximation([p.scaled(c) for p in self.parts], method=self.method, info=self.info)

    @property
    def params(self) -> int:
        return int(sum(p.params for p in self.parts))

    def product_seconds(self, b: int) -> float:
        return sum(p.product_seconds(b) for p in self.parts)

    def _matmul(self, X):
        return self._total(p._matmul(X) for p in self.parts)

    def _rmatmul(self, X):
        return self._total(p._rmatmul(X) for p in self.parts)

    def _columns(self, cols):
        return self._total(p._columns(cols) for p in self.parts)

    def _to_dense(self):
        return self._total(p._to_dense() for p in self.parts)

    def _total(self, blocks):
        out = None
        for B in blocks:
            out = np.array(B, dtype=np.result_type(B.dtype, self.dtype)) if out is None else out + B
        return out

    def _meta(self) -> dict:
        return {"parts": [p.meta() for p in self.parts]}

    def _arrays(self) -> dict:
        return {f"part{i}.{key}": a for i, p in enumerate(self.parts) for key, a in p._arrays().items()}

    @classmethod
    def _from_file(cls, stored: StoredArrays) -> "SumApproximation":
        count = len(stored.meta_list("parts"))
        if count == 0:
            raise SfaError("meta field 'parts' is empty")
        parts = []
        for i in range(count):
            part = stored.part(i)
            parts.append(kind_class(part.meta["kind"])._from_file(part))
        return cls(parts, method=stored.method("sum"), info=stored.info("parts"))

    def __repr__(self) -> str:
        inner = " + ".join(type(p).__name__ for p in self.parts)
        return f"<SumApproximation {self.method} n={self.n} ({inner}) params={self.params} {self.dtype.name}>"


class Monarch(Approximation):
    """A Monarch matrix (Dao et al. 2022) stored as one rank-1 factor pair per block slice.

    With n = s0 * s1, i = i0 * s1 + i1 and j = j0 * s1 + j1 (i0, j0 < s0; i1, j1 < s1),

        A_hat[i, j] = u[i1, j0, i0] * v[i1, j0, j1],

    which is the product of a block-diagonal matrix of s0 blocks of s1 x s1
    (entries v, acting on j1 for each j0), a permutation, and a block-diagonal
    matrix of s1 blocks of s0 x s0 (entries u, acting on j0 for each i1).

    Parameters
    ----------
    u : ndarray of shape (s1, s0, s0)
        u[i1, j0, :] is the left vector (over i0) of slice (i1, j0).
    v : ndarray of shape (s1, s0, s1)
        v[i1, j0, :] is the right vector (over j1) of slice (i1, j0).
    method : str, default="monarch"
    info : dict, optional
        Facts stored with the file.
    """

    kind = "monarch"

    def __init__(self, u, v, *, method: str = "monarch", info: dict | None = None):
        u, v = check_values(u, "u"), check_values(v, "v")
        if u.ndim != 3 or v.ndim != 3 or u.shape[:2] != v.shape[:2] or u.shape[1] != u.shape[2] or v.shape[0] != v.shape[2]:
            raise SfaError(f"Monarch factors need shapes (s1, s0, s0) and (s1, s0, s1); got {u.shape} and {v.shape}")
        s1, s0 = u.shape[0], u.shape[1]
        dtype = np.result_type(u.dtype, v.dtype)
        super().__init__(s0 * s1, dtype, method, info)
        self.s0, self.s1 = int(s0), int(s1)
        self.u = np.ascontiguousarray(u, dtype=dtype)
        self.v = np.ascontiguousarray(v, dtype=dtype)
        self._blocks = None  # the forward product's block stacks, contiguous, formed on first use

    def scaled(self, c: float) -> "Monarch":
        return Monarch(self.u * c, self.v, method=self.method, info=self.info)

    @property
    def params(self) -> int:
        return int(self.u.size + self.v.size)

    def product_seconds(self, b: int) -> float:
        """Two stacks of small BLAS products (s0 of s1 x s1, s1 of s0 x s0): half the dense rate."""
        return 2 * CALL_SECONDS + self.params * b / (0.5 * DENSE_FMA_RATE)

    def _matmul(self, X):
        s0, s1, k = self.s0, self.s1, X.shape[1]
        if self._blocks is None:  # contiguous stacks: each small product reads its block in one run
            self._blocks = (np.ascontiguousarray(self.v.transpose(1, 0, 2)), np.ascontiguousarray(self.u.transpose(0, 2, 1)))
        vt, ut = self._blocks
        X3 = np.ascontiguousarray(X).reshape(s0, s1, k)  # [j0, j1, :]
        Z = np.matmul(vt, X3)  # [j0, i1, :] = sum_j1 v[i1, j0, j1] X[j0, j1]
        Y = np.empty((s0, s1, k), dtype=np.result_type(Z.dtype, ut.dtype))  # [i0, i1, :]
        np.matmul(ut, Z.transpose(1, 0, 2), out=Y.transpose(1, 0, 2))  # [i1, i0, :], written in place
        return Y.reshape(self.n, k)

    def _rmatmul(self, X):
        s0, s1, k = self.s0, self.s1, X.shape[1]
        X3 = X.reshape(s0, s1, k).transpose(1, 0, 2)  # [i1, i0, :]
        Z = np.matmul(self.u, X3)  # [i1, j0, :] = sum_i0 u[i1, j0, i0] X[i0, i1]
        Y = np.matmul(self.v.transpose(1, 2, 0), Z.transpose(1, 0, 2))  # [j0, j1, :]
        return Y.reshape(self.n, k)

    def _columns(self, cols):
        j0, j1 = np.divmod(cols, self.s1)
        C = self.u[:, j0, :] * self.v[:, j0, j1][:, :, None]  # [i1, c, i0] = u[i1, j0, i0] v[i1, j0, j1]
        return np.ascontiguousarray(C.transpose(2, 0, 1)).reshape(self.n, len(cols))

    def _to_dense(self):
        return np.einsum("bai,baj->ibaj", self.u, self.v).reshape(self.n, self.n)

    def _meta(self) -> dict:
        return {"blocks": [self.s0, self.s1]}

    def _arrays(self) -> dict:
        return {"u": self.u, "v": self.v}

    @classmethod
    def _from_file(cls, stored: StoredArrays) -> "Monarch":
        blocks = stored.meta_list("blocks")
        if (len(blocks) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks)
                or blocks[0] * blocks[1] != stored.n):
            raise SfaError(f"meta field 'blocks' must be two positive integers s0, s1 with s0 * s1 = n = {stored.n}; "
                           f"got {blocks!r}")
        s0, s1 = blocks
        u, v = stored.values("u", (s1, s0, s0)), stored.values("v", (s1, s0, s1))
        return cls(u, v, method=stored.method("monarch"), info=stored.info("blocks"))

    def __repr__(self) -> str:
        return f"<Monarch n={self.n} blocks={self.s0}x{self.s1} params={self.params} {self.dtype.name}>"
