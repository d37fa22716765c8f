"""Sparsity patterns of the factor chain, as tables of column indices.

A pattern gives, for each of the M factors, an ``(n, k)`` integer table: row
``i`` of factor ``m`` has its non-zeros at columns ``tables[m][i, :]``. This
"ELL" layout (a fixed number of non-zeros per row) is what the kernels in
:mod:`sfa_cli.approximations.kernels` gather from, on CPU and CUDA alike.

Example
-------
>>> p = chord_pattern(8)
>>> p.factors, p.nnz_per_row, p.params
(3, 4, 96)
>>> p.tables[0][0].tolist()        # row 0: self link, then 0+1, 0+2, 0+4
[0, 1, 2, 4]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sfa_cli.errors import NotApplicable, SfaError

__all__ = [
    "Pattern",
    "chord_offsets",
    "chord_pattern",
    "butterfly_pattern",
    "chord_budget",
    "resolve_budget",
    "chord_at_budget",
    "butterfly_at_budget",
    "tsvd_rank_at_budget",
    "PATTERNS",
]


def _floor_log(n: int, base: int) -> int:
    """Largest L with base**L <= n (integer arithmetic, no float rounding)."""
    L, p = 0, 1
    while p * base <= n:
        p *= base
        L += 1
    return L


def _ceil_log(n: int, base: int) -> int:
    """Smallest M with base**M >= n."""
    M, p = 0, 1
    while p < n:
        p *= base
        M += 1
    return M


def _check_n(n: int) -> int:
    n = int(n)
    if n < 2:
        raise SfaError(f"a pattern needs n >= 2; got n={n}")
    return n


def _check_base(base: int) -> int:
    base = int(base)
    if base < 2:
        raise SfaError(f"base must be an integer >= 2; got {base}")
    return base


@dataclass(frozen=True)
class Pattern:
    """Where the non-zeros of each factor are.

    Attributes
    ----------
    name : str
        ``"chord"``, ``"butterfly"`` or ``"learned"``.
    n : int
        Matrix size.
    tables : tuple of ndarray of shape (n, k_m), dtype int64
        Column indices of the non-zeros of row i of factor m (factor 0 is the
        leftmost, W(1)). Entries of a row are distinct.
    options : dict
        The options that built the pattern, stored in factor files.
    """

    name: str
    n: int
    tables: tuple
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        for m, t in enumerate(self.tables):
            if t.ndim != 2 or t.shape[0] != self.n:
                raise ValueError(f"pattern table {m} has shape {t.shape}; expected ({self.n}, k)")

    @property
    def factors(self) -> int:
        return len(self.tables)

    @property
    def nnz_per_row(self) -> int:
        """Non-zeros per row of the widest factor."""
        return max(t.shape[1] for t in self.tables)

    @property
    def params(self) -> int:
        """Stored numbers: the non-zeros of all factors."""
        return int(sum(t.size for t in self.tables))

    def to_dict(self) -> dict:
        return {"name": self.name, **self.options}

    def __repr__(self) -> str:
        return f"<Pattern {self.name} n={self.n} factors={self.factors} nnz_per_row={self.nnz_per_row}>"


def chord_offsets(n: int, base: int = 2, *, symmetric: bool = False, self_link: bool = True) -> np.ndarray:
    """Column offsets of a Chord row: 0 (self link) and +-base**k mod n, k < L.

    L = floor(log_base n). Offsets that coincide modulo n are merged, so
    every offset appears once; the order is the self link, then +b^k, then -b^k.
    """
    n, base = _check_n(n), _check_base(base)
    L = _floor_log(n, base)
    cand = [0] if self_link else []
    cand += [base**k % n for k in range(L)]
    if symmetric:
        cand += [(-(base**k)) % n for k in range(L)]
    seen: dict[int, None] = {}
    for c in cand:
        seen.setdefault(int(c), None)
    if not self_link:
        seen.pop(0, None)
    if not seen:
        raise SfaError(f"the Chord pattern for n={n}, base={base} without self link is empty")
    return np.fromiter(seen, dtype=np.int64)


def chord_pattern(
    n: int,
    *,
    factors: int | None = None,
    base: int = 2,
    symmetric: bool = False,
    self_link: bool = True,
    permute: int | None = None,
) -> Pattern:
    """The Chord pattern: row i has non-zeros at (i + offset) mod n.

    Parameters
    ----------
    n : int
        Matrix size (any n >= 2; offsets wrap modulo n).
    factors : int, default=ceil(log_base n)
        Number of factors M.
    base : int, default=2
        Offsets are powers of ``base``.
    symmetric : bool, default=False
        Use +b^k and -b^k.
    self_link : bool, default=True
        Include the diagonal.
    permute : int or None, default=None
        Seed of a random relabelling of the nodes: the pattern becomes
        Q C Q^T for a permutation Q (same for every factor).
    """
    n, base = _check_n(n), _check_base(base)
    M = _ceil_log(n, base) if factors is None else int(factors)
    if M < 1:
        raise SfaError(f"the number of factors must be >= 1; got {M}")
    offsets = chord_offsets(n, base, symmetric=symmetric, self_link=self_link)
    rows = np.arange(n, dtype=np.int64)
    table = (rows[:, None] + offsets[None, :]) % n
    if permute is not None:
        # Node perm[i] plays the role of node i: W[perm[i], perm[j]] = C[i, j].
        perm = np.random.default_rng(int(permute)).permutation(n)
        permuted = np.empty_like(table)
        permuted[perm] = perm[table]
        table = permuted
    table.setflags(write=False)
    options = {
        "base": base,
        "symmetric": bool(symmetric),
        "self_link": bool(self_link),
        "permute": None if permute is None else int(permute),
    }
    return Pattern("chord", n, (table,) * M, options)


def butterfly_pattern(n: int, *, factors: int | None = None) -> Pattern:
    """The butterfly pattern: factor m links i with i XOR 2^(M-1-m).

    n must be a power of two; M = log2 n factors with 2 non-zeros per row.
    """
    n = _check_n(n)
    if n & (n - 1):
        raise SfaError(f"the butterfly pattern needs n to be a power of two; got n={n}")
    L = n.bit_length() - 1
    M = L if factors is None else int(factors)
    if not 1 <= M <= L:
        raise SfaError(f"the butterfly pattern for n={n} has 1 to {L} factors; got {M}")
    rows = np.arange(n, dtype=np.int64)
    tables = []
    for m in range(M):
        t = np.stack([rows, rows ^ (1 << (L - 1 - m))], axis=1)
        t.setflags(write=False)
        tables.append(t)
    return Pattern("butterfly", n, tuple(tables), {})


PATTERNS = {"chord": chord_pattern, "butterfly": butterfly_pattern}


def chord_budget(n: int, base: int = 2) -> dict:
    """The paper's parameter budget for size n.

    Returns ``{"factors": M, "nnz_per_row": L + 1, "params": M * n * (L + 1)}``
    with M = ceil(log_base n) and L = floor(log_base n).
    """
    n, base = _check_n(n), _check_base(base)
    M = _ceil_log(n, base)
    K = _floor_log(n, base) + 1
    return {"factors": M, "nnz_per_row": K, "params": M * n * K}


# -- budget arithmetic: every rule that turns a parameter budget into a size lives here --------

def resolve_budget(n: int, budget: float | int | None = None) -> int:
    """Parameters allowed: the Chord budget by default; a value < 1 is a fraction of n^2.

    >>> resolve_budget(64), resolve_budget(64, 0.5), resolve_budget(64, 1000)
    (2688, 2048, 1000)
    """
    if budget is None:
        return chord_budget(n)["params"]
    if isinstance(budget, bool):
        raise SfaError(f"the budget must be a number; got {budget!r}")
    budget = float(budget)
    if not math.isfinite(budget) or budget <= 0:
        raise SfaError(f"the budget must be positive; got {budget:g}")
    if budget < 1:
        return max(1, int(math.floor(budget * n * n)))
    if budget != int(budget):
        raise SfaError(f"a budget >= 1 is a parameter count and must be an integer; got {budget:g}")
    return int(budget)


def tsvd_rank_at_budget(n: int, params: int) -> int:
    """Rank of the truncated SVD that fits in ``params`` numbers: floor(params / 2n), capped at n.

    The one rule for the equal-budget baseline (``info``, ``fit``, ``compare``): a rank-r
    factorization stores 2 n r numbers, so it never overspends. 0 when not even rank 1 fits.

    >>> tsvd_rank_at_budget(77, chord_budget(77)["params"])   # lesmis: 7 factors x 7 per row
    24
    """
    return int(min(n, max(0, int(params) // (2 * int(n)))))


def chord_at_budget(n: int, budget: int, *, symmetric: bool = False, self_link: bool = True) -> tuple[dict, str]:
    """Chord pattern options that fit in ``budget`` parameters, and a note saying which.

    The paper's pattern (base 2, ceil(log2 n) factors) when it fits; otherwise
    the smallest base whose full-reach pattern fits; otherwise fewer base-2 factors.
    Raises :class:`NotApplicable` when not even one factor fits.

    >>> chord_at_budget(64, 6 * 64 * 7)
    ({'base': 2, 'factors': 6}, '')
    """

    def row_nnz(base):
        return len(chord_offsets(n, base, symmetric=symmetric, self_link=self_link))

    full = _ceil_log(n, 2) * n * row_nnz(2)
    if full <= budget:
        return {"base": 2, "factors": _ceil_log(n, 2)}, ""
    for base in range(3, n + 1):
        M = _ceil_log(n, base)
        if M * n * row_nnz(base) <= budget:
            return {"base": base, "factors": M}, f"base {base}, {M} factors: the base-2 pattern needs {full} > budget"
        if M == 1:
            break
    M = budget // (n * row_nnz(2))
    if M < 1:
        raise NotApplicable(f"one Chord factor needs {n * row_nnz(2)} parameters > budget {budget}")
    return {"base": 2, "factors": M}, f"{M} of {_ceil_log(n, 2)} factors: the full pattern needs {full} > budget"


def butterfly_at_budget(n: int, budget: int) -> tuple[dict, str]:
    """Butterfly options (the factor count) that fit in ``budget``, and a note when shortened.

    Raises :class:`NotApplicable` for n not a power of two or a budget below one factor (2n).

    >>> butterfly_at_budget(64, 10**6), butterfly_at_budget(64, 300)
    (({'factors': 6}, ''), ({'factors': 2}, '2 of 6 factors: the full butterfly needs 768 > budget'))
    """
    if n < 2 or n & (n - 1):
        raise NotApplicable(f"butterfly needs n to be a power of two; n={n}")
    L = n.bit_length() - 1
    M = min(L, budget // (2 * n))
    if M < 1:
        raise NotApplicable(f"one butterfly factor needs {2 * n} parameters > budget {budget}")
    note = "" if M == L else f"{M} of {L} factors: the full butterfly needs {2 * n * L} > budget"
    return {"factors": M}, note
