"""Render sfa's results: rich tables for the terminal (JSON is the dicts as they are)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.table import Table
from rich.text import Text

from sfa_cli.errors import SfaError
from sfa_cli.io import atomic_output, check_writable
from sfa_cli.memory import human_bytes

__all__ = [
    "info_table", "info_tables", "info_notes", "INFO_COLUMNS_MAX", "key_value_table", "fit_table", "eval_table",
    "compare_table", "error_text", "show_tables",
    "compare_rows", "write_csv", "write_json", "require_matplotlib", "plot_comparisons", "save_approximations",
    "unique_stems",
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
    """``448``; ``>= 448 (lower bound)`` when every computed singular value is above the tolerance;
    ``~448 (estimate)`` when only leading singular values were used otherwise."""
    rank = f"{info['rank']:,}"
    if info.get("rank_is_lower_bound"):
        return f">= {rank} (lower bound)"
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
            "tsvd_rel_error", "iterations", "evaluations", "epochs", "seconds", "device", "dtype", "optimizer",
            "stopped_because", "peak_memory", "peak_device_memory", "note")
EVAL_KEYS = ("factors", "path", "n", "method", "params", "compression", "rel_error", "products_pay_from")


def error_text(value, ci=None, is_estimate: bool = False, sep: str = " ") -> str:
    """A relative error for a table: ``0.4205``, or ``0.4205 [0.4191, 0.4218]`` for an estimate with its interval."""
    if value is None:
        return "-"
    if is_estimate and ci is not None:
        return f"{value:.4g}{sep}[{ci[0]:.4g}, {ci[1]:.4g}]"
    return f"{value:.4g}"


def _error_rows(row: dict) -> dict:
    """The table rows of ``rel_error``: as it is, or labelled as an estimate with its interval and its sample."""
    if not row.get("rel_error_is_estimate"):
        return {"rel_error": row["rel_error"]} if "rel_error" in row else {}
    rows = {"rel_error (estimate)": error_text(row["rel_error"], row.get("rel_error_ci"), True)}
    columns = row.get("sample_columns") or row.get("error_sample")
    if columns:
        seed = f", seed {row['seed']}" if "seed" in row else ""
        rows["error sample"] = f"{columns} of {row['n']} columns{seed}, {row.get('confidence', 0.95):.0%} CI"
    return rows


def _with_estimates(row: dict, keys) -> tuple[dict, list]:
    """(row, keys) with the error rows labelled as estimates where they are, and memory in binary units."""
    shown, order = {}, []
    for key in keys:
        if key == "rel_error":
            extra = _error_rows(row)
        elif key == "tsvd_rel_error" and row.get("tsvd_rel_error_ci") and row.get("rel_error_is_estimate"):
            extra = {"tsvd_rel_error (estimate)": error_text(row["tsvd_rel_error"], row["tsvd_rel_error_ci"], True)}
        elif key in ("peak_memory", "peak_device_memory"):
            value = row.get(f"{key}_bytes")
            extra = {key: human_bytes(value)} if value else {}
        else:
            extra = {key: row[key]} if key in row else {}
        shown.update(extra)
        order.extend(extra)
    return shown, order


def fit_table(summary: dict) -> Table:
    """The summary of `sfa fit` (an estimated error is labelled as such, with its interval)."""
    shown, keys = _with_estimates(summary, FIT_KEYS)
    return key_value_table(shown, title="sfa fit", keys=keys)


def eval_table(row: dict) -> Table:
    """The result of `sfa eval` (an estimated error is labelled as such, with its interval)."""
    shown, keys = _with_estimates(row, EVAL_KEYS)
    return key_value_table(shown, title="sfa eval", keys=keys)


def compare_table(path: str, comparison) -> Table:
    """One row per (budget, method); the best method at each budget is marked."""
    estimate = comparison.error.get("estimate")
    caption = None
    if estimate:
        e = comparison.error
        caption = (f"rel. error: estimates with {e['confidence']:.0%} intervals from the same {e['sample_columns']} "
                   f"sampled columns (seed {e['seed']}) for every method")
    table = Table(title=f"{path}  (n={comparison.n}, nnz={comparison.nnz})", title_justify="left",
                  caption=caption, caption_justify="left")
    sweep = len(comparison.budgets) > 1
    if sweep:
        table.add_column("budget", justify="right")
    for name, justify in (("method", "left"), ("params", "right"), ("compression", "right"),
                          ("rel. error\n(estimate)" if estimate else "rel. error", "right"), ("seconds", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column("note", ratio=1)
    for r in comparison.results:
        best = comparison.best(r.budget)
        mark = " *" if best is not None and r is best else ""
        cells = [
            r.method + mark,
            _fmt(r.params),
            f"{comparison.n**2 / r.params:.1f}x" if r.params else "-",
            error_text(r.rel_error, r.rel_error_ci, r.rel_error_is_estimate, sep="\n") if r.rel_error is not None
            else ("n/a" if r.status == "not applicable" else r.status),
            f"{r.seconds:.2f}",
            r.note,
        ]
        table.add_row(*([str(r.budget)] if sweep else []), *cells, style="bold green" if mark else None)
    return table


SHOW_KEYS = ("file", "kind", "n", "dtype", "method", "params", "compression", "factors", "pattern", "rank", "blocks",
             "parts", "path", "rel_error", "plot")


def show_tables(summary: dict) -> list[Table]:
    """The tables of `sfa show`: the approximation (and its error), its supports, the facts in its file."""
    row = dict(summary)
    if row.get("parts"):
        row["parts"] = " + ".join(f"{p['kind']} ({p['method']}, {p['params']:,} params)" for p in row["parts"])
    if row.get("compression") is not None:
        row["compression"] = f"{row['compression']:.4g}x"
    shown, keys = _with_estimates(row, SHOW_KEYS)
    tables = [key_value_table(shown, title="sfa show", keys=keys)]
    if summary.get("supports"):
        table = Table(title="supports (stored entries)", title_justify="left")
        table.add_column("matrix", overflow="fold")
        for name in ("shape", "nnz", "density", "nnz/row min", "mean", "max"):
            table.add_column(name, justify="right", no_wrap=True)
        for s in summary["supports"]:
            per_row = s["nnz_per_row"]
            table.add_row(Text(s["name"]), f"{s['shape'][0]:,} x {s['shape'][1]:,}", f"{s['nnz']:,}",
                          f"{s['density']:.3%}", f"{per_row['min']:,}", f"{per_row['mean']:.4g}", f"{per_row['max']:,}")
        tables.append(table)
    if summary.get("info"):
        tables.append(key_value_table(summary["info"], title="recorded in the file"))
    return tables


CSV_COLUMNS = ("path", "n", "budget", "method", "params", "rel_error", "seconds", "status", "note",
               "rel_error_is_estimate", "rel_error_ci_low", "rel_error_ci_high", "sample_columns")


def compare_rows(done) -> list[dict]:
    """Rows for CSV: one per (matrix, budget, method); an estimate's interval in two columns."""
    rows = []
    for path, c in done:
        for r in c.results:
            row = {"path": path, "n": c.n, **r.to_dict()}
            low, high = row.pop("rel_error_ci") or (None, None)
            rows.append({**row, "rel_error_ci_low": low, "rel_error_ci_high": high})
    return rows


def write_csv(path, rows, columns=CSV_COLUMNS, *, force: bool = True) -> None:
    """Write rows as CSV atomically (without ``force``, refusing a file another run wrote meanwhile)."""
    with atomic_output(path, force=force) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_json(path, obj, *, force: bool = True) -> None:
    """Write one JSON document atomically (without ``force``, refusing a file another run wrote meanwhile)."""
    with atomic_output(path, force=force) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def require_matplotlib():
    """Import matplotlib (Agg backend) or say how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SfaError("--plot needs matplotlib: pip install 'sfa-cli[plot]' (or pip install matplotlib)") from None
    return plt


def plot_comparisons(path, done, *, force: bool = True) -> None:
    """Bar charts of the errors on a log scale, or error-versus-parameters curves for a sweep.

    An exact result (error 0) is drawn at the axis' floor and labelled "exact"; a method that
    does not apply (or failed) has no bar and is labelled "n/a" (or "failed") in its place.
    """
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(done), figsize=(5 * len(done), 4), squeeze=False)
    for ax, (name, c) in zip(axes[0], done):
        ok = [r for r in c.results if r.status == "ok"]
        positive = [r.rel_error for r in ok if r.rel_error > 0]
        floor = min(positive) / 10 if positive else 1e-16
        if len(c.budgets) > 1:
            for method in dict.fromkeys(r.method for r in ok):
                pts = sorted((r.params, max(r.rel_error, floor)) for r in ok if r.method == method)
                ax.plot(*zip(*pts), marker="o", label=method)
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.legend(fontsize=8)
        else:
            shown = [r for r in c.results if r.budget == c.budgets[0]]
            names = [r.method for r in shown]
            heights = [max(r.rel_error, floor) if r.status == "ok" else 0 for r in shown]
            ax.bar(names, heights, bottom=None)
            for i, r in enumerate(shown):
                label = ("exact" if r.rel_error == 0 else None) if r.status == "ok" else (
                    "n/a" if r.status == "not applicable" else r.status)
                if label:
                    ax.annotate(label, (i, floor), ha="center", va="bottom", fontsize=8, rotation=90)
            ax.tick_params(axis="x", rotation=45)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor / 2)
        ax.set_ylabel("relative error (log scale)")
        ax.set_title(f"{Path(name).name} (n={c.n})")
    fig.tight_layout()
    with atomic_output(path, force=force) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _stem(spec: str) -> str:
    """A file-name stem for an input spec: its base name without extensions, plus the key of
    ``file.npz:KEY`` (a key's slashes become underscores)."""
    from sfa_cli.io import split_spec

    path, key = split_spec(str(spec))
    base = Path(path).name.split(".")[0] or "matrix"
    key = (key or "").strip("/").replace("/", "_")
    return f"{base}.{key}" if key else base


def unique_stems(specs) -> dict:
    """Stems for :func:`save_approximations` that never collide within one run: a stem shared by
    several inputs (``a/x.mtx`` and ``b/x.mtx``) gets ``-2``, ``-3``, ... in input order."""
    stems, seen = {}, {}
    for spec in specs:
        stem = _stem(spec)
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        stems[spec] = stem if count == 1 else f"{stem}-{count}"
    return stems


def save_approximations(directory, matrix_path, comparison, force: bool, stem: str | None = None) -> list[Path]:
    """Save every kept approximation as DIR/<stem>.<method>[.b<budget>].npz (``stem`` from
    :func:`unique_stems`; by default the matrix's base name)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)  # --save-dir names a directory to fill; outputs never make one
    stem = stem or _stem(matrix_path)
    written = []
    for r in comparison.results:
        if r.approximation is None:
            continue
        suffix = f".b{r.budget}" if len(comparison.budgets) > 1 else ""
        target = directory / f"{stem}.{r.method}{suffix}.npz"
        check_writable(target, force)
        r.approximation.save(target, force=force)
        written.append(target)
    return written
