"""The API reference (docs/api/*.md, rendered by mkdocstrings) covers ``dft.__all__``, and the docstrings it
renders are Markdown: no Sphinx roles, no reST literal blocks. Static and fast: nothing heavy is imported."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import dft

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
SRC = ROOT / "src" / "dft"

SPHINX_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|data|attr|mod|exc|obj|const|ref|term|doc):`")


def _entries() -> list[str]:
    """Every ``::: identifier`` of the API pages."""
    return [m for page in sorted(API.glob("*.md")) for m in re.findall(r"^::: (\S+)", page.read_text(), re.M)]


def _resolve(identifier: str) -> object:
    """The object ``identifier`` names: the longest importable module prefix, then attributes."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(identifier)


def _defines(module: str, name: str) -> bool:
    """``src/dft/<module>.py`` defines ``name`` at top level (read, not imported: transformers/trl stay unloaded)."""
    tree = ast.parse((SRC / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def _docstrings(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of every docstring in a file: module, classes, functions and attribute docstrings."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        body = getattr(node, "body", None)
        for stmt in body if isinstance(body, list) else []:
            value = stmt.value if isinstance(stmt, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                out.append((stmt.lineno, value.value))
    return out


@pytest.mark.parametrize("name", dft.__all__)
def test_every_public_name_has_an_api_entry(name: str) -> None:
    entries = _entries()
    lazy = dft._LAZY.get(name)
    if lazy is not None:  # documented under its defining module (mkdocstrings cannot see the lazy alias)
        identifier = f"dft.{lazy}.{name}"
        assert identifier in entries, f"no '::: {identifier}' in docs/api/*.md"
        assert _defines(lazy, name), f"dft.{lazy} does not define {name}"
        return
    target = getattr(dft, name)
    candidates = [e for e in entries if e.rsplit(".", 1)[-1] == name and e.startswith("dft.")]
    assert any(_resolve(e) is target for e in candidates), (
        f"no '::: ' entry in docs/api/*.md resolves to dft.{name} (candidates: {candidates})"
    )


def test_docstrings_have_no_sphinx_roles_or_rest_literal_blocks() -> None:
    found = []
    for path in sorted(SRC.glob("*.py")):
        for line, text in _docstrings(path):
            if SPHINX_ROLE.search(text):
                found.append(f"{path.name}:{line}: Sphinx role {SPHINX_ROLE.search(text).group(0)}")
            if any(row.rstrip().endswith("::") for row in text.splitlines()):
                found.append(f"{path.name}:{line}: reST literal block '::' (use a fenced code block)")
    assert not found, "docstrings are rendered as Markdown by mkdocstrings:\n" + "\n".join(found)
