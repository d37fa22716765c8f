"""The `sfa` command line: parse options, call the library, render results.

Results go to stdout (a rich table, or JSON/CSV for scripts); progress and
errors go to stderr, so ``sfa compare m.mtx --json | jq`` works.
"""
from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from sfa_cli._version import __version__
from sfa_cli.errors import SfaError
from sfa_cli.info import matrix_info
from sfa_cli.io import load_matrix
from sfa_cli.report import info_notes, info_table

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
    non-zeros per row) and the truncated-SVD rank with the same parameter
    count, and the share of ||A||_F^2 that rank keeps. A file that cannot be
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
        out.print(info_table(infos))
        for note in info_notes(infos):
            out.print(note, markup=False)
    if failed:
        ctx.exit(1)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="sfa")


if __name__ == "__main__":  # pragma: no cover
    main()
