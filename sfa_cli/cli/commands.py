"""The `sfa` command line: parse options, call the library, render results.

Results go to stdout (a rich table, or JSON/CSV for scripts); progress and
errors go to stderr, so ``sfa compare m.mtx --json | jq`` works.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from sfa_cli import limits
from sfa_cli._version import __version__
from sfa_cli.errors import SfaError, printable
from sfa_cli.engine.options import (DEVICES, DTYPES, FIT_STARTS, OPTIMIZERS, PATTERN_NAMES, SAMPLED_STARTS, SampledSchedule,
                             StopRules)
from sfa_cli.methods.registry import FIT_OPTIONS, METHODS, PATTERN_OPTIONS, SAMPLED_OPTIONS, method_record

# The library (and torch) is imported inside the commands: `sfa --version` and every `--help`
# answer without it (tests/test_cli_fit.py checks that importing this module leaves torch out).
_SAMPLED = SampledSchedule()
_STOP = StopRules()


class _Consoles:
    """stdout for results, stderr for progress, logs and errors; made on first use (rich is not needed
    for --help). Output that is not a terminal is not wrapped (a piped table keeps its columns)."""

    _out = _err = None

    @property
    def out(self):
        if self._out is None:
            from rich.console import Console

            probe = Console(highlight=False)
            self._out = Console(highlight=False, soft_wrap=True,
                                width=None if probe.is_terminal else max(probe.width, 200))
        return self._out

    @property
    def err(self):
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False)
        return self._err


_consoles = _Consoles()



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
            raise click.ClickException(printable(exc)) from None
        except KeyboardInterrupt:
            if _debug(ctx):
                raise
            click.echo("Error: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # an sfa bug or an environment failure
            if _debug(ctx):
                raise
            raise click.ClickException(_unexpected(exc)) from None


def _unexpected(exc: BaseException, path: str | None = None) -> str:
    """One line for an exception sfa did not foresee, naming the file when there is one."""
    where = f"{printable(path)}: " if path else ""
    if isinstance(exc, MemoryError):
        return f"{where}out of memory ({printable(exc) or 'MemoryError'})"
    if isinstance(exc, OSError) and exc.strerror:
        name = f" ({printable(exc.filename)})" if exc.filename and str(exc.filename) != str(path) else ""
        return f"{where}{exc.strerror}{name}"
    return f"{where}{type(exc).__name__}: {printable(exc)} (run with --debug for the traceback)"


def _per_file(ctx: click.Context, path: str, work) -> tuple[object, str | None]:
    """Run ``work()`` for one file of a batch: (its result, None), or after an error (None, the message),
    the message printed as one line naming the file, so the batch goes on."""
    try:
        return work(), None
    except SfaError as exc:
        if _debug(ctx):
            raise
        message, shown = printable(exc), printable(path)
        message = message if shown in message else f"{shown}: {message}"
    except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
        raise
    except Exception as exc:
        if _debug(ctx):
            raise
        message = _unexpected(exc, path)
    click.echo(f"Error: {message}", err=True)
    return None, message


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


class _Spinner:
    """A one-line status on stderr (rich), shown only on a terminal and unless quiet."""

    def __init__(self, enabled: bool):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        err = _consoles.err
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                                 transient=True, disable=not (enabled and err.is_terminal))
        self.task = self.progress.add_task("", total=None)
        self.enabled = enabled

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, text: str) -> None:
        self.progress.update(self.task, description=printable(text))

    def log(self, text: str) -> None:
        """A line that stays (stderr), above the spinner."""
        if self.enabled:
            self.progress.console.print(printable(text), markup=False, highlight=False, soft_wrap=True)


@cli.command()
@click.argument("matrices", nargs=-1, required=True, metavar="MATRIX...")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (one object, or a list when several files are given).")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@click.pass_context
def info(ctx: click.Context, matrices: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Describe matrices: size, sparsity, symmetry, rank and the equal budget.

    MATRIX is a .npz, .npy, .mtx, .mtx.gz, .h5/.hdf5 or .mat file; add :KEY to
    pick one array of a file holding several (file.npz:A, file.h5:/group/A).
    The budget rows give the Chord factorization's size (M factors with L+1
    nonzeros per row), the truncated-SVD rank with the same parameter count
    (floor(params / 2N)), and the share of ||A||_F^2 that rank keeps. A file
    that cannot be read gets one error line; the others are still shown, and
    the exit code is 1.

    \b
    Example:
        sfa info data/lesmis.mtx
        sfa info data/*.mtx data/digits_cov.npz --json
        sfa info weights.h5:/layer1/W
    """
    from sfa_cli.info import matrix_info
    from sfa_cli.io import load_matrix
    from sfa_cli.cli.report import info_notes, info_tables

    infos, failed = [], False
    with _Spinner(not quiet) as spinner:
        for spec in matrices:
            spinner.update(f"{spec}: reading")

            def work(spec=spec):
                A = load_matrix(spec)
                return matrix_info.trusted(A, path=spec, callback=lambda stage, fraction=None, spec=spec: spinner.update(
                    f"{spec}: {stage}" + (f" {fraction:.0%}" if fraction is not None else "")))

            result, problem = _per_file(ctx, spec, work)
            if problem is not None:
                failed = True
            else:
                infos.append(result)
    if as_json:
        if infos or len(matrices) > 1:
            emit_json(infos if len(matrices) > 1 else infos[0])
    elif infos:
        for table in info_tables(infos):
            _consoles.out.print(table)
        for note in info_notes(infos):
            _consoles.out.print(note, markup=False)
    if failed:
        ctx.exit(1)


# -- options shared by `fit` and `compare` -------------------------------------------
def _positive_budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(f"expected a parameter count or a fraction of N^2; got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise click.BadParameter(f"a budget must be a positive count or fraction of N^2; got {text!r}")
    if value >= 1 and value != int(value):
        raise click.BadParameter(f"a budget >= 1 is a parameter count and must be an integer; got {text!r}")
    return value


def _budget_list(ctx, param, value):
    if value is None:
        return None
    budgets = [_positive_budget(v.strip()) for v in value.split(",") if v.strip()]
    if not budgets:
        raise click.BadParameter("expected comma-separated budgets")
    return budgets


def _budget_value(ctx, param, value):
    return None if value is None else _positive_budget(value)


def _method_list(ctx, param, value):
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in METHODS]
    if unknown or not names:
        raise click.BadParameter(f"unknown method {unknown[0] if unknown else value!r}; choose from {', '.join(METHODS)}")
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
                 help="L-BFGS with a strong-Wolfe line search, Adam, or Levenberg-Marquardt (lm: goes further on "
                      "graph-like matrices in long runs; docs/engine.md)."),
    click.option("--start", type=click.Choice(FIT_STARTS), default="auto", show_default=True,
                 help="The factors' start: the paper's row averages, the identity plus noise, lifted (projections "
                      "on the product's paths: exact on products of 2-5 Chord factors that leave some entries empty, for "
                      "--factors 2 to 5), or auto (the identity when the diagonal holds a quarter of ||A||_F^2 or more, else the paper's)."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Step size.  [default: 1 for lbfgs, 0.01 for adam]"),
    click.option("--max-iter", type=click.IntRange(min=1), default=None,
                 help="Optimiser iterations.  [default: 5000 up to N = 256, then 5000*256/N, at least 300]"),
    click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
                 help="Seconds for the work on one matrix: sfa fit's fit, error and baseline together; "
                      "in sfa compare, each method's."),
    click.option("--tol", type=click.FloatRange(min=0), default=_STOP.tol, show_default=True,
                 help=f"Stop when the error improved by less than this fraction over {_STOP.window} iterations."),
    click.option("--patience", type=click.FloatRange(min=0), default=_STOP.patience, show_default=True, metavar="FRACTION",
                 help="Stop when the error improved by less than this fraction of itself over the last quarter "
                      "of the fit's seconds (from 2 s on); 0 turns the rule off."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial factors (and of randomized methods)."),
    click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                 help="Where to fit: auto picks CUDA when available and N >= 512 (below, the CPU is faster)."),
    click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True),
)


def _fit_options(kw: dict) -> dict:
    """The shared fitting options (registry.FIT_OPTIONS) named by the CLI options."""
    return {name: kw[name] for name in FIT_OPTIONS}


def _pattern_options(kw: dict) -> dict:
    """Pattern keyword arguments of fit; None leaves a pattern's default."""
    return {
        "factors": kw.get("factors"), "base": kw.get("base"), "symmetric": kw["symmetric"] or None,
        "self_link": False if kw["no_self_link"] else None, "permute": kw["permute"],
    }


#: Seconds after which `sfa fit` prints its start line even before the first evaluation.
START_LINE_AFTER = 2.0


class _FitProgress:
    """A rich progress line on stderr fed by the fit callback, and the stage the command is in."""

    def __init__(self, label: str, max_iter: int, enabled: bool, start_line: str = "", unit: str = "it"):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        err = _consoles.err
        self.enabled = enabled
        self.label = printable(label)
        self.start_line = start_line  # printed (also to logs) when the fit is under way
        import threading

        self._lock = threading.Lock()
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn(unit + " {task.completed:>5.0f}/{task.total:.0f}"),
            TextColumn("rel.err {task.fields[err]}"), TimeElapsedColumn(), console=err, transient=True,
            disable=not (enabled and err.is_terminal),
        )
        self.task = self.progress.add_task(self.label, total=max_iter, err="-")
        self.description = self.label
        self._notifier = None

    def __enter__(self):
        self.progress.__enter__()
        # the set-up of a large fit (reading columns, norms, the error sample) can take a while: the start
        # line comes at the first evaluation or after START_LINE_AFTER seconds, whichever is first (a
        # run refused at once prints only its error line)
        import threading

        self._timer = threading.Timer(START_LINE_AFTER, self._print_start_line)
        self._timer.daemon = True
        self._timer.start()
        # the first evaluation of a size may compile kernels for seconds: say so on the progress line
        from sfa_cli.approximations import kernels

        self._notifier = kernels.compile_notifier(
            lambda message: self.progress.update(self.task, description=f"{self.label}: {message}"))
        self._notifier.__enter__()
        return self

    def _print_start_line(self) -> None:
        with self._lock:
            if self.start_line and self.enabled:
                self.progress.console.print(self.start_line, markup=False, highlight=False, soft_wrap=True)
            self.start_line = ""

    def __exit__(self, *exc):
        self._timer.cancel()
        self._notifier.__exit__(*exc)
        return self.progress.__exit__(*exc)

    def stage(self, name: str) -> None:
        """The command moved to another stage (error, baseline): say so on the line."""
        if name != "fitting":
            what = {"error": "measuring the error", "baseline": "the equal-budget truncated SVD"}.get(name, name)
            self.progress.update(self.task, description=f"{self.description}: {what}")

    def __call__(self, step) -> bool:
        if self.start_line:
            self._print_start_line()
        # the sampled fit's steps also say which epoch they belong to; its error is the sample estimate
        epoch = f" epoch {step.epoch}/{step.epochs}" if getattr(step, "epochs", 0) else ""
        self.description = self.label + epoch
        self.progress.update(self.task, completed=step.iteration, err=f"{step.best_rel_error:.4g}",
                             description=self.description)
        return False


error_sample_option = click.option(
    "--error-sample", type=click.IntRange(min=1), default=_SAMPLED.error_sample, show_default=True,
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

#: `sfa fit` option names (click's parameter names) as the registry calls them.
_CLI_TO_REGISTRY = {"no_self_link": "self_link"}
#: Options of `sfa fit` that only some methods use (each record's `shared` and `own` say which).
_METHOD_SPECIFIC = PATTERN_OPTIONS + ("symmetric", "no_self_link") + SAMPLED_OPTIONS + ("order",) + FIT_OPTIONS


def _given(ctx: click.Context) -> set[str]:
    """Names of the options set on the command line (or the environment), not left at their defaults."""
    defaults = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP, None)
    return {name for name in ctx.params if ctx.get_parameter_source(name) not in defaults}


def _option_flag(ctx: click.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    return max(param.opts, key=len)


def _check_fit_method_options(ctx: click.Context, method: str, budget) -> None:
    """Usage errors for options the chosen method does not use (read from the registry)."""
    given = _given(ctx)
    record = method_record(method)
    if method == "chord":
        if "order" in given:
            raise click.UsageError("--order applies to --method sparse (the learned supports)")
        if budget is not None and ctx.params["pattern"] != "chord":
            raise click.UsageError("--budget sizes the Chord pattern; for a butterfly at a budget use --method butterfly")
        if budget is not None and given & {"factors", "base"}:
            raise click.UsageError("--budget chooses the Chord factor count and base; give --budget or --factors/--base")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not ctx.params["sampled"]:
            raise click.UsageError("runs under torchrun need --sampled (the full-batch fit runs in one process)")
        if ctx.params["sampled"] and given & {"optimizer", "max_iter", "patience"}:
            raise click.UsageError("--sampled uses Adam with its schedule: give --epochs and --lr, not --optimizer/--max-iter/--patience")
        if ctx.params["sampled"] and ctx.params["start"] not in SAMPLED_STARTS + ("auto",):
            raise click.UsageError(f"--start {ctx.params['start']} applies to the full-batch fit; --sampled takes "
                                   f"{' or '.join(SAMPLED_STARTS)}")
        return

    def takes(name):
        return record.takes(_CLI_TO_REGISTRY.get(name, name)) and name not in ("pattern", "sampled") + SAMPLED_OPTIONS

    bad = [name for name in _METHOD_SPECIFIC if name in given and not takes(name)]
    if bad:
        uses = ", ".join(_option_flag(ctx, name) for name in _METHOD_SPECIFIC if takes(name) and any(
            p.name == name for p in ctx.command.params)) or "none of the fitting options"
        raise click.UsageError(f"{_option_flag(ctx, bad[0])} does not apply to --method {method} (it takes {uses})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.UsageError(f"--method {method} runs in one process; under torchrun only the Chord --sampled fit runs")


def _check_outputs(output: str, report: str | None, force: bool, suffixes: tuple) -> None:
    """Output paths checked before any work: extension, directory, overwrite, output vs report."""
    from sfa_cli import io

    if report and Path(report).resolve() == Path(output).resolve():
        raise click.UsageError(f"--report {printable(report)} is the factor file -o; give two different paths")
    io.check_output(output, suffixes=suffixes, force=force, others=(report,) if report else ())
    if report:
        io.check_output(report, suffixes=(".json",), force=force, others=(output,))


@cli.command("fit", epilog=FIT_EXAMPLE)
@click.argument("matrix")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Factor file to write (.npz or .h5).")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Also write a JSON report with the history.")
@click.option("--method", type=click.Choice(list(METHODS)), default="chord", show_default=True,
              help="What to fit: the Chord factorization, or any method of sfa compare.")
@click.option("--budget", callback=_budget_value, default=None, metavar="PARAMS",
              help="Parameters allowed: a count, or a fraction of N^2 below 1 (as in sfa compare).  "
                   "[default: chord: its full pattern; other methods: the Chord budget M*N*(L+1)]")
@click.option("--order", type=click.Choice(METHODS["sparse"].own_option("order").choices), default=None,
              help="With --method sparse and --factors > 2: fit all supports jointly, or FAuST's hierarchy of "
                   "two-factor splits.  [default: joint]")
@click.option("--pattern", type=click.Choice(PATTERN_NAMES), default="chord", show_default=True, help="Sparsity pattern.")
@pattern_size_options
@pattern_variant_options
@optimizer_options
@click.option("--sampled/--no-sampled", default=None,
              help=f"Fit from blocks of columns with Adam, never forming N x N; automatic above N = "
                   f"{limits.DENSE_FIT_MAX_N} (sparse or dense) or when N x N does not fit in memory; --no-sampled "
                   f"forces the full-batch fit.")
@click.option("--batch-columns", type=click.IntRange(min=1), default=_SAMPLED.batch_columns, show_default=True,
              help="With --sampled: columns per step (over all processes).")
@click.option("--epochs", type=click.IntRange(min=1), default=_SAMPLED.epochs, show_default=True,
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
    (exit code 130), also when pressed while the final error or the baseline
    is measured. --method runs another method of sfa compare at --budget
    instead (e.g. sparse: factors whose supports are learned) and saves its
    approximation; sfa eval, apply and reconstruct read every one.

    The fit stops at --max-iter, --time-limit (the fit, error and baseline together), --tol, or
    --patience. From N = 1024 on the CPU it compiles faster kernels (1.4x) only when the fit is long
    enough to repay compiling: 18-28 s the first time, ~7 s from the cache in ~/.cache/sfa.
    SFA_COMPILE=0 never compiles, SFA_COMPILE=1 always does.
    """
    from sfa_cli.io import load_matrix
    from sfa_cli.cli.jobs import fit_matrix, uses_sampled_fit

    _check_fit_method_options(click.get_current_context(), method, budget)
    _check_outputs(output, report, force, (".npz", ".h5", ".hdf5"))
    with _Spinner(not quiet) as spinner:  # a large text file takes a while to read
        spinner.update(f"{matrix}: reading")
        A = load_matrix(matrix)
    n = A.shape[0]
    method_options = {k: v for k, v in (("order", order), ("factors", kw["factors"])) if v is not None} \
        if method == "sparse" else None
    pattern_options = _pattern_options(kw)
    if method == "sparse":
        pattern_options.pop("factors")
    schedule = {"batch_columns": batch_columns, "epochs": epochs, "exact_error": exact_error,
                "error_sample": error_sample}
    is_sampled = method == "chord" and uses_sampled_fit(A, sampled)
    if is_sampled:
        from sfa_cli.engine.sampled import init_distributed

        rank, _world = init_distributed(kw["device"])
        per_epoch = -(-n // min(batch_columns, n))
        total, unit = epochs * per_epoch, "step"
        start_line = (f"fitting {printable(matrix)} by column blocks: n={n}, {pattern} pattern, {epochs} epochs of "
                      f"{per_epoch} steps x {min(batch_columns, n)} columns (Ctrl-C stops and keeps the best factors)")
    else:
        from sfa_cli.engine.fit import default_max_iter

        rank = 0
        total, unit = kw["max_iter"] or default_max_iter(n), "it"
        start_line = (f"fitting {printable(matrix)}: n={n}, {pattern} pattern, up to {total} iterations "
                      f"(Ctrl-C stops and keeps the best factors)")
    if method != "chord":
        start_line = ""
    with _FitProgress(Path(matrix).name if method == "chord" else f"{Path(matrix).name}: {method} (n={n})", total,
                      enabled=not quiet and rank == 0, start_line=start_line, unit=unit) as progress:
        outcome = fit_matrix.trusted(
            A, method=method, budget=budget, pattern=pattern, pattern_options=pattern_options,
            fit_options=_fit_options(kw), method_options=method_options, seed=kw["seed"],
            sampled=True if is_sampled else (False if method == "chord" else None), schedule=schedule,
            baseline=not no_baseline, path=matrix, output=output,
            callback=progress if method == "chord" else None, on_stage=progress.stage,
        )
    outcome.summary.pop("rank", None)
    outcome.report.pop("rank", None)
    if rank != 0:
        return
    outcome.approximation.save(output, info=outcome.facts, force=force)
    if report:
        from sfa_cli.cli.report import write_json

        write_json(report, outcome.report, force=force)
    if as_json:
        emit_json(outcome.summary)
    else:
        from sfa_cli.cli.report import fit_table

        _consoles.out.print(fit_table(outcome.summary))
    if not quiet:
        for hint in outcome.hints:
            _consoles.err.print(f"note: {hint}", markup=False, highlight=False, soft_wrap=True)
    if outcome.interrupted:
        _consoles.err.print(f"interrupted: the best factors so far were written to {printable(output)}",
                            markup=False, highlight=False, soft_wrap=True)
        raise click.exceptions.Exit(130)


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
              help=f"Estimate the error from a column sample even for N <= {limits.EXACT_ERROR_MAX_N}.")
@error_sample_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the error sample.")
@click.option("--exact-error", is_flag=True,
              help=f"Exact error over all columns (streamed) even for N > {limits.EXACT_ERROR_MAX_N}.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(factors, matrix, estimate, error_sample, seed, exact_error, as_json):
    """Relative error of saved FACTORS (any sfa approximation file) on MATRIX.

    Exact up to N = 8192; above, an estimate from a seeded sample of columns with
    its 95% confidence interval (rel_error_estimate, rel_error_ci), labelled as
    an estimate. The same --seed and --error-sample give the same columns as
    `sfa fit --sampled` and `sfa compare`.
    """
    from sfa_cli.approximations.base import load_approximation
    from sfa_cli.io import load_matrix
    from sfa_cli.engine.sampled import error_report

    if estimate and exact_error:
        raise click.UsageError("--sampled and --exact-error exclude each other")
    approx = load_approximation(factors)
    A = load_matrix(matrix)
    if A.shape[0] != approx.n:
        raise SfaError(f"{printable(factors)}: the approximation is {approx.n} x {approx.n} but {printable(matrix)} "
                       f"is {A.shape[0]} x {A.shape[0]}")
    error = error_report.trusted(A, approx, exact_error=True if exact_error else False if estimate else None,
                         sample=error_sample, seed=seed)
    row = {"factors": factors, "path": matrix, "n": approx.n, "method": approx.method, "params": approx.params,
           "compression": approx.n**2 / approx.params, **error,
           "products_pay_from": approx.pays_from()}  # block width from which A_hat @ X beats dense (model)
    if as_json:
        emit_json(row)
    else:
        from sfa_cli.cli.report import eval_table

        _consoles.out.print(eval_table(row))


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
    import numpy as np

    from sfa_cli.approximations.base import load_approximation
    from sfa_cli.io import atomic_output, load_array

    _check_outputs(output, None, force, (".npy",))
    approx = load_approximation(factors)
    X = load_array(x)
    if X.ndim not in (1, 2) or X.shape[0] != approx.n:
        raise SfaError(f"{printable(x)}: X has shape {X.shape} but {printable(factors)} is {approx.n} x {approx.n}; "
                       f"X needs {approx.n} rows")
    Y = approx.rmatmul(X) if transpose else approx.matmul(X)
    with atomic_output(output, force=force) as tmp:
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
@click.option("--max-n", type=click.IntRange(min=2), default=limits.DENSE_LIMIT, show_default=True,
              help="Refuse to form matrices larger than this.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def reconstruct_command(factors, output, max_n, force):
    """Form the dense matrix A_hat of saved FACTORS (size-guarded)."""
    from sfa_cli.approximations.base import load_approximation
    from sfa_cli.io import save_matrix

    _check_outputs(output, None, force, (".npz", ".npy", ".mtx", ".mtx.gz", ".h5", ".hdf5", ".mat"))
    approx = load_approximation(factors)
    save_matrix(output, approx.to_dense(max_n=max_n), force=force)


SHOW_EXAMPLE = """
\b
Example:
    sfa show lesmis.npz
    sfa show lesmis.npz data/lesmis.mtx --json
    sfa show lesmis.npz data/lesmis.mtx --plot lesmis.png
"""


@cli.command("show", epilog=SHOW_EXAMPLE)
@click.argument("factors")
@click.argument("matrix", required=False)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Draw the supports (and with MATRIX: A, A_hat, |A - A_hat|); .png, .pdf or .svg; needs matplotlib "
                   "(pip install 'sfa-cli[plot]').")
@error_sample_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the error sample.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--force", is_flag=True, help="Overwrite an existing plot.")
def show_command(factors, matrix, plot_path, error_sample, seed, as_json, force):
    """The structure of saved FACTORS (any sfa approximation file).

    Kind, N, dtype, method, parameters and compression (N^2 / params), the
    kind's own fields (factors and the pattern stored in the file, rank,
    Monarch blocks, a sum's parts) and, per stored matrix (factor, low-rank
    half, sparse part), its shape, non-zeros and non-zeros per row
    (min/mean/max). With MATRIX, also the relative error ||A - A_hat||_F /
    ||A||_F as `sfa eval` measures it (exact up to N = 8192; above, an
    estimate from --error-sample columns drawn with --seed, with its 95%
    interval). --plot draws the supports as spy plots and, with MATRIX, |A|,
    |A_hat| and |A - A_hat| on log colour scales; above N = 512 a panel is a
    512 x 512 view of bins (counts, block maxima): nothing N x N is formed.
    """
    from sfa_cli.cli.show import PLOT_SUFFIXES, show_approximation

    if plot_path:
        _check_outputs(plot_path, None, force, PLOT_SUFFIXES)
        from sfa_cli.cli.report import require_matplotlib

        require_matplotlib()
    summary = show_approximation(factors, matrix, plot=plot_path, force=force, error_sample=error_sample, seed=seed)
    if as_json:
        emit_json(summary)
    else:
        from sfa_cli.cli.report import show_tables

        for table in show_tables(summary):
            _consoles.out.print(table)


COMPARE_EXAMPLE = """
\b
Example:
    sfa compare data/lesmis.mtx
    sfa compare *.mtx --methods chord,tsvd,topk --json > results.json
    sfa compare A.npz --budget 0.05 --csv results.csv --plot errors.png
    sfa compare A.npz --sweep 0.01,0.02,0.05,0.1 --plot sweep.png
    sfa compare big.mtx --epochs 2 --error-sample 2048 --json   # N > 8192: at scale, estimated errors
"""


def _compare_help() -> str:
    lines = [f"{name}: {record.description}" for name, record in METHODS.items()]
    return "\n".join(lines)


@cli.command("compare", epilog=COMPARE_EXAMPLE)
@click.argument("matrices", nargs=-1, required=True, metavar="MATRIX...")
@click.option("--methods", callback=_method_list, default=None,
              help=f"Comma-separated methods.  [default: all: {','.join(METHODS)}]")
@click.option("--budget", callback=_budget_value, default=None, metavar="PARAMS",
              help="Parameter budget: a count, or a fraction of N^2 below 1.  [default: the Chord budget M*N*(L+1)]")
@click.option("--sweep", callback=_budget_list, default=None, metavar="B1,B2,...",
              help="Several budgets: the error-versus-parameters curve of every method.")
@click.option("--order", type=click.Choice(METHODS["sparse"].own_option("order").choices), default=None,
              help="Method sparse: joint supports or FAuST's hierarchy (matters with more than 2 factors).  "
                   "[default: joint]")
@pattern_variant_options
@optimizer_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON: an object per matrix (a list for several).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write one row per (matrix, budget, method).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Draw the errors (or sweep curves); needs matplotlib (pip install 'sfa-cli[plot]').")
@click.option("--save-dir", type=click.Path(file_okay=False), default=None, help="Keep every method's approximation here.")
@click.option("--sampled/--no-sampled", "at_scale", default=None,
              help=f"Compare at scale (nothing N x N formed) even for small N; automatic above N = "
                   f"{limits.SCALE_ABOVE} (sparse or dense); --no-sampled forces the dense methods.")
@click.option("--epochs", type=click.IntRange(min=1), default=_SAMPLED.epochs, show_default=True,
              help="At scale: passes of the sampled fit (chord, butterfly).")
@click.option("--batch-columns", type=click.IntRange(min=1), default=_SAMPLED.batch_columns, show_default=True,
              help="At scale: columns per step of the sampled fit.")
@error_sample_option
@click.option("--exact-error", is_flag=True, help="Exact errors over all columns (streamed), also at scale.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.pass_context
def compare_command(ctx, matrices, methods, budget, sweep, order, as_json, csv_path, plot_path, save_dir, at_scale,
                    epochs, batch_columns, error_sample, exact_error, quiet, force, **kw):
    """Compare every method at the same parameter budget on each MATRIX.

    Methods: chord (the paper's sparse factorization), butterfly, tsvd
    (truncated SVD), rsvd (randomized SVD), topk (largest entries), monarch,
    lowrank+sparse, sparse (learned supports), chord+sparse. A bad file gets a
    one-line error (and an {"path", "error"} record with --json) and the others
    still run; the exit code is 1 if any file failed. Each method's name, time
    and error are shown on stderr as it finishes.

    A MATRIX with N > 8192 (sparse, or a dense .npy read as a memory map) is
    compared at scale: chord and butterfly by the sampled fit, tsvd by svds or
    a randomized range finder, sparse (learned supports) from blocks of A, topk
    by a running top-k, the methods that need dense N x N work are "not
    applicable", and every error is an estimate on the same seeded column
    sample, with its 95% interval. With --sweep, one verdict per budget and
    where the winner changes.
    """
    import time

    from sfa_cli.methods.compare import compare
    from sfa_cli.io import check_writable, load_matrix
    from sfa_cli.cli.report import compare_rows, compare_table, plot_comparisons, require_matplotlib, \
        save_approximations, unique_stems, write_csv

    for path, suffixes in ((csv_path, (".csv",)), (plot_path, (".png", ".pdf", ".svg"))):
        if path:
            if not Path(path).parent.is_dir():
                raise SfaError(f"{printable(path)}: the directory {printable(Path(path).parent)} does not exist")
            check_writable(path, force)
    if plot_path:
        require_matplotlib()
    fit_options = {**_fit_options(kw), **{k: v for k, v in _pattern_options(kw).items() if k not in ("factors", "base")}}
    stems = unique_stems(matrices)
    done, records, failures = [], [], 0  # records: the JSON, one per input in order (failures as {path, error})
    with _Spinner(not quiet) as spinner:
        for path in matrices:
            started = {}

            def before(method, b, p=path):
                started.update(t=time.perf_counter(), shown=0.0, line=f"{p}: {method} (budget {b})")
                spinner.update(started["line"])

            def step(method, s):  # the long methods' progress, four lines a second at most
                if time.perf_counter() - started["shown"] >= 0.25:
                    started["shown"] = time.perf_counter()
                    spinner.update(f"{started['line']}: iteration {s.iteration}, error {s.best_rel_error:.4g}")

            def after(result, p=path):
                error = f"{result.rel_error:.4g}" if result.rel_error is not None else result.status
                spinner.log(f"{p}: {result.method} (budget {result.budget}) {error} in {result.seconds:.1f} s")

            def work(path=path):
                spinner.update(f"{path}: reading")
                A = load_matrix(path)
                return compare.trusted(
                    A, methods=methods, budget=budget, sweep=sweep, seed=kw["seed"], fit_options=fit_options,
                    keep=save_dir is not None, method_options={"sparse": {"order": order}} if order else None,
                    scale=at_scale,
                    sampled_options={"epochs": epochs, "batch_columns": batch_columns},
                    exact_error=True if exact_error else None, error_sample=error_sample,
                    callback=before, result_callback=after, step_callback=step,
                )

            comparison, problem = _per_file(ctx, path, work)
            if problem is not None:
                records.append({"path": path, "error": problem})
                failures += 1
                continue
            done.append((path, comparison))
            records.append({"path": path, **comparison.to_dict()})
            if save_dir:
                save_approximations(save_dir, path, comparison, force, stem=stems[path])
            if not as_json:
                spinner.progress.stop()
                _consoles.out.print(compare_table(printable(path), comparison))
                for line in comparison.verdicts():
                    _consoles.out.print(line, markup=False)
                spinner.progress.start()
    if as_json:
        emit_json(records[0] if len(matrices) == 1 and done else records)
    if csv_path:
        write_csv(csv_path, compare_rows(done), force=force)
    if plot_path and done:
        plot_comparisons(plot_path, done, force=force)
    if failures:
        raise click.exceptions.Exit(1)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="sfa")


if __name__ == "__main__":  # pragma: no cover
    main()
