"""The `sfa` command line: parse options, call the library, render results.

Results go to stdout (a rich table, or JSON/CSV for scripts); progress and
errors go to stderr, so ``sfa compare m.mtx --json | jq`` works.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np
import scipy.sparse as sp
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from sfa_cli import kernels
from sfa_cli._version import __version__
from sfa_cli.approximation import DENSE_LIMIT, load_approximation
from sfa_cli.baselines import tsvd_at_rank
from sfa_cli.compare import METHODS, chord_at_budget, compare, resolve_budget, run_method
from sfa_cli.errors import SfaError
from sfa_cli.factors import SparseFactors
from sfa_cli.fit import DEFAULTS, DENSE_FIT_LIMIT, OPTIMIZERS, default_max_iter, fit
from sfa_cli.info import matrix_info
from sfa_cli.io import atomic_output, check_writable, load_array, load_matrix, save_matrix
from sfa_cli.learned import ORDERS
from sfa_cli.memory import peak_rss_bytes
from sfa_cli.metrics import relative_error
from sfa_cli.patterns import PATTERNS
from sfa_cli.report import (
    compare_rows, compare_table, eval_table, fit_table, info_notes, info_tables, plot_comparisons,
    require_matplotlib, save_approximations, write_csv, write_json,
)
from sfa_cli.sampled import EXACT_ERROR_UP_TO, SAMPLED_DEFAULTS, error_report, fit_sampled, init_distributed

# stdout for results, stderr for progress, logs and errors.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


class _SfaGroup(click.Group):
    """Turns library errors into one line and exit code 1 (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except SfaError as exc:
            if _debug(ctx):
                raise
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            if _debug(ctx):
                raise
            click.echo("Error: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # an sfa bug or an environment failure
            if _debug(ctx):
                raise
            raise click.ClickException(
                f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"
            ) from None


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.obj and root.obj.get("debug"))


def emit_json(obj) -> None:
    """Write one JSON document to stdout."""
    click.echo(json.dumps(obj, indent=2, allow_nan=True))


@click.group(cls=_SfaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="sfa")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compress square matrices by products of sparse full-rank factors.

    sfa fits the Chord sparse factorization (Khalitov et al., Neural Networks
    2022) and compares it with truncated SVD and other structured
    approximations at the same parameter budget.

    \b
    Example:
        sfa info data/lesmis.mtx
        sfa fit data/lesmis.mtx -o lesmis_factors.npz
        sfa compare data/lesmis.mtx --json
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command()
@click.argument("matrices", nargs=-1, required=True, metavar="MATRIX...")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (one object, or a list when several files are given).")
@click.pass_context
def info(ctx: click.Context, matrices: tuple[str, ...], as_json: bool) -> None:
    """Describe matrices: size, sparsity, symmetry, rank and the equal budget.

    MATRIX is a .npz, .npy, .mtx, .mtx.gz, .h5/.hdf5 or .mat file; add :KEY to
    pick one array of a file holding several (file.npz:A, file.h5:/group/A).
    The budget rows give the Chord factorization's size (M factors with L+1
    nonzeros per row), the truncated-SVD rank with the same parameter count,
    and the share of ||A||_F^2 that rank keeps. A file that cannot be
    read gets one error line; the others are still shown, and the exit code
    is 1.

    \b
    Example:
        sfa info data/lesmis.mtx
        sfa info data/*.mtx data/digits_cov.npz --json
        sfa info weights.h5:/layer1/W
    """
    infos, failed = [], False
    for spec in matrices:
        try:
            infos.append(matrix_info(load_matrix(spec), path=spec))
        except SfaError as exc:
            if _debug(ctx):
                raise
            click.echo(f"Error: {exc}", err=True)
            failed = True
    if as_json:
        if infos or len(matrices) > 1:
            emit_json(infos if len(matrices) > 1 else infos[0])
    elif infos:
        for table in info_tables(infos):
            out.print(table)
        for note in info_notes(infos):
            out.print(note, markup=False)
    if failed:
        ctx.exit(1)


# -- options shared by `fit` and `compare` -------------------------------------------
def _budget_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers; got {value!r}") from None


def _budget_value(ctx, param, value):
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"expected a parameter count or a fraction of N^2; got {value!r}") from None


def _method_list(ctx, param, value):
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return names


def _stack(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


pattern_size_options = _stack(
    click.option("--factors", type=click.IntRange(min=1), default=None, metavar="M",
                 help="Number of factors M.  [default: ceil(log_base N); --method sparse: 2]"),
    click.option("--base", type=click.IntRange(min=2), default=None,
                 help="Chord offsets are powers of this base.  [default: 2]"),
)

pattern_variant_options = _stack(
    click.option("--symmetric", is_flag=True, help="Chord offsets +b^k and -b^k."),
    click.option("--no-self-link", is_flag=True, help="Chord pattern without the diagonal."),
    click.option("--permute", type=int, default=None, metavar="SEED",
                 help="Relabel the nodes by a random permutation drawn from SEED."),
)

optimizer_options = _stack(
    click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="lbfgs", show_default=True,
                 help="L-BFGS with a strong-Wolfe line search, or Adam."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Step size.  [default: 1 for lbfgs, 0.01 for adam]"),
    click.option("--max-iter", type=click.IntRange(min=1), default=None,
                 help="Optimiser iterations.  [default: 5000 up to N = 256, then 5000*256/N, at least 300]"),
    click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
                 help="Stop fitting after this many seconds (per fit)."),
    click.option("--tol", type=click.FloatRange(min=0), default=DEFAULTS["tol"], show_default=True,
                 help=f"Stop when the error improved by less than this fraction over {DEFAULTS['window']} iterations."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial factors (and of randomized methods)."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="Where to fit: auto picks CUDA when available and N >= 512 (below, the CPU is faster)."),
    click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True),
)


def _fit_options(kw: dict) -> dict:
    """The keyword arguments of sfa_cli.fit.fit named by the shared CLI options."""
    return {
        "optimizer": kw["optimizer"], "lr": kw["lr"], "max_iter": kw["max_iter"], "time_limit": kw["time_limit"],
        "tol": kw["tol"], "device": kw["device"], "dtype": kw["dtype"],
    }


def _pattern_options(kw: dict) -> dict:
    """Pattern keyword arguments of fit; None leaves a pattern's default."""
    return {
        "factors": kw.get("factors"), "base": kw.get("base"), "symmetric": kw["symmetric"] or None,
        "self_link": False if kw["no_self_link"] else None, "permute": kw["permute"],
    }


class _FitProgress:
    """A rich progress line on stderr fed by the fit callback."""

    def __init__(self, label: str, max_iter: int, enabled: bool, start_line: str = "", unit: str = "it"):
        self.enabled = enabled
        self.label = label
        self.start_line = start_line  # printed (also to logs) once the first evaluation is done
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn(unit + " {task.completed:>5.0f}/{task.total:.0f}"),
            TextColumn("rel.err {task.fields[err]}"), TimeElapsedColumn(), console=err, transient=True,
            disable=not (enabled and err.is_terminal),
        )
        self.task = self.progress.add_task(label, total=max_iter, err="-")

    def __enter__(self):
        self.progress.__enter__()
        # the first evaluation of a size may compile kernels for seconds: say so on the progress line
        self.notifier = kernels.compile_notifier(
            lambda message: self.progress.update(self.task, description=f"{self.label}: {message}"))
        self.notifier.__enter__()
        return self

    def __exit__(self, *exc):
        self.notifier.__exit__(*exc)
        return self.progress.__exit__(*exc)

    def __call__(self, step) -> bool:
        if self.start_line and self.enabled:
            self.progress.console.print(self.start_line, markup=False, highlight=False, soft_wrap=True)
            self.start_line = ""
        # the sampled fit's steps also say which epoch they belong to; its error is the sample estimate
        epoch = f" epoch {step.epoch}/{step.epochs}" if getattr(step, "epochs", 0) else ""
        self.progress.update(self.task, completed=step.iteration, err=f"{step.best_rel_error:.4g}",
                             description=self.label + epoch)
        return False


error_sample_option = click.option(
    "--error-sample", type=click.IntRange(min=1), default=SAMPLED_DEFAULTS["error_sample"], show_default=True,
    metavar="COLUMNS", help="Columns of the seeded sample that estimates the error (the same for every method).")


FIT_EXAMPLE = """
\b
Example:
    sfa fit data/lesmis.mtx -o lesmis.npz
    sfa fit graph.mtx -o F.h5 --time-limit 60 --device cuda --json
    sfa fit A.npz -o F.npz --pattern butterfly --report fit.json
    sfa fit A.npz -o F.npz --budget 0.05                 # the Chord pattern sized to 5% of N^2
    sfa fit A.npz -o S.npz --method sparse --budget 0.05 # learned supports (see sfa compare)
    sfa fit A.npz -o T.npz --method tsvd --json
    sfa fit big.mtx -o F.npz --sampled --epochs 5 --error-sample 2048
"""

_FIT_OPTION_NAMES = ("optimizer", "lr", "max_iter", "time_limit", "tol", "device", "dtype")
#: Options of `sfa fit` that only some methods use: all of them Chord's, and --order the learned method's.
_METHOD_SPECIFIC = ("pattern", "factors", "base", "symmetric", "no_self_link", "permute", "sampled", "batch_columns",
                    "epochs", "exact_error", "order") + _FIT_OPTION_NAMES
#: The method-specific options each method other than chord takes (what compare passes it).
_FIT_METHOD_OPTIONS = {
    "butterfly": _FIT_OPTION_NAMES,
    "sparse": ("factors", "order", "max_iter", "time_limit", "device", "dtype"),
    "chord+sparse": _FIT_OPTION_NAMES + ("symmetric", "no_self_link"),
}


def _given(ctx: click.Context) -> set[str]:
    """Names of the options set on the command line (or the environment), not left at their defaults."""
    defaults = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP, None)
    return {name for name in ctx.params if ctx.get_parameter_source(name) not in defaults}


def _option_flag(ctx: click.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    return max(param.opts, key=len)


def _check_fit_method_options(ctx: click.Context, method: str, budget) -> None:
    """Usage errors for options the chosen method does not use."""
    given = _given(ctx)
    if method == "chord":
        if "order" in given:
            raise click.UsageError("--order applies to --method sparse (the learned supports)")
        if budget is not None and ctx.params["pattern"] != "chord":
            raise click.UsageError("--budget sizes the Chord pattern; for a butterfly at a budget use --method butterfly")
        if budget is not None and given & {"factors", "base"}:
            raise click.UsageError("--budget chooses the Chord factor count and base; give --budget or --factors/--base")
        return
    allowed = _FIT_METHOD_OPTIONS.get(method, ())
    bad = [name for name in _METHOD_SPECIFIC if name in given and name not in allowed]
    if bad:
        uses = ", ".join(_option_flag(ctx, name) for name in allowed) or "none of the fitting options"
        raise click.UsageError(f"{_option_flag(ctx, bad[0])} does not apply to --method {method} (it takes {uses})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.UsageError(f"--method {method} runs in one process; under torchrun only the Chord --sampled fit runs")


@cli.command("fit", epilog=FIT_EXAMPLE)
@click.argument("matrix")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Factor file to write (.npz or .h5).")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Also write a JSON report with the history.")
@click.option("--method", type=click.Choice(list(METHODS)), default="chord", show_default=True,
              help="What to fit: the Chord factorization, or any method of sfa compare.")
@click.option("--budget", callback=_budget_value, default=None, metavar="PARAMS",
              help="Parameters allowed: a count, or a fraction of N^2 below 1 (as in sfa compare).  "
                   "[default: chord: its full pattern; other methods: the Chord budget M*N*(L+1)]")
@click.option("--order", type=click.Choice(ORDERS), default=None,
              help="With --method sparse and --factors > 2: fit all supports jointly, or FAuST's hierarchy of "
                   "two-factor splits.  [default: joint]")
@click.option("--pattern", type=click.Choice(list(PATTERNS)), default="chord", show_default=True, help="Sparsity pattern.")
@pattern_size_options
@pattern_variant_options
@optimizer_options
@click.option("--sampled", is_flag=True,
              help=f"Fit from blocks of columns with Adam, never forming N x N (automatic for sparse inputs above N = {DENSE_FIT_LIMIT}).")
@click.option("--batch-columns", type=click.IntRange(min=1), default=SAMPLED_DEFAULTS["batch_columns"], show_default=True,
              help="With --sampled: columns per step (over all processes).")
@click.option("--epochs", type=click.IntRange(min=1), default=SAMPLED_DEFAULTS["epochs"], show_default=True,
              help="With --sampled: passes over all columns.")
@click.option("--exact-error", is_flag=True,
              help="With --sampled: report the exact error (one more pass) instead of the sample estimate.")
@error_sample_option
@click.option("--no-baseline", is_flag=True, help="Skip the equal-budget truncated SVD.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def fit_command(matrix, output, report, method, budget, order, pattern, no_baseline, as_json, quiet, force, sampled,
                batch_columns, epochs, exact_error, error_sample, **kw):
    """Fit sparse factors W(1)...W(M) to MATRIX and save them.

    Minimises ||A - W(1)...W(M)||_F over the non-zeros of a fixed pattern
    (Chord by default: M = ceil(log2 N) factors with floor(log2 N)+1 non-zeros
    per row). Ctrl-C stops the fit and still writes the best factors so far
    (exit code 130). --method runs another method of sfa compare at --budget
    instead (e.g. sparse: factors whose supports are learned) and saves its
    approximation; sfa eval, apply and reconstruct read every one.
    """
    _check_fit_method_options(click.get_current_context(), method, budget)
    check_writable(output, force)
    if report:
        check_writable(report, force)
    A = load_matrix(matrix)
    if method != "chord":
        return _fit_method_command(A, matrix, output, report, method, budget, order, no_baseline, as_json, quiet, kw)
    extra = {}
    if budget is not None:
        variant = {k: v for k, v in _pattern_options(kw).items() if k in ("symmetric", "self_link") and v is not None}
        params = resolve_budget(A.shape[0], budget)
        sizes, note = chord_at_budget(A.shape[0], params, **variant)
        kw.update(sizes)
        extra = {"budget": params, **({"note": note} if note else {})}
    total = kw["max_iter"] or default_max_iter(A.shape[0])
    start_line = (f"fitting {matrix}: n={A.shape[0]}, {pattern} pattern, up to {total} iterations "
                  f"(Ctrl-C stops and keeps the best factors)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not sampled:
        raise click.UsageError("runs under torchrun need --sampled (the full-batch fit runs in one process)")
    if sampled or (sp.issparse(A) and A.shape[0] > DENSE_FIT_LIMIT):
        if kw["optimizer"] != "lbfgs" or kw["max_iter"] is not None:
            raise click.UsageError("--sampled uses Adam with its schedule: give --epochs and --lr, not --optimizer/--max-iter")
        return _fit_sampled_command(A, matrix, output, report, pattern, no_baseline, as_json, quiet, batch_columns,
                                    epochs, exact_error, error_sample, kw, extra)
    with _FitProgress(Path(matrix).name, total, enabled=not quiet, start_line=start_line) as progress:
        try:
            result = fit(A, pattern=pattern, seed=kw["seed"], callback=progress, **_pattern_options(kw),
                         **_fit_options(kw))
        except SfaError as exc:  # e.g. the memory guard: say which file
            raise SfaError(f"{matrix}: {exc}") from None
    approx = result.approximation
    rel_error = relative_error(A, approx)  # float64, from the factors as saved
    summary = {"path": matrix, "output": output, "method": pattern, **result.to_dict(), "rel_error": rel_error,
               "fit_rel_error": result.rel_error}
    if not no_baseline:
        summary.update(_tsvd_baseline(A, approx.params))
    summary.update(extra)
    _write_fit_outputs(approx, result, summary, matrix, output, report, as_json)


def _write_fit_outputs(approx, result, summary, matrix, output, report, as_json):
    """Save the factors and the report, print the summary; exit 130 after an interrupt.

    ``result`` is the FitResult of a Chord fit, or None for the other methods
    (their report holds ``details``, the facts the method recorded, instead of a history).
    """
    facts = {"rel_error": summary["rel_error"], "input": str(matrix)}
    if result is not None:
        facts["stopped_because"] = result.stopped_because
    details = dict(approx.info)
    approx.info.update(facts)
    approx.save(output)
    if report:
        write_json(report, {**summary, "history": result.history} if result is not None
                   else {**summary, "details": details})
    if as_json:
        emit_json(summary)
    else:
        out.print(fit_table(summary))
    if result is not None and result.interrupted:
        err.print(f"interrupted: the best factors so far were written to {output}")
        raise click.exceptions.Exit(130)


def _fit_sampled_command(A, matrix, output, report, pattern, no_baseline, as_json, quiet, batch_columns, epochs,
                         exact_error, error_sample, kw, extra):
    """`sfa fit` by column blocks (also under torchrun: rank 0 writes and prints)."""
    rank, _world = init_distributed(kw["device"])
    # the sampled fit always uses Adam with its schedule; max_iter and tol belong to the full-batch fit
    options = {k: v for k, v in _fit_options(kw).items() if k not in ("max_iter", "tol", "optimizer")}
    n = A.shape[0]
    per_epoch = -(-n // min(batch_columns, n))
    start_line = (f"fitting {matrix} by column blocks: n={n}, {pattern} pattern, {epochs} epochs of {per_epoch} steps "
                  f"x {min(batch_columns, n)} columns (Ctrl-C stops and keeps the best factors)")
    with _FitProgress(Path(matrix).name, epochs * per_epoch, enabled=not quiet and rank == 0, start_line=start_line,
                      unit="step") as progress:
        result = fit_sampled(A, pattern=pattern, seed=kw["seed"], batch_columns=batch_columns, epochs=epochs,
                             exact_error=exact_error, error_sample=error_sample, callback=progress,
                             **_pattern_options(kw), **options)
    approx = result.approximation
    summary = {"path": matrix, "output": output, "method": pattern, **result.to_dict(), "seed": kw["seed"]}
    if not no_baseline and rank == 0:  # measured on the same columns as the fit's estimate
        summary.update(_tsvd_baseline(A, approx.params, exact_error=exact_error, sample=result.error_sample,
                                      seed=kw["seed"]))
    summary.update(extra)
    if rank == 0:
        _write_fit_outputs(approx, result, summary, matrix, output, report, as_json)


def _fit_method_command(A, matrix, output, report, method, budget, order, no_baseline, as_json, quiet, kw):
    """`sfa fit --method NAME`: one method of sfa compare at the budget, through compare's own code."""
    fit_options = {**_fit_options(kw), **{k: v for k, v in _pattern_options(kw).items() if k not in ("factors", "base")}}
    options = {}
    if method == "sparse":
        options = {k: v for k, v in (("order", order), ("factors", kw["factors"])) if v is not None}
    n = A.shape[0]
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True,
                  disable=quiet or not err.is_terminal) as progress:
        progress.add_task(f"{Path(matrix).name}: {method} (n={n})", total=None)
        result = run_method(A, method, budget, seed=kw["seed"], fit_options=fit_options, options=options)
    if result.status != "ok":
        what = "does not apply" if result.status == "not applicable" else "failed"
        raise SfaError(f"{matrix}: method {method} {what}: {result.note}")
    approx = result.approximation
    summary = {"path": matrix, "output": output, "method": method, "n": n}
    if isinstance(approx, SparseFactors):
        summary["factors"] = approx.num_factors
    summary.update(budget=result.budget, params=approx.params, compression=n**2 / approx.params,
                   rel_error=result.rel_error, seconds=result.seconds, dtype=approx.dtype.name)
    if isinstance(approx, SparseFactors):
        summary["pattern"] = approx.pattern
    if result.note:
        summary["note"] = result.note
    summary["peak_memory_bytes"] = peak_rss_bytes()
    if not no_baseline and method != "tsvd":
        summary.update(_tsvd_baseline(A, approx.params))
    _write_fit_outputs(approx, None, summary, matrix, output, report, as_json)


def _tsvd_baseline(A, params: int, **estimate) -> dict:
    """The equal-budget truncated SVD (rank params / 2N) the fit summaries report.

    Exact, or with ``estimate`` (error_report's exact_error, sample, seed) measured as the sampled fit is.
    """
    rank = max(1, params // (2 * A.shape[0]))
    if not estimate:
        return {"tsvd_rank": rank, "tsvd_rel_error": relative_error(A, tsvd_at_rank(A, rank))}
    tsvd = error_report(A, tsvd_at_rank(A, rank), **estimate)
    return {"tsvd_rank": rank, "tsvd_rel_error": tsvd["rel_error"], "tsvd_rel_error_ci": tsvd.get("rel_error_ci")}


EVAL_EXAMPLE = """
\b
Example:
    sfa eval lesmis.npz data/lesmis.mtx
    sfa eval F.h5 other_matrix.mtx --json
    sfa eval F.npz big.mtx --error-sample 4096 --seed 1     # an estimate with its 95% interval
    sfa eval F.npz big.mtx --exact-error                    # every column, streamed
"""


@cli.command("eval", epilog=EVAL_EXAMPLE)
@click.argument("factors")
@click.argument("matrix")
@click.option("--sampled", "estimate", is_flag=True,
              help=f"Estimate the error from a column sample even for N <= {EXACT_ERROR_UP_TO}.")
@error_sample_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the error sample.")
@click.option("--exact-error", is_flag=True,
              help=f"Exact error over all columns (streamed) even for N > {EXACT_ERROR_UP_TO}.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(factors, matrix, estimate, error_sample, seed, exact_error, as_json):
    """Relative error of saved FACTORS (any sfa approximation file) on MATRIX.

    Exact up to N = 8192; above, an estimate from a seeded sample of columns with
    its 95% confidence interval (rel_error_estimate, rel_error_ci), labelled as
    an estimate. The same --seed and --error-sample give the same columns as
    `sfa fit --sampled` and `sfa compare`.
    """
    if estimate and exact_error:
        raise click.UsageError("--sampled and --exact-error exclude each other")
    approx = load_approximation(factors)
    A = load_matrix(matrix)
    if A.shape[0] != approx.n:
        raise SfaError(f"{factors}: the approximation is {approx.n} x {approx.n} but {matrix} is {A.shape[0]} x {A.shape[0]}")
    error = error_report(A, approx, exact_error=True if exact_error else False if estimate else None,
                         sample=error_sample, seed=seed)
    row = {"factors": factors, "path": matrix, "n": approx.n, "method": approx.method, "params": approx.params,
           "compression": approx.n**2 / approx.params, **error}
    if as_json:
        emit_json(row)
    else:
        out.print(eval_table(row))


APPLY_EXAMPLE = """
\b
Example:
    sfa apply lesmis.npz x.npy -o y.npy
    sfa apply lesmis.npz X.npy -o Y.npy --transpose
"""


@cli.command("apply", epilog=APPLY_EXAMPLE)
@click.argument("factors")
@click.argument("x", metavar="X.npy")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write Y (.npy).")
@click.option("--transpose", is_flag=True, help="Compute A_hat^T X instead.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def apply_command(factors, x, output, transpose, force):
    """Y = W(1)...W(M) X for a vector or block X stored as .npy."""
    check_writable(output, force)
    approx = load_approximation(factors)
    X = load_array(x)
    Y = approx.rmatmul(X) if transpose else approx.matmul(X)
    with atomic_output(output) as tmp:
        np.save(tmp, Y)


RECONSTRUCT_EXAMPLE = """
\b
Example:
    sfa reconstruct lesmis.npz -o lesmis_dense.npz
"""


@cli.command("reconstruct", epilog=RECONSTRUCT_EXAMPLE)
@click.argument("factors")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Dense matrix to write (.npz, .npy, .mtx or .h5).")
@click.option("--max-n", type=click.IntRange(min=2), default=DENSE_LIMIT, show_default=True,
              help="Refuse to form matrices larger than this.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def reconstruct_command(factors, output, max_n, force):
    """Form the dense matrix A_hat of saved FACTORS (size-guarded)."""
    check_writable(output, force)
    approx = load_approximation(factors)
    save_matrix(output, approx.to_dense(max_n=max_n))


COMPARE_EXAMPLE = """
\b
Example:
    sfa compare data/lesmis.mtx
    sfa compare *.mtx --methods chord,tsvd,topk --json > results.json
    sfa compare A.npz --budget 0.05 --csv results.csv --plot errors.png
    sfa compare A.npz --sweep 0.01,0.02,0.05,0.1 --plot sweep.png
    sfa compare big.mtx --epochs 2 --error-sample 2048 --json   # N > 8192: at scale, estimated errors
"""


@cli.command("compare", epilog=COMPARE_EXAMPLE)
@click.argument("matrices", nargs=-1, required=True, metavar="MATRIX...")
@click.option("--methods", callback=_method_list, default=None,
              help=f"Comma-separated methods.  [default: all: {','.join(METHODS)}]")
@click.option("--budget", callback=_budget_value, default=None, metavar="PARAMS",
              help="Parameter budget: a count, or a fraction of N^2 below 1.  [default: the Chord budget M*N*(L+1)]")
@click.option("--sweep", callback=_budget_list, default=None, metavar="B1,B2,...",
              help="Several budgets: the error-versus-parameters curve of every method.")
@click.option("--order", type=click.Choice(ORDERS), default=None,
              help="Method sparse: joint supports or FAuST's hierarchy (matters with more than 2 factors).  "
                   "[default: joint]")
@pattern_variant_options
@optimizer_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON: an object per matrix (a list for several).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write one row per (matrix, budget, method).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Draw the errors (or sweep curves); needs matplotlib (pip install 'sfa[plot]').")
@click.option("--save-dir", type=click.Path(file_okay=False), default=None, help="Keep every method's approximation here.")
@click.option("--sampled", "at_scale", is_flag=True,
              help=f"Compare at scale (nothing N x N formed) even for small N; automatic for sparse inputs above N = {DENSE_FIT_LIMIT}.")
@click.option("--epochs", type=click.IntRange(min=1), default=SAMPLED_DEFAULTS["epochs"], show_default=True,
              help="At scale: passes of the sampled fit (chord, butterfly).")
@click.option("--batch-columns", type=click.IntRange(min=1), default=SAMPLED_DEFAULTS["batch_columns"], show_default=True,
              help="At scale: columns per step of the sampled fit.")
@error_sample_option
@click.option("--exact-error", is_flag=True, help="Exact errors over all columns (streamed), also at scale.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def compare_command(matrices, methods, budget, sweep, order, as_json, csv_path, plot_path, save_dir, at_scale, epochs,
                    batch_columns, error_sample, exact_error, quiet, force, **kw):
    """Compare every method at the same parameter budget on each MATRIX.

    Methods: chord (the paper's sparse factorization), butterfly, tsvd
    (truncated SVD), rsvd (randomized SVD), topk (largest entries), monarch,
    lowrank+sparse, sparse (learned supports), chord+sparse. A bad file gets a one-line error and the others still
    run; the exit code is 1 if any file failed.

    A sparse MATRIX with N > 8192 is compared at scale: chord and butterfly by
    the sampled fit, tsvd by svds and rsvd on the sparse matrix, topk keeps it
    sparse, the methods that need dense N x N work are "not applicable", and
    every error is an estimate on the same seeded column sample, with its 95%
    interval.
    """
    for path in (csv_path, plot_path):
        if path:
            check_writable(path, force)
    if plot_path:
        require_matplotlib()
    fit_options = {**_fit_options(kw), **{k: v for k, v in _pattern_options(kw).items() if k not in ("factors", "base")}}
    done, failed = [], 0
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err, transient=True, disable=quiet or not err.is_terminal) as progress:
        task = progress.add_task("", total=None)
        for path in matrices:
            try:
                A = load_matrix(path)
                comparison = compare(
                    A, methods=methods, budget=budget, sweep=sweep, seed=kw["seed"], fit_options=fit_options,
                    keep=save_dir is not None, method_options={"sparse": {"order": order}} if order else None,
                    scale=True if at_scale else None,
                    sampled_options={"epochs": epochs, "batch_columns": batch_columns},
                    exact_error=True if exact_error else None, error_sample=error_sample,
                    callback=lambda m, b, p=path: progress.update(task, description=f"{p}: {m} (budget {b})"),
                )
            except SfaError as exc:
                if _debug(click.get_current_context()):
                    raise
                failed += 1
                progress.console.print(f"Error: {exc}", markup=False, highlight=False, soft_wrap=True)
                continue
            done.append((path, comparison))
            if save_dir:
                save_approximations(save_dir, path, comparison, force)
            if not as_json:
                progress.stop()
                out.print(compare_table(path, comparison))
                out.print(comparison.verdict(), markup=False)
                progress.start()
    payload = [{"path": p, **c.to_dict()} for p, c in done]
    if as_json:
        emit_json(payload[0] if len(matrices) == 1 and payload else payload)
    if csv_path:
        write_csv(csv_path, compare_rows(done))
    if plot_path and done:
        plot_comparisons(plot_path, done)
    if failed:
        raise click.exceptions.Exit(1)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="sfa")


if __name__ == "__main__":  # pragma: no cover
    main()
