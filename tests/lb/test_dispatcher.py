"""Tests for threatgate.lb.dispatcher: the balancer's decisions, driven with a fake clock and no sockets.

A :class:`Harness` plays the edge: it carries out the dispatcher's actions into plain records (bytes
written per lane and per client, paused clients, connections asked for and closed, log lines), answers
for the nodes as a CyberTrace node in HA mode would (``<id> <detection>`` lines, then
``<id> LookupFinished``), and moves time by hand.  Failover, hangs, disabling, draining, reloads and
back-pressure are each one short story here; the subprocess tests (tests/integration/test_balancer*.py)
check the same against real nodes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest

from tests.config.configs import balancer_model, instance
from threatgate.config.balancer import BalancerConfig, InstanceSettings
from threatgate.lb.actions import (
    Action,
    Again,
    CloseClient,
    Compacted,
    Connect,
    Deliver,
    Disconnect,
    Log,
    Output,
    Pause,
    Resume,
    Retry,
    Send,
)
from threatgate.lb.dispatcher import Dispatcher
from threatgate.lb.instances import InstanceState
from threatgate.stats import BalancerStats
from threatgate.wire.flags import SessionFlags
from threatgate.wire.framing import Oversized

REPLY = SessionFlags(reply_back=True, send_finished=True)
A, B = "127.0.0.1:1", "127.0.0.1:2"


settings = instance


def config(*instances: InstanceSettings, **fields: Any) -> BalancerConfig:
    return balancer_model(Path("/nonexistent"), *instances, **fields)


class Harness:
    """The edge, in memory: actions become records; the clock moves only when told."""

    def __init__(self, *instances: InstanceSettings, **fields: Any) -> None:
        self.now = 1000.0
        self.stats = BalancerStats()
        self.d = Dispatcher(config(*(instances or (settings(1), settings(2))), **fields), self.stats, random.Random(1))
        self.wires: dict[str, bytearray] = {}  # lane key -> bytes written to it
        self.read: dict[str, int] = {}
        self.delivered: dict[Hashable, bytearray] = {}
        self.paused: dict[Hashable, set[str]] = {}
        self.closed_clients: list[Hashable] = []
        self.connects: list[str] = []
        self.attempts: dict[str, int] = {}  # lane key -> its last Connect's attempt
        self.disconnects: list[str] = []
        self.retries: list[Retry] = []
        self.output: list[str] = []
        self.logs: list[tuple[int, str]] = []
        self.compacted = 0

    # -- the edge -----------------------------------------------------------------------------------

    def run(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Send):
                self.wires.setdefault(action.lane, bytearray()).extend(action.data)
            elif isinstance(action, Deliver):
                self.delivered.setdefault(action.client, bytearray()).extend(action.data)
            elif isinstance(action, Pause):
                self.paused.setdefault(action.client, set()).add(action.reason)
            elif isinstance(action, Resume):
                self.paused.setdefault(action.client, set()).discard(action.reason)
            elif isinstance(action, CloseClient):
                self.closed_clients.append(action.client)
            elif isinstance(action, Connect):
                self.connects.append(action.lane)
                self.attempts[action.lane] = action.attempt
            elif isinstance(action, Disconnect):
                self.disconnects.append(action.lane)
            elif isinstance(action, Retry):
                self.retries.append(action)
            elif isinstance(action, Output):
                self.output.extend(action.lines)
            elif isinstance(action, Log):
                self.logs.append((action.level, action.message % action.args))
            elif isinstance(action, Compacted):
                self.compacted += 1
            elif isinstance(action, Again):
                self.run(self.d.dispatch(self.now))
        return actions

    def text(self, level: int = logging.DEBUG) -> str:
        return "\n".join(message for lvl, message in self.logs if lvl >= level)

    def open_lanes(self) -> None:
        """Every lane the dispatcher asked to connect, connected (the edge succeeded)."""
        while self.connects:
            key = self.connects.pop(0)
            wanted, actions = self.d.lane_connected(key, self.attempts[key], self.now)
            assert wanted, key
            self.run(actions)

    def up(self, *keys: str) -> None:
        """First health check passed, lanes connected."""
        for key in keys:
            self.run(self.d.check_passed(key, 0.001, self.now))
            self.open_lanes()
            assert self.d.instances[key].state is InstanceState.UP

    def client(self, name: str, flags: SessionFlags = REPLY) -> str:
        self.run(self.d.client_open(name, f"10.0.0.{len(self.d.clients) + 1}", flags))
        return name

    def submit(self, client: str, events: list[Any]) -> list[Action]:
        return self.run(self.d.submit(client, events, self.now))

    def sent(self, lane: str) -> list[tuple[int, str]]:
        """(request id, event) written to ``lane`` since the last look (keep-alive lines left out)."""
        data = self.wires.get(lane, bytearray())
        chunk, self.read[lane] = bytes(data[self.read.get(lane, 0) :]), len(data)
        return [
            (int(rid), event) for rid, _, event in (line.partition(" ") for line in chunk.decode().split("\n") if line)
        ]

    def answer(self, lane: str, events: list[tuple[int, str]], finish: bool = True) -> list[Action]:
        """The node answers on ``lane``: an event ``hit:...`` detects one line, the others nothing."""
        lines = []
        for rid, event in events:
            if event.startswith("hit"):
                lines.append(f"{rid} category=x matched={event}")
            if finish:
                lines.append(f"{rid} LookupFinished")
        return self.run(self.d.lane_lines(lane, "".join(f"{line}\n" for line in lines).encode(), self.now))

    def answers(self, client: str) -> list[tuple[str, ...]]:
        """What ``client`` received, event by event (its detection lines; the finished line ends each)."""
        out: list[tuple[str, ...]] = []
        current: list[str] = []
        for line in bytes(self.delivered.pop(client, b"")).decode().splitlines():
            if line.startswith("LookupFinished"):
                out.append(tuple(current))
                current = []
            else:
                current.append(line)
        assert not current, current
        return out

    def tick(self, seconds: float) -> list[Action]:
        self.now += seconds
        return self.run(self.d.tick(self.now))


def expected(events: list[str]) -> list[tuple[str, ...]]:
    return [(f"category=x matched={e}",) if e.startswith("hit") else () for e in events]


EVENTS = [f"hit:{n}" if n % 3 == 0 else f"miss:{n}" for n in range(100)]
LANE_A, LANE_B = f"{A}#0", f"{B}#0"


# -- placement and exactly once ----------------------------------------------------------------------------


def test_events_are_spread_and_answered_in_order_with_their_detections() -> None:
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, EVENTS)
    on_a, on_b = h.sent(LANE_A), h.sent(LANE_B)
    assert len(on_a) + len(on_b) == 100 and abs(len(on_a) - len(on_b)) <= 1
    h.answer(LANE_B, on_b)  # B answers first: only what precedes A's first event may be released
    early = h.answers(c)
    assert len(early) == min(rid for rid, _ in on_a) - 1
    h.answer(LANE_A, on_a)
    assert h.d.correlator.pending == 0 and h.d.outstanding(c) == 0
    assert h.stats.events_in == h.stats.events_out == 100 and h.stats.detections == 34


def test_the_answers_reach_the_client_in_submission_order_whatever_the_lanes_order() -> None:
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, EVENTS)
    on_a, on_b = h.sent(LANE_A), h.sent(LANE_B)
    h.answer(LANE_B, on_b)
    h.answer(LANE_A, on_a)
    assert h.answers(c) == expected(EVENTS)


# -- failover ------------------------------------------------------------------------------------------


def test_an_instance_lost_mid_stream_has_its_events_answered_once_by_the_other() -> None:
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, EVENTS)
    on_a, on_b = h.sent(LANE_A), h.sent(LANE_B)
    done = on_a[:5]
    partial = [e for e in on_a[5:] if e[1].startswith("hit")][:1]
    h.answer(LANE_A, done)
    h.answer(LANE_A, partial, finish=False)  # a detection line, then the node dies before LookupFinished
    h.run(h.d.lane_failed(LANE_A, "event connection lost: closed by the node", h.now))
    assert h.d.instances[A].state is InstanceState.DOWN
    assert "instance 127.0.0.1:1 is DOWN: event connection lost: closed by the node" in h.text(logging.ERROR)
    resent = h.sent(LANE_B)
    assert sorted(resent) == [e for e in on_a if e not in done]  # only what A did not finish, each once
    assert h.stats.redispatched == len(resent) and h.d.instances[A].redispatched == len(resent)
    # A late line from the dead node cannot count: the event has a new owner.
    h.answer(LANE_A, partial)
    assert h.stats.dropped_lines == {"not_owner": 2}  # refused and counted: the detection and the finished line
    h.answer(LANE_B, on_b + resent)
    assert h.answers(c) == expected(EVENTS)  # the partial detection of A is not shown twice
    assert h.d.correlator.pending == 0


def test_with_no_instance_left_events_wait_and_go_out_when_one_comes_back() -> None:
    h = Harness(settings(1))
    h.up(A)
    c = h.client("siem")
    h.submit(c, EVENTS[:10])
    h.sent(LANE_A)
    h.run(h.d.lane_failed(LANE_A, "event connection lost: closed by the node", h.now))
    assert len(h.d.backlog) == 10 and h.d.no_instance_since == h.now
    assert "no instance available (none UP): 10 event(s) wait in the backlog until one comes up" in h.text()
    for _ in range(2):  # rise (2) checks: a DOWN instance does not come back on one check
        h.tick(1.0)
        h.run(h.d.check_passed(A, 0.001, h.now))
    h.open_lanes()
    resent = h.sent(LANE_A)
    assert [rid for rid, _ in resent] == list(range(1, 11))
    assert "an instance is available again after 2.0 s without one: 10 waiting event(s) dispatched" in h.text()
    h.answer(LANE_A, resent)
    assert h.answers(c) == expected(EVENTS[:10])


def test_max_event_wait_answers_waiting_events_with_an_error_when_no_instance_comes() -> None:
    h = Harness(settings(1), max_event_wait=5.0)
    h.tick(0.25)
    c = h.client("siem")
    h.submit(c, ["a", "b"])
    h.tick(0.25)  # every instance checked once, none UP
    h.run(h.d.check_failed(A, "cannot connect: refused", h.now))
    h.tick(0.25)
    assert h.d.no_instance_since is not None and not h.delivered
    for _ in range(24):
        h.tick(0.25)
    assert bytes(h.delivered[c]).decode().splitlines() == ["LookupFinished error=no_instance waited=5s"] * 2
    assert h.stats.unmatched == {"max_event_wait": 2} and h.d.correlator.pending == 0


def test_a_lane_lost_beside_an_open_sibling_reconnects_after_a_backoff_and_the_instance_stays_up() -> None:
    h = Harness(settings(1, connections=2))
    h.up(A)
    c = h.client("siem")
    h.submit(c, EVENTS[:20])
    on0, on1 = h.sent(f"{A}#0"), h.sent(f"{A}#1")
    h.run(h.d.lane_failed(f"{A}#1", "event connection lost: closed by the node", h.now))
    assert h.d.instances[A].state is InstanceState.UP
    assert h.retries == [Retry(f"{A}#1", 0.2)]
    assert sorted(h.sent(f"{A}#0")) == on1
    h.now += 0.2
    h.run(h.d.retry_lane(f"{A}#1"))
    assert h.connects == [f"{A}#1"]
    h.open_lanes()
    h.answer(f"{A}#0", on0 + on1)
    assert h.answers(c) == expected(EVENTS[:20])
    # A second loss without an answered event in between doubles the wait (a node refusing the lane).
    h.run(h.d.lane_failed(f"{A}#1", "event connection failed: refused", h.now))
    assert h.retries[-1] == Retry(f"{A}#1", 0.4)


# -- hangs ------------------------------------------------------------------------------------------


def test_a_silent_instance_is_suspect_after_a_second_and_its_events_go_elsewhere() -> None:
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, EVENTS)
    on_a, on_b = h.sent(LANE_A), h.sent(LANE_B)
    h.tick(0.5)
    h.answer(LANE_B, on_b)
    assert h.d.instances[A].suspect_since is None
    h.tick(0.75)  # A silent for 1.25 s while owing events: over the 1 s floor
    assert h.d.lanes[LANE_A].suspect_since == h.now and LANE_A in h.disconnects
    assert sorted(h.sent(LANE_B)) == on_a and h.d.instances[A].state is InstanceState.UP
    assert h.stats.transitions["suspect"] == 1
    # No new events for it until a health check passes (it may be hung).
    h.submit(c, ["later"])
    assert h.sent(LANE_A) == [] and [e for _, e in h.sent(LANE_B)] == ["later"]
    h.run(h.d.check_passed(A, 0.001, h.now))
    assert h.d.lanes[LANE_A].suspect_since is None and h.connects == [LANE_A]


def test_an_instance_overdue_fall_times_in_a_row_is_down() -> None:
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    for round_ in range(3):  # fall = 3
        h.submit(c, [f"e{round_}-{n}" for n in range(20)])
        h.answer(LANE_B, h.sent(LANE_B))
        assert h.sent(LANE_A)
        h.tick(1.5)
        h.answer(LANE_B, h.sent(LANE_B))
        if round_ < 2:
            assert h.d.instances[A].state is InstanceState.UP
            h.run(h.d.check_passed(A, 0.001, h.now))  # cleared, reconnected: but it still answers nothing
            h.open_lanes()
    assert h.d.instances[A].state is InstanceState.DOWN
    assert "overdue 3 time(s) in a row" in h.text(logging.ERROR)


def test_one_slow_event_is_not_taken_from_instance_to_instance() -> None:
    """An event already taken from a slow instance once is left to ReplyTimeout (a poison pill)."""
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, ["slow"])
    [(rid, _)] = h.sent(LANE_A) or h.sent(LANE_B)
    first = LANE_A if h.d.lanes[LANE_A].owned else LANE_B
    other = LANE_B if first == LANE_A else LANE_A
    h.tick(1.5)
    assert h.d.correlator.owner(rid) == other
    h.run(h.d.check_passed(first.split("#")[0], 0.001, h.now))
    h.open_lanes()
    h.tick(1.5)
    assert h.d.correlator.owner(rid) == other and h.d.lanes[other].suspect_since is None


def test_reply_timeout_takes_down_the_only_instance() -> None:
    h = Harness(settings(1), reply_timeout=5.0)
    h.up(A)
    c = h.client("siem")
    h.submit(c, ["x"])
    h.tick(4.9)
    assert h.d.instances[A].state is InstanceState.UP  # nowhere else to go: overdue does not apply
    h.tick(0.2)
    assert h.d.instances[A].state is InstanceState.DOWN and h.stats.transitions["reply_timeout"] == 1
    assert list(h.d.backlog) == [1]


def test_health_checks_fall_and_rise() -> None:
    h = Harness()
    h.up(A, B)
    for n in range(3):
        h.run(h.d.check_failed(A, "no PONG within 2 s", h.now))
        assert h.d.instances[A].state is (InstanceState.DOWN if n == 2 else InstanceState.UP)
    assert "instance 127.0.0.1:1 is DOWN: health check: no PONG within 2 s" in h.text(logging.ERROR)
    h.run(h.d.check_passed(A, 0.001, h.now))
    assert h.d.instances[A].state is InstanceState.DOWN  # rise = 2
    h.run(h.d.check_passed(A, 0.001, h.now))
    assert h.d.instances[A].state is InstanceState.UP and h.connects == [LANE_A]


# -- admin: disable, enable, drain, reload ----------------------------------------------------------------


def test_disabling_an_instance_sends_its_events_elsewhere_at_once() -> None:
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, EVENTS)
    on_a, on_b = h.sent(LANE_A), h.sent(LANE_B)
    h.run(h.d.reconfigure(config(settings(1, enabled=False), settings(2)), h.now))
    assert h.d.instances[A].state is InstanceState.MAINT and LANE_A in h.disconnects
    assert sorted(h.sent(LANE_B)) == on_a
    assert "instance 127.0.0.1:1 disabled (MAINT)" in h.text()
    # Checks do not apply to MAINT; enabled again it needs rise checks, even though it was UP before.
    assert h.d.check_passed(A, 0.001, h.now) == []
    h.run(h.d.reconfigure(config(settings(1), settings(2)), h.now))
    assert h.d.instances[A].state is InstanceState.DOWN
    h.run(h.d.check_passed(A, 0.001, h.now))
    assert h.d.instances[A].state is InstanceState.DOWN
    h.run(h.d.check_passed(A, 0.001, h.now))
    assert h.d.instances[A].state is InstanceState.UP
    h.answer(LANE_B, on_b + on_a)
    assert h.answers(c) == expected(EVENTS)


def test_drain_finishes_what_the_instance_owes_then_maint() -> None:
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, EVENTS)
    on_a, on_b = h.sent(LANE_A), h.sent(LANE_B)
    h.run(h.d.drain(A, h.now))
    assert h.d.instances[A].state is InstanceState.DRAIN
    h.submit(c, ["new"])
    assert h.sent(LANE_A) == [] and [e for _, e in h.sent(LANE_B)] == ["new"]  # nothing new for it
    h.answer(LANE_A, on_a[:-1])
    assert h.d.instances[A].state is InstanceState.DRAIN and not h.disconnects
    h.answer(LANE_A, on_a[-1:])  # the last event it owed: drained
    assert h.d.instances[A].state is InstanceState.MAINT and h.disconnects == [LANE_A]
    assert h.stats.redispatched == 0  # answered where they were, not re-sent
    h.answer(LANE_B, on_b + [(101, "new")])
    assert h.answers(c) == expected([*EVENTS, "new"])
    assert "instance 127.0.0.1:1 drained: MAINT" in h.text()


def test_a_drain_can_be_called_off_and_a_down_instance_drains_at_once() -> None:
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, ["x", "y"])
    h.run(h.d.drain(A, h.now))
    h.run(h.d.enable(A, h.now))
    assert h.d.instances[A].state is InstanceState.UP
    for _ in range(3):
        h.run(h.d.check_failed(B, "refused", h.now))
    assert h.d.instances[B].state is InstanceState.DOWN
    h.run(h.d.drain(B, h.now))
    assert h.d.instances[B].state is InstanceState.MAINT


def test_a_draining_instance_that_fails_goes_to_maint_and_its_events_are_sent_again() -> None:
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, EVENTS[:10])
    on_a = h.sent(LANE_A)
    h.sent(LANE_B)
    h.run(h.d.drain(A, h.now))
    h.run(h.d.lane_failed(LANE_A, "event connection lost: closed by the node", h.now))
    assert h.d.instances[A].state is InstanceState.MAINT
    assert sorted(h.sent(LANE_B)) == on_a


def test_a_reload_adds_and_removes_instances_without_losing_events() -> None:
    h = Harness(settings(1))
    h.up(A)
    c = h.client("siem")
    h.submit(c, EVENTS[:10])
    on_a = h.sent(LANE_A)
    h.run(h.d.reconfigure(config(settings(2)), h.now))
    assert set(h.d.instances) == {B} and LANE_A in h.disconnects and LANE_A not in h.d.lanes
    assert len(h.d.backlog) == 10  # waiting for B
    h.up(B)
    assert sorted(h.sent(LANE_B)) == on_a
    assert "instance 127.0.0.1:1 removed" in h.text() and "instance 127.0.0.1:2 added" in h.text()


# -- back-pressure -------------------------------------------------------------------------------------


def test_a_client_over_its_pending_limit_is_paused_until_half_are_answered() -> None:
    h = Harness(settings(1), max_client_pending=10)
    h.up(A)
    c, other = h.client("siem"), h.client("other")
    h.submit(c, [f"e{n}" for n in range(10)])
    assert h.paused[c] == {"client_limit"} and not h.paused.get(other)
    assert h.stats.connections == {"paused_client_limit": 1}
    events = h.sent(LANE_A)
    h.answer(LANE_A, events[:4])
    assert h.paused[c] == {"client_limit"}  # 6 left: over half
    h.answer(LANE_A, events[4:5])
    assert h.paused[c] == set()


def test_a_full_backlog_pauses_the_heavy_clients_and_resumes_them_at_half() -> None:
    h = Harness(settings(1), max_pending_events=10, max_client_pending=1000)
    c, light = h.client("siem"), h.client("light")
    h.submit(light, ["one"])
    h.submit(c, [f"e{n}" for n in range(12)])  # no instance UP: the backlog fills
    assert h.paused[c] == {"backlog"} and not h.paused.get(light)
    assert "13 events wait for an instance (MaxPendingEvents 10): pausing clients 10.0.0.1" in h.text()
    h.up(A)
    assert h.paused[c] == set()
    assert "client(s) resumed" in h.text()


def test_a_lane_that_cannot_write_gets_nothing_until_it_can() -> None:
    h = Harness()
    h.up(A, B)
    h.run(h.d.lane_writable(LANE_A, False, h.now))
    c = h.client("siem")
    h.submit(c, EVENTS[:10])
    assert h.sent(LANE_A) == [] and len(h.sent(LANE_B)) == 10
    h.run(h.d.lane_writable(LANE_A, True, h.now))
    h.submit(c, EVENTS[:10])
    assert h.sent(LANE_A)


def test_a_large_backlog_is_placed_in_batches() -> None:
    h = Harness(settings(1), max_inflight_events=100_000, max_pending_events=100_000)
    h.up(A)
    c = h.client("siem")
    actions = h.submit(c, [f"e{n}" for n in range(10_000)])
    assert any(isinstance(a, Again) for a in actions)  # the harness dispatched again, as the edge does soon
    assert len(h.sent(LANE_A)) == 10_000


# -- clients --------------------------------------------------------------------------------------------


def test_a_half_closed_client_is_closed_after_its_last_answer() -> None:
    h = Harness(settings(1))
    h.up(A)
    c = h.client("siem")
    h.submit(c, ["a", "b"])
    assert h.d.client_eof(c) is True  # answers still owed: keep the connection open
    events = h.sent(LANE_A)
    h.answer(LANE_A, events[:1])
    assert h.closed_clients == []
    h.answer(LANE_A, events[1:])
    assert h.closed_clients == [c]


def test_a_client_gone_frees_its_events_on_the_lanes() -> None:
    h = Harness(settings(1))
    h.up(A)
    c = h.client("siem")
    h.submit(c, ["a", "b"])
    events = h.sent(LANE_A)
    h.run(h.d.client_gone(c))
    assert not h.d.lanes[LANE_A].owned and h.stats.dropped == {"client_gone": 2}
    h.answer(LANE_A, events)  # the node's answers arrive after the client left: dropped, counted
    assert h.d.correlator.dropped and c not in h.delivered


def test_detections_of_a_client_without_reply_back_go_to_output() -> None:
    h = Harness(settings(1))
    h.up(A)
    c = h.client("fire-and-forget", SessionFlags())
    assert "sent no X-KF-ReplyBack and there is no <OutputConnectionString>" in h.text(logging.WARNING)
    h.submit(c, ["hit:1", "miss:2"])
    h.answer(LANE_A, h.sent(LANE_A))
    assert h.output == ["category=x matched=hit:1"] and c not in h.delivered


def test_a_client_gone_without_reply_back_still_gets_its_detections_to_the_output() -> None:
    """A syslog shipper over TLS sends and closes at once (TLS has no half-close): its detections go on."""
    h = Harness(settings(1))
    h.up(A)
    c = h.client("shipper", SessionFlags())
    h.submit(c, ["hit:1", "miss:2", "hit:3"])
    events = h.sent(LANE_A)
    h.run(h.d.client_gone(c))
    assert "their detections still go to the output" in h.text(logging.INFO)
    assert h.stats.dropped == {} and h.d.lanes[LANE_A].owned
    h.answer(LANE_A, events)
    assert h.output == ["category=x matched=hit:1", "category=x matched=hit:3"]
    assert c not in h.d.clients and c not in h.closed_clients  # forgotten once answered, never "closed" again


def test_an_event_too_large_for_the_nodes_is_answered_here() -> None:
    h = Harness(settings(1), max_event_size=100)
    h.up(A)
    c = h.client("siem")
    h.submit(c, ["small", "é" * 60, Oversized("x" * 50, 5000)])
    assert [e for _, e in h.sent(LANE_A)] == ["small"]
    h.answer(LANE_A, [(1, "small")])
    lines = bytes(h.delivered[c]).decode().splitlines()
    assert lines[0] == "LookupFinished"
    assert lines[1].startswith("LookupFinished error=event_too_large size=120 limit=")
    assert lines[2] == "LookupFinished"
    assert h.stats.unmatched == {"event_too_large": 1} and h.stats.bad_input == {"oversized": 1}


# -- time ------------------------------------------------------------------------------------------------


def test_idle_lanes_get_a_keep_alive_line_each_second() -> None:
    h = Harness(settings(1))
    h.up(A)
    h.tick(0.5)
    assert bytes(h.wires.get(LANE_A, b"")) == b""
    h.tick(0.5)
    assert bytes(h.wires[LANE_A]) == b"\n"


@pytest.mark.parametrize("burst", [20_000])
def test_tables_are_compacted_once_a_burst_has_drained(burst: int) -> None:
    h = Harness(settings(1), max_inflight_events=burst, max_pending_events=burst, max_client_pending=burst)
    h.up(A)
    c = h.client("siem")
    h.submit(c, [f"e{n}" for n in range(burst)])
    h.tick(0.25)
    assert h.compacted == 0
    h.answer(LANE_A, h.sent(LANE_A))
    h.tick(0.25)
    assert h.compacted == 1


# -- what a review found --------------------------------------------------------------------------------


def test_an_old_connection_attempt_does_not_touch_the_lane_that_took_its_key() -> None:
    h = Harness(settings(1, connections=2))
    h.run(h.d.check_passed(A, 0.001, h.now))
    first = dict(h.attempts)  # both lanes connecting
    h.connects.clear()
    lane0 = f"{A}#0"
    h.run(h.d.lane_connected(lane0, first[lane0], h.now)[1])
    # Lane 1, still connecting, is retired (the node now asks for one connection), then wanted again.
    h.run(h.d.reconfigure(config(settings(1, connections=1)), h.now))
    h.run(h.d.reconfigure(config(settings(1, connections=2)), h.now))
    lane1 = f"{A}#1"
    assert h.attempts[lane1] != first[lane1]
    wanted, _ = h.d.lane_connected(lane1, h.attempts[lane1], h.now)
    assert wanted and h.d.lanes[lane1].connected
    # The first attempt's outcome arrives late: it must neither close the new lane nor be taken for it.
    assert h.d.connect_failed(lane1, first[lane1], "event connection failed: refused", h.now) == []
    assert h.d.lane_connected(lane1, first[lane1], h.now)[0] is False
    assert h.d.lanes[lane1].connected and h.d.instances[A].state is InstanceState.UP


def test_a_drain_called_off_makes_the_instance_available_again() -> None:
    h = Harness(settings(1), max_event_wait=5.0)
    h.up(A)
    c = h.client("siem")
    h.submit(c, ["held"])
    h.run(h.d.drain(A, h.now))
    assert h.d.instances[A].state is InstanceState.DRAIN and h.d.no_instance_since == h.now
    h.run(h.d.enable(A, h.now))
    assert h.d.instances[A].state is InstanceState.UP and h.d.no_instance_since is None
    h.answer(LANE_A, h.sent(LANE_A))
    h.run(h.d.lane_writable(LANE_A, False, h.now))  # it cannot take more for now: events wait
    h.submit(c, ["x"])
    for _ in range(30):
        h.tick(0.25)
    assert h.stats.unmatched == {}  # not answered "no instance" while one is UP


def test_a_draining_instance_that_fails_says_so() -> None:
    h = Harness()
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, EVENTS[:10])
    assert h.sent(LANE_A)
    h.run(h.d.drain(A, h.now))
    h.run(h.d.lane_failed(LANE_A, "event connection lost: closed by the node", h.now))
    assert "instance 127.0.0.1:1 failed while draining (event connection lost: closed by the node): MAINT" in h.text()
    assert h.stats.transitions["down"] == 1


# -- TLS lanes: a certificate that does not match the pin, tls changed by a reload ----------------------------

MISMATCH = "certificate mismatch: pinned AA:01, presented BB:02"


def test_a_pin_mismatch_takes_the_instance_out_at_once_even_with_a_lane_open() -> None:
    h = Harness(settings(1, connections=2), settings(2))
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, EVENTS)
    on_a = h.sent(LANE_A) + h.sent(f"{A}#1")
    assert on_a and h.sent(LANE_B)
    # Lane 1 of A reconnects and meets another certificate; lane 0 is still open: A goes out all the same.
    h.run(h.d.lane_failed(f"{A}#1", "event connection lost: closed by the node", h.now))
    assert h.d.instances[A].state is InstanceState.UP
    h.run(h.d.pin_refused(A, MISMATCH, h.now))
    inst = h.d.instances[A]
    assert inst.state is InstanceState.DOWN and h.d.why(inst) == MISMATCH
    assert LANE_A in h.disconnects
    errors = h.text(logging.ERROR)
    assert errors.count("pinned AA:01, presented BB:02") == 2  # the refusal (with the renew hint) and DOWN
    assert "threatgate balancer pins --renew 127.0.0.1:1" in errors
    assert sorted(h.sent(LANE_B)) == sorted(on_a)  # what A owed is answered by B
    # The health check meets the same certificate again: counted, not logged again.
    h.logs.clear()
    h.run(h.d.pin_refused(A, MISMATCH, h.now))
    assert h.text(logging.ERROR) == "" and h.stats.transitions["pin_mismatch"] == 2
    # Another certificate again is a new refusal, logged.
    h.run(h.d.pin_refused(A, MISMATCH.replace("BB", "CC"), h.now))
    assert "presented CC:02" in h.text(logging.ERROR)
    # Back once health checks (the same pin check) pass rise times.
    for _ in range(2):
        h.run(h.d.check_passed(A, 0.001, h.now))
    assert inst.state is InstanceState.UP and h.d.why(inst) == "connecting"


def test_a_pin_mismatch_of_a_connecting_lane_leaves_no_attempt_waiting() -> None:
    h = Harness(settings(1), settings(2))
    h.up(B)
    h.run(h.d.check_passed(A, 0.001, h.now))  # A is UP, its lane is being opened
    attempt = h.attempts[LANE_A]
    h.run(h.d.pin_refused(A, MISMATCH, h.now))
    h.run(h.d.connect_failed(LANE_A, attempt, MISMATCH, h.now))  # what the edge reports next
    lane = h.d.lanes[LANE_A]
    assert not lane.connecting and not lane.connected and h.d.instances[A].state is InstanceState.DOWN
    assert h.d.retry_lane(LANE_A) == []  # no reconnect while DOWN: health checks decide


def test_tls_changed_by_a_reload_reconnects_the_lanes_and_resends_what_they_owed() -> None:
    h = Harness(settings(1), settings(2))
    h.up(A, B)
    c = h.client("siem")
    h.submit(c, EVENTS[:20])
    on_a, on_b = h.sent(LANE_A), h.sent(LANE_B)
    old_attempt = h.attempts[LANE_A]
    h.connects.clear()
    h.run(h.d.reconfigure(config(settings(1, tls=True), settings(2)), h.now))
    assert LANE_A in h.disconnects and h.connects == [LANE_A] and h.attempts[LANE_A] != old_attempt
    assert h.d.instances[A].state is InstanceState.UP
    assert 'instance 127.0.0.1:1: tls="true": its event connections reconnect' in h.text()
    assert sorted(h.sent(LANE_B)) == sorted(on_a)  # sent again (B is open; A's new lane is not yet)
    late = h.answer(LANE_A, on_a)  # the old plain connection's late answers count for nothing
    assert not any(isinstance(a, Deliver) for a in late)
    h.open_lanes()
    h.answer(LANE_B, on_b + on_a)
    assert h.answers(c) == expected(EVENTS[:20]) and h.d.correlator.pending == 0
    # A reload without a change to tls keeps the lanes.
    h.disconnects.clear()
    h.run(h.d.reconfigure(config(settings(1, tls=True), settings(2)), h.now))
    assert h.disconnects == [] and h.connects == []
