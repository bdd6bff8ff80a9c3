"""Connections to instances: the persistent event connections ("lanes") and the PING health check.

Each enabled instance gets one or more persistent event connections, its *lanes*, opened with
``X-KF-SendFinishedEventX-KF-ReplyBack`` (the CyberTrace HA recipe); lines are written in batches,
replies are split into lines here and handed to the owner (the balancer service), which correlates
them.  Why several: a node with worker processes serves each connection in one worker for the
connection's whole life, so a single connection would keep one worker busy and leave the others
idle.  An instance opens as many lanes as ``<Instance connections=>`` says, or with ``auto`` (the
default) as many as the node's ``/readyz`` says (``event_connections``), 1 when it says nothing.

Invariants:
1. The :class:`Instance` holds what is the node's: settings, admin/health state, readiness, weight,
   counters.  A :class:`Lane` holds what is one connection's: its protocol, the events it owes, back-
   pressure, reply latency, progress and suspicion.  The lane is the owner of its events in the
   correlator (``lb/correlation.py``), under its key ``host:port#k``.
2. A lane's key is unique among the lanes its instance holds; a lane is retired (no new events, closed
   once it owes nothing) before its index can be given to a new lane, so a key never names two live
   connections.
3. Lane counts are decided by pure functions (:func:`lane_count`, :func:`plan_resize`); the
   :class:`Instance` applies the decision, the service does the I/O (connect, close, re-send).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, cast

from threatgate.config.balancer import BalancerConfig, InstanceSettings
from threatgate.lb.health import Health
from threatgate.lb.policy import InstanceState
from threatgate.net.describe import describe, printable
from threatgate.stats import BalancerStats
from threatgate.wire.flags import PONG, SessionFlags

log = logging.getLogger("threatgate.balancer")

UPSTREAM_FLAGS = SessionFlags(reply_back=True, send_finished=True).to_bytes()
PING_FLAGS = SessionFlags(reply_back=True, ping=True).to_bytes()
WRITE_HIGH = 8 * 1024 * 1024
"""Event bytes buffered toward one lane before the balancer stops dispatching to it."""
MAX_REPLY_LINE = 16 * 1024 * 1024
"""A reply line longer than this is a broken node: the connection is dropped (its events redispatched)."""
KEEPALIVE = 1.0
"""Seconds of silence after which an empty line is written to an event connection: the node skips it,
but it keeps the connection from being closed as idle (IdleTimeout) or evicted by a newcomer."""
LATENCY_WEIGHT = 0.2
"""Weight of each new sample in the moving average of a lane's reply latency."""


def lane_count(connections: int | Literal["auto"], learned: int | None) -> int:
    """How many lanes an instance wants: ``connections`` when a number, else what the node's ``/readyz``
    said (``learned``, already clamped to 1-64), else 1 (not polled, not answered yet, or an older node)."""
    if connections != "auto":
        return connections
    return learned if learned is not None else 1


@dataclass(frozen=True, slots=True)
class Resize:
    """What :func:`plan_resize` decided, by lane index."""

    open: tuple[int, ...] = ()  # new lanes
    revive: tuple[int, ...] = ()  # retiring lanes that take events again
    retire: tuple[int, ...] = ()  # lanes that take no new event; closed once they owe nothing

    def __bool__(self) -> bool:
        return bool(self.open or self.revive or self.retire)


def plan_resize(active: Sequence[tuple[int, bool]], retiring: Sequence[int], wanted: int) -> Resize:
    """The change from the current lanes to ``wanted`` lanes taking events.

    ``active``: (index, connected) of the lanes taking events; ``retiring``: indices of lanes draining.
    Growing revives draining lanes first (their connection is open and they already own events), then
    opens the lowest free indices.  Shrinking retires lanes without a connection first (nothing to
    drain; after a worker died the node closed that one), then the highest indices.
    """
    if wanted > len(active):
        need = wanted - len(active)
        revive = tuple(sorted(retiring)[:need])
        taken = {i for i, _ in active} | set(retiring)
        free = (i for i in range(len(taken) + need) if i not in taken)
        return Resize(open=tuple(next(free) for _ in range(need - len(revive))), revive=revive)
    if wanted < len(active):
        order = sorted(active, key=lambda lane: (lane[1], -lane[0]))  # disconnected first, then highest index
        return Resize(retire=tuple(i for i, _ in order[: len(active) - wanted]))
    return Resize()


class UpstreamProtocol(asyncio.Protocol):
    """One event connection (one lane): writes tagged events, splits replies into lines."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH)
        self.transport.write(UPSTREAM_FLAGS)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = buf.rfind(b"\n")
        if end < 0:
            self._buf = buf
            if len(buf) > MAX_REPLY_LINE:
                self.lane.on_broken(f"reply line longer than {MAX_REPLY_LINE} bytes")
            return
        self._buf = buf[end + 1 :]
        self.lane.on_lines(buf[:end].decode("utf-8", "replace").replace("\r", "").split("\n"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.lane.on_connection_lost(self, exc)

    def pause_writing(self) -> None:
        self.lane.writable = False

    def resume_writing(self) -> None:
        self.lane.writable = True
        self.lane.on_writable()


class Lane:
    """One event connection to an instance: what it owes, its back-pressure, latency and progress."""

    def __init__(self, instance: Instance, index: int) -> None:
        self.instance = instance
        self.index = index
        self.key = f"{instance.key}#{index}"  # its owner key in the correlator
        self.owned: dict[int, float] = {}  # request id -> loop time of dispatch, in dispatch order
        self.protocol: UpstreamProtocol | None = None
        self.writable = True
        self.connecting = False
        self.retiring = False  # takes no new event; closed and forgotten once it owes nothing
        self.last_progress = 0.0  # loop time of the last finished event (or of the first dispatch)
        self.last_write = 0.0  # loop time of the last bytes written
        self.latency = 0.0  # moving average of dispatch-to-finish seconds of its oldest events
        self.suspect_since: float | None = None  # overdue: its events were re-sent; no new ones while others can
        self.overdue_streak = 0  # found overdue in a row without finishing an event
        self.losses = 0  # lost on its own (its instance UP) in a row without finishing an event: reconnect backoff
        self.retry_at = 0.0  # loop time before which it is not reconnected (after losses)

    def __repr__(self) -> str:
        return f"<Lane {self.key} owned={len(self.owned)} connected={self.connected}>"

    @property
    def name(self) -> str:
        """How logs name it: the instance alone while it has one lane (as before lanes), else with the lane."""
        inst = self.instance
        if len(inst.lanes) == 1 and self.index == 0:
            return inst.key
        return f"{inst.key} lane {self.index}"

    @property
    def connected(self) -> bool:
        return self.protocol is not None and self.protocol.transport is not None

    def observe_latency(self, seconds: float) -> None:
        """A finished event's dispatch-to-finish time (one sample per read of replies is enough)."""
        self.latency = seconds if not self.latency else self.latency + LATENCY_WEIGHT * (seconds - self.latency)

    def oldest_dispatch(self) -> float | None:
        """Loop time at which its oldest unfinished event was sent (None when it owes nothing)."""
        for sent in self.owned.values():
            return sent
        return None

    def write(self, data: bytes, now: float) -> None:
        assert self.protocol is not None and self.protocol.transport is not None
        self.protocol.transport.write(data)
        self.last_write = now

    def keep_alive(self, now: float) -> None:
        """Write an empty line when the connection has been silent for :data:`KEEPALIVE` seconds."""
        if self.connected and now - self.last_write >= KEEPALIVE:
            self.write(b"\n", now)

    async def connect(self, connect_timeout: float) -> None:
        """Open the event connection (its instance is UP, or a lost lane reconnects)."""
        if self.connected or self.connecting:
            return
        self.connecting = True
        inst = self.instance
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamProtocol(self), inst.settings.host, inst.settings.matching_port),
                connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            inst.owner.lane_failed(self, f"event connection failed: {describe(exc)}")
            return
        finally:
            self.connecting = False
        if inst.state is not InstanceState.UP or self.retiring or self not in inst.lanes:
            # DOWN (another lane failed), disabled, removed or no longer wanted while we were connecting
            if protocol.transport is not None:
                protocol.transport.close()
            return
        self.protocol = protocol
        self.writable = True
        if self.losses:
            log.debug("instance %s: event connection open again", self.name)
        else:
            log.info("instance %s: event connection open", self.name)
        inst.owner.lane_connected(self)

    def close(self) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    # -- callbacks from the protocol ----------------------------------------------------------

    def on_lines(self, lines: list[str]) -> None:
        self.instance.owner.lane_lines(self, lines)

    def on_broken(self, why: str) -> None:
        self.instance.owner.lane_failed(self, why)

    def on_writable(self) -> None:
        self.instance.owner.lane_writable(self)

    def on_connection_lost(self, protocol: UpstreamProtocol, exc: Exception | None) -> None:
        if protocol is self.protocol:
            self.protocol = None
            self.instance.owner.lane_failed(
                self, f"event connection lost: {describe(exc) if exc else 'closed by the node'}"
            )


class Instance:
    """One node as the balancer sees it: settings, state, health, readiness, counters, and its lanes."""

    def __init__(self, settings: InstanceSettings, *, rise: int, fall: int, owner: InstanceOwner) -> None:
        self.settings = settings
        self.key = settings.key
        self.health = Health(rise=rise, fall=fall)
        self.state = InstanceState.DOWN if settings.enabled else InstanceState.MAINT
        self.owner = owner
        self.dispatched = 0  # events sent to it (redispatches to it included)
        self.finished = 0  # events it answered (their LookupFinished arrived)
        self.redispatched = 0  # events it owed that were sent again elsewhere after it (or a lane) failed
        self.check_seconds: float | None = None  # round trip of its last passed health check (connect to PONG)
        self.ready: bool | None = True  # /readyz said ready (None: not polled yet), or readiness is not polled
        self.not_ready_reason = ""
        self.max_event_size: int | None = None  # the node's MaxEventSize, from /readyz when it says
        self.event_connections: int | None = None  # lanes the node asks for in /readyz (None: not said)
        self.lanes: list[Lane] = []  # in index order, the retiring ones included
        self.active_lanes = 0  # lanes taking events (not retiring): an event's share of weight and limit
        self.resize()

    def __repr__(self) -> str:
        return (
            f"<Instance {self.key} {self.state.value} owned={self.owned_count} "
            f"lanes={self.open_lanes}/{self.active_lanes}>"
        )

    def wanted_lanes(self) -> int:
        return lane_count(self.settings.connections, self.event_connections)

    @property
    def connected(self) -> bool:
        """At least one lane is open."""
        return any(lane.connected for lane in self.lanes)

    @property
    def open_lanes(self) -> int:
        return sum(1 for lane in self.lanes if lane.connected)

    @property
    def owned_count(self) -> int:
        """Events it owes answers for, over every lane."""
        return sum(len(lane.owned) for lane in self.lanes)

    @property
    def suspect_since(self) -> float | None:
        """Since when its earliest suspect lane is suspect (None: no lane is)."""
        since = [lane.suspect_since for lane in self.lanes if lane.suspect_since is not None]
        return min(since) if since else None

    @property
    def last_progress(self) -> float:
        """Loop time of the last event any lane finished (or of a first dispatch)."""
        return max((lane.last_progress for lane in self.lanes), default=0.0)

    def resize(self) -> tuple[list[Lane], list[Lane]]:
        """Bring the lanes to :meth:`wanted_lanes`: returns (lanes opened or revived, lanes retired).

        New lanes are not connected here (the service connects them while the instance is UP); a
        retired lane that owes nothing is dropped at once, one that owes events keeps draining.
        """
        plan = plan_resize(
            [(lane.index, lane.connected) for lane in self.lanes if not lane.retiring],
            [lane.index for lane in self.lanes if lane.retiring],
            self.wanted_lanes(),
        )
        if not plan:
            return [], []
        by_index = {lane.index: lane for lane in self.lanes}
        added = [Lane(self, i) for i in plan.open]
        for i in plan.revive:
            by_index[i].retiring = False
        retired = [by_index[i] for i in plan.retire]
        for lane in retired:
            lane.retiring = True
        self.lanes = sorted([*self.lanes, *added], key=lambda lane: lane.index)
        for lane in retired:
            if not lane.owned:
                self.drop_lane(lane)
        self.active_lanes = sum(1 for lane in self.lanes if not lane.retiring)
        return added + [by_index[i] for i in plan.revive], retired

    def drop_lane(self, lane: Lane) -> None:
        """Forget a retired lane (it owes nothing): its connection is closed, its index free again."""
        lane.close()
        if lane in self.lanes:
            self.lanes.remove(lane)

    async def connect(self, connect_timeout: float) -> None:
        """Open every lane that should be open and is not (called when a health check passes)."""
        now = asyncio.get_running_loop().time()
        due = [
            lane
            for lane in self.lanes
            if not lane.connected and not lane.connecting and not lane.retiring and lane.retry_at <= now
        ]
        if due:
            await asyncio.gather(*(lane.connect(connect_timeout) for lane in due))

    def close(self) -> None:
        """Close every lane (the instance is DOWN, disabled or removed)."""
        for lane in self.lanes:
            lane.close()

    def keep_alive(self, now: float) -> None:
        for lane in self.lanes:
            lane.keep_alive(now)


class InstanceOwner:
    """What a :class:`Lane` reports to (the balancer service implements it)."""

    def lane_lines(self, lane: Lane, lines: list[str]) -> None:
        raise NotImplementedError

    def lane_failed(self, lane: Lane, why: str) -> None:
        raise NotImplementedError

    def lane_connected(self, lane: Lane) -> None:
        raise NotImplementedError

    def lane_writable(self, lane: Lane) -> None:
        raise NotImplementedError


async def ping(host: str, port: int, check_timeout: float) -> str | None:
    """One active health check: ``X-KF-ReplyBackPING`` -> ``PONG``.  None when healthy, else the error."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check_timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(PING_FLAGS)
            data = await reader.read(64)
    except TimeoutError:
        return f"no PONG within {check_timeout:.0f} s"
    except OSError as exc:
        return f"cannot connect: {describe(exc)}"
    finally:
        if writer is not None:
            writer.close()
    if not data.startswith(PONG):
        return f"answered {printable(data, 20)} instead of PONG"
    return None


class BalancerView(Protocol):
    """What the balancer's components read of it at every use (``BalancerService`` is one): properties,
    read through, since a reload replaces the config and the instance table.  Each component's port
    (gateway.GatewayHost, readiness.ReadinessHost) adds what else it needs."""

    @property
    def config(self) -> BalancerConfig: ...
    @property
    def stats(self) -> BalancerStats: ...
    @property
    def instances(self) -> Mapping[str, Instance]: ...
