"""Render sfa's results: rich tables for the terminal (JSON is the dicts as they are)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.table import Table
from rich.text import Text

from sfa_cli.errors import SfaError
from sfa_cli.io import atomic_output, check_writable

__all__ = [
    "info_table", "info_tables", "info_notes", "INFO_COLUMNS_MAX", "key_value_table", "fit_table", "compare_table",
    "compare_rows", "write_csv", "write_json", "require_matplotlib", "plot_comparisons", "save_approximations",
]

INFO_COLUMNS_MAX = 4
"""Most matrices side by side in one table of ``info_tables``."""


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
        table.add_column(Text(_label(info)), justify="right", overflow="fold")
    for label, cell in _MATRIX_FIGURES:
        table.add_row(label, *(cell(info) for info in infos))
    table.add_section()
    for label, cell in _BUDGET_FIGURES:
        table.add_row(label, *(cell(info) for info in infos))
    return table


def info_tables(infos: list[dict], per_table: int = INFO_COLUMNS_MAX) -> list[Table]:
    """``info_table`` for each run of `per_table` matrices, so every table fits 80 columns."""
    return [info_table(infos[k:k + per_table]) for k in range(0, len(infos), per_table)]


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
    rank = f"{info['rank']:,}"
    return f"~{rank} (estimate)" if info["rank_is_estimate"] else rank


_MATRIX_FIGURES = (
    ("N", lambda i: f"{i['n']:,}"),
    ("nnz", lambda i: f"{i['nnz']:,}"),
    ("density", lambda i: f"{i['density']:.3%}"),
    ("dtype", lambda i: i["dtype"]),
    ("storage", lambda i: i["storage"]),
    ("symmetric", lambda i: "yes" if i["symmetric"] else "no"),
    ("Frobenius norm", lambda i: f"{i['fro_norm']:.6g}"),
    ("rank", _rank),
)

_BUDGET_FIGURES = (
    ("factors M", lambda i: str(i["budget"]["factors"])),
    ("nnz per row L+1", lambda i: str(i["budget"]["nnz_per_row"])),
    ("params (budget)", lambda i: f"{i['budget']['params']:,}"),
    ("TSVD rank", lambda i: str(i["budget"]["tsvd_rank"])),
    ("TSVD energy", lambda i: f"{i['tsvd_energy']:.4%}"),
)


# -- fit, eval, compare ---------------------------------------------------------------
def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
    return str(value)


def key_value_table(row: dict, title: str | None = None, keys=None) -> Table:
    """A two-column table of a flat record."""
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key in keys or row:
        if key in row:
            table.add_row(key, _fmt(row[key]))
    return table


FIT_KEYS = ("path", "output", "method", "n", "factors", "budget", "params", "compression", "rel_error", "tsvd_rank",
            "tsvd_rel_error", "iterations", "evaluations", "seconds", "device", "dtype", "optimizer", "stopped_because",
            "note")


def fit_table(summary: dict) -> Table:
    """The summary of `sfa fit`."""
    return key_value_table(summary, title="sfa fit", keys=FIT_KEYS)


def compare_table(path: str, comparison) -> Table:
    """One row per (budget, method); the best method at each budget is marked."""
    table = Table(title=f"{path}  (n={comparison.n}, nnz={comparison.nnz})", title_justify="left")
    sweep = len(comparison.budgets) > 1
    if sweep:
        table.add_column("budget", justify="right")
    for name, justify in (("method", "left"), ("params", "right"), ("compression", "right"),
                          ("rel. error", "right"), ("seconds", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column("note", ratio=1)
    for r in comparison.results:
        best = comparison.best(r.budget)
        mark = " *" if best is not None and r is best else ""
        cells = [
            r.method + mark,
            _fmt(r.params),
            f"{comparison.n**2 / r.params:.1f}x" if r.params else "-",
            f"{r.rel_error:.4g}" if r.rel_error is not None else ("n/a" if r.status == "not applicable" else r.status),
            f"{r.seconds:.2f}",
            r.note,
        ]
        table.add_row(*([str(r.budget)] if sweep else []), *cells, style="bold green" if mark else None)
    return table


CSV_COLUMNS = ("path", "n", "budget", "method", "params", "rel_error", "seconds", "status", "note")


def compare_rows(done) -> list[dict]:
    """Rows for CSV: one per (matrix, budget, method)."""
    return [{"path": path, "n": c.n, **r.to_dict()} for path, c in done for r in c.results]


def write_csv(path, rows, columns=CSV_COLUMNS) -> None:
    """Write rows as CSV atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_json(path, obj) -> None:
    """Write one JSON document atomically."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def require_matplotlib():
    """Import matplotlib (Agg backend) or say how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SfaError("--plot needs matplotlib: pip install 'sfa[plot]' (or pip install matplotlib)") from None
    return plt


def plot_comparisons(path, done) -> None:
    """Bar charts of the errors, or error-versus-parameters curves for a sweep."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(done), figsize=(5 * len(done), 4), squeeze=False)
    for ax, (name, c) in zip(axes[0], done):
        ok = [r for r in c.results if r.status == "ok"]
        if len(c.budgets) > 1:
            for method in dict.fromkeys(r.method for r in ok):
                pts = sorted((r.params, max(r.rel_error, 1e-16)) for r in ok if r.method == method)
                ax.plot(*zip(*pts), marker="o", label=method)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("parameters")
            ax.legend(fontsize=8)
        else:
            ax.bar([r.method for r in ok], [r.rel_error for r in ok])
            ax.tick_params(axis="x", rotation=45)
        ax.set_ylabel("relative error")
        ax.set_title(f"{Path(name).name} (n={c.n})")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def save_approximations(directory, matrix_path, comparison, force: bool) -> list[Path]:
    """Save every kept approximation as DIR/<matrix stem>.<method>[.b<budget>].npz."""
    directory = Path(directory)
    stem = Path(str(matrix_path).split(":")[0]).name.split(".")[0]
    written = []
    for r in comparison.results:
        if r.approximation is None:
            continue
        suffix = f".b{r.budget}" if len(comparison.budgets) > 1 else ""
        target = directory / f"{stem}.{r.method}{suffix}.npz"
        check_writable(target, force)
        r.approximation.save(target)
        written.append(target)
    return written
