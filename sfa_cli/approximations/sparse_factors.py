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

Products: a block of columns goes through :func:`sfa_cli.approximations.kernels.chain_apply`, the
fit's per-factor kernels on torch views of the numpy arrays; a single column through scipy's compiled
DIA (circulant factors) or CSR loops, one factor at a time, where torch's cost per call would exceed
the product itself. Where the cost model says the dense product is faster (small n, many
parameters), ``@`` multiplies by the materialized matrix (:meth:`Approximation.prefers_dense`).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings

import numpy as np
import scipy.sparse as sp

from sfa_cli.approximations.base import CALL_SECONDS, SPARSE_FMA_RATE, Approximation, StoredArrays
from sfa_cli.errors import SfaError
from sfa_cli.approximations.patterns import Pattern
from sfa_cli.validation import as_csr

__all__ = ["SparseFactors", "pattern_structures", "initial_values"]

#: The cost model of a single column (docs/apply.md): scipy's DIA/CSR matrix-vector loop costs
#: about this much per factor, plus the non-zeros at VECTOR_FMA_RATE.
VECTOR_CALL_SECONDS = 2e-6
VECTOR_FMA_RATE = 5e9
#: Columns per kernel call in the model of a block product (kernels.apply_width gives 16-64).
MODEL_WIDTH = 32
#: A block product asks the compile policy (kernels.compiling_pays) once this object has spent this
#: many seconds in block products of one dtype (ski rental: what was spent is what is expected).
COMPILE_ASK_AFTER_SECONDS = 1.0


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
        self._params = int(sum(W.nnz for W in self.factors))  # read by every product's cost model
        self.pattern = dict(pattern or {"name": method})
        self._torch_cache: dict = {}
        self._vector_cache: dict = {}
        self._apply_cache: dict = {}  # per torch dtype: chain_apply's prepared operands
        self._block_seconds: dict = {}  # per torch dtype: seconds spent in block products
        self._compile_approved: set = set()
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
        return self._params

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

        A block of float32/float64 columns goes through :func:`kernels.chain_apply` (the fit's
        kernels) on a torch view of X, no copy when X already has the product's dtype; one column
        through scipy's compiled products, circulant factors as DIA matrices
        (:meth:`_vector_factors`). Torch tensors (any device, with gradients) go through
        `torch_chain` + kernels.chain_matmul.
        """
        keep = self.num_factors - 1 if skip_last else self.num_factors
        dtype = np.result_type(X.dtype, self.dtype)
        if keep == 0:
            return np.array(X, dtype=dtype)
        vector = X.ndim == 1 or X.shape[1] == 1
        if not vector and dtype in (np.float32, np.float64):
            return self._block_product(X.astype(dtype, copy=False), transpose, keep)
        if vector:
            order = self._vector_factors(transpose)
            if dtype == self.dtype and _matvec is not None:
                return _vector_chain(order[1:] if skip_last else order, X, self.n, dtype)
        else:
            order = [W.T for W in self.factors] if transpose else list(reversed(self.factors))
        Y = X
        for W in order[1:] if skip_last else order:
            Y = W @ Y
        return np.asarray(Y)

    def _block_product(self, X: np.ndarray, transpose: bool, keep: int) -> np.ndarray:
        import torch

        from sfa_cli.approximations.kernels import chain_apply

        tdtype = torch.float32 if X.dtype == np.float32 else torch.float64
        structs, values = self.torch_chain(dtype=tdtype)
        if min(X.strides) < 0:
            X = np.ascontiguousarray(X)
        if X.flags.writeable:
            Xt = torch.from_numpy(X)
        else:  # torch warns that it could write to it; chain_apply only reads
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                Xt = torch.from_numpy(X)
        start = time.perf_counter()
        with self._compile_approval(structs[:keep], tdtype):
            Y = chain_apply(structs[:keep], values[:keep], Xt, transpose, cache=self._apply_cache.setdefault(tdtype, {}))
        self._block_seconds[tdtype] = self._block_seconds.get(tdtype, 0.0) + time.perf_counter() - start
        return Y.numpy()

    def _compile_approval(self, structs, tdtype):
        """The compile policy's say for this product: in ``auto`` mode the compiled circulant kernels are
        used once :func:`kernels.compiling_pays` finds that the seconds this object already spent in block
        products (the expectation for what follows) repay compiling; elsewhere the policy stands."""
        from sfa_cli.approximations import kernels

        if kernels.compile_settings.enabled is not None or not hasattr(kernels, "compile_decision"):
            return contextlib.nullcontext()
        if tdtype not in self._compile_approved:
            spent = self._block_seconds.get(tdtype, 0.0)
            if spent < COMPILE_ASK_AFTER_SECONDS or not kernels.compiling_pays(
                    structs, [kernels.apply_width(self.n, tdtype.itemsize, compiled=True)], tdtype, "cpu", spent):
                return contextlib.nullcontext()
            self._compile_approved.add(tdtype)
        return _approved(kernels)

    def product_seconds(self, b: int) -> float:
        """Modelled seconds of the chain's product with b columns (see :mod:`sfa_cli.approximations.base`):
        one column costs VECTOR_CALL_SECONDS a factor plus the non-zeros at VECTOR_FMA_RATE; a block,
        one call a factor per MODEL_WIDTH columns plus params * b at SPARSE_FMA_RATE."""
        if b <= 1:
            return self.num_factors * VECTOR_CALL_SECONDS + self.params / VECTOR_FMA_RATE
        return self.num_factors * math.ceil(b / MODEL_WIDTH) * CALL_SECONDS + self.params * b / SPARSE_FMA_RATE

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


try:  # scipy's compiled loops themselves: `W @ x` adds 3-4 us of checks a factor, twice the product at n = 1024
    from scipy.sparse import _sparsetools

    _matvec = (_sparsetools.dia_matvec, _sparsetools.csr_matvec)
except (ImportError, AttributeError):  # a scipy without them: `W @ x`
    _matvec = None


def _vector_chain(order, x: np.ndarray, n: int, dtype) -> np.ndarray:
    """The factors in ``order`` (DIA or CSR matrices of ``dtype``) applied to one column, by scipy's loops."""
    global _matvec
    y = np.ascontiguousarray(x.reshape(-1), dtype=dtype)
    try:
        for W in order:
            out = np.zeros(n, dtype=dtype)
            if W.format == "dia":
                _matvec[0](n, n, len(W.offsets), W.data.shape[1], W.offsets, W.data, y, out)
            else:
                _matvec[1](n, n, W.indptr, W.indices, W.data, y, out)
            y = out
    except (TypeError, ValueError):  # the private signature changed: the public product from now on
        _matvec = None
        y = np.ascontiguousarray(x.reshape(-1), dtype=dtype)
        for W in order:
            y = W @ y
    return y.reshape(n, 1)


@contextlib.contextmanager
def _approved(kernels):
    with kernels.compile_decision() as settings:
        settings.approved = True
        yield


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
