"""Docs that cannot drift: every command has help with an example and is in the README."""
from pathlib import Path

import pytest

from sfa_cli.cli import cli
from sfa_cli.compare import METHODS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_command_has_help_with_example_and_is_documented(run_cli, name):
    result = run_cli(name, "--help")
    assert result.exit_code == 0
    assert cli.commands[name].help, f"{name} has no help text"
    assert "Example:" in result.output and f"sfa {name}" in result.output
    assert f"sfa {name}" in README, f"README does not show `sfa {name}`"


def test_readme_opens_with_the_two_commands():
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_method_is_documented():
    for method in METHODS:
        assert f"`{method}`" in README


def test_public_json_keys_are_documented():
    for key in ("tsvd_rel_error", "stopped_because", "rank_is_estimate", "tsvd_energy", "factor{m}.indptr"):
        assert key in README
