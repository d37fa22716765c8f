"""docs/api.md is generated from the docstrings and must match them (scripts/gen_api_docs.py)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_current(gen):
    committed = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/api.md is out of date: run python scripts/gen_api_docs.py"


def test_reference_names_every_public_entry(gen):
    import sfa_cli

    text = gen.render()
    for name in set(sfa_cli.__all__) - {"__version__", "SfaError"} | {"SequenceModel"}:
        assert f"## `{name}`" in text and f"](#{name.lower()})" in text, name
        if name in sfa_cli.__all__:
            assert f"`from sfa_cli import {name}`" in text


def test_every_name_of_the_previous_surface_is_still_importable_from_the_package():
    import sfa_cli

    previous = ["__version__", "SfaError", "Approximation", "load_approximation", "SparseFactors", "FitResult",
                "load_matrix", "save_matrix", "relative_error", "as_square_matrix", "chord_pattern",
                "butterfly_pattern"]
    for name in previous:
        assert name in sfa_cli.__all__ and getattr(sfa_cli, name) is not None


def test_numpydoc_becomes_markdown(gen):
    doc = """Scale a matrix.

Parameters
----------
A : ndarray of shape (n, n)
    The matrix; see :func:`~sfa_cli.io.load_matrix` and ``A.T``.
factor : float, default=2.0

Returns
-------
ndarray
    ``factor * A`` for <Approximation n=4>.

Examples
--------
>>> scale(A)
array([[2.]])
"""
    assert gen._markdown(doc) == """Scale a matrix.

**Parameters**

- `A` : ndarray of shape (n, n)
  The matrix; see `load_matrix` and `A.T`.
- `factor` : float, default=2.0

**Returns**

- ndarray
  `factor * A` for &lt;Approximation n=4>.

**Examples**

```python
>>> scale(A)
array([[2.]])
```
"""


def test_long_signatures_put_one_parameter_a_line(gen):
    def short(A, *, seed: "int" = 0) -> "dict":
        pass

    def long(A, *, a_rather_long_option_name: "int | None" = None, another_rather_long_option: str = "x",
             callback=None):
        pass

    assert gen._signature("def short", short, drop_self=False) == "def short(A, *, seed: int = 0) -> dict"
    assert gen._signature("def long", long, drop_self=False).splitlines() == [
        "def long(", "    A,", "    *,", "    a_rather_long_option_name: int | None = None,",
        "    another_rather_long_option: str = 'x',", "    callback=None,", ")",
    ]


def test_check_mode_reports_a_stale_file(gen, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen, "OUTPUT", tmp_path / "api.md")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    (tmp_path / "api.md").write_text("stale\n")
    assert gen.main(["--check"]) == 1
    assert "api.md is out of date: run python scripts/gen_api_docs.py" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
