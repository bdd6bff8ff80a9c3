"""Tests for threatgate.config.reload: every config field is classified, and restart elements are named."""

from __future__ import annotations

import logging
import types
import typing
from pathlib import Path

import pydantic
import pytest

from threatgate.config.balancer import BalancerConfig, load_balancer_config
from threatgate.config.common import Address
from threatgate.config.node import ClusterSettings, HTTPServerSettings, NodeConfig, load_node_config
from threatgate.config.reload import BALANCER_FIELDS, LIVE, NODE_FIELDS, RestartTracker, restart_needed

ROOT = Path(__file__).resolve().parents[2]

SECTIONS = {"input", "output", "feeds", "service", "scan", "http", "cluster"}
"""NodeConfig sections whose fields are classified one by one (the others as a whole)."""


def leaf_paths(model: type[pydantic.BaseModel], prefix: str = "") -> set[str]:
    """Every field of ``model`` as a dotted path, descending into the sections above."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        path = prefix + name
        inner = [a for a in typing.get_args(info.annotation) if a is not type(None)] or [info.annotation]
        sub = inner[0] if len(inner) == 1 else None
        if (
            not prefix
            and name in SECTIONS
            and isinstance(sub, type)
            and not isinstance(sub, types.GenericAlias)
            and issubclass(sub, pydantic.BaseModel)
        ):
            out |= leaf_paths(sub, path + ".")
        else:
            out.add(path)
    return out


def test_every_node_field_is_live_or_needs_a_restart() -> None:
    assert set(NODE_FIELDS) == leaf_paths(NodeConfig)


def test_every_balancer_field_is_live_or_needs_a_restart() -> None:
    assert set(BALANCER_FIELDS) == set(BalancerConfig.model_fields)


def test_listen_sockets_and_tls_files_need_a_restart_the_rest_applies() -> None:
    restart = {f for f, element in BALANCER_FIELDS.items() if element != LIVE}
    assert restart == {"listen_host", "matching_port", "api_port", "cybertrace_port", "cert_path", "key_path"} | {
        "cert_dir",
        "metrics",
        "admin_socket",
        "matching_tls",
        "alert_tls",
        "client_cert_path",
        "client_key_path",
    }
    assert BALANCER_FIELDS["output"] == BALANCER_FIELDS["alert_forward"] == LIVE
    assert NODE_FIELDS["output.destination"] == LIVE
    assert NODE_FIELDS["service.metrics"] == "ServiceSettings/MetricsConnectionString"


def test_balancer_changes_are_named_by_their_element() -> None:
    running = load_balancer_config(str(ROOT / "examples" / "balancer.conf"))
    new = running.model_copy(
        update={"metrics": Address("127.0.0.1", 9100), "output": Address("127.0.0.1", 7000), "matching_port": 1}
    )
    assert restart_needed(running, new, BALANCER_FIELDS) == ["Balancer@matching_port", "MetricsConnectionString"]
    assert restart_needed(running, running.model_copy(update={"output": Address("h", 1)}), BALANCER_FIELDS) == []


def test_a_section_added_reports_its_restart_elements() -> None:
    running = load_node_config(str(ROOT / "examples" / "node.conf"))
    assert running.http is not None and running.cluster is None
    cluster = ClusterSettings(listen=Address("127.0.0.1", 1), state_dir="/tmp/x")
    names = restart_needed(running, running.model_copy(update={"cluster": cluster}), NODE_FIELDS)
    assert names == ["Cluster/ConnectionString", "Cluster/StateDirectory"] + [
        "Cluster/HeartbeatInterval",
        "Cluster/FallCount",
        "Cluster/KeepRevisions",
        "Cluster/RequestTimeout",
    ]
    http = HTTPServerSettings.model_validate({**running.http.model_dump(), "users": (("a", "b"),), "idle_timeout": 5})
    assert restart_needed(running, running.model_copy(update={"http": http}), NODE_FIELDS) == ["HTTPServer/IdleTimeout"]


def test_the_tracker_compares_with_the_start_up_config(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.reload")
    started = load_balancer_config(str(ROOT / "examples" / "balancer.conf"))
    tracker = RestartTracker(started, BALANCER_FIELDS)
    moved = started.model_copy(update={"metrics": Address("127.0.0.1", 9100)})
    with caplog.at_level(logging.WARNING, logger="test.reload"):
        assert tracker.reloaded(moved, log) == ["MetricsConnectionString"]
        assert tracker.gauge() == 1
        # Reloaded again with another change that applies live: still not what runs.
        assert tracker.reloaded(moved.model_copy(update={"reply_timeout": 7.0}), log) == ["MetricsConnectionString"]
        assert tracker.reloaded(started.model_copy(update={"reply_timeout": 7.0}), log) == []  # back as started
    assert tracker.gauge() == 0
    assert [r.getMessage() for r in caplog.records] == [
        "configuration reload: needs a restart: MetricsConnectionString (running with the value it started with)"
    ] * 2
