"""The balancer's event path: clients in, events spread per event over instances, replies routed back.

Lifecycle (as the node's): ``serve`` -> ``startup`` (health checks start, listener opens) ->
``main_loop`` (a 1 s tick: reply timeouts, hourly statistics) -> ``shutdown``.  SIGHUP re-reads
the configuration; SIGTERM/SIGINT stop.

The flow of one event:
1. A client connection frames it (:mod:`threatgate.net.events`) and :meth:`BalancerService.submit`
   registers it in the :class:`~threatgate.lb.correlation.Correlator` (a new request id) and
   appends the id to the backlog.
2. :meth:`BalancerService.dispatch` drains the backlog: per event, the policy picks an UP, connected,
   writable instance under its in-flight limit; lines are written per instance in one batch.
3. The instance's reply lines go through the correlator; an event's lines are released to its
   client, in order, when its ``LookupFinished`` arrives.
4. When an instance fails (connection lost, reply timeout, health checks, disabled or removed),
   its unfinished events go back to the front of the backlog and are dispatched again; the
   correlator drops the stale instance's late lines, so every event is answered exactly once.

Back-pressure instead of loss: when the backlog is over ``MaxPendingEvents`` (no instance can take
more), clients stop being read until it drains to half; a client that does not read its replies
is paused at 4 MiB.  Nothing is dropped silently: every drop is counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client.core import Metric

from threatgate import runtime
from threatgate.balancer.alerts import AlertListener
from threatgate.balancer.gateway import Gateway
from threatgate.balancer.readiness import ReadinessMonitor
from threatgate.balancer.upstream import Instance, InstanceOwner, ping
from threatgate.config.balancer import BalancerConfig, load_balancer_config
from threatgate.config.common import Address
from threatgate.config.reload import BALANCER_FIELDS, RestartTracker
from threatgate.errors import ConfigError
from threatgate.lb.correlation import FINISHED, Answered, Correlator, Drop
from threatgate.lb.policy import Candidate, InstanceState, allocate
from threatgate.log import RateLimitedLog
from threatgate.metrics import BalancerCollector, BalancerStats, Gauges, LabelledGauges, start_metrics_server
from threatgate.net.events import EventListener, EventProtocol, ListenerLimits
from threatgate.net.sender import Dropped, LineSender, queue_gauges
from threatgate.wire.flags import SessionFlags
from threatgate.wire.framing import FramedEvent, Oversized

log = logging.getLogger("threatgate.balancer")

FINISHED_LINE = (FINISHED + "\n").encode()
DISPATCH_BATCH = 4096
"""Events placed per dispatch pass before yielding the loop (keeps reply handling responsive)."""


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
        log.info("client %s connected (%s)", self.peer, _describe(self.flags))
        if not self.flags.reply_back and self.service.output is None:
            log.warning(
                "client %s sent no X-KF-ReplyBack and there is no <OutputConnectionString>: "
                "its detections will be dropped (counted in threatgate_output_dropped_lines_total)",
                self.peer,
            )

    def on_closed(self) -> None:
        log.info("client %s disconnected", self.peer)
        self.service.client_gone(self)

    def deliver(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

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
        self.warn_drop = RateLimitedLog(log)
        self.warn_backlog = RateLimitedLog(log)
        self._paused_clients: set[ClientConnection] = set()
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
        if any(isinstance(e, Oversized) for e in events):
            for event in events:
                if isinstance(event, Oversized):
                    # Too large for any node: answered here (no detections), counted like a node does.
                    rid = corr.submit(key, "")
                    self.stats.bump(self.stats.bad_input, "oversized")
                    releases += corr.finish_local_runs(rid)
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
        if len(self.backlog) >= self.config.max_pending_events:
            self.warn_backlog(
                "%d events wait for an instance (MaxPendingEvents %d): pausing clients",
                len(self.backlog),
                self.config.max_pending_events,
            )
            for c in list(self.listener.active):
                assert isinstance(c, ClientConnection)
                c.pause("backlog")
                self._paused_clients.add(c)
        self.dispatch()

    def client_gone(self, client: ClientConnection) -> None:
        key = id(client)
        self.clients.pop(key, None)
        self._paused_clients.discard(client)
        gone = self.correlator.client_gone(key)
        for rid, owner in gone:
            if owner is not None:
                inst = self.instances.get(str(owner))
                if inst is not None:
                    inst.owned.pop(rid, None)
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
            self.stats.drop_lines("detections", "no_output_destination", len(lines))
            self.warn_drop(
                "detections of a client without X-KF-ReplyBack and no <OutputConnectionString>: %d line(s) dropped",
                len(lines),
            )
            return
        self.output.send_or_drop(("\n".join(lines) + "\n").encode("utf-8", "replace"))  # full: counted, logged

    def _output_sender(self, address: Address | None) -> LineSender | None:
        return None if address is None else LineSender(address, name="detections", on_drop=self._output_dropped)

    def _output_dropped(self, dropped: Dropped) -> None:
        self.stats.drop_lines(dropped.destination, dropped.reason, dropped.lines)

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Place backlog events on instances, one batched write per instance."""
        backlog = self.backlog
        if not backlog:
            self._maybe_resume_clients()
            return
        limit = self.config.max_inflight_events
        usable = [
            i
            for i in self.instances.values()
            if i.state is InstanceState.UP and i.connected and i.writable and len(i.owned) < limit
        ]
        if not usable:
            return
        corr = self.correlator
        now = asyncio.get_running_loop().time()
        cands = [Candidate(i.key, i.settings.weight, len(i.owned), limit - len(i.owned)) for i in usable]
        by_key = {i.key: i for i in usable}
        take = min(len(backlog), DISPATCH_BATCH)
        placed = 0
        for cand, count in allocate(cands, take, self.rng):
            ids = [backlog.popleft() for _ in range(min(count, len(backlog)))]
            inst = by_key[str(cand.key)]
            lines: list[str] = []
            sent = corr.dispatch_many(ids, inst.key, lines)
            if not sent:
                continue
            if not inst.owned:
                inst.last_progress = now
            inst.owned.update(dict.fromkeys(sent))
            inst.dispatched += len(sent)
            placed += len(sent)
            lines.append("")
            inst.write("\n".join(lines).encode("utf-8", "replace"))
        self.stats.dispatched += placed
        if backlog and take >= DISPATCH_BATCH:
            self._schedule_dispatch()
        self._maybe_resume_clients()

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True

            def run() -> None:
                self._dispatch_scheduled = False
                self.dispatch()

            asyncio.get_running_loop().call_soon(run)

    def _maybe_resume_clients(self) -> None:
        if self._paused_clients and len(self.backlog) <= self.config.max_pending_events // 2:
            for c in self._paused_clients:
                c.resume("backlog")
            self._paused_clients.clear()

    # -- instances (InstanceOwner) -------------------------------------------------------------

    def instance_lines(self, instance: Instance, lines: list[str]) -> None:
        finished: list[int] = []
        releases, drops = self.correlator.on_lines(instance.key, lines, finished)
        if drops:
            for why in drops:
                self._dropped_line(instance, why)
        if finished:
            owned = instance.owned
            for rid in finished:
                owned.pop(rid, None)
            instance.finished += len(finished)
            instance.last_progress = asyncio.get_running_loop().time()
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

    def instance_failed(self, instance: Instance, why: str) -> None:
        was_up = instance.state is InstanceState.UP
        if instance.health.passive_failure(why) or was_up:
            instance.state = InstanceState.DOWN if instance.state is InstanceState.UP else instance.state
            log.error("instance %s is DOWN: %s", instance.key, why)
            self.stats.bump(self.stats.transitions, "down")
        instance.close()
        self._redispatch(instance, why)

    def _redispatch(self, instance: Instance, why: str) -> None:
        lost = self.correlator.instance_lost(instance.key)
        instance.owned.clear()
        if lost:
            self.backlog.extendleft(reversed(lost))
            self.stats.redispatched += len(lost)
            log.warning(
                "instance %s: %d unfinished event(s) sent again to other instances (%s)", instance.key, len(lost), why
            )
        self.dispatch()

    def instance_connected(self, instance: Instance) -> None:
        self.dispatch()

    def instance_writable(self, instance: Instance) -> None:
        self.dispatch()

    def _add_instance(self, settings: Any) -> Instance:
        h = self.config.health
        inst = Instance(settings, rise=h.rise, fall=h.fall, owner=self)
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
                error = await ping(inst.settings.host, inst.settings.matching_port, h.timeout)
                if not self._checked(inst):
                    pass  # disabled or removed while the check ran: its result must not count
                elif error is None:
                    if inst.health.check_passed():
                        log.info("instance %s is UP (%d checks passed)", inst.key, inst.health.rise)
                        self.stats.bump(self.stats.transitions, "up")
                    if inst.health.up and inst.state is InstanceState.DOWN:
                        inst.state = InstanceState.UP
                    if inst.state is InstanceState.UP and not inst.connected:
                        await inst.connect(h.timeout)
                else:
                    if inst.health.check_failed(error):
                        self.instance_failed(inst, f"health check: {error}")
                    elif not inst.health.up:
                        log.debug("instance %s health check failed: %s", inst.key, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._should_exit.wait(), h.interval)

    def _check_timeouts(self) -> None:
        """An instance that holds events and finishes none for ReplyTimeout is treated as hung."""
        now = asyncio.get_running_loop().time()
        for inst in list(self.instances.values()):
            if inst.owned and now - inst.last_progress > self.config.reply_timeout:
                self.stats.bump(self.stats.transitions, "reply_timeout")
                self.instance_failed(inst, f"no answer for {self.config.reply_timeout:.0f} s")

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
            inst.settings = settings
            inst.health.rise, inst.health.fall = new.health.rise, new.health.fall  # interval/timeout: read per check
            if not settings.enabled and inst.state is not InstanceState.MAINT:
                inst.state = InstanceState.MAINT
                inst.health.up = False
                inst.health.successes = 0
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
            self._metrics_runner = await start_metrics_server(
                self.config.metrics, _Collector(self.stats, gauges, self.readiness, senders)
            )
            log.info("metrics on http://%s/metrics", self.config.metrics)
        await self.alerts.start()
        await self.gateway.start()
        self.readiness.start()
        self._server = await loop.create_server(
            lambda: ClientConnection(self),
            self.config.listen_host,
            self.config.matching_port,
            reuse_address=True,
            backlog=1024,
        )
        self.bound_port = self._server.sockets[0].getsockname()[1]
        log.info(
            "balancer listening for events on %s:%d (scanners_count %d, %d instance(s))",
            self.config.listen_host,
            self.bound_port,
            self.config.scanners_count,
            len(self.instances),
        )

    async def main_loop(self) -> None:
        last_stats = time.monotonic()
        while not self._should_exit.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._should_exit.wait(), 1.0)
            self._check_timeouts()
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
        log.info("balancer stopping (%d event(s) unanswered)", self.correlator.pending)
        if self._server is not None:
            self._server.close()
        self.listener.close_all()
        for task in list(self._checkers.values()) + list(self._tasks):
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
    """The balancer's counters and gauges plus the readiness gauges (labelled by instance and role)."""

    def __init__(
        self, stats: BalancerStats, gauges: Gauges, readiness: ReadinessMonitor, senders: LabelledGauges
    ) -> None:
        super().__init__(stats, gauges, senders)
        self._readiness = readiness

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        yield from self._readiness.families()


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
    )


def run_balancer(config: BalancerConfig) -> None:
    """Run until SIGTERM/SIGINT (uvloop when installed)."""
    runtime.run(runtime.serve(BalancerService(config)))
