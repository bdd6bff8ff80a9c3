"""No import runs back up the layers, and no module imports itself through others.

The package is layered so that a newcomer can tell what a module may touch (docs/architecture.md,
"Layers"). Each module of ``src/threatgate`` is given a layer by the longest prefix in ``LAYERS``:

=====  ==========  ==============================================================================
rank   layer       modules
=====  ==========  ==============================================================================
0      foundation  ``threatgate`` (the package), ``_version``, ``errors``, ``log``, ``heap``, ``stats``, ``fs``
1      bottom      ``wire``, ``lb``, ``config``, ``net``, ``metrics``, ``runtime``
2      middle      ``node``, ``balancer``, ``cluster``
3      top         ``cli``, ``__main__``, ``demo``
=====  ==========  ==============================================================================

The foundation modules import nothing of threatgate's but each other; ``metrics`` and ``runtime``
sit with ``net`` because ``net/http.py`` and the event ports use them. A module may import its own
layer or any lower one, never a higher one.

Every import counts: module-level, inside a function (a lazy import still makes the module depend on
the other) and under ``if TYPE_CHECKING:`` too. A type-only import of the parent service is exactly
the coupling a narrow ``typing.Protocol`` port replaces, and mypy resolves it as a real import, so it
is not exempt: a component declares what it uses of its parent as a port in its own module instead
(docs/architecture.md, "Layers").
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

FOUNDATION, BOTTOM, MIDDLE, TOP = range(4)
LAYERS: Mapping[str, int] = {
    "threatgate": FOUNDATION,
    "threatgate._version": FOUNDATION,
    "threatgate.errors": FOUNDATION,
    "threatgate.log": FOUNDATION,
    "threatgate.heap": FOUNDATION,
    "threatgate.fs": FOUNDATION,
    "threatgate.stats": FOUNDATION,
    "threatgate.wire": BOTTOM,
    "threatgate.lb": BOTTOM,
    "threatgate.config": BOTTOM,
    "threatgate.net": BOTTOM,
    "threatgate.metrics": BOTTOM,
    "threatgate.runtime": BOTTOM,
    "threatgate.node": MIDDLE,
    "threatgate.balancer": MIDDLE,
    "threatgate.cluster": MIDDLE,
    "threatgate.cli": TOP,
    "threatgate.__main__": TOP,
    "threatgate.demo": TOP,
}


def modules(root: Path, package: str = "threatgate") -> dict[str, Path]:
    """Every module of ``package`` under ``root`` by dotted name (a package by its ``__init__``)."""
    found: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported_names(path: Path, name: str) -> Iterable[str]:
    """The dotted names ``path`` imports anywhere (module level, functions, ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` resolves to mod.
            yield from (f"{source}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def import_graph(root: Path, package: str = "threatgate") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (each name resolved to its longest module).

    Importing ``pkg.mod`` runs ``pkg/__init__.py`` first; that implicit edge to a parent package is
    not counted (the package inits only say what the package is).
    """
    mods = modules(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = graph.setdefault(name, set())
        for imported in _imported_names(path, name):
            if imported != package and not imported.startswith(package + "."):
                continue
            while imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported != name:
                targets.add(imported)
    return graph


def layer_of(module: str, layers: Mapping[str, int] = LAYERS) -> int | None:
    """The layer of the longest prefix of ``module`` in ``layers`` (``threatgate`` alone is the package)."""
    if module in layers:
        return layers[module]
    parts = module.split(".")
    for end in range(len(parts) - 1, 1, -1):
        prefix = ".".join(parts[:end])
        if prefix in layers:
            return layers[prefix]
    return None


def upward(graph: Mapping[str, set[str]], layers: Mapping[str, int] = LAYERS) -> list[str]:
    """Every import from a lower layer to a higher one, as ``a -> b (low -> high)``."""
    found = []
    for source, targets in sorted(graph.items()):
        low = layer_of(source, layers)
        for target in sorted(targets):
            high = layer_of(target, layers)
            if low is not None and high is not None and high > low:
                found.append(f"{source} -> {target} ({low} -> {high})")
    return found


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:
        # Iterative, so a deep graph cannot hit the recursion limit.
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(found)


GRAPH = import_graph(SRC)


def test_every_module_has_a_layer() -> None:
    assert [name for name in GRAPH if layer_of(name) is None] == []


def test_no_import_runs_up_the_layers() -> None:
    assert upward(GRAPH) == []


def test_no_import_circles() -> None:
    assert circles(GRAPH) == []


def test_config_does_not_import_node_auth() -> None:
    """The example of issue 15: reading a config checks password hashes without the node's authenticator."""
    assert "threatgate.node.auth" not in GRAPH["threatgate.config.node"]
    assert not any(t.startswith("threatgate.node") for t in GRAPH["threatgate.config.node"])


def test_checker_finds_upward_imports_and_circles(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    for init in (pkg, pkg / "low", pkg / "high"):
        (init / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from pkg.high import b\n")
    (pkg / "high" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n")
    (pkg / "high" / "c.py").write_text("from pkg.high.b import thing\nimport pkg.low.a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.low.a"] == {"pkg.high.b"}
    assert graph["pkg.high.b"] == {"pkg.high.c"}
    assert graph["pkg.high.c"] == {"pkg.high.b", "pkg.low.a"}
    layers = {"pkg": 0, "pkg.low": 0, "pkg.high": 1}
    assert upward(graph, layers) == ["pkg.low.a -> pkg.high.b (0 -> 1)"]
    assert circles(graph) == [["pkg.high.b", "pkg.high.c", "pkg.low.a"]]
