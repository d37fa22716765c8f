"""Render sfa's results: rich tables for the terminal (JSON is the dicts as they are)."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

__all__ = ["info_table", "info_notes"]


def info_table(infos: list[dict]) -> Table:
    """One column per matrix, one row per figure of :func:`sfa_cli.info.matrix_info`.

    Parameters
    ----------
    infos : list of dict
        Results of ``matrix_info``, in the order to show them.
    """
    table = Table(title="Matrix info", title_justify="left")
    table.add_column("", style="bold")
    for info in infos:
        # Text, not str: a file name like "a[1].npz" must not be read as markup.
        table.add_column(Text(_label(info)), justify="right")
    for label, cell in _MATRIX_ROWS:
        table.add_row(label, *(cell(info) for info in infos))
    table.add_section()
    for label, cell in _BUDGET_ROWS:
        table.add_row(label, *(cell(info) for info in infos))
    return table


def info_notes(infos: list[dict]) -> list[str]:
    """Plain sentences to print under the info table (sparse storage already exact)."""
    return [
        f"storing {_label(info)} as sparse is already exact: nnz <= budget "
        f"({info['nnz']:,} <= {info['budget']['params']:,})"
        for info in infos
        if info["sparse_is_exact"]
    ]


def _label(info: dict) -> str:
    """Column heading: the file name (with its key), or "A" without a path."""
    path = info.get("path")
    return Path(path).name if path else "A"


def _rank(info: dict) -> str:
    """``448``, or ``~448 (estimate)`` when only leading singular values were used."""
    return f"~{info['rank']} (estimate)" if info["rank_is_estimate"] else str(info["rank"])


_MATRIX_ROWS = (
    ("N", lambda i: f"{i['n']:,}"),
    ("nnz", lambda i: f"{i['nnz']:,}"),
    ("density", lambda i: f"{i['density']:.3%}"),
    ("dtype", lambda i: i["dtype"]),
    ("storage", lambda i: i["storage"]),
    ("symmetric", lambda i: "yes" if i["symmetric"] else "no"),
    ("Frobenius norm", lambda i: f"{i['fro_norm']:.6g}"),
    ("rank", _rank),
)

_BUDGET_ROWS = (
    ("factors M", lambda i: str(i["budget"]["factors"])),
    ("nnz per row L+1", lambda i: str(i["budget"]["nnz_per_row"])),
    ("params (budget)", lambda i: f"{i['budget']['params']:,}"),
    ("TSVD rank", lambda i: str(i["budget"]["tsvd_rank"])),
    ("TSVD energy", lambda i: f"{i['tsvd_energy']:.4%}"),
)
