"""Shared fixtures: run the `sfa` command line in-process through click's CliRunner."""
import pytest
from click.testing import CliRunner

from sfa_cli.cli.commands import cli


@pytest.fixture
def run_cli():
    """Run ``sfa ARGS...`` and return click's Result (stdout and stderr kept apart)."""
    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli, [str(a) for a in args])

    return run


@pytest.fixture
def cli_error(run_cli):
    """Run a command that must fail cleanly; return its one stderr line.

    Checks what every user-facing error promises: exit code 1, exactly one
    line on stderr starting with ``Error:``, and no traceback.
    """

    def run(*args) -> str:
        result = run_cli(*args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("Error: ")
        assert "Traceback" not in result.output
        return lines[0]

    return run


@pytest.fixture
def compiled_path(monkeypatch):
    """The compiled circulant kernels switched on for small n (they start at COMPILE_MIN_N)."""
    from sfa_cli.approximations import kernels

    monkeypatch.setattr(kernels, "COMPILE_MIN_N", 8)
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_compile_failed", False)
    with kernels.use_compiled(True):
        yield kernels
