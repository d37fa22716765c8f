"""Write docs/api.md, the API reference, from the docstrings of sfa's public names.

    python scripts/gen_api_docs.py            # rewrite docs/api.md
    python scripts/gen_api_docs.py --check    # exit 1 if docs/api.md is out of date

The docstrings are numpydoc. Their section headings become bold lines and their
parameter lists Markdown lists; everything else is kept as written (doctests fenced,
RST roles shown as code). ``tests/test_api_docs.py`` fails when the committed file
differs from what this prints. To document another name, add it to ``ENTRIES``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "api.md"

#: What the reference holds, in order: "module:name" for a function or class,
#: "module" for a module's own docstring (an introduction to the names after it).
ENTRIES = (
    "sfa_cli:load_matrix",
    "sfa_cli:save_matrix",
    "sfa_cli:matrix_info",
    "sfa_cli:as_square_matrix",
    "sfa_cli:fit",
    "sfa_cli:FitResult",
    "sfa_cli:fit_sampled",
    "sfa_cli:lifted_start",
    "sfa_cli:compare",
    "sfa_cli:run_method",
    "sfa_cli:truncated_svd",
    "sfa_cli:randomized_svd",
    "sfa_cli:top_k",
    "sfa_cli:lowrank_plus_sparse",
    "sfa_cli:monarch",
    "sfa_cli:butterfly_closed_form",
    "sfa_cli:learned_sparse",
    "sfa_cli:learned_at_scale",
    "sfa_cli:chord_plus_sparse",
    "sfa_cli:relative_error",
    "sfa_cli:best_scale",
    "sfa_cli:error_report",
    "sfa_cli:load_approximation",
    "sfa_cli:Approximation",
    "sfa_cli:SparseFactors",
    "sfa_cli:LowRank",
    "sfa_cli:SparseMatrix",
    "sfa_cli:Monarch",
    "sfa_cli:SumApproximation",
    "sfa_cli:chord_pattern",
    "sfa_cli:butterfly_pattern",
    "sfa_cli:ChordMixing",
    "sfa_cli.nn:SequenceModel",
    "sfa_cli:FactorizedLinear",
    "sfa_cli.engine.options",
    "sfa_cli:PatternSpec",
    "sfa_cli:StopRules",
    "sfa_cli:OptimizerSpec",
    "sfa_cli:Placement",
    "sfa_cli:SampledSchedule",
)

#: numpydoc sections whose entries are "name : type" lines with indented descriptions.
LIST_SECTIONS = {"Parameters", "Other Parameters", "Returns", "Yields", "Receives", "Raises",
                 "Warns", "Attributes"}

_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc|ref):`(~?)([^`]+)`")
_SIGNATURE_WIDTH = 88

HEADER = """\
# API reference

Generated from the docstrings by `python scripts/gen_api_docs.py` (or `make api-docs`);
do not edit by hand: `tests/test_api_docs.py` fails when this file is out of date.
The command line is described in the [README](../README.md).
"""


def render() -> str:
    """The whole reference as Markdown text."""
    resolved = [_resolve(entry) for entry in ENTRIES]
    toc = [f"- [`{name}`](#{_anchor(name)})" for module, name, _ in resolved if name]
    parts = [HEADER, "\n".join(toc) + "\n"]
    for module, name, obj in resolved:
        parts.append(_module_section(module) if name is None else _object_section(module, name, obj))
    return "\n".join(parts)


def _resolve(entry: str):
    module_name, _, name = entry.partition(":")
    module = importlib.import_module(module_name)
    if not name:
        return module_name, None, module
    try:
        return module_name, name, getattr(module, name)
    except AttributeError:
        raise SystemExit(f"gen_api_docs: {module_name} has no {name!r}; update ENTRIES") from None


def _anchor(name: str) -> str:
    """The anchor GitHub gives the heading ``## `name` ``."""
    return re.sub(r"[^a-z0-9_-]", "", name.lower())


def _module_section(module_name: str) -> str:
    doc = inspect.getdoc(importlib.import_module(module_name)) or ""
    return f"## Module `{module_name}`\n\n{_markdown(doc)}"


def _object_section(module: str, name: str, obj) -> str:
    kind = "class" if inspect.isclass(obj) else "def"
    home = getattr(obj, "__module__", module)
    where = f"`from {module} import {name}`" + (f" (defined in `{home}`)" if home != module else "")
    lines = [f"## `{name}`", "",
             where, "",
             "```python", _signature(f"{kind} {name}", obj, drop_self=False), "```", "",
             _markdown(inspect.getdoc(obj) or "(no docstring)")]
    if inspect.isclass(obj):
        bases = [f"`{_public_path(b)}`" for b in obj.__bases__
                 if b is not object and not b.__name__.startswith("_")]
        lines[-1:-1] = [f"Bases: {', '.join(bases)}", ""] if bases else []
        lines += [_member_section(name, member, value) for member, value in _members(obj)]
    return "\n".join(lines)


def _public_path(cls) -> str:
    """The shortest import path of a class: ``torch.nn.Module``, not ``torch.nn.modules.module.Module``."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{'.'.join(parts[:i])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _members(cls):
    """Public members in source order: the class's own, then those of its private sfa bases
    (a public base has its own entry), less undocumented overrides of foreign bases."""
    owners = [cls] + [b for b in cls.__mro__[1:] if b.__name__.startswith("_") and b.__module__.startswith("sfa_cli")]
    seen = set()
    for name, value in ((n, v) for owner in owners for n, v in vars(owner).items()):
        if name in seen or name.startswith("_") or inspect.isclass(value):
            continue
        seen.add(name)
        if not (callable(value) or isinstance(value, (property, classmethod, staticmethod))):
            continue
        if _own_doc(value) is None and any(
            hasattr(base, name) and not base.__module__.startswith("sfa_cli") for base in cls.__mro__[1:]
        ):
            continue  # e.g. nn.Module.extra_repr: plumbing, documented by torch
        yield name, value


def _own_doc(value):
    target = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
    return inspect.getdoc(target) if getattr(target, "__doc__", None) else None


def _member_section(cls_name: str, name: str, value) -> str:
    doc = _markdown(_own_doc(value) or "(no docstring)")
    if isinstance(value, property):
        return f"### `{cls_name}.{name}` (property)\n\n{doc}"
    function = getattr(value, "__func__", value)
    prefix = "@classmethod\n" if isinstance(value, classmethod) else ""
    signature = _signature(f"{prefix}def {name}", function, drop_self=not isinstance(value, staticmethod))
    return f"### `{cls_name}.{name}`\n\n```python\n{signature}\n```\n\n{doc}"


def _signature(head: str, obj, *, drop_self: bool) -> str:
    """``def name(a, b=1) -> T`` on one line, or one parameter a line when longer than the page."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{head}(...)"
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    texts, seen_star = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not seen_star:
            texts.append("*")
        seen_star = seen_star or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        texts.append(_parameter(p))
    returns = ""
    if sig.return_annotation is not inspect.Signature.empty and not inspect.isclass(obj):
        returns = f" -> {_annotation(sig.return_annotation)}"
    one_line = f"{head}({', '.join(texts)}){returns}"
    if len(one_line.splitlines()[-1]) <= _SIGNATURE_WIDTH:
        return one_line
    body = "".join(f"    {t},\n" for t in texts)
    return f"{head}(\n{body}){returns}"


def _parameter(p: inspect.Parameter) -> str:
    """``name: type = default`` with string annotations (``from __future__ import annotations``) unquoted."""
    star = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
    text = star + p.name
    if p.annotation is not p.empty:
        text += f": {_annotation(p.annotation)}"
    if p.default is not p.empty:
        text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
    return text


def _annotation(annotation) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _markdown(doc: str) -> str:
    """numpydoc text as Markdown: bold section headings, list sections as lists, doctests fenced."""
    lines = doc.splitlines()
    out, section, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()) and line.strip():
            section = line.strip()
            out += ["", f"**{section}**", ""]
            i += 2
            continue
        if line.lstrip().startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += ["```python", *block, "```"]
            continue
        if section in LIST_SECTIONS and line.strip() and not line.startswith(" "):
            name, sep, kind = line.partition(" : ")
            out.append(f"- `{name.strip()}` : {_inline(kind.strip())}" if sep else f"- {_inline(line.strip())}")
        elif section in LIST_SECTIONS and line.startswith(" "):
            out.append("  " + _inline(line.strip()))
        else:
            out.append(_inline(line))
        i += 1
    text = "\n".join(out).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def _inline(text: str) -> str:
    """RST roles and double backticks as Markdown code; ``<`` that would open an HTML tag escaped."""
    text = _ROLE.sub(lambda m: f"`{m.group(2).split('.')[-1] if m.group(1) else m.group(2)}`", text)
    text = text.replace("``", "`")
    pieces = text.split("`")
    return "`".join(re.sub(r"<(?=[A-Za-z/!?])", "&lt;", p) if k % 2 == 0 else p for k, p in enumerate(pieces))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the checkout's sfa_cli, not another installed copy
    sys.exit(main())
