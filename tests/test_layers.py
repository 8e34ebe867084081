"""The package's layers import one way: core -> integrations -> tools -> cli (an import-linter style contract).

Every ``from .x import`` / ``import dft.x`` in ``src/dft`` counts, at module level or inside a function (a lazy
import is still a dependency). A module may import its own layer or the layers below it, never above; no two
modules import each other, directly or around a circle; the CLI is a package of small modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dft"

LAYERS = {
    "core": [
        "weights", "transform", "options", "reduction", "stats", "precision", "labels", "losses", "fused",
        "epilogue", "vocab_parallel", "advice", "nft",
    ],
    "integrations": ["batches", "models", "engines", "causal", "distributed", "arguments", "trainer", "trl_compat"],
    "tools": ["data", "prior", "sampling", "verifiers", "toy"],
    "cli": ["cli"],  # the package: cli (its __init__: main, dispatch), cli.train, cli.eval, cli._parsing, ...
}  # fmt: skip
ORDER = list(LAYERS)
FACADE = {"__init__", "__main__", "_version", "__version__"}  # the package root re-exports; __main__ runs the CLI


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__") or "__init__"


def _layer(module: str) -> str | None:
    top = module.split(".")[0]
    return next((layer for layer, names in LAYERS.items() if top in names), None)


def _imports(path: Path) -> set[str]:
    """The dft modules ``path`` imports (relative or absolute, anywhere in the file)."""
    package = _module_name(path).split(".")[:-1] if path.name != "__init__.py" else _module_name(path).split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                if node.module is None:  # from . import x
                    found.update(".".join([*base, a.name]) for a in node.names)
                    continue
            elif node.module and (node.module == "dft" or node.module.startswith("dft.")):
                target = node.module.removeprefix("dft").lstrip(".")
                if not target:
                    found.update(a.name for a in node.names)
                    continue
            else:
                continue
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("dft.") for a in node.names if a.name.startswith("dft."))
    return {f for f in found if f and f.split(".")[0] not in FACADE}


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if m not in FACADE and _layer(m) is None]
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py: {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in FACADE))
def test_imports_go_down_the_layers(module):
    mine = ORDER.index(_layer(module))
    for target in sorted(_imports(MODULES[module])):
        layer = _layer(target)
        assert layer is not None, f"{module} imports {target}, which has no layer"
        assert ORDER.index(layer) <= mine, f"{module} ({ORDER[mine]}) imports {target} ({layer}): upward"


def _graph() -> dict[str, set[str]]:
    """``{module: the modules it imports}`` over ``src/dft`` (an imported name is resolved to its module)."""

    def module_of(target: str) -> str | None:
        parts = target.split(".")
        return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in MODULES), None)

    graph = {}
    for module, path in MODULES.items():
        if module in FACADE:
            continue
        graph[module] = {m for t in _imports(path) if (m := module_of(t)) not in (None, module, *FACADE)}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle per strongly connected group of modules (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_circle():
    """No module imports, at module level or lazily, a module that imports it back (directly or around a
    circle); the package root (the facade re-exporting the API) is left out."""
    circles = _cycles(_graph())
    assert not circles, f"import circles among src/dft modules: {circles}"


def test_the_circle_check_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


CLI_MAX_LINES = 400


def test_cli_modules_are_small():
    """The CLI is one small module per command plus its shared private modules, none over 400 lines."""
    cli = sorted((SRC / "cli").glob("*.py"))
    assert {p.stem for p in cli} >= {"__init__", "train", "eval", "inspect", "sample"}
    long = {p.name: n for p in cli if (n := len(p.read_text().splitlines())) > CLI_MAX_LINES}
    assert not long, f"CLI modules over {CLI_MAX_LINES} lines: {long}"


def test_the_contract_can_fail(tmp_path, monkeypatch):
    """An upward import, lazy or not, is found."""
    bad = tmp_path / "weights.py"
    bad.write_text("def f():\n    from .engines import ENGINES\n    from . import cli\n")
    assert {"engines", "cli"} <= {t.split(".")[0] for t in _imports_at(bad)}


def _imports_at(path: Path) -> set[str]:
    original = globals()["SRC"]
    globals()["SRC"] = path.parent
    try:
        return _imports(path)
    finally:
        globals()["SRC"] = original
