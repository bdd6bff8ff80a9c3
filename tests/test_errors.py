"""errors.py is the one error tree, and it is used (docs/exceptions.md).

1. Every class declared in errors.py is raised (constructed) somewhere in src: no dead branches.
2. An exception class that another module imports lives in errors.py, not in the module that raises
   it: whoever catches it then depends on the bottom layer only, never on the raiser.
Both are read from the source (ast), so no module is imported for them.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import threatgate
from threatgate import errors

SRC = Path(threatgate.__file__).parent
ERRORS = SRC / "errors.py"

ALLOWED: dict[tuple[str, str], str] = {}
"""(module, class) defined outside errors.py that other modules may import, with the reason."""


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def last_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):  # Generic[...] and the like
        return last_name(node.value)
    return None


def exception_classes(trees: dict[str, ast.Module]) -> set[tuple[str, str]]:
    """(module, class) of every class deriving from an exception, found to a fixed point."""
    names = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    found: set[tuple[str, str]] = set()
    while True:
        before = len(found)
        for module, tree in trees.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and any(last_name(b) in names for b in node.bases):
                    found.add((module, node.name))
                    names.add(node.name)
        if len(found) == before:
            return found


def test_every_error_class_is_raised_somewhere() -> None:
    trees = modules()
    declared = {
        node.name
        for node in trees["threatgate.errors"].body
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_")
    }
    assert declared, "errors.py declares no error"
    constructed = {
        last_name(node.func)
        for module, tree in trees.items()
        if module != "threatgate.errors"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert sorted(declared - constructed) == [], "declared in errors.py but never raised: use them or delete them"


def test_exceptions_that_cross_modules_live_in_errors_py() -> None:
    trees = modules()
    defined = {(m, c) for m, c in exception_classes(trees) if m != "threatgate.errors"}
    crossing = []
    for module, tree in trees.items():
        aliases: dict[str, str] = {}  # local name -> the module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if (node.module, alias.name) in defined and node.module != module:
                        crossing.append((node.module, alias.name, module))
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                source = aliases.get(node.value.id)
                if source is not None and source != module and (source, node.attr) in defined:
                    crossing.append((source, node.attr, module))
    found = sorted((m, c, user) for m, c, user in crossing if (m, c) not in ALLOWED)
    assert found == [], "exception classes imported by other modules: move them to errors.py"


def test_the_scan_finds_module_local_exceptions() -> None:
    """The scan above is not vacuous: it sees the exceptions that stay local to their module."""
    defined = exception_classes(modules())
    assert ("threatgate.node.ipc", "ChannelError") in defined
    assert ("threatgate.cluster.etcd", "_Refused") in defined  # derives from errors.EtcdError


def test_errors_py_sits_below_everything() -> None:
    tree = ast.parse(ERRORS.read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert [m for m in imported if m.startswith("threatgate")] == []
    assert issubclass(errors.FileWriteError, errors.ThreatgateError)
