"""node/eventpath.py: what a node and its workers share on the event path, without sockets.

The ``%Date%`` clock (rendered once per second), the listener limits and the detection sender taken from
the config, which sender a reload keeps, the per-batch accounting into the process's counters (bad input
moved out of the framer and logged), and lost records of a damaged snapshot counted once per feed.
The connection class itself is driven through real sockets in tests/integration/test_node_process.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from threatgate.config.common import Address
from threatgate.config.node import NodeConfig, load_node_config
from threatgate.log import RateLimitedLog
from threatgate.net.sender import Dropped
from threatgate.node import eventpath
from threatgate.node.eventpath import (
    ReadFailures,
    SyslogClock,
    account,
    detection_sender,
    listener_limits,
    next_output,
    syslog_date,
)
from threatgate.node.matcher import MatchStats
from threatgate.stats import NodeStats
from threatgate.wire.framing import FramingStats

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def config() -> NodeConfig:
    return load_node_config(str(EXAMPLES / "node.conf"))


def test_syslog_date_is_the_documented_local_form() -> None:
    when = time.mktime((2026, 3, 5, 7, 8, 9, 0, 0, -1))
    assert syslog_date(when) == "Mar 05 07:08:09"


def test_SyslogClock_renders_once_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [time.mktime((2026, 3, 5, 7, 8, 9, 0, 0, -1)) + 0.1]
    rendered: list[float | None] = []
    monkeypatch.setattr(eventpath.time, "time", lambda: now[0])
    real = eventpath.syslog_date
    monkeypatch.setattr(eventpath, "syslog_date", lambda t=None: rendered.append(t) or real(t))
    clock = SyslogClock()
    assert clock.date() == "Mar 05 07:08:09"
    now[0] += 0.8
    assert clock.date() == "Mar 05 07:08:09"
    now[0] += 0.2
    assert clock.date() == "Mar 05 07:08:10"
    assert len(rendered) == 2


def test_listener_limits_and_the_detection_sender_come_from_the_config(config: NodeConfig) -> None:
    limits = listener_limits(config)
    assert (limits.handshake_timeout, limits.scanners_count, limits.idle_timeout) == (
        config.service.handshake_timeout,
        config.service.scanners_count,
        config.service.idle_timeout,
    )
    assert (limits.max_event_size, limits.delimiter) == (config.input.max_event_size, config.input.event_delimiter)
    drops: list[Dropped] = []
    sender = detection_sender(config, drops.append)
    assert (sender.address, sender.name, sender.retries, sender.retry_timeout) == (
        config.output.destination,
        "detections",
        config.output.retries_count,
        config.output.retries_timeout,
    )
    assert sender.on_drop == drops.append


def reloaded(config: NodeConfig, **output: Any) -> NodeConfig:
    return config.model_copy(update={"output": config.output.model_copy(update=output)})


def test_a_reload_keeps_the_sender_of_the_same_destination_with_the_new_retries(config: NodeConfig) -> None:
    current = detection_sender(config, lambda dropped: None)
    kept, old = next_output(current, reloaded(config, retries_count=9, retries_timeout=1.5), lambda dropped: None)
    assert kept is current and old is None
    assert (current.retries, current.retry_timeout) == (9, 1.5)


def test_a_reload_to_another_destination_makes_a_new_sender_and_hands_back_the_old(config: NodeConfig) -> None:
    current = detection_sender(config, lambda dropped: None)
    moved = Address("127.0.0.1", config.output.destination.port + 1)
    new, old = next_output(current, reloaded(config, destination=moved), lambda dropped: None)
    assert old is current and new is not current and new.address == moved


class StandInFramer:
    def __init__(self, **bad: int) -> None:
        self.stats = FramingStats(**bad)


def test_account_folds_a_batch_into_the_counters_and_moves_bad_input_out_of_the_framer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = NodeStats(events=1, per_category={"c2": 1})
    batch = MatchStats(events=10, detections=3, suppressed=1, ignored=2, per_category={"c2": 2, "ph": 1})
    batch.decided, batch.confirmed = 6, 3
    framer = StandInFramer(nul=2, oversized=1)
    caplog.set_level(logging.WARNING, "threatgate.test")
    warn = RateLimitedLog(logging.getLogger("threatgate.test"), interval=0)
    account(stats, batch, framer, True, warn)  # type: ignore[arg-type]
    assert (stats.events, stats.detections, stats.suppressed, stats.ignored, stats.finished_lines) == (11, 3, 1, 2, 10)
    assert stats.engine_events == {"compiled": 6, "confirmed": 3, "reference": 1}
    assert stats.per_category == {"c2": 3, "ph": 1}
    assert stats.bad_input == {"nul": 2, "oversized": 1}
    assert (framer.stats.nul, framer.stats.oversized) == (0, 0)  # moved, not counted twice
    assert [r.getMessage() for r in caplog.records] == [
        'bad input on the event port: nul (2 event(s)); see threatgate_bad_input_total{reason="nul"}',
        'bad input on the event port: oversized (1 event(s)); see threatgate_bad_input_total{reason="oversized"}',
    ]
    account(stats, MatchStats(events=4), StandInFramer(), False, warn)  # type: ignore[arg-type]
    assert (stats.events, stats.finished_lines, stats.engine_events["reference"]) == (15, 10, 5)


def test_account_counts_detections_by_source_and_indicator_per_batch() -> None:
    stats = NodeStats(per_source={"urls": 1})
    warn = RateLimitedLog(logging.getLogger("threatgate.test"), interval=0)
    batch = MatchStats(events=3, detections=3, per_category={"c2": 3})
    batch.per_source, batch.per_indicator = {"urls": 2, "api": 1}, {"evil.example": 2, "10.0.0.1": 1}
    account(stats, batch, StandInFramer(), False, warn)  # type: ignore[arg-type]
    account(stats, batch, StandInFramer(), False, warn)  # type: ignore[arg-type]
    assert stats.per_source == {"urls": 5, "api": 2}
    assert stats.top_indicators.top() == [("evil.example", 4), ("10.0.0.1", 2)]


class StandInSnapshot:
    """What ReadFailures reads of a FeedSnapshot (weakly referenced, as a snapshot is)."""

    def __init__(self, name: str, path: str | None) -> None:
        self.name, self.path, self.read_failures = name, path, 0


def test_ReadFailures_counts_each_new_failure_once_per_feed_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    stats = NodeStats()
    failures = ReadFailures(stats, logging.getLogger("threatgate.test"))
    snap, other = StandInSnapshot("urls", "/var/tg/urls.snap"), StandInSnapshot("ips", None)
    caplog.set_level(logging.ERROR, "threatgate.test")
    failures.check([snap, other])  # type: ignore[list-item]
    assert stats.feed_read_failures == {} and caplog.records == []
    snap.read_failures = 3
    failures.check([snap, other])  # type: ignore[list-item]
    failures.check([snap, other])  # type: ignore[list-item]  # nothing new
    assert stats.feed_read_failures == {"urls": 3}
    assert caplog.records[0].levelno == logging.ERROR
    assert (
        caplog.records[0]
        .getMessage()
        .startswith("feed urls: 3 record(s) could not be read from the loaded version's snapshot /var/tg/urls.snap;")
    )
    snap.read_failures, other.read_failures = 5, 1
    failures.check([snap, other])  # type: ignore[list-item]
    assert stats.feed_read_failures == {"urls": 5, "ips": 1}
