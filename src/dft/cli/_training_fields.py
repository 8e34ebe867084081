"""``TrainingArguments``' fields read from transformers' source, without importing it.

Importing ``transformers.training_args`` costs seconds (it imports accelerate and torch's distributed modules);
``dft train`` needs only the field names, the types argparse converts with, the defaults and the help texts to
refuse a bad flag. This module reads them from ``training_args.py`` with ``ast``: an enum type becomes the
``Literal`` of its values (read from the module that defines it), another class a ``str`` (the real parse that
follows converts it), everything else is as transformers declares it. If the source
cannot be read that way, ``flags_class`` returns the imported class
instead (slower, the same flags); ``tests/test_cli_early_refusal.py`` checks that both parse every flag alike.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import typing
from typing import Any

__all__ = ["flags_class"]

_TYPING = {
    "Optional": typing.Optional,
    "Union": typing.Union,
    "Literal": typing.Literal,
    "Any": typing.Any,
    "list": list,
    "dict": dict,
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "None": None,
}


class _Names(dict):
    """Annotation names: typing's, the builtins and the enums; any other class is a ``str`` subclass of its name
    (a distinct type: ``typing.Union`` caches by order-blind equality, so two unions of plain ``str`` could come
    back in each other's order)."""

    def __missing__(self, key: str) -> Any:
        return self.setdefault(key, type(key, (str,), {}))


class _Quoted(ast.NodeTransformer):
    """``Optional['ParallelismConfig']``: a quoted name is a name. Inside ``list[...]`` an enum is a class, not a
    ``Literal``: argparse converts each item with the type itself (an enum's constructor)."""

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str) and node.value.isidentifier():
            return ast.copy_location(ast.Name(id=node.value, ctx=ast.Load()), node)
        return node

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.value, ast.Name) and node.value.id == "list":
            for name in ast.walk(node.slice):
                if isinstance(name, ast.Name) and name.id not in _TYPING:
                    name.id = f"{name.id}_item"
        return node


def _annotation(node: ast.expr, enums: dict[str, Any]) -> Any:
    expr = ast.fix_missing_locations(ast.Expression(_Quoted().visit(node)))
    return eval(compile(expr, "<annotation>", "eval"), {"__builtins__": {}}, _Names(_TYPING, **enums))  # noqa: S307


def _enum_classes(tree: ast.Module) -> dict[str, Any]:
    """``{name: Literal[values]}`` of the module's enum classes whose members are all string literals, in the
    order the enum iterates them (an alias, a repeated value, is not a member of its own)."""
    found: dict[str, Any] = {}
    for cls in tree.body:
        bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in getattr(cls, "bases", [])}
        if not isinstance(cls, ast.ClassDef) or not bases & {"Enum", "ExplicitEnum"}:
            continue
        values = [
            st.value.value
            for st in cls.body
            if isinstance(st, ast.Assign) and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str)
        ]
        members = [st for st in cls.body if isinstance(st, ast.Assign)]
        if values and len(values) == len(members):
            found[cls.name] = typing.Literal[tuple(dict.fromkeys(values))]
    return found


def _enums(tree: ast.Module, origin: str) -> dict[str, Any]:
    """The enums ``training_args.py`` defines or imports from a module of its own package."""
    found = _enum_classes(tree)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            path = os.path.join(os.path.dirname(origin), *node.module.split(".")) + ".py"
            wanted = {a.asname or a.name: a.name for a in node.names}
            if os.path.isfile(path) and wanted.keys() - found.keys():
                with open(path, encoding="utf-8") as f:
                    there = _enum_classes(ast.parse(f.read()))
                found.update({alias: there[name] for alias, name in wanted.items() if name in there})
    return found


def _literal(node: ast.expr | None, module_values: dict[str, Any]) -> Any:
    if node is None:
        return dataclasses.MISSING
    if isinstance(node, ast.Name) and node.id in module_values:
        return module_values[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:  # an expression (an enum member, a call): the real parse checks the flag's value
        return None


def _scope_values(statements: list[ast.stmt]) -> dict[str, Any]:
    """``NAME = literal`` assignments among ``statements`` and the ``if`` / ``try`` blocks in them (not in
    functions or nested classes), the last one winning: ``default_optim`` in the class body is
    ``"adamw_torch_fused"``, set under torch >= 2.8 (the real parse that follows uses the real default)."""
    values: dict[str, Any] = {}
    todo = list(statements)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.If, ast.Try)):
            todo[:0] = [*node.body, *getattr(node, "handlers", []), *node.orelse, *getattr(node, "finalbody", [])]
        elif isinstance(node, ast.ExceptHandler):
            todo[:0] = node.body
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def _metadata(node: ast.expr) -> dict[str, Any]:
    """The literal entries of ``metadata={...}`` (a computed one, e.g. ``choices`` of a dict built at import, is
    left out: the real parse checks that flag's value)."""
    out: dict[str, Any] = {}
    if isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values):
            try:
                out[ast.literal_eval(key)] = ast.literal_eval(value)
            except (ValueError, TypeError):
                pass
    return out


def _field(stmt: ast.AnnAssign, module_values: dict[str, Any], enums: dict[str, Any]) -> tuple[str, Any, Any]:
    name = stmt.target.id  # type: ignore[union-attr]
    kind = _annotation(stmt.annotation, enums)
    value = stmt.value
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field"):
        return name, kind, dataclasses.field(default=_literal(value, module_values))
    options: dict[str, Any] = {}
    for kw in value.keywords:
        if kw.arg == "default":
            options["default"] = _literal(kw.value, module_values)
        elif kw.arg == "default_factory":
            factory = kw.value.id if isinstance(kw.value, ast.Name) else None
            options["default_factory"] = {"list": list, "dict": dict}.get(factory or "", lambda: None)
        elif kw.arg == "metadata":
            options["metadata"] = _metadata(kw.value)
        elif kw.arg == "init":
            options["init"] = ast.literal_eval(kw.value)
    return name, kind, dataclasses.field(**options)


def training_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, dataclasses.field(...))`` of ``TrainingArguments``, in order, from its source file."""
    spec = importlib.util.find_spec("transformers.training_args")
    if spec is None or not spec.origin:
        raise LookupError("transformers.training_args has no source file")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments"]
    if cls.bases:  # fields inherited from elsewhere would be missed
        raise LookupError("TrainingArguments has base classes")
    module_values, enums = _scope_values([*tree.body, *cls.body]), _enums(tree, spec.origin)
    return [
        _field(stmt, module_values, enums)
        for stmt in cls.body
        if isinstance(stmt, ast.AnnAssign)
        and isinstance(stmt.target, ast.Name)
        and stmt.simple
        # ClassVar / framework attributes are not dataclass fields
        and not ast.unparse(stmt.annotation).startswith(("ClassVar", "typing.ClassVar"))
    ]


def flags_class(read_source: bool = True) -> type:
    """``DFTConfig``'s fields (``TrainingArguments``' and ``DFTArguments``', in the
    same order) with only the DFT checks in ``__post_init__``.

    With ``read_source`` (the default) ``TrainingArguments``' fields come from its source, so neither
    ``transformers.training_args`` nor accelerate is imported; if that source cannot be read, or with
    ``read_source=False``, from the imported class. Either way parsing into it sets nothing up (no device, no
    process group, no DeepSpeed) and imports neither Trainer nor datasets."""
    from ..arguments import DFTArguments, check_numeric_fields

    def __post_init__(self: Any) -> None:
        check_numeric_fields(self)
        self.validate_dft_arguments()

    if read_source:
        try:
            base = dataclasses.make_dataclass("TrainingArgumentFields", training_fields())
        except Exception:  # a source this reader does not follow: the imported class, slower but the same
            base = None
        if base is not None:
            return dataclasses.make_dataclass(
                "TrainFlags", [], bases=(base, DFTArguments), namespace={"__post_init__": __post_init__}
            )
    from transformers import TrainingArguments

    return dataclasses.make_dataclass(
        "TrainFlags", [], bases=(TrainingArguments, DFTArguments), namespace={"__post_init__": __post_init__}
    )
