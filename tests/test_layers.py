"""The layer rule of docs/architecture.md, checked on the source: every import of an sfa module,
function-level imports included, goes to the same layer or one below, and no module imports
itself back through others (no cycle)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sfa_cli"

#: Layers from the bottom. A module may import its own layer and those below it.
LAYERS = {
    "foundation": 0,  # sfa_cli/<module>.py other than the leaves below
    "io": 1,
    "approximations": 2,
    "engine": 3,
    "methods": 4,
    "leaves": 5,  # sfa_cli/nn.py, sfa_cli/info.py: public entry points that nothing else imports, but the CLI
    "cli": 6,
}
LEAVES = {"sfa_cli.nn", "sfa_cli.info"}
FACADES = {"sfa_cli", "sfa_cli.__main__"}  # the lazy re-exports and `python -m sfa_cli`


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("sfa_cli",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    if module in LEAVES:
        return LAYERS["leaves"]
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS and (PACKAGE / parts[1]).is_dir():
        return LAYERS[parts[1]]
    return LAYERS["foundation"]


def _imports(module: str) -> set[str]:
    """The sfa modules that ``module`` imports anywhere in its source (strings excluded)."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("sfa_cli"):
                found.add(name)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(set(MODULES) - FACADES))
def test_imports_only_its_own_layer_or_below(module):
    upward = sorted(t for t in GRAPH[module] if t not in FACADES and _layer(t) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports higher layers: {upward}"


def test_no_import_cycle():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH[m] - FACADES):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(set(MODULES) - FACADES):
        if m not in state:
            visit(m)


def test_no_module_above_900_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 900}
    assert not long, f"modules above 900 lines: {long}"


def test_every_folder_says_what_it_holds_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Layer rule" in doc, f"{init} has no layer rule in its docstring"
