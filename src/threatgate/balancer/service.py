"""The balancer's asyncio edge: sockets, timers and logs around the sans-IO :mod:`threatgate.lb.dispatcher`.

Every decision about events (ids, placement, redispatch, back-pressure, instance states, overdue and
hung instances) is the :class:`~threatgate.lb.dispatcher.Dispatcher`'s; this module feeds it what
happened (events read from a client, reply lines read from a lane, a connection opened or lost, a
health check's outcome, a tick of the clock) and carries out the actions it returns
(:meth:`BalancerService.apply`): writes, pauses, lane connections, retries, log lines.

Lifecycle (as the node's): ``serve`` -> ``startup`` (health checks start, listener opens) ->
``main_loop`` (a 0.25 s tick: overdue lanes, reply timeouts, keep-alives, MaxEventWait; hourly
statistics) -> ``shutdown``.  SIGHUP re-reads the configuration; SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from threatgate import heap, runtime
from threatgate.balancer.admin import instance_row
from threatgate.balancer.gateway import WriteRouter
from threatgate.balancer.lanes_tls import LaneOpener
from threatgate.balancer.upstream import UpstreamProtocol
from threatgate.config.balancer import BalancerConfig, load_balancer_config
from threatgate.config.common import Address
from threatgate.config.reload import BALANCER_FIELDS, RestartTracker
from threatgate.config.security import TLSListener
from threatgate.errors import ConfigError, PinMismatch, UpstreamFailed
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
from threatgate.lb.correlation import Correlator, Drop
from threatgate.lb.dispatcher import Dispatcher
from threatgate.lb.instances import Instance, InstanceState
from threatgate.log import RateLimitedLog
from threatgate.metrics import BalancerCollector, MetricsServer, start_metrics_server
from threatgate.net.describe import describe
from threatgate.net.events import EventListener, EventProtocol, ListenerLimits, log_drained
from threatgate.net.gate import Gate, Gates, Listening, start_servers
from threatgate.net.sender import Dropped, DropTally, LineSender, queue_gauges
from threatgate.stats import BalancerStats, Gauges, LabelledGauges
from threatgate.wire.flags import SessionFlags
from threatgate.wire.framing import FramedEvent

log = logging.getLogger("threatgate.balancer")

GC_THRESHOLDS = (50_000, 20, 20)
"""The cyclic collector's thresholds in the balancer (CPython's defaults: 700, 10, 10)."""

TICK = 0.25
"""Seconds between the dispatcher's periodic checks (overdue instances, keep-alives, waiting events)."""


class Bound(Protocol):
    """A listener that says where it listens once started (``getsockname()``: port 0 is the port picked),
    and its door (a reload gives it the new <AllowedSources>)."""

    sockname: Any
    gate: Gate


class GatewayPart(Protocol):
    """The REST gateway as the edge sees it (balancer/gateway.py ``Gateway``)."""

    @property
    def refused(self) -> Mapping[str, str]: ...
    @property
    def http(self) -> Bound | None: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...


class ReadinessPart(WriteRouter, Protocol):
    """The readiness monitor as the edge sees it (balancer/readiness.py ``ReadinessMonitor``)."""

    def start(self) -> None: ...
    async def close(self) -> None: ...
    def families(self) -> Iterator[Metric]: ...


API_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a REST gateway client has for its TLS handshake (the gateway's request-header deadline)."""


def _handshake_timeout(config: BalancerConfig, port: str) -> float:
    """The TLS handshake deadline of a port: the gateway's own for ``api``, else HandshakeTimeout."""
    return API_HANDSHAKE_TIMEOUT if port == "api" else config.handshake_timeout


ORPHAN_POLL = 0.01
"""Seconds between two looks at the events of clients that left, at shutdown (as net/drain.py's poll)."""


class AlertPart(Protocol):
    """The service-alert port as the edge sees it (balancer/alerts.py ``AlertListener``)."""

    sockname: Any
    bound: list[tuple[str, Any]]

    @property
    def forward(self) -> LineSender | None: ...
    def raise_own(self, name: str, **context: object) -> None: ...
    async def replace_forward(self, address: Address | None) -> None: ...
    async def start(self, gate: Callable[[TLSListener | None], Gate]) -> None: ...
    async def close(self) -> None: ...


class StatisticsPart(Protocol):
    """The detection statistics poller as the edge sees it (balancer/statistics.py ``StatisticsPoller``)."""

    def start(self) -> None: ...
    async def close(self) -> None: ...
    def report(self) -> dict[str, Any]: ...
    def families(self) -> Iterator[Metric]: ...


class AdminPart(Protocol):
    """The admin socket as the edge sees it (balancer/admin.py ``AdminServer``)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...


class ClientConnection(EventProtocol):
    """A SIEM (or lookup script) connection: behaves toward it like one big node."""

    def __init__(self, service: BalancerService) -> None:
        super().__init__(service.listener)
        self.service = service

    def process(self, events: list[FramedEvent]) -> None:
        self.service.submit(self, events)

    def unanswered(self) -> int:
        """Events not answered yet, counting answers gathered and not yet written as one (a drain waits)."""
        service = self.service
        return service.dispatcher.outstanding(self) + (self in service._gathered)

    def keep_open_after_eof(self) -> bool:
        """Half-closed: stay open while answers are on their way; else write what was gathered for it now,
        before the transport closes (a close flushes what was written, not what is still gathered)."""
        service = self.service
        if service.dispatcher.client_eof(self):
            return True
        service._flush_one(self)
        return False

    def on_active(self) -> None:
        log.debug("client %s connected (%s)", self.peer, _describe(self.flags))
        self.service.apply(self.service.dispatcher.client_open(self, self.peer, self.flags))

    def on_closed(self) -> None:
        log.debug("client %s disconnected", self.peer)
        service = self.service
        service._gathered.pop(self, None)
        service.apply(service.dispatcher.client_gone(self))

    def deliver(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def finish(self) -> None:
        """Close after the last answer when the client has half-closed."""
        if self.eof and self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class BalancerService:
    """The edge: listener, lane connections, health checks, timers; decisions are the dispatcher's.

    Its other parts (gateway, readiness monitor, alert listener) are built and handed over by the
    composition root (balancer/app.py, :meth:`wire`): this module knows them only by their ports.
    """

    gateway: GatewayPart
    readiness: ReadinessPart
    alerts: AlertPart
    admin: AdminPart | None = None
    statistics: StatisticsPart | None = None

    def __init__(self, config: BalancerConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.stats = BalancerStats()
        self.listener = EventListener(self.stats, _limits(config), log)
        self.rng = rng or random.Random()
        self.dispatcher = Dispatcher(config, self.stats, self.rng)
        self.output = self._output_sender(config.output)
        self.restart = RestartTracker(config, BALANCER_FIELDS)
        self.drop_tally = DropTally()
        self.warn_drop = RateLimitedLog(log)
        self._limited: dict[str, RateLimitedLog] = {}
        self._upstreams: dict[str, UpstreamProtocol] = {}  # lane key -> its open event connection
        self.opener = LaneOpener(config.cert_dir)  # lanes and health checks, plain or TLS (pinned)
        self._gathered: dict[object, list[bytes]] = {}  # connection -> bytes to write at the end of the iteration
        self._flush_scheduled = False
        self._dispatch_scheduled = False
        self._servers: list[Listening] = []  # the event port, and its TLS twin during a migration
        self.gates = Gates(self.stats, log)  # every port's door: a reload gives them their new <AllowedSources>
        self._metrics: MetricsServer | None = None
        self._should_exit = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._checkers: dict[str, asyncio.Task[None]] = {}
        self._stats_mark = (time.monotonic(), 0)
        self.bound_port = 0
        self.listening = runtime.Listening()  # what startup() bound, by name (reported with READY=1)

    def __repr__(self) -> str:
        return f"<BalancerService clients={len(self.listener.active)} {self.dispatcher!r}>"

    def wire(
        self,
        *,
        gateway: GatewayPart,
        readiness: ReadinessPart,
        alerts: AlertPart,
        admin: AdminPart | None = None,
        statistics: StatisticsPart | None = None,
    ) -> None:
        """Take the parts the composition root built (before :meth:`startup`)."""
        self.gateway, self.readiness, self.alerts, self.admin = gateway, readiness, alerts, admin
        self.statistics = statistics

    def detection_statistics(self) -> dict[str, Any]:
        """The deployment's detection statistics (balancer/statistics.py ``Statistics.report``); {} when
        not polled."""
        return self.statistics.report() if self.statistics is not None else {}

    # -- run-time control (the admin socket's AdminHost) ---------------------------------------

    def operate(self, command: str, key: str) -> None:
        """An operator's ``disable``/``enable``/``drain`` of instance ``key`` (until SIGHUP or restart)."""
        self.apply(self.dispatcher.operate(command, key, self._now()))

    def instance_rows(self) -> list[dict[str, Any]]:
        """Every instance as ``threatgate balancer instance list`` shows it."""
        d = self.dispatcher
        return [instance_row(inst, d.why(inst)) for inst in sorted(d.instances.values(), key=lambda i: i.key)]

    # -- what the components read (BalancerView) ----------------------------------------------

    @property
    def instances(self) -> Mapping[str, Instance]:
        return self.dispatcher.instances

    @property
    def correlator(self) -> Correlator:
        return self.dispatcher.correlator

    @property
    def backlog(self) -> deque[int]:
        return self.dispatcher.backlog

    # -- carrying out the dispatcher's actions -------------------------------------------------

    def apply(self, actions: list[Action]) -> None:
        """Carry out ``actions`` in order (the hot ones first: a write to a lane, answers to a client).

        Writes are gathered per connection and made once the callbacks of this loop iteration have run
        (:meth:`_flush`): the reads of one iteration (a client's events, several lanes' answers) each
        produce writes to the same few sockets, and one ``write`` per socket per iteration instead of
        one per read and socket halves the balancer's system time.  Order per socket is kept; what is
        gathered for a connection that closes meanwhile is dropped with it (its events are owned by its
        lane and sent again by the dispatcher).
        """
        for action in actions:
            if isinstance(action, Send):
                upstream = self._upstreams.get(action.lane)
                if upstream is not None:
                    self._gather(upstream, action.data)
            elif isinstance(action, Deliver):
                self._gather(action.client, action.data)
            else:
                self._apply_other(action)

    def _gather(self, conn: object, data: bytes) -> None:
        chunks = self._gathered.get(conn)
        if chunks is not None:
            chunks.append(data)
            return
        self._gathered[conn] = [data]
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write what was gathered, one write per connection."""
        self._flush_scheduled = False
        gathered, self._gathered = self._gathered, {}
        for conn, chunks in gathered.items():
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if isinstance(conn, UpstreamProtocol):
                if conn.transport is not None and self._upstreams.get(conn.key) is conn:
                    conn.transport.write(data)
            else:
                cast(ClientConnection, conn).deliver(data)

    def _flush_one(self, conn: object) -> None:
        """Write what was gathered for ``conn`` now (before it is closed)."""
        chunks = self._gathered.pop(conn, None)
        if chunks and isinstance(conn, ClientConnection):
            conn.deliver(b"".join(chunks))

    def _apply_other(self, action: Action) -> None:
        if isinstance(action, Log):
            if action.limit:
                limited = self._limited.get(action.limit)
                if limited is None:
                    limited = self._limited[action.limit] = RateLimitedLog(log, action.level)
                limited(action.message, *action.args)
            else:
                log.log(action.level, action.message, *action.args)
        elif isinstance(action, Pause):
            cast(ClientConnection, action.client).pause(action.reason)
        elif isinstance(action, Resume):
            cast(ClientConnection, action.client).resume(action.reason)
        elif isinstance(action, CloseClient):
            self._flush_one(action.client)
            cast(ClientConnection, action.client).finish()
        elif isinstance(action, Output):
            self._send_output(action.lines)
        elif isinstance(action, Connect):
            if not self._should_exit.is_set():
                self._spawn(self._connect(action))
        elif isinstance(action, Disconnect):
            upstream = self._upstreams.pop(action.lane, None)
            if upstream is not None:
                self._gathered.pop(upstream, None)
                if upstream.transport is not None:
                    upstream.transport.abort()
        elif isinstance(action, Retry):
            asyncio.get_running_loop().call_later(action.delay, self._retry_lane, action.lane)
        elif isinstance(action, Again):
            self._schedule_dispatch()
        elif isinstance(action, Compacted):
            gc.collect()
            heap.give_back()
            log.debug("event tables compacted after a burst (%d pending)", action.pending)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    # -- clients ------------------------------------------------------------------------------

    def submit(self, client: ClientConnection, events: list[FramedEvent]) -> None:
        if log.isEnabledFor(logging.DEBUG):
            for event in events:
                log.debug("event from %s: %.300s", client.peer, event if isinstance(event, str) else "(oversized)")
        self._account_framer(client)
        self.apply(self.dispatcher.submit(client, events, self._now()))

    def _account_framer(self, client: ClientConnection) -> None:
        f = client.framer.stats
        for reason in ("invalid_utf8", "nul", "oversized", "unterminated"):
            n = getattr(f, reason)
            if n:
                if reason != "oversized":  # counted per event by the dispatcher
                    self.stats.bump(self.stats.bad_input, reason, n)
                setattr(f, reason, 0)

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
        """Place what waits in the backlog (the readiness monitor calls it when an instance turns ready)."""
        self.apply(self.dispatcher.dispatch(self._now()))

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True

            def run() -> None:
                self._dispatch_scheduled = False
                self.dispatch()

            asyncio.get_running_loop().call_soon(run)

    # -- lanes (UpstreamProtocol reports here) --------------------------------------------------

    def lane_lines(self, upstream: UpstreamProtocol, data: bytes) -> None:
        if self._upstreams.get(upstream.key) is upstream:
            self.apply(self.dispatcher.lane_lines(upstream.key, data, self._now()))
        elif late := sum(1 for line in data.split(b"\n") if line.strip(b"\r")):
            # Read from a connection already closed (its lane's events have a new owner, maybe a new
            # connection under the same key): nothing of it may count.
            self.stats.bump(self.stats.dropped_lines, Drop.NOT_OWNER.value, late)

    def lane_broken(self, upstream: UpstreamProtocol, why: str) -> None:
        if self._upstreams.get(upstream.key) is upstream:
            self.apply(self.dispatcher.lane_failed(upstream.key, why, self._now()))

    def lane_lost(self, upstream: UpstreamProtocol, exc: Exception | None) -> None:
        self._gathered.pop(upstream, None)
        if self._upstreams.get(upstream.key) is upstream:
            del self._upstreams[upstream.key]
            why = f"event connection lost: {describe(exc) if exc else 'closed by the node'}"
            self.apply(self.dispatcher.lane_failed(upstream.key, why, self._now()))

    def lane_writable(self, upstream: UpstreamProtocol, writable: bool) -> None:
        if self._upstreams.get(upstream.key) is upstream:
            self.apply(self.dispatcher.lane_writable(upstream.key, writable, self._now()))

    async def _connect(self, action: Connect) -> None:
        key, attempt = action.lane, action.attempt
        lane = self.dispatcher.lanes.get(key)
        if lane is None:  # dropped meanwhile: nothing waits for this attempt
            return
        settings = lane.instance.settings
        try:
            _, upstream = await self.opener.open_lane(
                settings, lambda: UpstreamProtocol(self, key), self.config.health.timeout
            )
        except PinMismatch as exc:  # nothing was written on that connection
            self.apply(self.dispatcher.pin_refused(settings.key, exc.reason, self._now()))
            self.apply(self.dispatcher.connect_failed(key, attempt, exc.reason, self._now()))
            return
        except (OSError, TimeoutError, UpstreamFailed) as exc:
            why = f"event connection failed: {describe(exc)}"
            self.apply(self.dispatcher.connect_failed(key, attempt, why, self._now()))
            return
        if upstream.transport is None:  # lost before we got here: connection_lost found no lane to report to
            why = "event connection lost: closed by the node"
            self.apply(self.dispatcher.connect_failed(key, attempt, why, self._now()))
            return
        wanted, actions = self.dispatcher.lane_connected(key, attempt, self._now())
        if not wanted:
            upstream.transport.abort()
        else:
            stale = self._upstreams.get(key)
            self._upstreams[key] = upstream
            if stale is not None:  # never two connections under one key (the dispatcher had it closed)
                self._gathered.pop(stale, None)
                if stale.transport is not None:
                    stale.transport.abort()
        self.apply(actions)

    def _retry_lane(self, key: str) -> None:
        if not self._should_exit.is_set():
            self.apply(self.dispatcher.retry_lane(key))

    def resize_lanes(self, inst: Instance, why: str) -> None:
        """Open or retire lanes after ``connections`` or the node's ``event_connections`` changed."""
        self.apply(self.dispatcher.resize_lanes(inst.key, why, self._now()))

    # -- health checks ------------------------------------------------------------------------

    async def _check_loop(self, key: str) -> None:
        """Active health checks of the instance ``key`` until it is removed or the balancer stops (an instance
        removed and added again by two quick reloads keeps this loop: it follows the key)."""
        dispatcher = self.dispatcher
        while not self._should_exit.is_set() and key in dispatcher.instances:
            h = self.config.health
            inst = dispatcher.checked(key)
            if inst is not None:
                started = time.perf_counter()  # not loop.time(): uvloop's is cached per loop iteration (1 ms steps)
                error = await self.opener.ping(inst.settings, h.timeout)
                if dispatcher.checked(key) is not inst:
                    pass  # disabled or removed while the check ran: its result must not count
                elif error is None:
                    self.apply(dispatcher.check_passed(key, time.perf_counter() - started, self._now()))
                elif isinstance(error, PinMismatch):
                    self.apply(dispatcher.pin_refused(key, error.reason, self._now()))
                else:
                    self.apply(dispatcher.check_failed(key, error, self._now()))
            if await runtime.pause(self._should_exit, h.interval):
                return

    def _start_checks(self) -> None:
        """A health-check loop for every instance that has none (at start-up, and instances a reload added)."""
        for key in self.dispatcher.instances:
            if key in self._checkers:
                continue
            task = asyncio.get_running_loop().create_task(self._check_loop(key), name=f"health-{key}")
            self._checkers[key] = task

            def forget(done: asyncio.Task[None], key: str = key) -> None:
                if self._checkers.get(key) is done:
                    del self._checkers[key]

            task.add_done_callback(forget)

    # -- time ---------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """The periodic work of the event path (every :data:`TICK` seconds)."""
        self.apply(self.dispatcher.tick(now))
        for address, reason, lines in self.drop_tally.due(time.monotonic()):
            self.alerts.raise_own("KL_ALERT_DetectionsDropped", destination=address, lines=lines, reason=reason)

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
        self.apply(self.dispatcher.reconfigure(new, self._now()))
        self._start_checks()
        for change in self.gates.apply(new.allowed_sources, lambda port: _handshake_timeout(new, port)):
            log.info("allowed sources now: %s", change)
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

    def _gate(self, port: str, tls: TLSListener | None = None) -> Gate:
        """The door of one of the balancer's ports: its ``<AllowedSources>``, and TLS when given (net/gate.py);
        kept in :attr:`gates`, so a reload gives it a new list."""
        config = self.config
        return self.gates.open(port, config.allowed_sources, _handshake_timeout(config, port), tls)

    async def startup(self) -> None:
        # Every event allocates a few small tracked objects (correlator entries, lists): with CPython's
        # default gen-0 threshold of 700 the cyclic collector ran every few hundred events and took 12 %
        # of the balancer's CPU while streaming.  What start-up built is frozen out of every collection,
        # and collections run 70 times less often (docs/performance.md, "Issue 15").
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        await self.opener.start(self.config)  # the client certificate: before the first health check
        self._start_checks()
        if self.output is not None:
            self.output.start()
        if self.config.metrics is not None:
            dispatcher = self.dispatcher
            gauges: Gauges = {
                "threatgate_balancer_backlog": ("Events waiting for an instance", lambda: len(dispatcher.backlog)),
                "threatgate_balancer_pending": ("Events not yet answered", lambda: dispatcher.correlator.pending),
                "threatgate_balancer_clients": ("Client connections", lambda: len(self.listener.active)),
                "threatgate_balancer_instances_up": ("Instances UP", dispatcher.up_count),
                "threatgate_config_restart_required": (
                    "1 while the configuration file differs from the running one in something that needs a restart",
                    self.restart.gauge,
                ),
            }
            senders = queue_gauges(lambda: (self.output, self.alerts.forward))
            self._metrics = await start_metrics_server(
                self.config.metrics, _Collector(self, gauges, senders), gate=self._gate("metrics")
            )
            _, port = self.listening.add("metrics", self._metrics.address)
            log.info("metrics on http://%s/metrics", Address(self.config.metrics.host, port))
        await self.alerts.start(lambda tls: self._gate("alerts", tls))
        for name, sockname in self.alerts.bound:
            self.listening.add(name, sockname)
        await self.gateway.start()
        assert self.gateway.http is not None
        self.gates.add(self.gateway.http.gate)  # made by the gateway with its own TLS pair: reloads reach it too
        self.listening.add("api", self.gateway.http.sockname)
        self.readiness.start()
        if self.statistics is not None:
            self.statistics.start()
        if self.admin is not None:
            await self.admin.start()
        servers = await start_servers(
            "events",
            lambda: ClientConnection(self),
            self.config.listen_host,
            self.config.matching_port,
            self.config.matching_tls,
            lambda tls: self._gate("events", tls),
        )
        self._servers = [server for _, server in servers]
        for name, server in servers:
            self.listening.add(name, server.sockets[0].getsockname())
        self.bound_port = servers[0][1].sockets[0].getsockname()[1]
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

    async def _drain_orphans(self, deadline: float) -> None:
        """Within the same DrainTimeout: the events of clients that left (no ReplyBack) get their detections out
        too; what is still unanswered at the deadline is counted and said, never dropped quietly."""
        loop = asyncio.get_running_loop()
        # A poll, as net/drain.py's: the answers come through the sans-IO core, which has no event to wait on.
        while self.dispatcher.orphaned() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(ORPHAN_POLL)
        left = self.dispatcher.orphaned()
        if left:
            self.stats.bump(self.stats.dropped, "shutdown", left)
            log.warning(
                "%d event(s) of clients that already left were not answered within DrainTimeout: their detections "
                'are lost (threatgate_balancer_dropped_total{reason="shutdown"})',
                left,
            )

    async def shutdown(self) -> None:
        """Stop accepting, drain the client connections within DrainTimeout (answers from the nodes keep
        arriving meanwhile), then stop the rest."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = self.config.drain_timeout
        for server in self._servers:
            server.close()  # first: new client connections are refused from here
        if self._servers:
            log.info(
                "balancer draining: %d client connection(s), %d event(s) unanswered, up to %g s",
                len(self.listener.active),
                self.correlator.pending,
                timeout,
            )
        drained = await self.listener.drain(timeout)
        await self._drain_orphans(started + timeout)
        if self._servers:
            log_drained(log, "balancer", drained, loop.time() - started, timeout)
        for task in list(self._checkers.values()):
            task.cancel()
        if self._tasks:  # a reload's hand-over of an old sender's queue: let it finish (its drops are counted)
            await asyncio.wait(list(self._tasks), timeout=3.0)
        for task in list(self._tasks):
            task.cancel()
        for upstream in list(self._upstreams.values()):
            if upstream.transport is not None:
                upstream.transport.abort()
        self._upstreams.clear()
        if self.admin is not None:
            await self.admin.close()
        await self.readiness.close()
        if self.statistics is not None:
            await self.statistics.close()
        await self.gateway.close()
        await self.alerts.close()
        if self.output is not None:
            await self.output.aclose()
        if self._metrics is not None:
            await self._metrics.close()


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
        if service.statistics is not None:
            yield from service.statistics.families()


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
