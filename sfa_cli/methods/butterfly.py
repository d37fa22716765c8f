"""Closed-form butterfly factorization: hierarchical two-factor splits solved by rank-1 SVDs.

The butterfly pattern (:func:`sfa_cli.approximations.patterns.butterfly_pattern`) has, for n = 2^L, M <= L
factors; factor m (0 = leftmost, W(1)) links row i with columns i and i XOR 2^(L-1-m), so
W(1) mixes the most significant bit of the index. These are the "butterfly supports"
S_l = I_{2^(l-1)} (x) 1_{2x2} (x) I_{n/2^l} of Le, Zheng, Riccietti and Gribonval, "Fast
learning of fast transforms, with guarantees" (ICASSP 2022), in the same order: sfa's factor
m is their S_(m+1), with no bit reversal and no permutation.

Why it works: the product of factors p..q-1 links i and j only when they agree outside
the bits p..q-1 (counted from the most significant). Split those bits at r into a high
group (p..r-1) and a low group (r..q-1). Column k of the left part and row k of the right
part then cover disjoint rectangles of the segment, one per k: rows that differ from k only
in the high group, columns that differ from k only in the low group. The best
two-factor approximation is therefore one rank-1 truncated SVD per rectangle, all independent
and all the same size, so one batched ``np.linalg.svd`` solves a whole split. Splitting each
part again down to single bits (a balanced tree, which kept the error on noisy products far
closer to the noise than peeling one factor at a time: docs/butterfly.md) gives the M
factors. A butterfly product is recovered exactly (every split is then exact); on other
matrices the result is rescaled by the best scalar, so its error is never above 1.

Fewer factors than L (a budget below the full butterfly): sfa's pattern with M factors mixes
only the M most significant bits, so its products are exactly the block matrices that link i
and j when they agree on the L - M low bits. The same tree on that segment is the closed form
for it; the entries of A outside the segment are out of reach of every M-factor product.

Compact layout: a matrix on the segment of bits p..q-1 is stored as an array
``S[h, gi, gj, l]`` of shape (2^p, 2^(q-p), 2^(q-p), 2^(L-q)) holding entry
``(h, gi, l), (h, gj, l)`` (bit groups written most significant first).

Example
-------
>>> import numpy as np, scipy.linalg
>>> from sfa_cli.metrics import relative_error
>>> H = scipy.linalg.hadamard(64).astype(float)
>>> F = butterfly_closed_form(H)
>>> F
<SparseFactors butterfly n=64 factors=6 params=768 float64>
>>> relative_error(H, F) < 1e-12
True
"""
from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp

from sfa_cli.errors import NotApplicable, SfaError
from sfa_cli.validation import validates_matrix
from sfa_cli.approximations.sparse_factors import SparseFactors
from sfa_cli.engine.fit import fit
from sfa_cli.memory import require_memory
from sfa_cli.engine.optimize import EXACT_REL_ERROR
from sfa_cli.approximations.patterns import butterfly_pattern

__all__ = ["butterfly_closed_form"]

#: Elements of the stacked blocks handed to one ``np.linalg.svd`` call (32 MiB in float64):
#: bounds the SVD's work arrays at large n.
SVD_CHUNK_ELEMENTS = 1 << 22


@validates_matrix
def butterfly_closed_form(
    A,
    *,
    factors: int | None = None,
    dtype=np.float64,
    polish_iter: int = 0,
    time_limit: float | None = None,
    device: str = "auto",
    callback=None,
) -> SparseFactors:
    """Butterfly factors of A by hierarchical rank-1 SVDs, with an optional gradient polish.

    Parameters
    ----------
    A : ndarray or scipy sparse matrix of shape (n, n)
        n a power of two; a sparse A is densified (the method reads every entry).
    factors : int, default=log2 n
        Number of factors M, 1 <= M <= log2 n; the result is on ``butterfly_pattern(n, factors=M)``.
    dtype : {np.float64, np.float32}, default=np.float64
        dtype of the returned factors; the SVDs always run in float64.
    polish_iter : int, default=0
        L-BFGS iterations of :func:`sfa_cli.engine.fit.fit` started from the closed form; the
        better of the two (exact relative error, float64) is returned. A closed form within
        the fit's exact stop (relative error 1e-7) is not polished.
    time_limit : float, optional
        Seconds for the polish.
    device : {"auto", "cpu", "cuda"}, default="auto"
        Device of the polish.
    callback : callable, optional
        Passed to the polish fit: ``callback(step: FitStep)``, returning True stops it.

    Returns
    -------
    SparseFactors
        method ``butterfly``; ``info`` holds ``rel_error`` (of the returned factors),
        ``closed_form_rel_error``, ``scale`` (the best scalar applied), ``seconds``,
        ``note``, and with a polish ``polish_rel_error`` and ``polish_iterations``.

    Raises
    ------
    NotApplicable
        n is not a power of two.
    SfaError
        A is not a finite square matrix, is all zeros, or an option is out of range.
    """
    t0 = time.perf_counter()
    n = A.shape[0]
    if n & (n - 1):
        raise NotApplicable(f"the closed-form butterfly needs n to be a power of two; n={n}")
    L = n.bit_length() - 1
    M = L if factors is None else _check_int(factors, "factors", 1, L)
    out_dtype = _check_dtype(dtype)
    polish_iter = _check_int(polish_iter, "polish_iter", 0, None)
    if time_limit is not None and not time_limit > 0:
        raise SfaError(f"time_limit must be positive; got {time_limit}")

    # a float64 dense copy of A unless it is one already, and about four arrays the size of the
    # pattern's support (n 2^M entries): the segment, its rectangles, the SVD's output, the product
    copy = 0 if isinstance(A, np.ndarray) and A.dtype == np.float64 else 8 * n * n
    require_memory(copy + 4 * 8 * n * 2**M,
                   f"the closed-form butterfly of the {n} x {n} matrix",
                   "use the gradient fit (sfa fit --pattern butterfly --sampled)", dtype="float64")
    dense = A.toarray() if sp.issparse(A) else A
    dense = np.asarray(dense, dtype=np.float64)
    norm_sq = float(np.sum(dense * dense))
    if norm_sq == 0.0:
        raise SfaError("the matrix is all zeros; there is nothing to approximate")
    target = _support(dense, M)
    del dense

    leaves = _factor_segment(target, M)
    product = _product(leaves)
    # The best scalar multiple: exact products keep scale 1; elsewhere it caps the error at 1.
    product_sq = float(np.sum(product * product))
    scale = float(np.sum(target * product)) / product_sq if product_sq > 0 else 0.0
    leaves = _balanced(leaves, scale)
    values = [_csr_values(C).astype(out_dtype) for C in leaves]
    closed = _error(target, norm_sq, [_leaf_from_values(v, n, m) for m, v in enumerate(values)])

    pattern = butterfly_pattern(n, factors=M)
    info = {"rel_error": closed, "closed_form_rel_error": closed, "scale": scale,
            "note": f"closed form (hierarchical rank-1 SVDs), {M} of {L} factors"}
    best = SparseFactors.from_pattern(pattern, values, info=info)
    if polish_iter > 0 and closed > EXACT_REL_ERROR:  # an exact closed form has nothing to polish
        result = fit.trusted(A, pattern=pattern, init=best, max_iter=polish_iter, time_limit=time_limit,
                     device=device, dtype=out_dtype.name, callback=callback)
        polished = result.approximation
        rel = _error(target, norm_sq, _leaves_from_factors(polished))
        info.update(polish_rel_error=rel, polish_iterations=result.iterations)
        if rel < closed:
            info.update(rel_error=rel, note=info["note"] + f", polished by {result.iterations} L-BFGS iterations")
            best = SparseFactors(polished.factors, method="butterfly", pattern=pattern.to_dict(), info=info)
        if result.interrupted:
            raise KeyboardInterrupt
    best.info.update(info, seconds=time.perf_counter() - t0)
    return best


# -- validation ------------------------------------------------------------------------------
def _check_int(value, name: str, low: int, high: int | None) -> int:
    if isinstance(value, bool) or int(value) != value or value < low or (high is not None and value > high):
        bounds = f"{low} to {high}" if high is not None else f">= {low}"
        raise SfaError(f"{name} must be an integer {bounds}; got {value!r}")
    return int(value)


def _check_dtype(dtype) -> np.dtype:
    try:
        out = np.dtype(dtype)
    except TypeError:
        out = None
    if out not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise SfaError(f"dtype must be float32 or float64; got {dtype!r}")
    return out


# -- the hierarchy in compact layout ----------------------------------------------------------
def _support(dense: np.ndarray, M: int) -> np.ndarray:
    """A's entries on the M-factor pattern's support: shape (1, 2^M, 2^M, n / 2^M)."""
    n = dense.shape[0]
    G, low = 2**M, n >> M
    if low == 1:
        return dense.reshape(1, n, n, 1)
    blocks = dense.reshape(G, low, G, low)
    diagonal = np.arange(low)
    # advanced indices separated by a slice go first: result [l, gi, gj]
    return np.ascontiguousarray(blocks[:, diagonal, :, diagonal].transpose(1, 2, 0))[None]


def _balanced_tree(bits: int) -> int:
    return bits // 2


def _factor_segment(S: np.ndarray, bits: int, tree=_balanced_tree) -> list[np.ndarray]:
    """Leaves (H, 2, 2, Lo), one per bit, whose butterfly product approximates segment S.

    ``tree(bits)`` is how many high bits go to the left part of a split (scripts/bench_recovery.py
    --tree-study compares the balanced tree with peeling one factor at a time).
    """
    if bits == 1:
        return [S]
    high = tree(bits)
    X, Y = _split(S, 2**high, 2 ** (bits - high))
    return _factor_segment(X, high, tree) + _factor_segment(Y, bits - high, tree)


def _split(S: np.ndarray, G1: int, G2: int) -> tuple[np.ndarray, np.ndarray]:
    """The best two-factor split of segment S: one rank-1 SVD per rectangle.

    S has shape (H, G1 G2, G1 G2, Lo); returns X of shape (H, G1, G1, G2 Lo) (the high bits)
    and Y of shape (H G1, G2, G2, Lo) (the low bits).
    """
    H, Lo = S.shape[0], S.shape[3]
    # rectangle k = (h, g2k, g1k, l) holds S[h, (g1i, g2k), (g1k, g2j), l] over rows g1i, columns g2j
    blocks = S.reshape(H, G1, G2, G1, G2, Lo).transpose(0, 2, 3, 5, 1, 4).reshape(-1, G1, G2)
    u = np.empty((blocks.shape[0], G1))
    v = np.empty((blocks.shape[0], G2))
    step = max(1, SVD_CHUNK_ELEMENTS // (G1 * G2))
    for start in range(0, blocks.shape[0], step):
        U, s, Vt = np.linalg.svd(blocks[start:start + step], full_matrices=False)
        root = np.sqrt(s[:, :1])
        u[start:start + step] = U[:, :, 0] * root
        v[start:start + step] = Vt[:, 0, :] * root
    u = u.reshape(H, G2, G1, Lo, G1)  # h, g2k, g1k, l, g1i
    v = v.reshape(H, G2, G1, Lo, G2)  # h, g2k, g1k, l, g2j
    X = u.transpose(0, 4, 2, 1, 3).reshape(H, G1, G1, G2 * Lo)
    Y = v.transpose(0, 2, 1, 4, 3).reshape(H * G1, G2, G2, Lo)
    return X, Y


def _combine(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """The product of a high-bits part X and a low-bits part Y, in the compact layout of their segment."""
    H, G1 = X.shape[:2]
    G2, Lo = Y.shape[1], Y.shape[3]
    X = X.reshape(H, G1, G1, G2, Lo)  # h, g1i, g1k, g2k, l
    Y = Y.reshape(H, G1, G2, G2, Lo)  # h, g1k, g2k, g2j, l
    T = np.einsum("haksl,hksjl->haskjl", X, Y)  # one term per entry: no sum over k
    return T.reshape(H, G1 * G2, G1 * G2, Lo)


def _product(leaves: list[np.ndarray]) -> np.ndarray:
    """The product of consecutive leaves, recombined along the same balanced tree."""
    if len(leaves) == 1:
        return leaves[0]
    high = len(leaves) // 2
    return _combine(_product(leaves[:high]), _product(leaves[high:]))


def _balanced(leaves: list[np.ndarray], scale: float) -> list[np.ndarray]:
    """Leaves times scalars whose product is ``scale``, every leaf with the same norm."""
    norms = [float(np.linalg.norm(C)) for C in leaves]
    if scale == 0.0 or min(norms) == 0.0:
        return [np.zeros_like(C) for C in leaves]
    common = math.exp((sum(math.log(c) for c in norms) + math.log(abs(scale))) / len(leaves))
    out = [C * (common / c) for C, c in zip(leaves, norms)]
    if scale < 0:
        out[0] = -out[0]
    return out


def _error(target: np.ndarray, norm_sq: float, leaves: list[np.ndarray]) -> float:
    """Relative Frobenius error of the leaves' product against A (whose support is ``target``)."""
    residual = target - _product(leaves)
    outside = norm_sq - float(np.sum(target * target))  # entries no product on the pattern reaches
    return math.sqrt(max(outside, 0.0) + float(np.sum(residual * residual))) / math.sqrt(norm_sq)


# -- compact leaves <-> CSR values on the butterfly pattern ------------------------------------
def _csr_values(C: np.ndarray) -> np.ndarray:
    """Leaf (H, 2, 2, Lo) as the factor's CSR values: row (h, a, l), columns (h, 0, l) < (h, 1, l)."""
    return C.transpose(0, 1, 3, 2).reshape(-1)


def _leaf_from_values(values: np.ndarray, n: int, m: int) -> np.ndarray:
    """Inverse of :func:`_csr_values` for factor m (0 = leftmost), in float64."""
    H = 2**m
    return np.asarray(values, dtype=np.float64).reshape(H, 2, n // (2 * H), 2).transpose(0, 1, 3, 2)


def _leaves_from_factors(F: SparseFactors) -> list[np.ndarray]:
    """The compact leaves of factors on the butterfly pattern (as built by ``from_pattern``)."""
    if any(W.nnz != 2 * F.n for W in F.factors):
        raise SfaError(f"{F!r} does not store the butterfly pattern's 2 entries per row")
    return [_leaf_from_values(W.data, F.n, m) for m, W in enumerate(F.factors)]
