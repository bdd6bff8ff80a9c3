"""The balancer's event path: clients in, events spread per event over instances, replies routed back.

Lifecycle (as the node's): ``serve`` -> ``startup`` (health checks start, listener opens) ->
``main_loop`` (a 1 s tick: reply timeouts, hourly statistics) -> ``shutdown``.  SIGHUP re-reads
the configuration; SIGTERM/SIGINT stop.

The flow of one event:
1. A client connection frames it (:mod:`threatgate.net.events`) and :meth:`BalancerService.submit`
   registers it in the :class:`~threatgate.lb.correlation.Correlator` (a new request id) and
   appends the id to the backlog.
2. :meth:`BalancerService.dispatch` drains the backlog: per event, the policy picks a connected,
   writable lane of an UP instance under its in-flight limit; lines are written per lane in one batch.
   An instance has one lane (event connection) per worker of the node (balancer/upstream.py); a
   lane's weight is its instance's weight divided by the instance's lanes, so the lanes of a node
   together take the share one connection would.
3. The lane's reply lines go through the correlator (the lane is the owner); an event's lines are
   released to its client, in order, when its ``LookupFinished`` arrives.
4. When an instance fails (its last connection lost, reply timeout, health checks, disabled or
   removed), its unfinished events go back to the front of the backlog and are dispatched again; the
   correlator drops the stale lanes' late lines, so every event is answered exactly once.  A lane lost
   while another lane of its instance is open (a worker of the node died) re-sends only its own
   events and reconnects; the instance stays UP.

Back-pressure instead of loss, and one client cannot hold the others: a client with more than
``MaxPendingEventsPerClient`` unanswered events stops being read until half are answered; when the
backlog is over ``MaxPendingEvents`` (no instance can take more), the clients holding more than their
share stop being read until it drains to half; a client that does not read its replies is paused at
4 MiB.  Nothing is dropped silently: every drop is counted and logged.

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

import asyncio
import gc
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from threatgate import heap, runtime
from threatgate.balancer.alerts import AlertListener
from threatgate.balancer.gateway import Gateway
from threatgate.balancer.readiness import ReadinessMonitor
from threatgate.balancer.upstream import Instance, InstanceOwner, Lane, ping
from threatgate.config.balancer import BalancerConfig, load_balancer_config
from threatgate.config.common import Address
from threatgate.config.reload import BALANCER_FIELDS, RestartTracker
from threatgate.errors import ConfigError
from threatgate.lb.correlation import FINISHED, Answered, Correlator, Drop
from threatgate.lb.policy import Candidate, InstanceState, allocate
from threatgate.log import RateLimitedLog
from threatgate.metrics import BalancerCollector, start_metrics_server
from threatgate.net.events import EventListener, EventProtocol, ListenerLimits, log_drained
from threatgate.net.sender import Dropped, DropTally, LineSender, queue_gauges
from threatgate.stats import BalancerStats, Gauges, LabelledGauges
from threatgate.wire.flags import SessionFlags
from threatgate.wire.framing import FramedEvent, Oversized

log = logging.getLogger("threatgate.balancer")

GC_THRESHOLDS = (50_000, 20, 20)
"""The cyclic collector's thresholds in the balancer (CPython's defaults: 700, 10, 10)."""

FINISHED_LINE = (FINISHED + "\n").encode()
DISPATCH_BATCH = 4096
"""Events placed per dispatch pass before yielding the loop (keeps reply handling responsive)."""
TICK = 0.25
"""Seconds between checks of overdue instances, idle keep-alives and waiting events."""
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


class ClientConnection(EventProtocol):
    """A SIEM (or lookup script) connection: behaves toward it like one big node."""

    def __init__(self, service: BalancerService) -> None:
        super().__init__(service.listener)
        self.service = service
        self.outstanding = 0  # events submitted and not yet released

    def process(self, events: list[FramedEvent]) -> None:
        self.service.submit(self, events)

    def keep_open_after_eof(self) -> bool:
        if self.outstanding:
            return True  # half-closed: the answers are still on their way
        return False

    def on_active(self) -> None:
        log.debug("client %s connected (%s)", self.peer, _describe(self.flags))
        if not self.flags.reply_back and self.service.output is None:
            log.warning(
                "client %s sent no X-KF-ReplyBack and there is no <OutputConnectionString>: "
                "its detections will be dropped (counted in threatgate_output_dropped_lines_total)",
                self.peer,
            )

    def on_closed(self) -> None:
        log.debug("client %s disconnected", self.peer)
        self.service.client_gone(self)

    def deliver(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def is_paused(self, reason: str) -> bool:
        return reason in self._paused_by

    def maybe_finish(self) -> None:
        """Close after the last answer when the client has half-closed."""
        if self.eof and not self.outstanding and self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class BalancerService(InstanceOwner):
    """Owns the listener, the correlator, the instances and their health checks."""

    def __init__(self, config: BalancerConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.stats = BalancerStats()
        self.listener = EventListener(self.stats, _limits(config), log)
        self.correlator = Correlator()
        self.backlog: deque[int] = deque()
        self.instances: dict[str, Instance] = {}
        self.clients: dict[int, ClientConnection] = {}
        self.rng = rng or random.Random()
        self.output = self._output_sender(config.output)
        self.restart = RestartTracker(config, BALANCER_FIELDS)
        self.drop_tally = DropTally()
        self.warn_drop = RateLimitedLog(log)
        self.warn_backlog = RateLimitedLog(log)
        self.warn_client_limit = RateLimitedLog(log)
        self.note_resumed = RateLimitedLog(log, logging.INFO)
        self.warn_no_instance = RateLimitedLog(log)
        self.warn_not_ready = RateLimitedLog(log)
        self.warn_unmatched = RateLimitedLog(log)
        self._paused_clients: set[ClientConnection] = set()
        self._no_instance_since: float | None = None  # loop time since when no instance is UP
        self._id_marks: deque[tuple[float, int]] = deque()  # (loop time, first request id submitted after it)
        self._peak_pending = 0
        self._compacted_at = 0  # pending events at the first compaction after a burst (a second one follows)
        self._compacted_time = -COMPACT_EVERY  # monotonic time of the last first-stage compaction
        self._compacted_peak = 0  # the peak it followed: a burst at least twice as large compacts at once
        self._dispatch_scheduled = False
        self._server: asyncio.Server | None = None
        self.gateway = Gateway(self)
        self.readiness = ReadinessMonitor(self, self.gateway)
        self.alerts = AlertListener(self)
        self._metrics_runner: web.AppRunner | None = None
        self._should_exit = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._checkers: dict[str, asyncio.Task[None]] = {}
        self._stats_mark = (time.monotonic(), 0)
        self.bound_port = 0
        self.listening = runtime.Listening()  # what startup() bound, by name (reported with READY=1)
        for settings in config.instances:
            self._add_instance(settings)

    def __repr__(self) -> str:
        up = sum(1 for i in self.instances.values() if i.state is InstanceState.UP)
        return (
            f"<BalancerService up={up}/{len(self.instances)} clients={len(self.listener.active)} "
            f"backlog={len(self.backlog)} {self.correlator!r}>"
        )

    # -- clients ------------------------------------------------------------------------------

    def submit(self, client: ClientConnection, events: list[FramedEvent]) -> None:
        corr = self.correlator
        key = id(client)
        self.clients[key] = client
        releases: list[Answered] = []
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
                    releases += self._refuse_event(client, corr.submit(key, ""), size, room)
                else:
                    self.backlog.append(corr.submit(key, event))
        else:
            self.backlog.extend(corr.submit_many(key, events))  # type: ignore[arg-type]
        client.outstanding += len(events)
        if log.isEnabledFor(logging.DEBUG):
            for event in events:
                log.debug("event from %s: %.300s", client.peer, event if isinstance(event, str) else "(oversized)")
        self.stats.events_in += len(events)
        self._account_framer(client)
        if releases:
            self._deliver(releases)
        if client.outstanding >= self.config.client_pending_limit and not client.is_paused("client_limit"):
            client.pause("client_limit")
            self.stats.bump(self.stats.connections, "paused_client_limit")
            self.warn_client_limit(
                "client %s has %d unanswered events (MaxPendingEventsPerClient %d): not reading it until half "
                "are answered; other clients are not affected",
                client.peer,
                client.outstanding,
                self.config.client_pending_limit,
            )
        if len(self.backlog) >= self.config.max_pending_events:
            self._pause_heavy_clients()
        self.dispatch()

    def event_limit(self) -> int:
        """Longest line (UTF-8 bytes, request id included) every enabled instance matches.

        An instance's limit is its MaxEventSize from ``/readyz`` when it says, else the balancer's own
        MaxEventSize (keep them equal).  An event that does not fit once ``"<id> "`` is in front of it
        would be refused by the node as oversized, so the balancer answers it at once with an error
        finished line instead of forwarding it.
        """
        sizes = [i.max_event_size or self.config.max_event_size for i in self.instances.values() if i.settings.enabled]
        return min(sizes or [self.config.max_event_size])

    def _refuse_event(self, client: ClientConnection, rid: int, size: int, limit: int) -> list[Answered]:
        self.stats.bump(self.stats.unmatched, "event_too_large")
        self.warn_unmatched(
            "event of %d bytes from %s not forwarded: the instances match at most %d bytes after the request id "
            "(MaxEventSize); answered with error=event_too_large",
            size,
            client.peer,
            limit,
        )
        return self.correlator.finish_local_runs(rid, f"{FINISHED} error=event_too_large size={size} limit={limit}")

    def _pause_heavy_clients(self) -> None:
        """Backlog full: stop reading the clients that hold more than an equal share of it."""
        active = [c for c in self.listener.active if isinstance(c, ClientConnection)]
        share = self.config.max_pending_events // max(1, len(active))
        heavy = [c for c in active if c.outstanding >= share and c not in self._paused_clients]
        if not heavy:
            return
        self.warn_backlog(
            "%d events wait for an instance (MaxPendingEvents %d): pausing clients %s",
            len(self.backlog),
            self.config.max_pending_events,
            ", ".join(sorted({c.peer for c in heavy})),
        )
        for c in heavy:
            c.pause("backlog")
            self._paused_clients.add(c)

    def client_gone(self, client: ClientConnection) -> None:
        key = id(client)
        self.clients.pop(key, None)
        self._paused_clients.discard(client)
        gone = self.correlator.client_gone(key)
        if gone:
            lanes = {lane.key: lane for inst in self.instances.values() for lane in inst.lanes}
            for rid, owner in gone:
                if owner is not None:
                    lane = lanes.get(owner)  # type: ignore[call-overload]
                    if lane is not None:
                        lane.owned.pop(rid, None)
                        if lane.retiring and not lane.owned:
                            self._retired(lane)
        if gone:
            self.stats.bump(self.stats.dropped, "client_gone", len(gone))
            log.info(
                "client %s left with %d event(s) unanswered; their answers will be discarded", client.peer, len(gone)
            )

    def _account_framer(self, client: ClientConnection) -> None:
        f = client.framer.stats
        for reason in ("invalid_utf8", "nul", "oversized", "unterminated"):
            n = getattr(f, reason)
            if n:
                if reason != "oversized":  # counted per event in submit
                    self.stats.bump(self.stats.bad_input, reason, n)
                setattr(f, reason, 0)

    def _deliver(self, answered: list[Answered]) -> None:
        """Write each client's answered run in one write (the plain run costs no per-event work)."""
        stats = self.stats
        for run in answered:
            client = self.clients.get(run.client)  # type: ignore[call-overload]
            if client is None:
                continue
            count = len(run.answers)
            client.outstanding -= count
            if client.outstanding <= self.config.client_pending_limit // 2 and client.is_paused("client_limit"):
                client.resume("client_limit")
            stats.events_out += count
            stats.detections += run.detections
            flags = client.flags
            if flags.reply_back:
                if run.plain:
                    data = FINISHED_LINE * count if flags.send_finished else b""
                else:
                    out: list[str] = []
                    for _, lines, finished in run.answers:
                        out.extend(lines)
                        if flags.send_finished:
                            out.append(finished)
                    data = ("\n".join(out) + "\n").encode("utf-8", "replace") if out else b""
                if data:
                    client.deliver(data)
            elif run.detections:
                self._send_output(tuple(line for _, lines, _ in run.answers for line in lines))
            client.maybe_finish()

    def _send_output(self, lines: tuple[str, ...]) -> None:
        if self.output is None:
            self._detections_dropped("nowhere", "no_output_destination", len(lines))
            self.warn_drop(
                "detections of a client without X-KF-ReplyBack and no <OutputConnectionString>: %d line(s) dropped",
                len(lines),
            )
            return
        self.output.send_or_drop(("\n".join(lines) + "\n").encode("utf-8", "replace"))  # full: counted, logged

    def _output_sender(self, address: Address | None) -> LineSender | None:
        return None if address is None else LineSender(address, name="detections", on_drop=self._output_dropped)

    def _output_dropped(self, dropped: Dropped) -> None:
        self._detections_dropped(str(dropped.address), dropped.reason, dropped.lines)

    def _detections_dropped(self, address: str, reason: str, lines: int) -> None:
        """Count detection lines that will never reach anyone; the balancer's own service alert, at most
        once a minute per destination and reason (the rest summed into the next, see :meth:`tick`)."""
        self.stats.drop_lines("detections", reason, lines)
        due = self.drop_tally.add(address, reason, lines, time.monotonic())
        if due:
            self.alerts.raise_own("KL_ALERT_DetectionsDropped", destination=address, lines=due, reason=reason)

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Place backlog events on lanes, one batched write per lane.

        A lane's weight and in-flight limit are its instance's divided by the instance's lanes: a node
        takes the same share of events, and holds at most ``MaxInflightEvents``, however many lanes
        it has.  With one lane per instance this is exactly the per-instance placement.
        """
        backlog = self.backlog
        if not backlog:
            self._maybe_resume_clients()
            return
        limit = self.config.max_inflight_events
        cands: list[Candidate] = []
        by_key: dict[str, Lane] = {}
        for lane in self._pool():
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
        now = asyncio.get_running_loop().time()
        take = min(len(backlog), DISPATCH_BATCH)
        placed = 0
        for cand, count in allocate(cands, take, self.rng):
            ids = [backlog.popleft() for _ in range(min(count, len(backlog)))]
            lane = by_key[cand.key]  # type: ignore[index]
            lines: list[str] = []
            sent = corr.dispatch_many(ids, lane.key, lines)
            if not sent:
                continue
            if not lane.owned:
                lane.last_progress = now
            lane.owned.update(dict.fromkeys(sent, now))
            lane.instance.dispatched += len(sent)
            placed += len(sent)
            lines.append("")
            lane.write("\n".join(lines).encode("utf-8", "replace"), now)
        self.stats.dispatched += placed
        if backlog and take >= DISPATCH_BATCH:
            self._schedule_dispatch()
        self._maybe_resume_clients()

    def _pool(self) -> list[Lane]:
        """The lanes events may go to now: connected, not retiring, of UP instances; among them the
        not suspect lanes of ready instances while there are any; else none while an instance's
        readiness is still being asked for the first time (a node whose feed did not load must not get
        events before it said so); else those not suspect, else any (an answer beats none)."""
        up = [
            lane
            for i in self.instances.values()
            if i.state is InstanceState.UP
            for lane in i.lanes
            if lane.protocol is not None and lane.protocol.transport is not None and not lane.retiring
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
            if self.warn_not_ready.due():
                named = {lane.instance.key: lane.instance.not_ready_reason for lane in alive}
                self.warn_not_ready(
                    "no ready instance: events go to instance(s) that are not ready (%s); their detections may "
                    "be incomplete",
                    "; ".join(f"{key}: {reason}" for key, reason in named.items()),
                )
            return alive
        return up

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True

            def run() -> None:
                self._dispatch_scheduled = False
                self.dispatch()

            asyncio.get_running_loop().call_soon(run)

    def _maybe_resume_clients(self) -> None:
        if self._paused_clients and len(self.backlog) <= self.config.max_pending_events // 2:
            self.note_resumed(
                "%d events wait for an instance (under half of MaxPendingEvents %d): %d client(s) resumed",
                len(self.backlog),
                self.config.max_pending_events,
                len(self._paused_clients),
            )
            for c in self._paused_clients:
                c.resume("backlog")
            self._paused_clients.clear()

    # -- lanes and instances (InstanceOwner) ---------------------------------------------------

    def lane_lines(self, lane: Lane, lines: list[str]) -> None:
        finished: list[int] = []
        releases, drops = self.correlator.on_lines(lane.key, lines, finished)
        if drops:
            for why in drops:
                self._dropped_line(lane.instance, why)
        if finished:
            owned = lane.owned
            pop = owned.pop
            sent = pop(finished[0], None)  # the oldest of this read: what a hang would delay first
            for rid in finished[1:]:
                pop(rid, None)
            now = asyncio.get_running_loop().time()
            if sent is not None:
                lane.observe_latency(now - sent)
            lane.instance.finished += len(finished)
            lane.last_progress = now
            lane.overdue_streak = 0
            if lane.losses:
                lane.losses = 0
            if lane.retiring and not owned:
                self._retired(lane)
        if releases:
            self._deliver(releases)
        if finished:
            self.dispatch()

    def _dropped_line(self, instance: Instance, why: Drop) -> None:
        self.stats.bump(self.stats.dropped_lines, why.value)
        if why is Drop.NO_ID:
            self.warn_drop(
                "instance %s sent a line without a request id (its EventFormat must start with %%REQ%%)",
                instance.key,
            )
        else:
            log.debug("instance %s: line dropped (%s)", instance.key, why.value)

    def lane_failed(self, lane: Lane, why: str) -> None:
        """A lane's connection failed (lost, broken, refused).  While another lane of its UP instance is
        open, only that lane's events are re-sent and it reconnects (a worker of the node died; the node
        is fine); otherwise the instance failed, as with one connection."""
        inst = lane.instance
        if lane.retiring or lane not in inst.lanes:  # no longer wanted: nothing to reconnect
            lane.close()
            self._redispatch(inst, why, [lane])
            self._retired(lane)
            return
        if inst.state is not InstanceState.UP or not any(o is not lane and o.connected for o in inst.lanes):
            self.instance_failed(inst, why)
            return
        lane.close()
        now = asyncio.get_running_loop().time()
        lane.losses += 1
        delay = min(LANE_RETRY * 2 ** (lane.losses - 1), LANE_RETRY_MAX)
        lane.retry_at = now + delay
        self.stats.bump(self.stats.transitions, "lane_lost")
        log.warning(
            "instance %s: %s; the instance stays UP (%d of %d event connections open), this one reconnects in %.1f s",
            lane.name,
            why,
            inst.open_lanes,
            inst.active_lanes,
            delay,
        )
        self._redispatch(inst, why, [lane])
        asyncio.get_running_loop().call_later(delay, self._reconnect_lane, lane)

    def _reconnect_lane(self, lane: Lane) -> None:
        """A lane lost on its own reconnects, if it is still wanted and its instance still UP and not suspect."""
        inst = lane.instance
        if (
            self.instances.get(inst.key) is inst
            and inst.state is InstanceState.UP
            and lane in inst.lanes
            and not lane.retiring
            and lane.suspect_since is None
            and not self._should_exit.is_set()
        ):
            self._spawn(lane.connect(self.config.health.timeout))

    def _retired(self, lane: Lane) -> None:
        """A retiring lane owes nothing any more: closed and forgotten."""
        inst = lane.instance
        if lane in inst.lanes:
            inst.drop_lane(lane)
            log.info(
                "instance %s: event connection %d retired (%d lane(s) now)", inst.key, lane.index, inst.active_lanes
            )

    def instance_failed(self, instance: Instance, why: str) -> None:
        was_up = instance.state is InstanceState.UP
        if instance.health.passive_failure(why) or was_up:
            instance.state = InstanceState.DOWN if instance.state is InstanceState.UP else instance.state
            log.error("instance %s is DOWN: %s", instance.key, why)
            self.stats.bump(self.stats.transitions, "down")
        instance.close()
        self._redispatch(instance, why)

    def _redispatch(self, instance: Instance, why: str, lanes: list[Lane] | None = None) -> None:
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
                log.warning(
                    "instance %s: %d unfinished event(s) of event connection %d sent again (%s)",
                    instance.key,
                    len(lost),
                    lanes[0].index,
                    why,
                )
            elif any(i.state is InstanceState.UP and i is not instance for i in self.instances.values()):
                log.warning(
                    "instance %s: %d unfinished event(s) sent again to other instances (%s)",
                    instance.key,
                    len(lost),
                    why,
                )
            else:
                log.warning(
                    "instance %s: %d unfinished event(s) wait in the backlog: no other instance available (%s)",
                    instance.key,
                    len(lost),
                    why,
                )
        self._note_availability()
        self.dispatch()

    def _note_availability(self) -> None:
        """Say when the last UP instance is gone (HAProxy's "backend has no server available!") and when one is back."""
        now = asyncio.get_running_loop().time()
        up = any(i.state is InstanceState.UP for i in self.instances.values())
        if not up and self._no_instance_since is None:
            self._no_instance_since = now
            self.stats.bump(self.stats.transitions, "no_instance")
            log.warning(
                "no instance available (none UP): %d event(s) wait in the backlog%s",
                len(self.backlog),
                f" (answered with error=no_instance after MaxEventWait {self.config.max_event_wait:.0f} s)"
                if self.config.max_event_wait
                else " until one comes up",
            )
        elif up and self._no_instance_since is not None:
            log.info(
                "an instance is available again after %.1f s without one: %d waiting event(s) dispatched",
                now - self._no_instance_since,
                len(self.backlog),
            )
            self._no_instance_since = None

    def lane_connected(self, lane: Lane) -> None:
        self.dispatch()

    def lane_writable(self, lane: Lane) -> None:
        self.dispatch()

    def resize_lanes(self, inst: Instance, why: str) -> None:
        """Open or retire lanes after ``connections`` or the node's ``event_connections`` changed.

        The instance's state does not change: new lanes connect while it is UP, retired lanes take no new
        event and close once they owe nothing (their events are answered, not re-sent).
        """
        before = inst.active_lanes
        added, retired = inst.resize()
        if not added and not retired:
            return
        log.info("instance %s: %d event connection(s), was %d (%s)", inst.key, inst.active_lanes, before, why)
        if added and inst.state is InstanceState.UP and self.instances.get(inst.key) is inst:
            self._spawn(inst.connect(self.config.health.timeout))
        self.dispatch()

    def _add_instance(self, settings: Any) -> Instance:
        h = self.config.health
        inst = Instance(settings, rise=h.rise, fall=h.fall, owner=self)
        if self.config.readiness and settings.api_port_set:
            inst.ready = None  # its /readyz decides, once asked (at once): no events before unless none is known
        if not settings.enabled:
            inst.health.checked = True  # enabled later by SIGHUP: it needs ``rise`` checks like any DOWN one
        self.instances[inst.key] = inst
        return inst

    def _checked(self, inst: Instance) -> bool:
        """Whether ``inst`` is still an enabled instance of the running configuration (checks apply to it)."""
        return inst.state is not InstanceState.MAINT and self.instances.get(inst.key) is inst

    async def _check_loop(self, inst: Instance) -> None:
        """Active health checks of one instance until it is removed or the balancer stops."""
        while not self._should_exit.is_set() and self.instances.get(inst.key) is inst:
            h = self.config.health
            if inst.state is not InstanceState.MAINT:
                started = time.perf_counter()  # not loop.time(): uvloop's is cached per loop iteration (1 ms steps)
                error = await ping(inst.settings.host, inst.settings.matching_port, h.timeout)
                if not self._checked(inst):
                    pass  # disabled or removed while the check ran: its result must not count
                elif error is None:
                    inst.check_seconds = time.perf_counter() - started
                    self._check_passed(inst)
                    if inst.state is InstanceState.UP:
                        await inst.connect(h.timeout)  # the lanes not open (all of them after DOWN)
                else:
                    if inst.health.check_failed(error):
                        self.instance_failed(inst, f"health check: {error}")
                    elif not inst.health.up:
                        log.debug("instance %s health check failed: %s", inst.key, error)
            if await runtime.pause(self._should_exit, h.interval):
                return

    def _check_passed(self, inst: Instance) -> None:
        health = inst.health
        if health.check_passed():
            if health.successes < health.rise:
                log.info("instance %s is UP (first health check passed)", inst.key)
            else:
                log.info("instance %s is UP (%d checks passed)", inst.key, health.rise)
            self.stats.bump(self.stats.transitions, "up")
        if health.up and inst.state is InstanceState.DOWN:
            inst.state = InstanceState.UP
            self._note_availability()
        suspect_since = inst.suspect_since
        if suspect_since is not None:
            log.info(
                "instance %s answers health checks again after %.1f s: it gets events again",
                inst.key,
                asyncio.get_running_loop().time() - suspect_since,
            )
            for lane in inst.lanes:
                lane.suspect_since = None

    def tick(self, now: float) -> None:
        """The periodic work of the event path (every :data:`TICK` seconds)."""
        for inst in list(self.instances.values()):
            inst.keep_alive(now)
            for lane in [lane for lane in inst.lanes if lane.retiring and not lane.owned]:
                self._retired(lane)  # its last events were handed back or their client left
        self._check_overdue(now)
        self._check_timeouts(now)
        self._expire_waiting(now)
        if self._no_instance_since is None and all(
            i.health.checked for i in self.instances.values() if i.state is not InstanceState.MAINT
        ):
            self._note_availability()  # none came UP at start-up
        if self._no_instance_since is not None and self.backlog and now - self._no_instance_since >= 10:
            self.warn_no_instance(
                "no instance available for %.0f s: %d event(s) wait in the backlog",
                now - self._no_instance_since,
                len(self.backlog),
            )
        for address, reason, lines in self.drop_tally.due(time.monotonic()):
            self.alerts.raise_own("KL_ALERT_DetectionsDropped", destination=address, lines=lines, reason=reason)
        self._maybe_compact()

    def overdue_deadline(self, lane: Lane) -> float:
        """How long ``lane`` may owe events without answering any before it is suspect."""
        return min(self.config.reply_timeout, max(OVERDUE_FLOOR, OVERDUE_FACTOR * lane.latency))

    def _check_overdue(self, now: float) -> None:
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
            lane.overdue_streak += 1
            self.stats.bump(self.stats.transitions, "suspect")
            if lane.overdue_streak >= inst.health.fall:
                why = f"no answer to events for {silent:.1f} s (overdue {lane.overdue_streak} time(s) in a row)"
                if any(self._answering(o, now) for o in inst.lanes if o is not lane):
                    self.lane_failed(lane, why)  # one worker of the node is stuck, the others answer
                else:
                    self.instance_failed(inst, why)
                continue
            lane.suspect_since = now
            log.warning(
                "instance %s is suspect: no answer for %.1f s (deadline %.1f s, recent latency %.0f ms) while "
                "owing %d event(s); they are sent again elsewhere and it gets no new events until a health check "
                "passes",
                lane.name,
                silent,
                deadline,
                lane.latency * 1000,
                len(lane.owned),
            )
            lane.close()  # no late answer from this connection can mix with the new owner's
            self.correlator.mark_overdue(list(lane.owned))
            self._redispatch(inst, "overdue", [lane])

    def _answering(self, lane: Lane, now: float) -> bool:
        """Whether ``lane`` is open and keeps answering (owes nothing, or finished an event within its deadline)."""
        return (
            lane.connected
            and lane.suspect_since is None
            and (not lane.owned or now - lane.last_progress <= self.overdue_deadline(lane))
        )

    def _check_timeouts(self, now: float) -> None:
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
                self.instance_failed(inst, why)
            else:
                for lane in hung:
                    self.lane_failed(lane, why)

    def _expire_waiting(self, now: float) -> None:
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
        if self._no_instance_since is None or not threshold or not backlog:
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
            self.warn_unmatched(
                "%d event(s) waited %.0f s (MaxEventWait) with no instance UP: answered with error=no_instance, "
                "no detections",
                answered,
                wait,
            )
        self._deliver(releases)
        self._maybe_resume_clients()

    def _maybe_compact(self) -> None:
        """After a burst has drained, give its memory back: tables shrink, freed heap returns to the system.

        Once when pending events fall under an eighth of the burst's peak, and once more when they fall
        under an eighth of that (what was still held at the first pass is then freed too); at most once a
        minute for bursts of the same size.
        """
        pending = self.correlator.pending
        self._peak_pending = max(self._peak_pending, pending)
        now = time.monotonic()
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
        for inst in self.instances.values():
            for lane in inst.lanes:
                lane.owned = dict(lane.owned)
        self.backlog = deque(self.backlog)
        gc.collect()
        heap.give_back()
        log.debug("event tables compacted after a burst (%d pending)", pending)

    # -- configuration ------------------------------------------------------------------------

    def apply_config(self, new: BalancerConfig) -> None:
        """Everything config/reload.py marks live; the rest is reported (WARNING, restart gauge).

        Instances added, removed, enabled or disabled; events in flight are kept (redispatched).
        """
        old = self.config
        self.restart.reloaded(new, log)
        self.config = new
        if new.output != old.output:
            self._replace_output(new.output)
        if new.alert_forward != old.alert_forward:
            self._spawn(self.alerts.replace_forward(new.alert_forward))
        self.listener.limits = _limits(new)
        wanted = {s.key: s for s in new.instances}
        for key in list(self.instances):
            if key not in wanted:
                removed = self.instances.pop(key)
                removed.state = InstanceState.MAINT
                removed.close()
                self._redispatch(removed, "removed from the configuration")
                log.info("instance %s removed", key)
        for key, settings in wanted.items():
            inst = self.instances.get(key)
            if inst is None:
                inst = self._add_instance(settings)
                self._start_checks(inst)
                log.info("instance %s added", key)
                continue
            connections = inst.settings.connections
            inst.settings = settings
            inst.health.rise, inst.health.fall = new.health.rise, new.health.fall  # interval/timeout: read per check
            if settings.connections != connections:
                self.resize_lanes(inst, f'connections="{settings.connections}"')
            if not settings.enabled and inst.state is not InstanceState.MAINT:
                inst.state = InstanceState.MAINT
                inst.health.reset()
                for lane in inst.lanes:
                    lane.suspect_since = None
                inst.close()
                self._redispatch(inst, "disabled")
                log.info("instance %s disabled (MAINT)", key)
            elif settings.enabled and inst.state is InstanceState.MAINT:
                inst.state = InstanceState.DOWN
                log.info("instance %s enabled; UP after %d health checks", key, new.health.rise)
        log.info("configuration reloaded from %s", new.path)

    def _replace_output(self, address: Address | None) -> None:
        """A new sender for a new destination; the old one flushes for 2 s and hands over the rest."""
        old, self.output = self.output, self._output_sender(address)
        if self.output is not None:
            self.output.start()
        log.info("detections of clients without X-KF-ReplyBack now go to %s", address or "nowhere (dropped)")
        if old is not None:
            self._spawn(old.aclose(successor=self.output))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        try:
            new = await asyncio.to_thread(load_balancer_config, self.config.path)
        except ConfigError as exc:
            log.error("configuration not reloaded, keeping the running one: %s", exc)
            return
        self.apply_config(new)

    # -- lifecycle ----------------------------------------------------------------------------

    def _start_checks(self, inst: Instance) -> None:
        task = asyncio.get_running_loop().create_task(self._check_loop(inst), name=f"health-{inst.key}")
        self._checkers[inst.key] = task
        key = inst.key

        def forget(done: asyncio.Task[None]) -> None:
            if self._checkers.get(key) is done:
                del self._checkers[key]

        task.add_done_callback(forget)

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        # Every event allocates a few small tracked objects (correlator entries, lists): with CPython's
        # default gen-0 threshold of 700 the cyclic collector ran every few hundred events and took 12 %
        # of the balancer's CPU while streaming.  What start-up built is frozen out of every collection,
        # and collections run 70 times less often (docs/performance.md, "Issue 15").
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        for inst in self.instances.values():
            self._start_checks(inst)
        if self.output is not None:
            self.output.start()
        if self.config.metrics is not None:
            gauges: Gauges = {
                "threatgate_balancer_backlog": ("Events waiting for an instance", lambda: len(self.backlog)),
                "threatgate_balancer_pending": ("Events not yet answered", lambda: self.correlator.pending),
                "threatgate_balancer_clients": ("Client connections", lambda: len(self.listener.active)),
                "threatgate_balancer_instances_up": (
                    "Instances UP",
                    lambda: sum(1 for i in self.instances.values() if i.state is InstanceState.UP),
                ),
                "threatgate_config_restart_required": (
                    "1 while the configuration file differs from the running one in something that needs a restart",
                    self.restart.gauge,
                ),
            }
            senders = queue_gauges(lambda: (self.output, self.alerts.forward))
            self._metrics_runner = await start_metrics_server(self.config.metrics, _Collector(self, gauges, senders))
            _, port = self.listening.add("metrics", self._metrics_runner.addresses[0])
            log.info("metrics on http://%s/metrics", Address(self.config.metrics.host, port))
        await self.alerts.start()
        self.listening.add("alerts", self.alerts.sockname)
        await self.gateway.start()
        assert self.gateway.http is not None
        self.listening.add("api", self.gateway.http.sockname)
        self.readiness.start()
        self._server = await loop.create_server(
            lambda: ClientConnection(self),
            self.config.listen_host,
            self.config.matching_port,
            reuse_address=True,
            backlog=1024,
        )
        self.bound_port = self.listening.add("events", self._server.sockets[0].getsockname())[1]
        self.listener.start_sweeps()
        log.info(
            "balancer listening for events on %s:%d (scanners_count %d, %d instance(s))",
            self.config.listen_host,
            self.bound_port,
            self.config.scanners_count,
            len(self.instances),
        )

    async def main_loop(self) -> None:
        last_stats = time.monotonic()
        loop = asyncio.get_running_loop()
        async for _ in runtime.ticks(self._should_exit, TICK):
            self.tick(loop.time())
            if time.monotonic() - last_stats >= self.config.stats_interval:
                last_stats = time.monotonic()
                self.log_eps()

    def log_eps(self) -> None:
        started, count = self._stats_mark
        now = time.monotonic()
        eps = (self.stats.events_in - count) / max(now - started, 1e-9)
        self._stats_mark = (now, self.stats.events_in)
        log.info(
            "average EPS over the last %.0f s: %.1f (%d events in total)", now - started, eps, self.stats.events_in
        )

    def request_exit(self) -> None:
        self._should_exit.set()

    def request_reload(self) -> None:
        self._spawn(self.reload())

    async def shutdown(self) -> None:
        """Stop accepting, drain the client connections within DrainTimeout (answers from the nodes keep
        arriving meanwhile), then stop the rest."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = self.config.drain_timeout
        if self._server is not None:
            self._server.close()  # first: new client connections are refused from here
            log.info(
                "balancer draining: %d client connection(s), %d event(s) unanswered, up to %g s",
                len(self.listener.active),
                self.correlator.pending,
                timeout,
            )
        drained = await self.listener.drain(timeout)
        if self._server is not None:
            log_drained(log, "balancer", drained, loop.time() - started, timeout)
        for task in list(self._checkers.values()):
            task.cancel()
        if self._tasks:  # a reload's hand-over of an old sender's queue: let it finish (its drops are counted)
            await asyncio.wait(list(self._tasks), timeout=3.0)
        for task in list(self._tasks):
            task.cancel()
        for inst in self.instances.values():
            inst.close()
        await self.readiness.close()
        await self.gateway.close()
        await self.alerts.close()
        if self.output is not None:
            await self.output.aclose()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()


class _Collector(BalancerCollector):
    """The balancer's counters and gauges, per-instance gauges and the readiness gauges."""

    def __init__(self, service: BalancerService, gauges: Gauges, senders: LabelledGauges) -> None:
        super().__init__(service.stats, gauges, senders)
        self._service = service

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        service = self._service
        instances = sorted(service.instances.values(), key=lambda i: i.key)
        refused = service.gateway.refused
        per_instance: list[tuple[str, str, Callable[[Instance], float]]] = [
            ("threatgate_balancer_instance_up", "1 when the instance is UP", lambda i: i.state is InstanceState.UP),
            (
                "threatgate_balancer_instance_suspect",
                "1 while the instance (one of its lanes) is suspect (overdue answers; no new events while others "
                "can take them)",
                lambda i: i.suspect_since is not None,
            ),
            (
                "threatgate_balancer_instance_ready",
                "1 when the instance's /readyz says ready (or is not polled)",
                lambda i: i.ready is True,
            ),
            (
                "threatgate_balancer_instance_pin_refused",
                "1 while the instance is out of REST rotation: its certificate does not match its pin",
                lambda i: i.key in refused,
            ),
            (
                "threatgate_balancer_instance_inflight",
                "Events the instance owes answers for (over all its lanes)",
                lambda i: i.owned_count,
            ),
        ]
        for name, doc, value in per_instance:
            family = GaugeMetricFamily(name, doc, labels=["instance"])
            for inst in instances:
                family.add_metric([inst.key], float(value(inst)))
            yield family
        for name, doc, attribute in (
            (
                "threatgate_balancer_instance_dispatched",
                "Events sent to the instance (redispatches to it included)",
                "dispatched",
            ),
            ("threatgate_balancer_instance_answered", "Events the instance answered", "finished"),
            (
                "threatgate_balancer_instance_redispatched",
                "Events the instance owed that were sent again elsewhere after it failed",
                "redispatched",
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["instance"])
            for inst in instances:
                counter.add_metric([inst.key], getattr(inst, attribute))
            yield counter
        lanes = GaugeMetricFamily(
            "threatgate_balancer_instance_lanes",
            "Event connections (lanes) open to the instance: one per worker of the node when it says so",
            labels=["instance"],
        )
        for inst in instances:
            lanes.add_metric([inst.key], inst.open_lanes)
        yield lanes
        check = GaugeMetricFamily(
            "threatgate_balancer_instance_check_seconds",
            "Round trip of the instance's last passed health check (connect, PING, PONG), in seconds",
            labels=["instance"],
        )
        for inst in instances:
            if inst.check_seconds is not None:
                check.add_metric([inst.key], inst.check_seconds)
        yield check
        yield from service.readiness.families()


def _describe(flags: SessionFlags) -> str:
    if not flags.reply_back:
        return "detections to OutputConnectionString"
    return "ReplyBack" + (", SendFinishedEvent" if flags.send_finished else "")


def _limits(config: BalancerConfig) -> ListenerLimits:
    return ListenerLimits(
        handshake_timeout=config.handshake_timeout,
        scanners_count=config.scanners_count,
        max_event_size=config.max_event_size,
        delimiter=config.event_delimiter,
        idle_timeout=config.idle_timeout,
    )
