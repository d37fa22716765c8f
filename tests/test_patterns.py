"""Pattern properties: row counts, no duplicates, reachability, options."""
import numpy as np
import pytest

from sfa_cli.errors import SfaError
from sfa_cli.approximations.patterns import butterfly_pattern, chord_budget, chord_offsets, chord_pattern, tsvd_rank_at_budget


def _mask(table, n):
    S = np.zeros((n, n), dtype=np.int64)
    S[np.arange(n)[:, None], table] = 1
    return S


@pytest.mark.parametrize("n", [2, 3, 5, 64, 100, 127, 1000])
def test_chord_rows_counts_and_reachability(n):
    p = chord_pattern(n)
    L = int(np.floor(np.log2(n)))
    assert p.factors == int(np.ceil(np.log2(n)))
    table = p.tables[0]
    assert table.shape == (n, L + 1)
    assert all(len(set(row)) == len(row) for row in table.tolist())
    S = _mask(table, n)
    assert (S.sum(axis=0) == L + 1).all()  # circulant: every column has L+1 non-zeros too
    if n <= 200:
        R = np.eye(n, dtype=np.int64)
        for _ in range(p.factors):
            R = np.minimum(R @ S, 1)
        assert R.min() == 1, "the product of M masks must be dense"


def test_offsets_merge_duplicates_modulo_n():
    # n=4, symmetric: +1, +2, -1=3, -2=2 -> {0, 1, 2, 3}, 2 counted once
    assert chord_offsets(4, symmetric=True).tolist() == [0, 1, 2, 3]
    p = chord_pattern(4, symmetric=True)
    assert p.nnz_per_row == 4


@pytest.mark.parametrize("n,base", [(100, 3), (81, 3), (50, 7)])
def test_base(n, base):
    p = chord_pattern(n, base=base)
    L = 0
    while base ** (L + 1) <= n:
        L += 1
    assert p.tables[0][0].tolist() == [0] + [base**k for k in range(L)]
    assert base ** p.factors >= n > base ** (p.factors - 1)


def test_no_self_link_and_permutation():
    p = chord_pattern(33, self_link=False)
    assert 0 not in (p.tables[0] - np.arange(33)[:, None]) % 33
    q = chord_pattern(33, permute=7)
    base = _mask(chord_pattern(33).tables[0], 33)
    perm = np.random.default_rng(7).permutation(33)
    expected = np.zeros_like(base)
    expected[np.ix_(perm, perm)] = base
    assert (_mask(q.tables[0], 33) == expected).all()
    assert (_mask(chord_pattern(33, permute=7).tables[0], 33) == _mask(q.tables[0], 33)).all()


def test_butterfly():
    p = butterfly_pattern(16)
    assert p.factors == 4 and p.nnz_per_row == 2
    R = np.eye(16, dtype=np.int64)
    for t in p.tables:
        R = np.minimum(R @ _mask(t, 16), 1)
    assert R.min() == 1
    with pytest.raises(SfaError, match="power of two"):
        butterfly_pattern(12)


def test_budget_figures():
    assert chord_budget(1024) == {"factors": 10, "nnz_per_row": 11, "params": 10 * 1024 * 11}
    assert chord_budget(1000)["params"] == 10 * 1000 * 10
    assert chord_pattern(1000).params == chord_budget(1000)["params"]
    assert tsvd_rank_at_budget(1024, chord_budget(1024)["params"]) == 55
    assert tsvd_rank_at_budget(10, 19) == 0 and tsvd_rank_at_budget(10, 10**6) == 10


def test_info_fit_and_compare_size_the_tsvd_baseline_by_one_rule():
    # ceil(M^2 / 2) gave lesmis rank 25, 3850 numbers > the budget 3773
    from pathlib import Path

    from sfa_cli.methods.compare import compare
    from sfa_cli.info import matrix_info
    from sfa_cli.io import load_matrix

    A = load_matrix(Path(__file__).parent.parent / "data" / "lesmis.mtx")
    info = matrix_info(A)
    rank = info["budget"]["tsvd_rank"]
    assert rank == 24 and 2 * 77 * rank <= info["budget"]["params"]
    tsvd = compare(A, methods=["tsvd"]).results[0]
    assert tsvd.params == 2 * 77 * rank
    with pytest.raises(SfaError):
        chord_pattern(1)
