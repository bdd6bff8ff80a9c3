"""What the config tests share: the example files, writing a config next to the example feeds, line numbers."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write_node_config(tmp_path: Path, text: str, name: str = "node.conf") -> Path:
    """Write ``text`` next to a copy of the example feeds, so relative feed paths resolve."""
    if not (tmp_path / "feeds").exists():
        shutil.copytree(EXAMPLES / "feeds", tmp_path / "feeds")
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_balancer_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kl_balancer.conf"
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of ``text`` containing ``needle``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in config text")
