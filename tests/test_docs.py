"""Docs that cannot drift: every command has help with an example and is in the README."""
from pathlib import Path

import pytest

from sfa_cli.cli.commands import cli
from sfa_cli.methods.compare import METHODS

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


def test_readme_method_table_is_the_registry():
    from sfa_cli.methods.registry import method_table

    assert method_table() in README, "the README's method table differs from sfa_cli.methods.registry (paste method_table())"


def test_cli_choices_come_from_the_registry(run_cli):
    from sfa_cli.methods.registry import METHODS as RECORDS

    fit_help = run_cli("fit", "--help").output
    compare_help = run_cli("compare", "--help").output
    assert all(name in fit_help and name in compare_help for name in RECORDS)
    assert "sfa-cli[plot]" in compare_help


def test_importing_the_cli_leaves_torch_out():
    # `sfa --version` and every --help answer without importing torch (issue 17)
    import subprocess
    import sys

    code = "import sys, sfa_cli.cli.commands; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_public_json_keys_are_documented():
    for key in ("tsvd_rel_error", "stopped_because", "rank_is_estimate", "tsvd_energy", "factor{m}.indptr"):
        assert key in README


def test_readme_factor_file_recipe_rebuilds_the_factors(tmp_path, monkeypatch):
    # the README's numpy/scipy-only recipe, run as written on a file sfa wrote
    import numpy as np

    from sfa_cli.approximations.base import load_approximation
    from sfa_cli.engine.fit import fit
    from sfa_cli.io import load_matrix

    section = README.split("## Factor files")[1]
    recipe = section.split("```python")[1].split("```")[0]
    A = load_matrix(Path(__file__).resolve().parents[1] / "data" / "lesmis.mtx")
    fit(A, max_iter=5).approximation.save(tmp_path / "lesmis.npz")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(recipe, scope)
    assert np.allclose(scope["A_hat"].toarray(), load_approximation(tmp_path / "lesmis.npz").to_dense())
