"""The protocol and matching core is sans-IO: no event loop, sockets, TLS or clock in these modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "threatgate"
FORBIDDEN = frozenset({"asyncio", "socket", "ssl", "time"})
SANS_IO_FILES = sorted(
    [
        *(SRC / "wire").glob("*.py"),
        *(
            SRC / "node" / f"{name}.py"
            for name in (
                "normalize",
                "render",
                "store",
                "feeds",
                "records",
                "feedref",
                "feedsnapshot",
                "feedparse",
                "feedwatch",
                "matcher",
                "spread",
                "supervisor",
            )
        ),
        SRC / "net" / "drain.py",
        SRC / "net" / "http1.py",
        SRC / "cluster" / "tokens.py",
        SRC / "cluster" / "routes.py",
        SRC / "lb" / "drill.py",
        SRC / "balancer" / "console_auth.py",
        SRC / "balancer" / "console_state.py",
    ]
)


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module imported anywhere in ``path`` (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value.split(".")[0])
    return found


def test_sans_io_file_list_covers_the_core() -> None:
    names = {p.relative_to(SRC).as_posix() for p in SANS_IO_FILES}
    assert {
        "wire/flags.py",
        "wire/framing.py",
        "node/normalize.py",
        "node/render.py",
        "node/store.py",
        "node/feeds.py",
        "node/matcher.py",
    } <= names
    assert all(p.is_file() for p in SANS_IO_FILES)


@pytest.mark.parametrize("path", SANS_IO_FILES, ids=lambda p: p.relative_to(SRC).as_posix())
def test_sans_io_module_imports_no_io(path: Path) -> None:
    bad = imported_modules(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_sans_io_checker_detects_forbidden_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nimport asyncio.events\nfrom socket import socket\n"
        "def f():\n    import ssl\n    return __import__('time')\n"
    )
    assert imported_modules(sample) & FORBIDDEN == {"asyncio", "socket", "ssl", "time"}
