"""What the config tests share: the example files, writing a config next to the example feeds, line numbers."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from threatgate.config.balancer import BalancerConfig, InstanceSettings

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


def instance(port: int, **fields: Any) -> InstanceSettings:
    """An instance on 127.0.0.1 (nothing needs to listen there for unit tests)."""
    return InstanceSettings(host="127.0.0.1", matching_port=port, **fields)


def balancer_model(directory: Path, *instances: InstanceSettings, **fields: Any) -> BalancerConfig:
    """A balancer configuration built in code (no file read): readiness polls off, no admin socket."""
    return BalancerConfig(
        path=str(directory / "kl_balancer.conf"),
        listen_host="127.0.0.1",
        matching_port=9000,
        api_port=9001,
        cybertrace_port=9002,
        scanners_count=10,
        cert_path="c",
        key_path="k",
        cert_dir=str(directory),
        instances=instances,
        allowed=(),
        readiness=False,
        **fields,
    )
