"""Instances and their lanes as the balancer sees them: state, health, what each connection owes.

Sans-IO: nothing here opens, writes or closes a socket.  :class:`~threatgate.lb.dispatcher.Dispatcher`
changes these records and says what the edge must do; the edge (balancer/service.py) owns the
connections, by lane key.

Invariants:
1. An :class:`Instance` holds what is the node's: settings, admin/health state, readiness, weight,
   counters.  A :class:`Lane` holds what is one event connection's: whether it is open and writable,
   the events it owes, reply latency, progress and suspicion.  The lane is the owner of its events in
   the correlator (``lb/correlation.py``), under its key ``host:port#k``.
2. A lane's key is unique among the lanes its instance holds; a lane is retired (no new events, closed
   once it owes nothing) before its index can be given to a new lane, so a key never names two live
   connections.
3. An instance's state changes only through :func:`next_state` (the table :data:`TRANSITIONS`), in
   HAProxy's words: UP gets events; DOWN failed (health checks, its connections, its answers); DRAIN
   gets nothing new and finishes what it owes, then is MAINT; MAINT is disabled (``enabled="false"``,
   or disabled at run time).
4. Lane counts are decided by pure functions (:func:`lane_count`, :func:`plan_resize`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from threatgate.config.balancer import InstanceSettings
from threatgate.lb.health import Health

LATENCY_WEIGHT = 0.2
"""Weight of each new sample in the moving average of a lane's reply latency."""


class InstanceState(enum.Enum):
    """Admin and health state, in HAProxy's words."""

    UP = "UP"  # healthy and enabled: gets events
    DOWN = "DOWN"  # failed health checks, lost its connections or its answers: gets nothing
    DRAIN = "DRAIN"  # finishing what it owes, gets nothing new; then MAINT
    MAINT = "MAINT"  # disabled (enabled="false", or at run time): gets nothing, not checked


class Change(enum.Enum):
    """What happens to an instance (the columns of :data:`TRANSITIONS`)."""

    CHECKS_PASSED = "checks_passed"  # rise health checks passed (the first one for an instance never seen)
    FAILED = "failed"  # fall checks failed, its last lane lost, overdue or no answer for ReplyTimeout
    DRAIN = "drain"  # asked to finish what it owes and take nothing new
    DRAINED = "drained"  # draining, and it owes nothing any more
    DISABLE = "disable"  # enabled="false" (a reload) or disabled at run time: its events are sent again
    ENABLE = "enable"


S = InstanceState
TRANSITIONS: dict[tuple[InstanceState, Change], InstanceState] = {
    (S.DOWN, Change.CHECKS_PASSED): S.UP,
    (S.UP, Change.FAILED): S.DOWN,
    (S.DRAIN, Change.FAILED): S.MAINT,  # it was leaving anyway: what it owed is sent again
    (S.UP, Change.DRAIN): S.DRAIN,
    (S.DOWN, Change.DRAIN): S.MAINT,  # owes nothing: drained at once
    (S.DRAIN, Change.DRAINED): S.MAINT,
    (S.UP, Change.DISABLE): S.MAINT,
    (S.DOWN, Change.DISABLE): S.MAINT,
    (S.DRAIN, Change.DISABLE): S.MAINT,
    (S.MAINT, Change.ENABLE): S.DOWN,  # UP after ``rise`` health checks
    (S.DRAIN, Change.ENABLE): S.UP,  # a drain called off: its lanes are still open and checked
}
"""Every allowed state change; any other (state, change) pair leaves the state as it is."""


def next_state(state: InstanceState, change: Change) -> InstanceState | None:
    """The state after ``change``, or None when it does not apply in ``state``."""
    return TRANSITIONS.get((state, change))


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


class Lane:
    """One event connection to an instance: whether it is open, what it owes, its latency and progress."""

    __slots__ = (
        "instance",
        "index",
        "key",
        "owned",
        "connected",
        "connecting",
        "writable",
        "retiring",
        "last_progress",
        "last_write",
        "latency",
        "suspect_since",
        "overdue_streak",
        "losses",
        "retry_at",
        "attempt",
    )

    def __init__(self, instance: Instance, index: int) -> None:
        self.instance = instance
        self.index = index
        self.key = f"{instance.key}#{index}"  # its owner key in the correlator, and the edge's connection key
        self.owned: dict[int, float] = {}  # request id -> time of dispatch, in dispatch order
        self.connected = False  # the edge reported it open (and not lost since)
        self.connecting = False  # the edge was asked to open it and has not answered yet
        self.writable = True  # the connection's write buffer is under its high-water mark
        self.retiring = False  # takes no new event; closed and forgotten once it owes nothing
        self.last_progress = 0.0  # time of the last finished event (or of the first dispatch)
        self.last_write = 0.0  # time of the last bytes written
        self.latency = 0.0  # moving average of dispatch-to-finish seconds of its oldest events
        self.suspect_since: float | None = None  # overdue: its events were re-sent; no new ones while others can
        self.overdue_streak = 0  # found overdue in a row without finishing an event
        self.losses = 0  # lost on its own (its instance UP) in a row without finishing an event: reconnect backoff
        self.retry_at = 0.0  # time before which it is not reconnected (after losses)
        self.attempt = 0  # the connection attempt in flight (its Connect's number) while connecting

    def __repr__(self) -> str:
        return f"<Lane {self.key} owned={len(self.owned)} connected={self.connected}>"

    @property
    def name(self) -> str:
        """How logs name it: the instance alone while it has one lane (as before lanes), else with the lane."""
        inst = self.instance
        if len(inst.lanes) == 1 and self.index == 0:
            return inst.key
        return f"{inst.key} lane {self.index}"

    def observe_latency(self, seconds: float) -> None:
        """A finished event's dispatch-to-finish time (one sample per read of replies is enough)."""
        self.latency = seconds if not self.latency else self.latency + LATENCY_WEIGHT * (seconds - self.latency)

    def oldest_dispatch(self) -> float | None:
        """Time at which its oldest unfinished event was sent (None when it owes nothing)."""
        for sent in self.owned.values():
            return sent
        return None


class Instance:
    """One node as the balancer sees it: settings, state, health, readiness, counters, and its lanes."""

    def __init__(self, settings: InstanceSettings, *, rise: int, fall: int) -> None:
        self.settings = settings
        self.key = settings.key
        self.health = Health(rise=rise, fall=fall)
        self.state = InstanceState.DOWN if settings.enabled else InstanceState.MAINT
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
        """Time of the last event any lane finished (or of a first dispatch)."""
        return max((lane.last_progress for lane in self.lanes), default=0.0)

    def resize(self) -> tuple[list[Lane], list[Lane], list[Lane]]:
        """Bring the lanes to :meth:`wanted_lanes`: returns (lanes opened or revived, lanes retired, lanes
        dropped).  A retired lane that owes nothing is dropped at once (its connection must be closed),
        one that owes events keeps draining."""
        plan = plan_resize(
            [(lane.index, lane.connected) for lane in self.lanes if not lane.retiring],
            [lane.index for lane in self.lanes if lane.retiring],
            self.wanted_lanes(),
        )
        if not plan:
            return [], [], []
        by_index = {lane.index: lane for lane in self.lanes}
        added = [Lane(self, i) for i in plan.open]
        for i in plan.revive:
            by_index[i].retiring = False
        retired = [by_index[i] for i in plan.retire]
        for lane in retired:
            lane.retiring = True
        self.lanes = sorted([*self.lanes, *added], key=lambda lane: lane.index)
        dropped = [lane for lane in retired if not lane.owned]
        for lane in dropped:
            self.lanes.remove(lane)
        self.active_lanes = sum(1 for lane in self.lanes if not lane.retiring)
        return added + [by_index[i] for i in plan.revive], retired, dropped
