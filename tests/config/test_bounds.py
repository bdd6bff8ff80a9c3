"""Config bounds are declared once, on the models; the XML readers take them from there."""

from __future__ import annotations

import ast
from pathlib import Path

from threatgate.config.balancer import BalancerConfig, InstanceSettings
from threatgate.config.common import UNBOUNDED, field_bounds, field_range
from threatgate.config.node import ClusterSettings, FeedsSettings, ScanSettings, ServiceSettings

SRC = Path(__file__).resolve().parents[2] / "src" / "threatgate"


def test_bounds_come_from_the_model() -> None:
    assert field_bounds(ServiceSettings, "handshake_timeout") == (1, 3600)  # gt=0 on a float: files write 1 or more
    assert field_bounds(ServiceSettings, "idle_timeout") == (0, 86400)
    assert field_bounds(ScanSettings, "workers") == (1, 64)  # inside Annotated, in a union with "auto"
    assert field_bounds(InstanceSettings, "connections") == (1, 64)
    assert field_bounds(BalancerConfig, "matching_port") == (0, 65535)  # a listen port: 0 picks one
    assert field_bounds(InstanceSettings, "matching_port") == (1, 65535)  # an address to connect to
    assert field_bounds(FeedsSettings, "per_scan_detect_limit") == (0, 1_000_000)
    assert field_bounds(BalancerConfig, "path") == (-UNBOUNDED, UNBOUNDED)  # no bounds declared
    assert field_range(ClusterSettings, "heartbeat") == (0.1, 60.0)
    assert field_range(ClusterSettings, "request_timeout") == (0.1, 300.0)


def test_no_reader_writes_its_own_numeric_bounds() -> None:
    """``parse_int(node, raw, what, 1, 3600)`` beside a model that says ``le=3600`` is two places to keep in
    step; the readers call ``parse_field`` with the model and the field instead."""
    offenders = []
    for path in (SRC / "config").glob("*.py"):
        if path.name == "common.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "parse_int":
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
