"""The balancer's event path as a sans-IO core: events in, actions out.

:class:`Dispatcher` owns everything the balancer decides about events: request ids and ownership (the
:class:`~threatgate.lb.correlation.Correlator`), the backlog, placement on lanes (``lb/policy.py``),
redispatch when an instance or a lane fails, back-pressure on clients, the instance states and their
transitions (``lb/instances.py``), overdue and hung instances, MaxEventWait.  Its methods take ``now``
(seconds on one monotonic clock) and what happened, and return the :data:`Action` list the edge carries
out: write to a lane or a client, pause or resume reading a client, open or close a lane, log.  It never
touches a socket, a timer or a logger, so failover, hangs, reloads and back-pressure are unit tested
with a fake clock (tests/lb/test_dispatcher.py); balancer/service.py is the asyncio edge.

The flow of one event:
1. :meth:`Dispatcher.submit` registers it in the correlator (a new request id) and appends the id to
   the backlog.
2. :meth:`Dispatcher.dispatch` drains the backlog: per event, the policy picks a connected, writable
   lane of an UP instance under its in-flight limit; lines go out per lane in one :class:`Send`.  A
   lane's weight is its instance's weight divided by the instance's lanes, so the lanes of a node
   together take the share one connection would.
3. A lane's reply lines go through the correlator (the lane is the owner); an event's lines are
   released to its client, in order, when its ``LookupFinished`` arrives (:class:`Deliver`).
4. When an instance fails (its last connection lost, reply timeout, health checks, disabled or
   removed), its unfinished events go back to the front of the backlog and are dispatched again; the
   correlator drops the stale lanes' late lines, so every event is answered exactly once.  A lane lost
   while another lane of its instance is open (a worker of the node died) re-sends only its own
   events and reconnects; the instance stays UP.

Back-pressure instead of loss, and one client cannot hold the others: a client with more than
``MaxPendingEventsPerClient`` unanswered events stops being read until half are answered; when the
backlog is over ``MaxPendingEvents`` (no instance can take more), the clients holding more than their
share stop being read until it drains to half.  Nothing is dropped silently: every drop is counted
and logged.

A hung instance costs at most about a second: a lane that owes events and has answered none for
longer than its overdue deadline (twice its recent reply latency, at least :data:`OVERDUE_FLOOR`) while
another lane can take them, and whose oldest event was not taken from a slow lane before (an event is
re-sent for being overdue once; one slow everywhere is left to ReplyTimeout), is *suspect*: its event
connection is closed (so no late answer can mix with a new one), its events are dispatched again,
and it gets no new events until a health check of its instance passes.  Found overdue ``fall`` times
in a row without finishing an event, its instance is DOWN (or, while another lane of the same
instance answers, that lane alone is closed and reconnected).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Hashable
from itertools import repeat

from threatgate.config.balancer import BalancerConfig, InstanceSettings
from threatgate.lb.actions import (
    AGAIN,
    Action,
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
from threatgate.lb.correlation import FINISHED, Answered, Correlator, Drop, consume
from threatgate.lb.instances import Change, Instance, InstanceState, Lane, next_state
from threatgate.lb.policy import Candidate, allocate
from threatgate.stats import BalancerStats
from threatgate.wire.flags import SessionFlags
from threatgate.wire.framing import FramedEvent, Oversized

FINISHED_LINE = (FINISHED + "\n").encode()
DISPATCH_BATCH = 4096
"""Events placed per dispatch pass before the edge runs other callbacks (keeps reply handling responsive)."""
OVERDUE_FLOOR = 1.0
"""Shortest overdue deadline: an instance silent this long while owing events is suspect (if another can serve)."""
OVERDUE_FACTOR = 2.0
"""The overdue deadline in units of the instance's recent reply latency (a loaded node is slower, not hung)."""
ID_PREFIX = 20
"""Bytes the request id adds in front of an event (19 digits and a space at most)."""
COMPACT_BELOW = 8
"""After a burst, tables are rebuilt once pending events drop below 1/COMPACT_BELOW of their peak."""
COMPACT_MIN_PEAK = 10_000
"""Peaks smaller than this are not worth a compaction."""
COMPACT_EVERY = 60.0
"""Seconds between compactions after bursts of the same size (bursty traffic must not run a full GC each
second); a burst at least twice the last one's peak compacts at once."""
LANE_RETRY = 0.2
"""Seconds before a lane lost on its own (its instance UP) reconnects; doubled after each loss in a row
without an answered event (a node refusing it, e.g. ScannersCount too low), up to :data:`LANE_RETRY_MAX`."""
LANE_RETRY_MAX = 10.0
KEEPALIVE = 1.0
"""Seconds of silence after which an empty line is written to an event connection: the node skips it,
but it keeps the connection from being closed as idle (IdleTimeout) or evicted by a newcomer."""
NO_INSTANCE_WARN = 10.0
"""Seconds without an UP instance after which waiting events are reported (then every 10 s at most)."""
KEEPALIVE_LINE = b"\n"


class Client:
    """One client connection as the dispatcher sees it."""

    __slots__ = ("key", "peer", "reply_back", "send_finished", "outstanding", "paused", "eof", "gone")

    def __init__(self, key: Hashable, peer: str, flags: SessionFlags) -> None:
        self.key = key
        self.peer = peer
        self.reply_back = flags.reply_back
        self.send_finished = flags.send_finished
        self.outstanding = 0  # events submitted and not yet released
        self.paused: set[str] = set()  # why we asked the edge not to read it
        self.eof = False  # it half-closed: closed once it is owed nothing
        self.gone = False  # its connection closed, its detections still go to the output (no ReplyBack)


class Dispatcher:
    """Placement, ownership, redispatch, back-pressure and instance state of the balancer's event path."""

    def __init__(self, config: BalancerConfig, stats: BalancerStats, rng: random.Random | None = None) -> None:
        self.config = config
        self.stats = stats
        self.rng = rng or random.Random()
        self.correlator = Correlator()
        self.backlog: deque[int] = deque()
        self.instances: dict[str, Instance] = {}
        self.lanes: dict[str, Lane] = {}  # lane key -> lane, of every instance (retiring ones included)
        self.clients: dict[Hashable, Client] = {}
        self._backlog_paused: set[Client] = set()
        self.no_instance_since: float | None = None  # since when no instance is UP
        self._id_marks: deque[tuple[float, int]] = deque()  # (time, first request id submitted after it)
        self._peak_pending = 0
        self._compacted_at = 0  # pending events at the first compaction after a burst (a second one follows)
        self._compacted_time = -COMPACT_EVERY  # time of the last first-stage compaction
        self._compacted_peak = 0  # the peak it followed: a burst at least twice as large compacts at once
        self.admin: dict[str, str] = {}  # instance key -> what an operator did at run time (until SIGHUP)
        self._attempts = 0  # connection attempts asked for: each Connect's number
        for settings in config.instances:
            self._add_instance(settings)

    def __repr__(self) -> str:
        up = sum(1 for i in self.instances.values() if i.state is InstanceState.UP)
        return (
            f"<Dispatcher up={up}/{len(self.instances)} clients={len(self.clients)} "
            f"backlog={len(self.backlog)} {self.correlator!r}>"
        )

    # -- clients ------------------------------------------------------------------------------

    def client_open(self, key: Hashable, peer: str, flags: SessionFlags) -> list[Action]:
        """A client's flags are in and it holds a scanner slot."""
        self.clients[key] = Client(key, peer, flags)
        if not flags.reply_back and self.config.output is None:
            return [
                Log(
                    logging.WARNING,
                    "client %s sent no X-KF-ReplyBack and there is no <OutputConnectionString>: its detections "
                    "will be dropped (counted in threatgate_output_dropped_lines_total)",
                    (peer,),
                )
            ]
        return []

    def outstanding(self, key: Hashable) -> int:
        """Events of the client submitted and not yet answered."""
        client = self.clients.get(key)
        return client.outstanding if client is not None else 0

    def client_eof(self, key: Hashable) -> bool:
        """The client half-closed: True while answers are still owed to it (keep the connection open;
        a :class:`CloseClient` follows the last one)."""
        client = self.clients.get(key)
        if client is None:
            return False
        client.eof = True
        return client.outstanding > 0

    def submit(self, key: Hashable, events: list[FramedEvent], now: float) -> list[Action]:
        """Events read from a client (at least one): ids, backlog, back-pressure, and a dispatch."""
        client = self.clients[key]
        corr = self.correlator
        releases: list[Answered] = []
        out: list[Action] = []
        limit = self.event_limit()
        try:
            longest = max(map(len, events))  # type: ignore[arg-type]
        except TypeError:  # an Oversized marker among them
            longest = limit
        if (longest + ID_PREFIX) * 4 > limit:  # some event might not fit a node in UTF-8: look at each (rare)
            for event in events:
                if isinstance(event, Oversized):
                    # Too large for any node: answered here (no detections), counted like a node does.
                    rid = corr.submit(key, "")
                    self.stats.bump(self.stats.bad_input, "oversized")
                    releases += corr.finish_local_runs(rid)
                    continue
                room = limit - len(str(corr.next_id)) - 1  # what the node takes after "<id> "
                if len(event) * 4 > room and (size := len(event.encode("utf-8", "replace"))) > room:
                    releases += self._refuse_event(client, corr.submit(key, ""), size, room, out)
                else:
                    self.backlog.append(corr.submit(key, event))
        else:
            self.backlog.extend(corr.submit_many(key, events))  # type: ignore[arg-type]
        client.outstanding += len(events)
        self.stats.events_in += len(events)
        if releases:
            self._deliver(releases, out)
        pending_limit = self.config.client_pending_limit
        if client.outstanding >= pending_limit and "client_limit" not in client.paused:
            client.paused.add("client_limit")
            out.append(Pause(key, "client_limit"))
            self.stats.bump(self.stats.connections, "paused_client_limit")
            out.append(
                Log(
                    logging.WARNING,
                    "client %s has %d unanswered events (MaxPendingEventsPerClient %d): not reading it until half "
                    "are answered; other clients are not affected",
                    (client.peer, client.outstanding, pending_limit),
                    "client_limit",
                )
            )
        if len(self.backlog) >= self.config.max_pending_events:
            self._pause_heavy_clients(out)
        self._dispatch(now, out)
        return out

    def event_limit(self) -> int:
        """Longest line (UTF-8 bytes, request id included) every enabled instance matches.

        An instance's limit is its MaxEventSize from ``/readyz`` when it says, else the balancer's own
        MaxEventSize (keep them equal).  An event that does not fit once ``"<id> "`` is in front of it
        would be refused by the node as oversized, so the balancer answers it at once with an error
        finished line instead of forwarding it.
        """
        sizes = [i.max_event_size or self.config.max_event_size for i in self.instances.values() if i.settings.enabled]
        return min(sizes or [self.config.max_event_size])

    def _refuse_event(self, client: Client, rid: int, size: int, limit: int, out: list[Action]) -> list[Answered]:
        self.stats.bump(self.stats.unmatched, "event_too_large")
        out.append(
            Log(
                logging.WARNING,
                "event of %d bytes from %s not forwarded: the instances match at most %d bytes after the request "
                "id (MaxEventSize); answered with error=event_too_large",
                (size, client.peer, limit),
                "unmatched",
            )
        )
        return self.correlator.finish_local_runs(rid, f"{FINISHED} error=event_too_large size={size} limit={limit}")

    def _pause_heavy_clients(self, out: list[Action]) -> None:
        """Backlog full: stop reading the clients that hold more than an equal share of it."""
        clients = list(self.clients.values())
        share = self.config.max_pending_events // max(1, len(clients))
        heavy = [c for c in clients if c.outstanding >= share and c not in self._backlog_paused and not c.gone]
        if not heavy:
            return
        out.append(
            Log(
                logging.WARNING,
                "%d events wait for an instance (MaxPendingEvents %d): pausing clients %s",
                (len(self.backlog), self.config.max_pending_events, ", ".join(sorted({c.peer for c in heavy}))),
                "backlog",
            )
        )
        for c in heavy:
            c.paused.add("backlog")
            out.append(Pause(c.key, "backlog"))
            self._backlog_paused.add(c)

    def client_gone(self, key: Hashable) -> list[Action]:
        """The client's connection closed: its events are forgotten (late answers are discarded).

        Unless its detections go to the output (no ReplyBack): they do not need the connection, so its
        events are still matched and their detections sent on (a syslog shipper over TLS closes its
        session right after sending: TLS has no half-close).  The client is forgotten once answered.
        """
        client = self.clients.get(key)
        if client is not None and not client.reply_back and client.outstanding and not client.gone:
            client.gone = client.eof = True
            self._backlog_paused.discard(client)
            client.paused.clear()
            return [
                Log(
                    logging.INFO,
                    "client %s left with %d event(s) unanswered; their detections still go to the output",
                    (client.peer, client.outstanding),
                )
            ]
        self.clients.pop(key, None)
        if client is not None:
            self._backlog_paused.discard(client)
        gone = self.correlator.client_gone(key)
        if not gone:
            return []
        out: list[Action] = []
        for rid, owner in gone:
            if owner is not None:
                lane = self.lanes.get(owner)  # type: ignore[call-overload]
                if lane is not None:
                    lane.owned.pop(rid, None)
                    if lane.retiring and not lane.owned:
                        self._retired(lane, out)
        self.stats.bump(self.stats.dropped, "client_gone", len(gone))
        out.append(
            Log(
                logging.INFO,
                "client %s left with %d event(s) unanswered; their answers will be discarded",
                (client.peer if client is not None else key, len(gone)),
            )
        )
        return out

    def _deliver(self, answered: list[Answered], out: list[Action]) -> None:
        """Each client's answered run in one :class:`Deliver` (the plain run costs no per-event work)."""
        stats = self.stats
        half = self.config.client_pending_limit // 2
        for run in answered:
            client = self.clients.get(run.client)
            if client is None:
                continue
            count = len(run.answers)
            client.outstanding -= count
            if client.outstanding <= half and "client_limit" in client.paused and not client.gone:
                client.paused.discard("client_limit")
                out.append(Resume(client.key, "client_limit"))
            stats.events_out += count
            stats.detections += run.detections
            if client.reply_back:
                if run.plain:
                    data = FINISHED_LINE * count if client.send_finished else b""
                else:
                    lines: list[str] = []
                    for _, found, finished in run.answers:
                        lines.extend(found)
                        if client.send_finished:
                            lines.append(finished)
                    data = ("\n".join(lines) + "\n").encode("utf-8", "replace") if lines else b""
                if data:
                    out.append(Deliver(client.key, data))
            elif run.detections:
                out.append(Output(tuple(line for _, found, _ in run.answers for line in found)))
            if client.eof and not client.outstanding:
                if client.gone:
                    del self.clients[client.key]
                else:
                    out.append(CloseClient(client.key))

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self, now: float) -> list[Action]:
        """Place what waits in the backlog (after an :class:`Again`)."""
        out: list[Action] = []
        self._dispatch(now, out)
        return out

    def _dispatch(self, now: float, out: list[Action]) -> None:
        """Place backlog events on lanes, one batched :class:`Send` per lane.

        A lane's weight and in-flight limit are its instance's divided by the instance's lanes: a node
        takes the same share of events, and holds at most ``MaxInflightEvents``, however many lanes
        it has.  With one lane per instance this is exactly the per-instance placement.
        """
        backlog = self.backlog
        if not backlog:
            self._maybe_resume_clients(out)
            return
        limit = self.config.max_inflight_events
        cands: list[Candidate] = []
        by_key: dict[str, Lane] = {}
        for lane in self._pool(out):
            inst = lane.instance
            shares = inst.active_lanes
            cap = limit if shares <= 1 else max(1, limit // shares)
            owned = len(lane.owned)
            if lane.writable and owned < cap:
                weight = inst.settings.weight if shares <= 1 else inst.settings.weight / shares
                cands.append(Candidate(lane.key, weight, owned, cap - owned))
                by_key[lane.key] = lane
        if not cands:
            return
        corr = self.correlator
        take = min(len(backlog), DISPATCH_BATCH)
        placed = 0
        for cand, count in allocate(cands, take, self.rng):
            ids = [backlog.popleft() for _ in range(min(count, len(backlog)))]
            lane = by_key[cand.key]  # type: ignore[index]
            sent, data = corr.dispatch_encoded(ids, lane.key)
            if not sent:
                continue
            if not lane.owned:
                lane.last_progress = now
            lane.owned.update(dict.fromkeys(sent, now))
            lane.instance.dispatched += len(sent)
            placed += len(sent)
            out.append(Send(lane.key, data))
            lane.last_write = now
        self.stats.dispatched += placed
        if backlog and take >= DISPATCH_BATCH:
            out.append(AGAIN)
        self._maybe_resume_clients(out)

    def _pool(self, out: list[Action]) -> list[Lane]:
        """The lanes events may go to now: connected, not retiring, of UP instances; among them the
        not suspect lanes of ready instances while there are any; else none while an instance's
        readiness is still being asked for the first time (a node whose feed did not load must not get
        events before it said so); else those not suspect, else any (an answer beats none)."""
        up = [
            lane
            for i in self.instances.values()
            if i.state is InstanceState.UP
            for lane in i.lanes
            if lane.connected and not lane.retiring
        ]
        if not up:
            return up
        good = [lane for lane in up if lane.instance.ready and lane.suspect_since is None]
        if good:
            return good
        if any(lane.instance.ready is None for lane in up):
            return []  # the first /readyz answer is on its way (bounded by the health-check timeout)
        alive = [lane for lane in up if lane.suspect_since is None]
        if alive:
            named = {lane.instance.key: lane.instance.not_ready_reason for lane in alive}
            out.append(
                Log(
                    logging.WARNING,
                    "no ready instance: events go to instance(s) that are not ready (%s); their detections may "
                    "be incomplete",
                    ("; ".join(f"{key}: {reason}" for key, reason in named.items()),),
                    "not_ready",
                )
            )
            return alive
        return up

    def _maybe_resume_clients(self, out: list[Action]) -> None:
        paused = self._backlog_paused
        if paused and len(self.backlog) <= self.config.max_pending_events // 2:
            out.append(
                Log(
                    logging.INFO,
                    "%d events wait for an instance (under half of MaxPendingEvents %d): %d client(s) resumed",
                    (len(self.backlog), self.config.max_pending_events, len(paused)),
                    "resumed",
                )
            )
            for c in paused:
                c.paused.discard("backlog")
                out.append(Resume(c.key, "backlog"))
            paused.clear()

    # -- lanes --------------------------------------------------------------------------------

    def lane_lines(self, key: str, data: bytes, now: float) -> list[Action]:
        """Reply lines read from a lane (whole lines, each ending with LF): the balancer's hot path."""
        lane = self.lanes.get(key)
        if lane is None:
            return []
        out: list[Action] = []
        finished: list[int] = []
        releases, drops = self.correlator.on_reply(key, data, finished)
        if drops:
            for why in drops:
                self._dropped_line(lane.instance, why, out)
        if finished:
            owned = lane.owned
            pop = owned.pop
            sent = pop(finished[0], None)  # the oldest of this read: what a hang would delay first
            consume(map(pop, finished, repeat(None)))
            if sent is not None:
                lane.observe_latency(now - sent)
            inst = lane.instance
            inst.finished += len(finished)
            lane.last_progress = now
            lane.overdue_streak = 0
            if lane.losses:
                lane.losses = 0
            if not owned:
                if lane.retiring:
                    self._retired(lane, out)
                if inst.state is InstanceState.DRAIN:
                    self._maybe_drained(inst, out)
        if releases:
            self._deliver(releases, out)
        if finished:
            self._dispatch(now, out)
        return out

    def _dropped_line(self, instance: Instance, why: Drop, out: list[Action]) -> None:
        self.stats.bump(self.stats.dropped_lines, why.value)
        if why is Drop.NO_ID:
            out.append(
                Log(
                    logging.WARNING,
                    "instance %s sent a line without a request id (its EventFormat must start with %%REQ%%)",
                    (instance.key,),
                    "drop",
                )
            )
        else:
            out.append(Log(logging.DEBUG, "instance %s: line dropped (%s)", (instance.key, why.value)))

    def lane_connected(self, key: str, attempt: int, now: float) -> tuple[bool, list[Action]]:
        """The edge opened the connection of attempt ``attempt`` for the lane ``key`` (after a :class:`Connect`).

        False: the connection is not wanted (the instance went DOWN, was disabled or removed, the lane was
        retired, or this is an older attempt than the lane's): the edge closes it.
        """
        lane = self.lanes.get(key)
        if lane is None or not lane.connecting or lane.attempt != attempt:
            return False, [Log(logging.DEBUG, "lane %s: a connection no longer wanted is closed", (key,))]
        lane.connecting = False
        if lane.instance.state is not InstanceState.UP or lane.retiring:
            return False, []
        lane.connected = True
        lane.writable = True
        lane.last_write = now
        out: list[Action] = [
            Log(logging.DEBUG, "instance %s: event connection open again", (lane.name,))
            if lane.losses
            else Log(logging.INFO, "instance %s: event connection open", (lane.name,))
        ]
        self._dispatch(now, out)
        return True, out

    def connect_failed(self, key: str, attempt: int, why: str, now: float) -> list[Action]:
        """Attempt ``attempt`` to open the lane ``key`` failed (refused, timed out, lost at once)."""
        lane = self.lanes.get(key)
        if lane is None or not lane.connecting or lane.attempt != attempt:
            return []  # an older attempt, for a lane dropped or connected since: nothing to say about this one
        return self.lane_failed(key, why, now)

    def lane_writable(self, key: str, writable: bool, now: float) -> list[Action]:
        """The lane's write buffer went over its high-water mark (False) or back under it (True)."""
        lane = self.lanes.get(key)
        if lane is None:
            return []
        lane.writable = writable
        return self.dispatch(now) if writable else []

    def lane_failed(self, key: str, why: str, now: float) -> list[Action]:
        """A lane's connection failed (lost, broken, refused, overdue, hung).  While another lane of its UP
        instance is open, only that lane's events are re-sent and it reconnects (a worker of the node
        died; the node is fine); otherwise the instance failed, as with one connection."""
        lane = self.lanes.get(key)
        if lane is None:
            return []
        out: list[Action] = []
        self._lane_failed(lane, why, now, out)
        return out

    def _lane_failed(self, lane: Lane, why: str, now: float, out: list[Action]) -> None:
        lane.connecting = False
        self._close_lane(lane, out)
        inst = lane.instance
        if lane.retiring or lane not in inst.lanes:  # no longer wanted: nothing to reconnect
            self._redispatch(inst, why, now, out, [lane])
            self._retired(lane, out)
            return
        if inst.state is not InstanceState.UP or not any(o is not lane and o.connected for o in inst.lanes):
            self._instance_failed(inst, why, now, out)
            return
        lane.losses += 1
        delay = min(LANE_RETRY * 2 ** (lane.losses - 1), LANE_RETRY_MAX)
        lane.retry_at = now + delay
        self.stats.bump(self.stats.transitions, "lane_lost")
        out.append(
            Log(
                logging.WARNING,
                "instance %s: %s; the instance stays UP (%d of %d event connections open), this one reconnects "
                "in %.1f s",
                (lane.name, why, inst.open_lanes, inst.active_lanes, delay),
            )
        )
        self._redispatch(inst, why, now, out, [lane])
        out.append(Retry(lane.key, delay))

    def retry_lane(self, key: str) -> list[Action]:
        """A lane lost on its own reconnects (after its :class:`Retry`), if it is still wanted, its instance
        still UP, and it is not suspect."""
        lane = self.lanes.get(key)
        if lane is None:
            return []
        inst = lane.instance
        if (
            self.instances.get(inst.key) is inst
            and inst.state is InstanceState.UP
            and lane in inst.lanes
            and not lane.retiring
            and lane.suspect_since is None
            and not lane.connected
            and not lane.connecting
        ):
            return [self._connect(lane)]
        return []

    def _connect(self, lane: Lane) -> Connect:
        self._attempts += 1
        lane.attempt = self._attempts
        lane.connecting = True
        settings = lane.instance.settings
        return Connect(lane.key, settings.host, settings.matching_port, lane.attempt)

    def _close_lane(self, lane: Lane, out: list[Action]) -> None:
        if lane.connected:
            lane.connected = False
            out.append(Disconnect(lane.key))

    def _retired(self, lane: Lane, out: list[Action]) -> None:
        """A retiring lane owes nothing any more: closed and forgotten."""
        inst = lane.instance
        if lane in inst.lanes:
            self._drop_lane(lane, out)
            out.append(
                Log(
                    logging.INFO,
                    "instance %s: event connection %d retired (%d lane(s) now)",
                    (inst.key, lane.index, inst.active_lanes),
                )
            )

    def _drop_lane(self, lane: Lane, out: list[Action]) -> None:
        self._close_lane(lane, out)
        inst = lane.instance
        if lane in inst.lanes:
            inst.lanes.remove(lane)
        if self.lanes.get(lane.key) is lane:
            del self.lanes[lane.key]

    def _connect_due(self, inst: Instance, now: float, out: list[Action]) -> None:
        """Open every lane of an UP instance that should be open and is not."""
        for lane in inst.lanes:
            if not lane.connected and not lane.connecting and not lane.retiring and lane.retry_at <= now:
                out.append(self._connect(lane))

    def resize_lanes(self, key: str, why: str, now: float) -> list[Action]:
        """Open or retire lanes after ``connections`` or the node's ``event_connections`` changed.

        The instance's state does not change: new lanes connect while it is UP, retired lanes take no new
        event and close once they owe nothing (their events are answered, not re-sent).
        """
        inst = self.instances.get(key)
        out: list[Action] = []
        if inst is None:
            return out
        self._resize(inst, why, now, out)
        return out

    def _resize(self, inst: Instance, why: str, now: float, out: list[Action]) -> None:
        before = inst.active_lanes
        added, retired, dropped = inst.resize()
        if not added and not retired:
            return
        for lane in dropped:
            self._close_lane(lane, out)
            self.lanes.pop(lane.key, None)
        for lane in added:
            self.lanes[lane.key] = lane
        out.append(
            Log(
                logging.INFO,
                "instance %s: %d event connection(s), was %d (%s)",
                (inst.key, inst.active_lanes, before, why),
            )
        )
        if added and inst.state is InstanceState.UP and self.instances.get(inst.key) is inst:
            self._connect_due(inst, now, out)
        self._dispatch(now, out)

    # -- instances ----------------------------------------------------------------------------

    def _add_instance(self, settings: InstanceSettings) -> Instance:
        h = self.config.health
        inst = Instance(settings, rise=h.rise, fall=h.fall)
        if self.config.readiness and settings.api_port_set:
            inst.ready = None  # its /readyz decides, once asked (at once): no events before unless none is known
        if not settings.enabled:
            inst.health.checked = True  # enabled later: it needs ``rise`` checks like any DOWN one
        self.instances[inst.key] = inst
        for lane in inst.lanes:
            self.lanes[lane.key] = lane
        return inst

    def _change(self, inst: Instance, change: Change) -> bool:
        """Apply ``change`` by the transition table; True when the state changed."""
        state = next_state(inst.state, change)
        if state is None or state is inst.state:
            return False
        inst.state = state
        return True

    def checked(self, key: str) -> Instance | None:
        """The instance health checks apply to now under ``key`` (None: removed or MAINT)."""
        inst = self.instances.get(key)
        return None if inst is None or inst.state is InstanceState.MAINT else inst

    def check_passed(self, key: str, seconds: float, now: float) -> list[Action]:
        """An active health check of the instance passed (connect, PING, PONG in ``seconds``)."""
        inst = self.checked(key)
        out: list[Action] = []
        if inst is None:
            return out
        inst.check_seconds = seconds
        health = inst.health
        if health.check_passed():
            if health.successes < health.rise:
                out.append(Log(logging.INFO, "instance %s is UP (first health check passed)", (inst.key,)))
            else:
                out.append(Log(logging.INFO, "instance %s is UP (%d checks passed)", (inst.key, health.rise)))
            self.stats.bump(self.stats.transitions, "up")
        if health.up and self._change(inst, Change.CHECKS_PASSED):
            self._note_availability(now, out)
        suspect_since = inst.suspect_since
        if suspect_since is not None:
            out.append(
                Log(
                    logging.INFO,
                    "instance %s answers health checks again after %.1f s: it gets events again",
                    (inst.key, now - suspect_since),
                )
            )
            for lane in inst.lanes:
                lane.suspect_since = None
        if inst.state is InstanceState.UP:
            self._connect_due(inst, now, out)
            self._dispatch(now, out)
        return out

    def check_failed(self, key: str, error: str, now: float) -> list[Action]:
        """An active health check of the instance failed with ``error``."""
        inst = self.checked(key)
        out: list[Action] = []
        if inst is None:
            return out
        if inst.health.check_failed(error):
            self._instance_failed(inst, f"health check: {error}", now, out)
        elif not inst.health.up:
            out.append(Log(logging.DEBUG, "instance %s health check failed: %s", (inst.key, error)))
        return out

    def pin_refused(self, key: str, why: str, now: float) -> list[Action]:
        """The instance ``key`` presented a certificate other than its pin, to a lane or a health check (the
        edge wrote nothing on that connection): out of rotation at once, whatever its other lanes, as the
        REST gateway takes it out; back only when health checks pass again (the same pin check).

        ``why`` names both fingerprints (``PinMismatch.reason``); logged at ERROR once per distinct
        mismatch, counted every time (``threatgate_balancer_transitions{kind="pin_mismatch"}``).
        """
        inst = self.checked(key)
        out: list[Action] = []
        if inst is None:
            return out
        self.stats.bump(self.stats.transitions, "pin_mismatch")
        if inst.health.last_error != why:
            out.append(
                Log(
                    logging.ERROR,
                    "instance %s: event port %s; out of rotation until its certificate matches again or the pin "
                    "is renewed (threatgate balancer pins --renew %s)",
                    (inst.key, why, inst.key),
                )
            )
        self._instance_failed(inst, why, now, out)
        return out

    def _reconnect(self, inst: Instance, why: str, now: float, out: list[Action]) -> None:
        """Close every lane of ``inst`` and open them again (its connection settings changed): what they owed
        is sent again; an attempt in flight is forgotten (its outcome names an attempt no lane waits for)."""
        for lane in inst.lanes:
            self._close_lane(lane, out)
            lane.connecting = False
        self._redispatch(inst, why, now, out)
        for lane in [lane for lane in inst.lanes if lane.retiring]:
            self._retired(lane, out)
        if inst.state is InstanceState.UP:
            self._connect_due(inst, now, out)

    def _instance_failed(self, inst: Instance, why: str, now: float, out: list[Action]) -> None:
        was = inst.state
        inst.health.passive_failure(why)
        if self._change(inst, Change.FAILED):
            self.stats.bump(self.stats.transitions, "down")
            if was is InstanceState.DRAIN:
                out.append(Log(logging.WARNING, "instance %s failed while draining (%s): MAINT", (inst.key, why)))
            else:
                out.append(Log(logging.ERROR, "instance %s is DOWN: %s", (inst.key, why)))
        for lane in inst.lanes:
            self._close_lane(lane, out)
        self._redispatch(inst, why, now, out)

    def disable(self, key: str, now: float, why: str = "disabled") -> list[Action]:
        """MAINT at once: its connections close, what it owes is sent again elsewhere."""
        inst = self.instances.get(key)
        out: list[Action] = []
        if inst is None or not self._change(inst, Change.DISABLE):
            return out
        inst.health.reset()
        for lane in inst.lanes:
            lane.suspect_since = None
            self._close_lane(lane, out)
        self._redispatch(inst, why, now, out)
        out.append(Log(logging.INFO, "instance %s %s (MAINT)", (key, why)))
        return out

    def enable(self, key: str, now: float) -> list[Action]:
        """Out of MAINT: UP after ``rise`` health checks (a drain called off: UP at once)."""
        inst = self.instances.get(key)
        out: list[Action] = []
        if inst is None:
            return out
        was = inst.state
        if not self._change(inst, Change.ENABLE):
            return out
        if was is InstanceState.DRAIN:
            out.append(Log(logging.INFO, "instance %s: drain called off, it gets events again", (key,)))
            self._note_availability(now, out)
            self._dispatch(now, out)
        else:
            out.append(Log(logging.INFO, "instance %s enabled; UP after %d health checks", (key, inst.health.rise)))
        return out

    def drain(self, key: str, now: float) -> list[Action]:
        """DRAIN: no new events; what it owes is answered (not re-sent), then MAINT."""
        inst = self.instances.get(key)
        out: list[Action] = []
        if inst is None:
            return out
        was = inst.state
        if not self._change(inst, Change.DRAIN):
            return out
        if inst.state is InstanceState.DRAIN:
            out.append(
                Log(logging.INFO, "instance %s draining: %d event(s) in flight, no new ones", (key, inst.owned_count))
            )
            self._maybe_drained(inst, out)
        else:
            inst.health.reset()
            out.append(Log(logging.INFO, "instance %s drained (it was %s): MAINT", (key, was.value)))
        self._note_availability(now, out)
        return out

    def operate(self, command: str, key: str, now: float) -> list[Action]:
        """An operator's run-time command (the admin socket, HAProxy's ``disable/enable/drain server``):
        ``disable``, ``enable`` or ``drain`` the instance ``key``.  It holds until the next reload
        (SIGHUP), which applies the configuration's ``enabled`` again, or restart.

        Raises:
            KeyError: no instance ``key``.
            ValueError: an unknown command.
        """
        if key not in self.instances:
            raise KeyError(key)
        if command == "disable":
            out = self.disable(key, now, "disabled at run time")
            self.admin[key] = "disabled at run time"
        elif command == "drain":
            out = self.drain(key, now)
            self.admin[key] = "drained at run time"
        elif command == "enable":
            out = self.enable(key, now)
            self.admin.pop(key, None)
        else:
            raise ValueError(command)
        return out

    def _maybe_drained(self, inst: Instance, out: list[Action]) -> None:
        if inst.owned_count or not self._change(inst, Change.DRAINED):
            return
        inst.health.reset()
        for lane in inst.lanes:
            self._close_lane(lane, out)
        out.append(Log(logging.INFO, "instance %s drained: MAINT", (inst.key,)))

    def _redispatch(
        self, instance: Instance, why: str, now: float, out: list[Action], lanes: list[Lane] | None = None
    ) -> None:
        """Hand the unfinished events of ``lanes`` (default: every lane of ``instance``) back to the backlog,
        in submission order, ahead of what waits there."""
        lanes = instance.lanes if lanes is None else lanes
        lost: list[int] = []
        for lane in lanes:
            mine = self.correlator.instance_lost(lane.key)
            lane.owned.clear()
            if mine:
                lost = sorted(lost + mine) if lost else mine  # ids grow in submission order
        if lost:
            self.backlog.extendleft(reversed(lost))
            self.stats.redispatched += len(lost)
            instance.redispatched += len(lost)
            if len(lanes) == 1 and len(instance.lanes) > 1:
                message = "instance %s: %d unfinished event(s) of event connection %d sent again (%s)"
                args: tuple[object, ...] = (instance.key, len(lost), lanes[0].index, why)
            elif any(i.state is InstanceState.UP and i is not instance for i in self.instances.values()):
                message = "instance %s: %d unfinished event(s) sent again to other instances (%s)"
                args = (instance.key, len(lost), why)
            else:
                message = "instance %s: %d unfinished event(s) wait in the backlog: no other instance available (%s)"
                args = (instance.key, len(lost), why)
            out.append(Log(logging.WARNING, message, args))
        self._note_availability(now, out)
        self._dispatch(now, out)

    def _note_availability(self, now: float, out: list[Action]) -> None:
        """Say when the last UP instance is gone (HAProxy's "backend has no server available!") and when one is back."""
        up = any(i.state is InstanceState.UP for i in self.instances.values())
        if not up and self.no_instance_since is None:
            self.no_instance_since = now
            self.stats.bump(self.stats.transitions, "no_instance")
            wait = self.config.max_event_wait
            out.append(
                Log(
                    logging.WARNING,
                    "no instance available (none UP): %d event(s) wait in the backlog%s",
                    (
                        len(self.backlog),
                        f" (answered with error=no_instance after MaxEventWait {wait:.0f} s)"
                        if wait
                        else " until one comes up",
                    ),
                )
            )
        elif up and self.no_instance_since is not None:
            out.append(
                Log(
                    logging.INFO,
                    "an instance is available again after %.1f s without one: %d waiting event(s) dispatched",
                    (now - self.no_instance_since, len(self.backlog)),
                )
            )
            self.no_instance_since = None

    # -- time ---------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """The periodic work of the event path (the edge calls it every quarter second or so)."""
        out: list[Action] = []
        for inst in list(self.instances.values()):
            for lane in inst.lanes:
                if lane.connected and now - lane.last_write >= KEEPALIVE:
                    out.append(Send(lane.key, KEEPALIVE_LINE))
                    lane.last_write = now
            for lane in [lane for lane in inst.lanes if lane.retiring and not lane.owned]:
                self._retired(lane, out)  # its last events were handed back or their client left
            if inst.state is InstanceState.DRAIN:
                self._maybe_drained(inst, out)
        self._check_overdue(now, out)
        self._check_timeouts(now, out)
        self._expire_waiting(now, out)
        if self.no_instance_since is None and all(
            i.health.checked for i in self.instances.values() if i.state is not InstanceState.MAINT
        ):
            self._note_availability(now, out)  # none came UP at start-up
        if self.no_instance_since is not None and self.backlog and now - self.no_instance_since >= NO_INSTANCE_WARN:
            out.append(
                Log(
                    logging.WARNING,
                    "no instance available for %.0f s: %d event(s) wait in the backlog",
                    (now - self.no_instance_since, len(self.backlog)),
                    "no_instance",
                )
            )
        self._maybe_compact(now, out)
        return out

    def overdue_deadline(self, lane: Lane) -> float:
        """How long ``lane`` may owe events without answering any before it is suspect."""
        return min(self.config.reply_timeout, max(OVERDUE_FLOOR, OVERDUE_FACTOR * lane.latency))

    def _check_overdue(self, now: float, out: list[Action]) -> None:
        """Lanes owing events that answered none for their deadline: suspect, their events go elsewhere."""
        up = [lane for i in self.instances.values() if i.state is InstanceState.UP for lane in i.lanes]
        for lane in up:
            if not lane.owned or lane.suspect_since is not None:
                continue
            oldest = lane.oldest_dispatch()
            assert oldest is not None
            silent = now - max(oldest, lane.last_progress)
            deadline = self.overdue_deadline(lane)
            if silent <= deadline:
                continue
            if not any(o is not lane and o.connected and o.suspect_since is None and not o.retiring for o in up):
                continue  # nowhere else to go: ReplyTimeout decides
            if self.correlator.was_overdue(next(iter(lane.owned))):
                # Its oldest event was already taken from a slow lane: maybe that event is slow, not the
                # node (a poison pill would otherwise make every instance suspect in turn).
                continue
            inst = lane.instance
            if inst.state is not InstanceState.UP:
                continue  # failed by another of its lanes in this pass
            lane.overdue_streak += 1
            self.stats.bump(self.stats.transitions, "suspect")
            if lane.overdue_streak >= inst.health.fall:
                why = f"no answer to events for {silent:.1f} s (overdue {lane.overdue_streak} time(s) in a row)"
                if any(self._answering(o, now) for o in inst.lanes if o is not lane):
                    self._lane_failed(lane, why, now, out)  # one worker of the node is stuck, the others answer
                else:
                    self._instance_failed(inst, why, now, out)
                continue
            lane.suspect_since = now
            out.append(
                Log(
                    logging.WARNING,
                    "instance %s is suspect: no answer for %.1f s (deadline %.1f s, recent latency %.0f ms) while "
                    "owing %d event(s); they are sent again elsewhere and it gets no new events until a health "
                    "check passes",
                    (lane.name, silent, deadline, lane.latency * 1000, len(lane.owned)),
                )
            )
            self._close_lane(lane, out)  # no late answer from this connection can mix with the new owner's
            self.correlator.mark_overdue(list(lane.owned))
            self._redispatch(inst, "overdue", now, out, [lane])

    def _answering(self, lane: Lane, now: float) -> bool:
        """Whether ``lane`` is open and keeps answering (owes nothing, or finished an event within its deadline)."""
        return (
            lane.connected
            and lane.suspect_since is None
            and (not lane.owned or now - lane.last_progress <= self.overdue_deadline(lane))
        )

    def _check_timeouts(self, now: float, out: list[Action]) -> None:
        """A lane that holds events and finishes none for ReplyTimeout is treated as hung: its instance
        fails when no lane of it finishes events (as with one connection), else that lane alone."""
        timeout = self.config.reply_timeout
        for inst in list(self.instances.values()):
            hung = [lane for lane in inst.lanes if lane.owned and now - lane.last_progress > timeout]
            if not hung:
                continue
            self.stats.bump(self.stats.transitions, "reply_timeout")
            why = f"no answer for {timeout:.0f} s"
            if len(hung) == sum(1 for lane in inst.lanes if lane.owned):
                self._instance_failed(inst, why, now, out)
            else:
                for lane in hung:
                    self._lane_failed(lane, why, now, out)

    def _expire_waiting(self, now: float, out: list[Action]) -> None:
        """MaxEventWait: while no instance is UP, events waiting that long since they were submitted are
        answered with an error finished line (never while an instance can still take them)."""
        wait = self.config.max_event_wait
        marks = self._id_marks
        if not wait:
            marks.clear()
            return
        next_id = self.correlator.next_id
        if not marks or marks[-1][1] != next_id:
            marks.append((now, next_id))
        threshold = 0  # events with a lower id were submitted at least ``wait`` seconds ago
        while len(marks) > 1 and marks[1][0] <= now - wait:
            marks.popleft()
        if marks and marks[0][0] <= now - wait:
            threshold = marks[0][1]
        backlog = self.backlog
        if self.no_instance_since is None or not threshold or not backlog:
            return
        if min(backlog[0], backlog[-1]) >= threshold:
            return
        expired = [rid for rid in backlog if rid < threshold]
        if not expired:
            return
        self.backlog = deque(rid for rid in backlog if rid >= threshold)
        corr = self.correlator
        releases: list[Answered] = []
        line = f"{FINISHED} error=no_instance waited={wait:.0f}s"
        answered = 0
        for rid in expired:
            if corr.is_pending(rid):
                releases += corr.finish_local_runs(rid, line)
                answered += 1
        if answered:
            self.stats.bump(self.stats.unmatched, "max_event_wait", answered)
            out.append(
                Log(
                    logging.WARNING,
                    "%d event(s) waited %.0f s (MaxEventWait) with no instance UP: answered with error=no_instance, "
                    "no detections",
                    (answered, wait),
                    "unmatched",
                )
            )
        self._deliver(releases, out)
        self._maybe_resume_clients(out)

    def _maybe_compact(self, now: float, out: list[Action]) -> None:
        """After a burst has drained, give its memory back: tables shrink (the edge then frees the heap).

        Once when pending events fall under an eighth of the burst's peak, and once more when they fall
        under an eighth of that (what was still held at the first pass is then freed too); at most once a
        minute for bursts of the same size.
        """
        pending = self.correlator.pending
        self._peak_pending = max(self._peak_pending, pending)
        if (
            self._peak_pending >= COMPACT_MIN_PEAK
            and pending * COMPACT_BELOW <= self._peak_pending
            and (now - self._compacted_time >= COMPACT_EVERY or self._peak_pending >= 2 * self._compacted_peak)
        ):
            self._compacted_at = pending
            self._compacted_time = now
            self._compacted_peak = self._peak_pending
        elif self._compacted_at and pending * COMPACT_BELOW <= self._compacted_at:
            self._compacted_at = 0
        else:
            return
        self._peak_pending = pending
        self.correlator.compact()
        for lane in self.lanes.values():
            lane.owned = dict(lane.owned)
        self.backlog = deque(self.backlog)
        out.append(Compacted(pending))

    # -- configuration ------------------------------------------------------------------------

    def reconfigure(self, new: BalancerConfig, now: float) -> list[Action]:
        """A reloaded configuration: instances added, removed, enabled, disabled or resized; events in
        flight are kept (redispatched).  What is not the event path's (output, alerts, listener limits)
        is the edge's."""
        old = self.config
        self.config = new
        out: list[Action] = []
        self.admin.clear()
        wanted = {s.key: s for s in new.instances}
        for key in list(self.instances):
            if key not in wanted:
                removed = self.instances.pop(key)
                removed.state = InstanceState.MAINT
                for lane in removed.lanes:
                    self._close_lane(lane, out)
                self._redispatch(removed, "removed from the configuration", now, out)
                for lane in removed.lanes:
                    if self.lanes.get(lane.key) is lane:
                        del self.lanes[lane.key]
                out.append(Log(logging.INFO, "instance %s removed", (key,)))
        for key, settings in wanted.items():
            inst = self.instances.get(key)
            if inst is None:
                self._add_instance(settings)
                out.append(Log(logging.INFO, "instance %s added", (key,)))
                continue
            connections, tls = inst.settings.connections, inst.settings.tls
            inst.settings = settings
            inst.health.rise, inst.health.fall = new.health.rise, new.health.fall  # interval/timeout: read per check
            if settings.connections != connections:
                self._resize(inst, f'connections="{settings.connections}"', now, out)
            if settings.tls != tls:
                said = f'tls="{str(settings.tls).lower()}"'
                out.append(Log(logging.INFO, "instance %s: %s: its event connections reconnect", (key, said)))
                self._reconnect(inst, said, now, out)
            if not settings.enabled and inst.state is not InstanceState.MAINT:
                out += self.disable(key, now)
            elif settings.enabled and inst.state in (InstanceState.MAINT, InstanceState.DRAIN):
                out += self.enable(key, now)  # a run-time disable or drain ends with a reload
        if new.max_pending_events != old.max_pending_events or new.client_pending_limit != old.client_pending_limit:
            self._maybe_resume_clients(out)
        return out

    # -- views --------------------------------------------------------------------------------

    def why(self, inst: Instance) -> str:
        """Why the instance is in its state, as an operator reads it."""
        state = inst.state
        if state is InstanceState.UP:
            if inst.suspect_since is not None:
                return "suspect: overdue answers, no new events until a health check passes"
            if inst.ready is False:
                return f"not ready: {inst.not_ready_reason}"
            return "" if inst.connected else "connecting"
        if state is InstanceState.DOWN:
            return inst.health.last_error or "not checked yet"
        if state is InstanceState.DRAIN:
            return f"draining ({inst.owned_count} event(s) in flight)"
        return self.admin.get(inst.key) or (
            "disabled in the configuration" if not inst.settings.enabled else "disabled"
        )

    def up_count(self) -> int:
        return sum(1 for i in self.instances.values() if i.state is InstanceState.UP)
