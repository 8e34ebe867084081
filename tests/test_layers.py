"""The package's layers import one way: core -> integrations -> tools -> cli (an import-linter style contract).

Every ``from .x import`` / ``import dft.x`` in ``src/dft`` counts, at module level or inside a function (a lazy
import is still a dependency). A module may import its own layer or the layers below it, never above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dft"

LAYERS = {
    "core": [
        "weights", "transform", "options", "reduction", "stats", "precision", "labels", "losses", "fused",
        "epilogue", "vocab_parallel", "advice",
    ],
    "integrations": ["models", "engines", "causal", "distributed", "trainer", "trl_compat"],
    "tools": ["data", "prior", "sampling", "verifiers", "toy"],
    "cli": ["cli", "sample_cli", "evaluation", "reporting"],
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
