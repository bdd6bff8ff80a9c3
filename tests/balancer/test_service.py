"""Tests for threatgate.balancer.service (the edge), lanes first: several event connections per instance.

The balancer service runs on the test's event loop with stand-in transports: a lane's transport records
what the balancer writes, and the test answers as a node would (``<id> <detection>`` lines, then
``<id> LookupFinished``) by feeding the lane's protocol.  The client is a real :class:`ClientConnection`
on a stand-in transport, so what it receives is exactly what a SIEM would read.

What must hold: a lane lost while another lane of its instance is open re-sends only its own unfinished
events, each exactly once, and the instance stays UP; the last lane lost is the instance DOWN, as with one
connection; the lane count follows ``connections`` and the node's ``event_connections`` without losing or
re-sending anything; a node with two lanes takes the share of events one connection would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.config.configs import balancer_model, instance
from threatgate.balancer.app import build_balancer
from threatgate.balancer.readiness import ReadinessMonitor, View, parse_readiness
from threatgate.balancer.service import BalancerService, ClientConnection, _Collector
from threatgate.balancer.upstream import UpstreamProtocol
from threatgate.config.balancer import HealthCheckSettings, InstanceSettings
from threatgate.lb.actions import Connect
from threatgate.lb.correlation import Drop
from threatgate.lb.instances import Instance, InstanceState, Lane

REPLY_FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"


class StandIn:
    """A transport that records writes (a lane's connection to a node, or a client's connection)."""

    def __init__(self, service: BalancerService | None = None) -> None:
        self.service = service
        self.data = bytearray()
        self.read = 0  # how much of ``data`` the test has looked at
        self.closing = False

    def write(self, data: bytes) -> None:
        self.data += data

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def flush(self) -> None:
        """Let the balancer write what it gathered in this loop iteration."""
        if self.service is not None:
            self.service._flush()

    def new_lines(self) -> list[str]:
        """Lines written since the last call (keep-alive empty lines left out)."""
        chunk, self.read = bytes(self.data[self.read :]), len(self.data)
        return [line for line in chunk.decode().split("\n") if line]


settings = instance
config = balancer_model


class Rig:
    """A balancer service with stand-in lanes; connecting a lane attaches a new stand-in (no socket)."""

    def __init__(self, service: BalancerService) -> None:
        self.service = service
        self.wires: dict[str, StandIn] = {}  # lane key -> its current transport
        self.protocols: dict[str, UpstreamProtocol] = {}  # lane key -> its current connection
        self.connects: Counter[str] = Counter()
        self.connected = asyncio.Event()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def attach(self, lane: Lane) -> StandIn:
        """The lane's connection opens (as the edge does after a Connect)."""
        protocol = UpstreamProtocol(self.service, lane.key)
        wire = StandIn()
        protocol.connection_made(wire)  # type: ignore[arg-type]
        assert wire.new_lines() == ["X-KF-SendFinishedEventX-KF-ReplyBack"]
        self.service._upstreams[lane.key] = protocol
        self.wires[lane.key] = wire
        self.protocols[lane.key] = protocol
        wanted, actions = self.service.dispatcher.lane_connected(lane.key, lane.attempt, self.now())
        assert wanted, lane
        self.service.apply(actions)
        return wire

    def proto(self, lane: Lane) -> UpstreamProtocol:
        return self.protocols[lane.key]

    def up(self, key: str) -> Instance:
        """The instance UP (its first health check passed) with every lane connected."""
        service = self.service
        service.apply(service.dispatcher.check_passed(key, 0.001, self.now()))
        inst = service.instances[key]
        assert inst.state is InstanceState.UP
        for lane in inst.lanes:
            if not lane.connected:
                self.attach(lane)
        return inst

    def check_passed(self, inst: Instance) -> None:
        self.service.apply(self.service.dispatcher.check_passed(inst.key, 0.001, self.now()))

    def client(self, events: list[str]) -> StandIn:
        conn = ClientConnection(self.service)
        wire = StandIn(self.service)
        conn.connection_made(wire)  # type: ignore[arg-type]
        conn.data_received(REPLY_FLAGS + "".join(f"{e}\n" for e in events).encode())
        return wire

    def sent(self, lane: Lane) -> list[tuple[int, str]]:
        """(request id, event) written to ``lane`` since the last look."""
        self.service._flush()  # what the loop does once this iteration's callbacks ran
        split = (line.partition(" ") for line in self.wires[lane.key].new_lines())
        return [(int(rid), event) for rid, _, event in split]

    def answer(self, lane: Lane, events: list[tuple[int, str]], finish: bool = True) -> None:
        """The node answers on ``lane``: an event ``hit:...`` detects one line, the others nothing."""
        lines = []
        for rid, event in events:
            if event.startswith("hit"):
                lines.append(f"{rid} category=x matched={event}")
            if finish:
                lines.append(f"{rid} LookupFinished")
        self.proto(lane).data_received(("\n".join(lines) + "\n").encode())


@pytest.fixture
def make_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(*instances: InstanceSettings, **fields: Any) -> Rig:
        service = build_balancer(config(tmp_path, *instances, **fields), random.Random(1))
        rig = Rig(service)

        async def connect(self: BalancerService, action: Connect) -> None:
            lane = service.dispatcher.lanes.get(action.lane)
            if lane is None or not lane.connecting or lane.attempt != action.attempt:
                return  # attached by the test already, or dropped meanwhile
            rig.connects[lane.key] += 1
            rig.attach(lane)
            rig.connected.set()

        monkeypatch.setattr(BalancerService, "_connect", connect)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.service.listener.close_all()


def answers(wire: StandIn) -> list[tuple[str, ...]]:
    """A client's answers, event by event: its detection lines (the finished line ends each)."""
    wire.flush()
    out: list[tuple[str, ...]] = []
    current: list[str] = []
    for line in wire.new_lines():
        if line == "LookupFinished":
            out.append(tuple(current))
            current = []
        else:
            current.append(line)
    assert not current, current
    return out


def expected(events: list[str]) -> list[tuple[str, ...]]:
    return [(f"category=x matched={e}",) if e.startswith("hit") else () for e in events]


EVENTS = [f"hit:{n}" if n % 3 == 0 else f"miss:{n}" for n in range(200)]


# -- a lane lost while others live -------------------------------------------------------------------------------


async def test_a_lane_lost_while_another_is_open_resends_only_its_events_exactly_once(
    make_rig: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(settings(1, connections=2))
    inst = rig.up("127.0.0.1:1")
    lane0, lane1 = inst.lanes
    assert [lane.key for lane in inst.lanes] == ["127.0.0.1:1#0", "127.0.0.1:1#1"]
    client = rig.client(EVENTS)
    on0, on1 = rig.sent(lane0), rig.sent(lane1)
    assert len(on0) + len(on1) == len(EVENTS) and abs(len(on0) - len(on1)) <= 1  # spread over both lanes
    # Lane 1 answers a few events, and part of one more (a detection line, no finished line), then its
    # connection is lost (the worker serving it died).
    done, partial = on1[:10], [e for e in on1[10:] if e[1].startswith("hit")][:1]
    rig.answer(lane1, done)
    rig.answer(lane1, partial, finish=False)
    old = rig.proto(lane1)
    caplog.set_level(logging.INFO, "threatgate.balancer")
    old.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert inst.state is InstanceState.UP
    assert not lane1.connected and lane0.connected
    assert rig.service.stats.transitions == {"up": 1, "lane_lost": 1}
    # Only lane 1's unfinished events are sent again, each once, all on the live lane; none of lane 0's.
    unfinished = [e for e in on1 if e not in done]
    assert sorted(rig.sent(lane0)) == unfinished
    assert rig.service.stats.redispatched == inst.redispatched == len(unfinished)
    assert "instance 127.0.0.1:1 lane 1: event connection lost: " in caplog.text
    assert "the instance stays UP (1 of 2 event connections open), this one reconnects in 0.2 s" in caplog.text
    assert f"instance 127.0.0.1:1: {len(unfinished)} unfinished event(s) of event connection 1 sent again" in (
        caplog.text
    )
    # A late line of the dead connection (still in a socket buffer) is refused: the event has a new owner.
    old.data_received(f"{partial[0][0]} LookupFinished\n".encode())
    assert rig.service.stats.dropped_lines == {Drop.NOT_OWNER.value: 1}
    # The live lane answers everything it holds: every event is answered once, in order, with its detections.
    rig.answer(lane0, on0 + unfinished)
    assert answers(client) == expected(EVENTS)
    assert rig.service.correlator.pending == 0
    # The lost lane reconnects on its own after LANE_RETRY (the instance never went DOWN) and gets events again.
    await asyncio.wait_for(rig.connected.wait(), 5)
    assert rig.connects == {"127.0.0.1:1#1": 1} and lane1.connected and lane1.losses == 1
    again = rig.client(EVENTS[:20])
    on0, on1 = rig.sent(lane0), rig.sent(lane1)
    assert on1, "the reconnected lane gets events"
    rig.answer(lane0, on0)
    rig.answer(lane1, on1)
    assert answers(again) == expected(EVENTS[:20])
    assert lane1.losses == 0  # an answered event ends the reconnect backoff


async def test_the_last_lane_lost_is_the_instance_down_as_with_one_connection(
    make_rig: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(settings(1, connections=2), settings(2))
    a, b = rig.up("127.0.0.1:1"), rig.up("127.0.0.1:2")
    client = rig.client(EVENTS)
    held = {lane.key: rig.sent(lane) for lane in [*a.lanes, *b.lanes]}
    assert all(held.values())
    caplog.set_level(logging.INFO, "threatgate.balancer")
    for lane in list(a.lanes):  # the node is gone: every connection closes
        rig.proto(lane).connection_lost(None)
    assert a.state is InstanceState.DOWN
    assert "instance 127.0.0.1:1 is DOWN: event connection lost: closed by the node" in caplog.text
    assert rig.service.stats.transitions == {"up": 2, "lane_lost": 1, "down": 1}
    [other] = b.lanes
    resent = rig.sent(other)
    assert sorted(resent) == sorted(held["127.0.0.1:1#0"] + held["127.0.0.1:1#1"])
    rig.answer(other, held["127.0.0.1:2#0"] + resent)
    assert answers(client) == expected(EVENTS)
    rig.service._retry_lane(a.lanes[0].key)  # LANE_RETRY later: the first lane lost does not reconnect
    await asyncio.sleep(0)
    assert not rig.connects


async def test_one_connection_behaves_as_before_lanes(make_rig: Any, caplog: pytest.LogCaptureFixture) -> None:
    """``auto`` and a node that says nothing: one lane named as the instance; its loss is the instance DOWN."""
    rig = make_rig(settings(1), settings(2))
    a, b = rig.up("127.0.0.1:1"), rig.up("127.0.0.1:2")
    assert len(a.lanes) == len(b.lanes) == 1 and a.lanes[0].name == "127.0.0.1:1"
    rig.client(EVENTS)
    assert rig.sent(a.lanes[0]) and rig.sent(b.lanes[0])
    caplog.set_level(logging.INFO, "threatgate.balancer")
    rig.proto(a.lanes[0]).connection_lost(None)
    assert a.state is InstanceState.DOWN
    assert re.search(
        r"instance 127\.0\.0\.1:1: \d+ unfinished event\(s\) sent again to other instances \(event connection lost",
        caplog.text,
    )
    assert "lane" not in caplog.text


# -- hung lanes -----------------------------------------------------------------------------------------------------


async def test_a_silent_lane_is_suspect_alone_while_its_sibling_answers(
    make_rig: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(settings(1, connections=2))
    inst = rig.up("127.0.0.1:1")
    lane0, lane1 = inst.lanes
    client = rig.client(EVENTS)
    on0, on1 = rig.sent(lane0), rig.sent(lane1)
    rig.answer(lane0, on0)  # lane 0 answers, lane 1 (a stuck worker) does not
    caplog.set_level(logging.WARNING, "threatgate.balancer")
    now = asyncio.get_running_loop().time() + 1.5
    rig.service.tick(now)
    assert lane1.suspect_since == now and lane0.suspect_since is None and not lane1.connected
    assert inst.state is InstanceState.UP
    assert "instance 127.0.0.1:1 lane 1 is suspect: no answer for " in caplog.text
    assert sorted(rig.sent(lane0)) == on1  # its events went to the sibling
    rig.answer(lane0, on1)
    assert answers(client) == expected(EVENTS)
    # A passing health check clears it and reconnects it.
    rig.check_passed(inst)
    await asyncio.wait_for(rig.connected.wait(), 5)
    assert lane1.connected and lane1.suspect_since is None


async def test_reply_timeout_on_one_lane_closes_that_lane_only(make_rig: Any) -> None:
    rig = make_rig(settings(1, connections=2))
    inst = rig.up("127.0.0.1:1")
    lane0, lane1 = inst.lanes
    client = rig.client(EVENTS)
    on0, on1 = rig.sent(lane0), rig.sent(lane1)
    rig.answer(lane0, on0[:-1])  # lane 0 keeps answering (one left), lane 1 never does
    loop = asyncio.get_running_loop()
    lane0.last_progress = loop.time() + 30.5  # lane 0 answered just now, at the test's "now"
    timeouts(rig, loop.time() + 31)
    assert inst.state is InstanceState.UP and lane0.connected and not lane1.connected
    assert rig.service.stats.transitions == {"up": 1, "reply_timeout": 1, "lane_lost": 1}
    resent = rig.sent(lane0)
    assert sorted(resent) == on1
    rig.answer(lane0, on0[-1:] + resent)
    assert answers(client) == expected(EVENTS)
    # Both lanes silent that long: the instance, as with one connection.
    rig.client(EVENTS[:10])
    await asyncio.wait_for(rig.connected.wait(), 5)
    rig.client(EVENTS[:10])
    timeouts(rig, loop.time() + 100)
    assert rig.service.instances[inst.key].state is InstanceState.DOWN


def timeouts(rig: Rig, now: float) -> None:
    """The dispatcher's ReplyTimeout check alone (a tick would find the silent lane overdue first)."""
    out: list[Any] = []
    rig.service.dispatcher._check_timeouts(now, out)
    rig.service.apply(out)


# -- spread, weight and limits ---------------------------------------------------------------------------------------


async def test_two_lanes_take_the_share_of_one_connection(make_rig: Any) -> None:
    """Weight per lane = the instance's weight / its lanes: equal weights, equal shares, whatever the lanes."""
    rig = make_rig(settings(1, connections=2), settings(2), settings(3, connections=3, weight=2))
    a, b, c = rig.up("127.0.0.1:1"), rig.up("127.0.0.1:2"), rig.up("127.0.0.1:3")
    rig.client([f"e{n}" for n in range(4000)])
    share = {inst.key: sum(len(rig.sent(lane)) for lane in inst.lanes) for inst in (a, b, c)}
    assert sum(share.values()) == 4000
    assert abs(share[a.key] - share[b.key]) <= 4, share
    assert abs(share[c.key] - 2 * share[b.key]) <= 8, share
    for inst in (a, c):  # and within an instance, evenly over its lanes
        counts = [len(lane.owned) for lane in inst.lanes]
        assert max(counts) - min(counts) <= 2, counts


async def test_the_inflight_limit_is_the_instances_split_over_its_lanes(make_rig: Any) -> None:
    rig = make_rig(settings(1, connections=2), max_inflight_events=10)
    inst = rig.up("127.0.0.1:1")
    rig.client([f"e{n}" for n in range(50)])
    assert [len(lane.owned) for lane in inst.lanes] == [5, 5]
    assert len(rig.service.backlog) == 40


async def test_a_lane_that_cannot_write_gets_nothing_while_its_sibling_can(make_rig: Any) -> None:
    rig = make_rig(settings(1, connections=2))
    inst = rig.up("127.0.0.1:1")
    lane0, lane1 = inst.lanes
    rig.proto(lane0).pause_writing()  # its socket buffer is full
    rig.client(EVENTS[:50])
    assert not rig.sent(lane0) and len(rig.sent(lane1)) == 50
    rig.proto(lane0).resume_writing()
    rig.client(EVENTS[:50])
    assert rig.sent(lane0)


# -- the lane count ---------------------------------------------------------------------------------------------------


def readyz(**fields: Any) -> View:
    return View("127.0.0.1:1", api="443", answer=parse_readiness(200, json.dumps(fields).encode()))


async def test_the_lane_count_follows_the_nodes_event_connections_without_losing_or_resending(
    make_rig: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(settings(1))
    inst = rig.up("127.0.0.1:1")
    monitor = rig.service.readiness
    assert isinstance(monitor, ReadinessMonitor)
    caplog.set_level(logging.INFO, "threatgate.balancer")
    monitor._learn_lanes(inst, readyz(ready=True, role="standalone"))  # an older node: says nothing
    assert len(inst.lanes) == 1 and not rig.connects
    # The node restarted with 2 workers: a second lane opens, the instance stays UP throughout.
    monitor._learn_lanes(inst, readyz(ready=True, role="standalone", event_connections=2))
    await asyncio.wait_for(rig.connected.wait(), 5)
    assert [lane.key for lane in inst.lanes] == ["127.0.0.1:1#0", "127.0.0.1:1#1"] and inst.open_lanes == 2
    assert "instance 127.0.0.1:1: 2 event connection(s), was 1 (the node's /readyz event_connections 2)" in caplog.text
    client = rig.client(EVENTS)
    lane0, lane1 = inst.lanes
    on0, on1 = rig.sent(lane0), rig.sent(lane1)
    assert on0 and on1
    # A poll that fails keeps the lanes.
    monitor._learn_lanes(inst, View(inst.key, api="443", answer=None, error="cannot connect"))
    assert inst.active_lanes == 2
    # A worker is not ready: back to 1.  Lane 1 takes no new event, answers what it holds, then closes.
    monitor._learn_lanes(inst, readyz(ready=True, role="standalone", event_connections=1))
    assert lane1.retiring and lane1.connected and inst.active_lanes == 1
    more = rig.client(EVENTS[:30])
    assert not rig.sent(lane1) and len(rig.sent(lane0)) == 30
    rig.answer(lane1, on1)
    assert inst.lanes == [lane0] and not lane1.connected
    assert "instance 127.0.0.1:1: event connection 1 retired (1 lane(s) now)" in caplog.text
    rig.answer(lane0, on0)
    assert answers(client) == expected(EVENTS)
    assert rig.service.stats.redispatched == 0 and inst.state is InstanceState.UP
    del more


async def test_an_absurd_event_connections_is_clamped_and_logged_once(
    make_rig: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(settings(1))
    inst = rig.up("127.0.0.1:1")
    caplog.set_level(logging.INFO, "threatgate.balancer")
    for _ in range(3):
        rig.service.readiness._learn_lanes(inst, readyz(ready=True, role="standalone", event_connections=10**6))
    assert inst.active_lanes == 64
    assert caplog.text.count("/readyz asks for 1000000 event connections; opening at most 64") == 1


async def test_explicit_connections_win_and_a_reload_opens_or_retires_lanes(make_rig: Any, tmp_path: Path) -> None:
    rig = make_rig(settings(1, connections=3))
    inst = rig.up("127.0.0.1:1")
    rig.service.readiness._learn_lanes(inst, readyz(ready=True, role="standalone", event_connections=1))
    assert inst.active_lanes == 3
    rig.service.apply_config(config(tmp_path, settings(1, connections=1)))
    assert [lane.index for lane in inst.lanes] == [0] and inst.state is InstanceState.UP
    rig.service.apply_config(config(tmp_path, settings(1, connections="auto")))
    assert inst.active_lanes == 1  # the node said 1
    rig.service.apply_config(config(tmp_path, settings(1, connections=2)))
    await asyncio.wait_for(rig.connected.wait(), 5)
    assert inst.open_lanes == 2


# -- what operators read -------------------------------------------------------------------------------------------


async def test_metrics_count_per_instance_over_its_lanes(make_rig: Any) -> None:
    rig = make_rig(settings(1, connections=2), settings(2))
    rig.up("127.0.0.1:1")
    rig.up("127.0.0.1:2")
    rig.client([f"e{n}" for n in range(30)])
    registry = CollectorRegistry()
    registry.register(_Collector(rig.service, {}, {}))
    text = generate_latest(registry).decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert samples['threatgate_balancer_instance_lanes{instance="127.0.0.1:1"}'] == "2.0"
    assert samples['threatgate_balancer_instance_lanes{instance="127.0.0.1:2"}'] == "1.0"
    inflight = [float(samples[f'threatgate_balancer_instance_inflight{{instance="127.0.0.1:{p}"}}']) for p in (1, 2)]
    lanes = rig.service.instances["127.0.0.1:1"].lanes
    assert sum(inflight) == 30 and inflight[0] == sum(len(lane.owned) for lane in lanes) > 0


async def test_retiring_lanes_whose_client_left_are_dropped_and_their_indices_reused(
    make_rig: Any, tmp_path: Path
) -> None:
    rig = make_rig(settings(1, connections=3))
    inst = rig.up("127.0.0.1:1")
    rig.client(EVENTS)
    assert all(rig.sent(lane) for lane in inst.lanes)
    rig.service.apply_config(config(tmp_path, settings(1, connections=1)))
    assert [(lane.index, lane.retiring) for lane in inst.lanes] == [(0, False), (1, True), (2, True)]
    [client] = [c for c in rig.service.listener.active if isinstance(c, ClientConnection)]
    client.connection_lost(None)  # the client leaves: nothing is owed on any lane any more
    assert [lane.index for lane in inst.lanes] == [0] and rig.service.correlator.pending == 0
    rig.service.apply_config(config(tmp_path, settings(1, connections=2)))
    await asyncio.wait_for(rig.connected.wait(), 5)
    assert [lane.key for lane in inst.lanes] == ["127.0.0.1:1#0", "127.0.0.1:1#1"] and inst.open_lanes == 2


# -- what a review found ------------------------------------------------------------------------------------------


async def test_a_client_that_half_closes_gets_the_answer_made_while_it_closed(make_rig: Any) -> None:
    """The last event (no LF) is answered here at EOF (too large to forward): written before the close."""
    rig = make_rig(settings(1), max_event_size=100)
    rig.up("127.0.0.1:1")
    conn = ClientConnection(rig.service)
    wire = StandIn(rig.service)
    conn.connection_made(wire)  # type: ignore[arg-type]
    conn.data_received(REPLY_FLAGS + ("é" * 60).encode())
    assert conn.eof_received() is False  # nothing owed any more: asyncio closes the transport on return
    assert wire.new_lines() == ["LookupFinished"]  # oversized for the balancer itself: answered without detections


async def test_an_instance_removed_and_added_again_at_once_is_still_checked(
    make_rig: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings: list[int] = []

    async def ping(host: str, port: int, check_timeout: float) -> str | None:
        pings.append(port)
        return None

    monkeypatch.setattr("threatgate.balancer.lanes_tls.ping", ping)
    fast = HealthCheckSettings(interval=0.05, timeout=1.0, rise=1, fall=1)
    rig = make_rig(settings(1), health=fast)
    rig.service._start_checks()
    await asyncio.wait_for(rig.connected.wait(), 5)
    rig.service.apply_config(config(tmp_path, health=fast))  # removed ...
    rig.service.apply_config(config(tmp_path, settings(1), health=fast))  # ... and back before the next check
    inst = rig.service.instances["127.0.0.1:1"]
    assert inst.state is InstanceState.DOWN
    before = len(pings)
    for _ in range(100):
        await asyncio.sleep(0.02)
        if inst.state is InstanceState.UP:
            break
    assert inst.state is InstanceState.UP and len(pings) > before
    rig.service.request_exit()
    await asyncio.gather(*rig.service._checkers.values())


def test_detection_statistics_are_the_statistics_parts_report(tmp_path: Path) -> None:
    service = build_balancer(config(tmp_path, settings(1)), random.Random(1))
    got = service.detection_statistics()  # wired by the composition root; nothing polled yet
    assert got["last_hour"]["detections"] == 0 and got["instances"] == {} and len(got["per_minute"]) == 60
    service.statistics = None
    assert service.detection_statistics() == {}
