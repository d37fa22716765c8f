"""The chain of sparse factors A_hat = W(1) W(2) ... W(M).

Example
-------
>>> import numpy as np
>>> from sfa_cli.approximations.patterns import chord_pattern
>>> F = SparseFactors.from_pattern(chord_pattern(16), seed=0)   # paper's initial factors
>>> F
<SparseFactors chord n=16 factors=4 params=320 float64>
>>> x = np.ones(16)
>>> np.allclose(F @ x, F.to_dense() @ x), np.allclose(x @ F, F.T.to_dense() @ x)
(True, True)

File layout: ``factor{m}.indptr``, ``factor{m}.indices``, ``factor{m}.data`` for
m = 0..M-1 (factor0 is W(1), the leftmost; ``/factors/{m}/...`` in ``.h5``),
and the meta record; docs/formats.md has the exact layout and a scipy-only recipe.

torch is imported on first use (a block product, :meth:`SparseFactors.from_pattern`),
so loading a file and multiplying vectors does not need it.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from sfa_cli.approximations.base import Approximation, StoredArrays
from sfa_cli.errors import SfaError
from sfa_cli.approximations.patterns import Pattern
from sfa_cli.validation import as_csr

__all__ = ["SparseFactors", "pattern_structures", "initial_values"]


def pattern_structures(pattern: Pattern, device="cpu") -> tuple[list, list[np.ndarray]]:
    """Kernel structures (:class:`~sfa_cli.approximations.kernels.FactorStructure`) for every factor of a pattern,
    and each factor's table->CSR order.

    Factors that share one table (Chord) share one structure.
    """
    from sfa_cli.approximations.kernels import FactorStructure

    cache: dict[int, tuple] = {}
    structs, orders = [], []
    for table in pattern.tables:
        if id(table) not in cache:
            cache[id(table)] = FactorStructure.from_table(table, device)
        s, order = cache[id(table)]
        structs.append(s)
        orders.append(order)
    return structs, orders


class SparseFactors(Approximation):
    """A product of M sparse n x n factors, each stored as CSR.

    Parameters
    ----------
    factors : list of scipy.sparse matrices or ndarrays of shape (n, n)
        W(1), ..., W(M), leftmost first; real and finite (integers become float64).
    method : str, default="chord"
        The method that produced them (``chord``, ``butterfly``, ``sparse``...).
    pattern : dict or None
        Pattern name and options, recorded in the file.
    info : dict or None
        Facts stored with the file: error reached, input file, ...

    Raises
    ------
    SfaError
        No factors, a factor that is not n x n, or one with NaN/Inf, complex
        values or inconsistent CSR index arrays.
    """

    kind = "sparse_factors"

    def __init__(self, factors, *, method: str = "chord", pattern: dict | None = None, info: dict | None = None):
        factors = list(factors) if factors is not None else []
        if not factors:
            raise SfaError("a SparseFactors chain needs at least one factor")
        mats = [as_csr(W, f"factor {m}") for m, W in enumerate(factors)]
        n = mats[0].shape[0]
        for m, W in enumerate(mats):
            if W.shape != (n, n):
                raise SfaError(f"factor {m} has shape {W.shape}; all factors must be {n} x {n}")
            W.sort_indices()
        dtype = np.result_type(*(W.dtype for W in mats))
        super().__init__(n, dtype, method, info)
        self.factors = [W.astype(dtype, copy=False) for W in mats]
        self.pattern = dict(pattern or {"name": method})
        self._torch_cache: dict = {}
        self._vector_cache: dict = {}
        self._last_csc = None

    def scaled(self, c: float) -> "SparseFactors":
        """c A_hat: the first factor's values times c (the others unchanged)."""
        first = self.factors[0].copy()
        first.data = first.data * np.asarray(c, dtype=first.dtype)
        return SparseFactors([first, *self.factors[1:]], method=self.method, pattern=self.pattern, info=self.info)

    @classmethod
    def from_pattern(cls, pattern: Pattern, values=None, *, seed: int = 0, dtype=np.float64, info=None) -> "SparseFactors":
        """Factors with a pattern's structure.

        values : list of M arrays in CSR order, or None for the paper's start:
            every row averages its non-zeros (1/k each) with 1% uniform noise.
        """
        import torch

        structs, orders = pattern_structures(pattern)
        if values is None:
            values = initial_values(structs, seed=seed, dtype=torch.float64)
            values = [v.numpy().astype(dtype) for v in values]
        mats = [
            sp.csr_matrix((np.asarray(v), s.col.numpy(), s.crow.numpy()), shape=(pattern.n, pattern.n))
            for s, v in zip(structs, values)
        ]
        return cls(mats, method=pattern.name, pattern=pattern.to_dict(), info=info)

    # -- protocol ----------------------------------------------------------
    @property
    def params(self) -> int:
        return int(sum(W.nnz for W in self.factors))

    @property
    def num_factors(self) -> int:
        return len(self.factors)

    def to_scipy(self) -> list[sp.csr_matrix]:
        """Copies of the factors as scipy CSR matrices, leftmost first."""
        return [W.copy() for W in self.factors]

    def torch_chain(self, device="cpu", dtype=None):
        """(structures, values) of the factors as torch tensors on a device (cached)."""
        import torch

        from sfa_cli.approximations.kernels import FactorStructure

        dtype = dtype or torch.from_numpy(np.zeros(0, self.dtype)).dtype
        key = (str(device), dtype)
        if key not in self._torch_cache:
            structs = [
                FactorStructure.from_csr(W.indptr, W.indices, self.n, device) for W in self.factors
            ]
            values = [torch.from_numpy(W.data).to(device=device, dtype=dtype) for W in self.factors]
            self._torch_cache[key] = (structs, values)
        return self._torch_cache[key]

    def _apply(self, X: np.ndarray, transpose: bool, skip_last: bool = False) -> np.ndarray:
        """The chain (or its transpose) times X, numpy in and out; ``skip_last`` leaves out W(M) (not with transpose).

        A vector goes through scipy's compiled sparse products, a block of columns through
        torch's CSR kernel, which uses every core, on the plain CSR path: compiling the
        circulant kernels takes seconds, which one product does not win back (figures in
        docs/performance.md, section d). Torch tensors (any device, with gradients) go
        through `torch_chain` + kernels.chain_matmul.
        """
        keep = self.num_factors - 1 if skip_last else self.num_factors
        vector = X.ndim == 1 or X.shape[1] == 1
        dtype = np.result_type(X.dtype, self.dtype)
        if not vector and keep and dtype in (np.float32, np.float64):
            import torch

            from sfa_cli.approximations.kernels import chain_matmul, csr_only

            structs, values = self.torch_chain(dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
            with torch.no_grad(), csr_only():
                Y = chain_matmul(structs[:keep], values[:keep], torch.from_numpy(np.ascontiguousarray(X, dtype=dtype)),
                                 transpose=transpose)
            return Y.numpy()
        if vector:
            order = self._vector_factors(transpose)
        else:
            order = [W.T for W in self.factors] if transpose else list(reversed(self.factors))
        Y = X
        for W in order[1:] if skip_last else order:
            Y = W @ Y
        return np.asarray(Y)

    def _vector_factors(self, transpose: bool) -> list:
        """The factors in application order for matrix-vector products (cached).

        A circulant factor (Chord) is a few wrapped diagonals: scipy's DIA product reads
        them contiguously, without index arrays (faster than CSR for a vector; for blocks
        of columns CSR was as fast: docs/performance.md, section d). Factors whose
        diagonals would store much more than their non-zeros stay CSR.
        """
        if transpose not in self._vector_cache:
            mats = [W.T.tocsr() if transpose else W for W in self.factors]
            out = []
            for W in mats if transpose else reversed(mats):
                rows = np.repeat(np.arange(self.n), np.diff(W.indptr))
                diagonals = np.unique(W.indices - rows).size  # DIA stores n values per diagonal
                out.append(W.todia() if diagonals * self.n <= 2.5 * max(W.nnz, 1) else W)
            self._vector_cache[transpose] = out
        return self._vector_cache[transpose]

    def _matmul(self, X):
        return self._apply(X, transpose=False)

    def _rmatmul(self, X):
        return self._apply(X, transpose=True)

    def _columns(self, cols):
        # W(M)[:, cols] is read from W(M) directly: one product fewer than W(1)...W(M) E_cols.
        if self._last_csc is None:
            self._last_csc = self.factors[-1].tocsc()
        return self._apply(self._last_csc[:, cols].toarray(), transpose=False, skip_last=True)

    def _meta(self) -> dict:
        return {"factors": self.num_factors, "pattern": self.pattern}

    def _arrays(self) -> dict:
        out = {}
        for m, W in enumerate(self.factors):
            out[f"factor{m}.indptr"] = W.indptr
            out[f"factor{m}.indices"] = W.indices
            out[f"factor{m}.data"] = W.data
        return out

    @classmethod
    def _from_file(cls, stored: StoredArrays) -> "SparseFactors":
        n, M = stored.n, stored.meta_int("factors", minimum=1)
        pattern = stored.meta.get("pattern")
        if pattern is not None and not isinstance(pattern, dict):
            raise SfaError(f"meta field 'pattern' must be an object or null; got {pattern!r}")
        mats = [stored.csr(f"factor{m}.", (n, n)) for m in range(M)]
        return cls(mats, method=stored.method("chord"), pattern=pattern, info=stored.info("factors", "pattern"))

    def __repr__(self) -> str:
        return f"<SparseFactors {self.method} n={self.n} factors={self.num_factors} params={self.params} {self.dtype.name}>"


def initial_values(structs, *, seed: int, dtype=None, noise: float = 0.01) -> list:
    """The paper's start: each row averages its non-zeros, with 1% uniform noise.

    Row i of each factor gets (1 + noise * u) / sum_row(1 + noise * u), u ~ U[0, 1),
    drawn on the CPU from ``seed`` so that every device starts from the same point.
    Returns one torch tensor of ``dtype`` (default float32) per structure.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for s in structs:
        raw = 1.0 + noise * torch.rand(s.nnz, generator=gen, dtype=torch.float64)
        row_sum = torch.zeros(s.n, dtype=torch.float64).index_add_(0, s.rows.cpu(), raw)
        out.append((raw / row_sum[s.rows.cpu()]).to(dtype))
    return out
