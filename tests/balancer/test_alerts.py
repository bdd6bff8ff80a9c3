"""balancer/alerts.py: service alert lines are framed across reads, and an over-long line is cut once.

A stand-in listener records what the connection hands over; the connection gets its bytes through
``data_received`` as asyncio would deliver them (no sockets).
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest

from threatgate.balancer.alerts import MAX_LINE, AlertConnection


class Listener:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.bad: list[str] = []
        self.connections: set[Any] = set()

    def on_line(self, peer: str, raw: bytes) -> None:
        self.lines.append(raw)

    def count_bad(self, reason: str) -> None:
        self.bad.append(reason)


def feed(chunks: list[bytes], close: bool = True) -> Listener:
    listener = Listener()
    conn = AlertConnection(listener)  # type: ignore[arg-type]
    transport = mock.Mock()
    transport.get_extra_info.return_value = ("192.0.2.1", 5000)
    conn.connection_made(transport)
    for chunk in chunks:
        conn.data_received(chunk)
    if close:
        conn.connection_lost(None)
    return listener


def test_lines_are_split_across_reads() -> None:
    listener = feed([b"one\ntw", b"o\n", b"\nthree"])
    assert listener.lines == [b"one", b"two", b"", b"three"]  # the last one at the close
    assert listener.bad == []


@pytest.mark.parametrize("chunk", [4096, 65536, 300_000])
def test_an_over_long_line_is_cut_once_and_the_rest_dropped(chunk: int) -> None:
    data = b"A" * (1 << 20) + b"\nafter\n"
    listener = feed([data[i : i + chunk] for i in range(0, len(data), chunk)])
    assert [len(line) for line in listener.lines] == [MAX_LINE, 5]
    assert listener.lines[1] == b"after"
    assert listener.bad == ["alert_line_too_long"]


def test_an_over_long_line_never_ended_reports_once() -> None:
    listener = feed([b"B" * 10_000] * 100)  # 1 MB, no newline, then the connection closes
    assert [len(line) for line in listener.lines] == [MAX_LINE]
    assert listener.bad == ["alert_line_too_long"]


def test_a_whole_over_long_line_in_one_read_is_cut_too() -> None:
    listener = feed([b"C" * (MAX_LINE + 10) + b"\nnext\n"])
    assert [len(line) for line in listener.lines] == [MAX_LINE, 4]
    assert listener.bad == ["alert_line_too_long"]


def test_the_last_alerts_are_kept_for_the_console() -> None:
    from threatgate.balancer.alerts import KEPT, AlertListener
    from threatgate.stats import BalancerStats

    host = mock.Mock(stats=BalancerStats())
    host.config.alert_forward = None
    listener = AlertListener(host)
    for i in range(KEPT + 5):
        listener.on_line("192.0.2.1:5000", f"Apr 16 09:05:41 alert=KL_ALERT_UpdatedFeed feed=f{i}".encode())
    listener.raise_own("KL_ALERT_DetectionsDropped", lines=3)
    assert len(listener.recent) == KEPT
    assert listener.recent[-1].name == "KL_ALERT_DetectionsDropped" and listener.recent[-1].peer == "balancer"
    assert listener.recent[-2].line.endswith(f"feed=f{KEPT + 4}")
    assert listener.recent[0].line.endswith("feed=f6")  # the 6 oldest gave way
    assert host.stats.alerts == {"KL_ALERT_UpdatedFeed": KEPT + 5, "KL_ALERT_DetectionsDropped": 1}
