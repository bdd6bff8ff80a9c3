"""The node process: event listener, feed lifecycle, detection output, alerts and metrics.

Lifecycle (uvicorn's chain): ``run`` -> ``startup`` (load feeds, then listen: a node that answers
PING has its feeds) -> ``main_loop`` (periodic reloads) -> ``shutdown`` (stop accepting, close
connections, flush senders).  SIGHUP reloads feeds; SIGTERM/SIGINT stop.

Connections go through three states: HANDSHAKE (collecting session flags, no scanner held),
ACTIVE (holds one of ScannersCount scanners) and CLOSED.  A PING connection is answered in
HANDSHAKE and never needs a scanner, so health checks work even when every scanner is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import time
from typing import Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from threatgate.config.node import NodeConfig
from threatgate.errors import FeedError
from threatgate.log import RateLimitedLog
from threatgate.metrics import NodeStats, StatsCollector
from threatgate.net.sender import LineSender
from threatgate.node.feeds import FeedSnapshot, feed_identity, load_feed
from threatgate.node.matcher import Matcher, MatchStats
from threatgate.node.render import FieldFormat, Template
from threatgate.node.store import IndicatorStore
from threatgate.wire.flags import PONG, NeedData, SessionFlags, parse_flags
from threatgate.wire.framing import LineFramer

log = logging.getLogger("threatgate.node")

MAX_PENDING_HANDSHAKES = 256
"""Connections still sending their flags; more are closed at once (a connection flood stays cheap)."""
MAX_HANDSHAKE_BYTES = 4096
HIGH_WATER = 4 * 1024 * 1024
"""Reply bytes buffered for a client that does not read before we stop reading its events."""


def syslog_date(now: float | None = None) -> str:
    """``%Date%``: the documented ``Mon DD HH:MM:SS`` form, local time."""
    return time.strftime("%b %d %H:%M:%S", time.localtime(now))


class ConnState(enum.Enum):
    HANDSHAKE = "HANDSHAKE"
    ACTIVE = "ACTIVE"
    CLOSED = "CLOSED"


class Alerts:
    """Service alerts (KL_ALERT_*): rendered with AlertFormat, sent to AlertConnectionString if enabled."""

    def __init__(self, config: NodeConfig, stats: NodeStats) -> None:
        out = config.output
        self._stats = stats
        self._template = Template(out.alert_format) if out.alert_format else None
        self.sender: LineSender | None = None
        if out.alert_destination is not None and self._template is not None:
            self.sender = LineSender(
                out.alert_destination,
                name="alerts",
                retries=out.retries_count,
                retry_timeout=out.retries_timeout,
                max_queue_bytes=1024 * 1024,
            )
        self._fields = FieldFormat(out.record_field_format)

    def raise_alert(self, name: str, **context: object) -> None:
        self._stats.bump(self._stats.alerts, name)
        detail = " ".join(f"{k}={v}" for k, v in context.items())
        level = logging.WARNING if "Failed" in name or "Partially" in name or "Unavailable" in name else logging.INFO
        log.log(level, "alert %s %s", name, detail)
        if self.sender is None or self._template is None:
            return
        fields = {
            "Date": syslog_date(),
            "Alert": name,
            "RecordContext": self._fields.join(((k, str(v)) for k, v in context.items()), " "),
        }
        if not self.sender.send((self._template.render(fields) + "\n").encode()):
            self._stats.bump(self._stats.bad_input, "alert_queue_full")


class EventConnection(asyncio.Protocol):
    """One client connection on the event port."""

    def __init__(self, node: NodeService) -> None:
        self.node = node
        self.state = ConnState.HANDSHAKE
        self.flags = SessionFlags()
        self.peer = ""
        self._handshake = bytearray()
        self._framer = LineFramer(node.config.input.max_event_size, node.config.input.event_delimiter)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused_by: set[str] = set()
        self._eof = False

    def __repr__(self) -> str:
        return f"<EventConnection {self.peer} {self.state.value} {self.flags}>"

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        node = self.node
        if len(node.handshaking) >= MAX_PENDING_HANDSHAKES:
            # Evict the oldest silent connection, not the newcomer: a flood of idle sockets must not
            # lock out a real client, which sends its flags at once and leaves this set quickly.
            oldest = next(iter(node.handshaking))
            node.handshaking.pop(oldest)
            node.stats.bump(node.stats.connections, "evicted_handshake")
            node.warn_flood(
                "more than %d connections in handshake; closing the oldest (%s)", MAX_PENDING_HANDSHAKES, oldest.peer
            )
            oldest.abort()
        node.handshaking[self] = None
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self._timer = asyncio.get_running_loop().call_later(
            node.config.service.handshake_timeout, self._handshake_expired
        )

    def data_received(self, data: bytes) -> None:
        if self.state is ConnState.ACTIVE:
            self._framer.receive_data(data)
            self._process()
        elif self.state is ConnState.HANDSHAKE:
            self._handshake += data
            self._try_handshake(eof=False)

    def eof_received(self) -> bool:
        self._eof = True
        if self.state is ConnState.HANDSHAKE:
            self._try_handshake(eof=True)
        if self.state is ConnState.ACTIVE:
            self._framer.receive_data(b"")
            self._process()
        return False  # close our side once the replies are written

    def abort(self) -> None:
        self.state = ConnState.CLOSED
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        node = self.node
        node.handshaking.pop(self, None)
        if self.state is ConnState.ACTIVE:
            node.active.discard(self)
            if self._framer.buffered:
                node.stats.bump(node.stats.bad_input, "disconnected_mid_event")
                log.debug("%s disconnected with %d bytes of an unfinished event", self.peer, self._framer.buffered)
            log.debug("event connection from %s closed (%s)", self.peer, exc or "EOF")
        self.state = ConnState.CLOSED
        if self._timer is not None:
            self._timer.cancel()

    def pause_writing(self) -> None:
        self._pause("writing")

    def resume_writing(self) -> None:
        self._resume("writing")

    # -- handshake ----------------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        if self.state is ConnState.HANDSHAKE and self._transport is not None:
            self.node.stats.bump(self.node.stats.bad_input, "handshake_timeout")
            if self._handshake:
                self._try_handshake(eof=True)  # bytes that could still be flags: decide now
            else:
                log.debug("%s sent nothing for %.0f s; closing", self.peer, self.node.config.service.handshake_timeout)
                self._transport.close()

    def _try_handshake(self, eof: bool) -> None:
        assert self._transport is not None
        if len(self._handshake) > MAX_HANDSHAKE_BYTES:
            eof = True  # cannot be flags any more; decide with what we have
        result = parse_flags(bytes(self._handshake), eof=eof)
        if isinstance(result, NeedData):
            return
        flags, consumed = result
        node = self.node
        node.handshaking.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flags = flags
        if flags.ping:
            node.stats.bump(node.stats.connections, "ping")
            self._transport.write(PONG)
            self._transport.close()
            self.state = ConnState.CLOSED
            return
        if len(node.active) >= node.config.service.scanners_count:
            node.stats.bump(node.stats.connections, "rejected_scanners")
            node.warn_scanners(
                "all %d scanners busy; refusing event connection from %s", node.config.service.scanners_count, self.peer
            )
            self._transport.close()
            self.state = ConnState.CLOSED
            return
        node.active.add(self)
        node.stats.bump(node.stats.connections, "accepted")
        self.state = ConnState.ACTIVE
        log.debug("event connection from %s flags=%s", self.peer, flags)
        rest = bytes(self._handshake[consumed:])
        self._handshake = bytearray()
        if rest:
            self._framer.receive_data(rest)
        if self._eof:
            self._framer.receive_data(b"")
        self._process()

    # -- events -------------------------------------------------------------------------------

    def _process(self) -> None:
        events = self._framer.next_events()
        if not events:
            return
        node = self.node
        flags = self.flags
        finished = flags.send_finished or node.config.output.finished_enabled
        mstats = MatchStats()
        lines = node.matcher.match(events, date=node.date(), peer_ip=self.peer, finished=finished, stats=mstats)
        node.account(mstats, self._framer, finished)
        if not lines:
            return
        payload = "".join(lines).encode("utf-8", "replace")
        if flags.reply_back:
            assert self._transport is not None
            self._transport.write(payload)
            return
        sender = node.output
        if not sender.send(payload):
            # The destination is not keeping up: hold this batch and stop reading until it drains.
            node.stats.bump(node.stats.bad_input, "output_backpressure")
            self._pause("output")

            def retry() -> None:
                if not sender.send(payload):
                    sender.when_drained(retry)
                    return
                self._resume("output")

            sender.when_drained(retry)

    def _pause(self, reason: str) -> None:
        if not self._paused_by and self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
        self._paused_by.add(reason)

    def _resume(self, reason: str) -> None:
        self._paused_by.discard(reason)
        if not self._paused_by and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()


class NodeService:
    """Owns the listener, the matcher and its store, the senders and the reload schedule."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.stats = NodeStats()
        self.alerts = Alerts(config, self.stats)
        self.matcher = Matcher(config, IndicatorStore())
        self.output = LineSender(
            config.output.destination,
            name="detections",
            retries=config.output.retries_count,
            retry_timeout=config.output.retries_timeout,
        )
        self.handshaking: dict[EventConnection, None] = {}  # insertion-ordered: oldest first
        self.active: set[EventConnection] = set()
        self.warn_flood = RateLimitedLog(log)
        self.warn_scanners = RateLimitedLog(log)
        self.warn_input = RateLimitedLog(log)
        self._snapshots: dict[int, FeedSnapshot] = {}
        self._server: asyncio.Server | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._reload_lock = asyncio.Lock()
        self._should_exit = asyncio.Event()
        self._date_cache = (0, "")
        self.bound_port = 0

    def __repr__(self) -> str:
        return f"<NodeService {self.config.input.listen} active={len(self.active)} store={self.matcher.store!r}>"

    def date(self) -> str:
        now = int(time.time())
        if self._date_cache[0] != now:
            self._date_cache = (now, syslog_date(now))
        return self._date_cache[1]

    def account(self, m: MatchStats, framer: LineFramer, finished: bool) -> None:
        """Fold one batch's counters into the node's (cheap: a handful of additions per batch)."""
        s = self.stats
        s.events += m.events
        s.detections += m.detections
        s.suppressed += m.suppressed
        s.ignored += m.ignored
        if finished:
            s.finished_lines += m.events
        for cat, n in m.per_category.items():
            s.per_category[cat] = s.per_category.get(cat, 0) + n
        f = framer.stats
        for reason in ("invalid_utf8", "nul", "oversized", "unterminated"):
            n = getattr(f, reason)
            if n:
                s.bump(s.bad_input, reason, n)
                setattr(f, reason, 0)
                self.warn_input("bad input on the event port: %s (%d event(s)); see threatgate_bad_input", reason, n)

    # -- feeds --------------------------------------------------------------------------------

    async def reload_feeds(self, reason: str) -> None:
        """Load changed feed files in a worker thread and swap in a new store.

        A feed that fails to load keeps its previous version and raises KL_ALERT_FailedToUpdateFeed.
        """
        async with self._reload_lock:
            started = time.monotonic()
            changed: dict[int, FeedSnapshot] = {}
            for slot, settings in enumerate(self.config.feeds.feeds):
                if not settings.enabled:
                    continue
                old = self._snapshots.get(slot)
                if old is not None and old.identity == feed_identity(settings):
                    continue
                try:
                    snap = await asyncio.to_thread(load_feed, settings)
                except FeedError as exc:
                    self.stats.bump(self.stats.feed_failures, settings.name)
                    log.error("feed %s not loaded (%s); %s", settings.name, exc, _kept(old))
                    self.alerts.raise_alert("KL_ALERT_FailedToUpdateFeed", feed=settings.name, error=str(exc))
                    continue
                changed[slot] = snap
                rep = snap.report
                self.stats.feed_malformed[settings.name] = rep.malformed
                if rep.malformed:
                    log.warning(
                        "feed %s: %d malformed record(s) skipped, e.g. %s",
                        settings.name,
                        rep.malformed,
                        "; ".join(rep.examples),
                    )
                    self.alerts.raise_alert(
                        "KL_ALERT_FeedLoadedPartially", feed=settings.name, records=rep.records, malformed=rep.malformed
                    )
                self.alerts.raise_alert("KL_ALERT_UpdatedFeed", feed=settings.name, records=rep.records)
            self.stats.reloads += 1
            if not changed and self._snapshots:
                log.debug("feeds.reload.complete reason=%s: nothing changed", reason)
                return
            snapshots = dict(self._snapshots)
            snapshots.update(changed)
            store = await asyncio.to_thread(IndicatorStore, snapshots)
            self._snapshots = snapshots
            self.matcher.use_store(store)
            for snap in snapshots.values():
                self.stats.feed_records[snap.name] = snap.report.records
            log.info(
                "feeds loaded (%s): %d indicator(s) from %d feed(s) in %.2f s",
                reason,
                len(store),
                len(snapshots),
                time.monotonic() - started,
            )

    # -- lifecycle ----------------------------------------------------------------------------

    async def startup(self) -> None:
        await self.reload_feeds("startup")
        loop = asyncio.get_running_loop()
        listen = self.config.input.listen
        self._server = await loop.create_server(
            lambda: EventConnection(self), listen.host, listen.port, reuse_address=True, backlog=1024
        )
        sock = self._server.sockets[0]
        self.bound_port = sock.getsockname()[1]
        self.output.start()
        if self.alerts.sender is not None:
            self.alerts.sender.start()
        if self.config.service.metrics is not None:
            await self._start_metrics()
        log.info(
            "node listening for events on %s:%d (ScannersCount %d)",
            listen.host,
            self.bound_port,
            self.config.service.scanners_count,
        )
        self.alerts.raise_alert("KL_ALERT_ServiceStarted")

    async def _start_metrics(self) -> None:
        registry = CollectorRegistry()
        registry.register(
            StatsCollector(
                self.stats,
                {
                    "threatgate_active_connections": ("Event connections holding a scanner", lambda: len(self.active)),
                    "threatgate_indicators": ("Indicators in the live store", lambda: len(self.matcher.store)),
                    "threatgate_output_queue_bytes": ("Detection bytes waiting", lambda: self.output.queued_bytes),
                },
            )
        )

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        address = self.config.service.metrics
        assert address is not None
        site = web.TCPSite(self._metrics_runner, address.host, address.port)
        await site.start()
        log.info("metrics on http://%s/metrics", address)

    async def main_loop(self) -> None:
        minutes = self.config.feeds.update_frequency
        while not self._should_exit.is_set():
            timeout = minutes * 60 if minutes else None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._should_exit.wait(), timeout)
            if not self._should_exit.is_set():
                await self._reload_logged("schedule")

    async def _reload_logged(self, reason: str) -> None:
        try:
            await self.reload_feeds(reason)
        except Exception:  # a reload bug must never take the node down
            log.exception("feed reload (%s) failed; the previous store stays in use", reason)

    def request_reload(self) -> None:
        asyncio.get_running_loop().create_task(self._reload_logged("SIGHUP"))

    def request_exit(self) -> None:
        self._should_exit.set()

    async def shutdown(self) -> None:
        log.info("node stopping")
        if self._server is not None:
            self._server.close()
        for conn in [*self.active, *self.handshaking]:
            if conn._transport is not None:
                conn._transport.close()
        self.alerts.raise_alert("KL_ALERT_ServiceStopped")
        await self.output.aclose()
        if self.alerts.sender is not None:
            await self.alerts.sender.aclose()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        handlers: list[tuple[signal.Signals, Any]] = [
            (signal.SIGHUP, self.request_reload),
            (signal.SIGTERM, self.request_exit),
            (signal.SIGINT, self.request_exit),
        ]
        for sig, handler in handlers:
            loop.add_signal_handler(sig, handler)
        try:
            await self.startup()
            await self.main_loop()
        finally:
            for sig, _ in handlers:
                loop.remove_signal_handler(sig)
            await self.shutdown()


def _kept(old: FeedSnapshot | None) -> str:
    return f"keeping the previous version ({old.report.records} records)" if old else "no previous version to keep"


def run_node(config: NodeConfig) -> None:
    """Run a node until SIGTERM/SIGINT (uvloop when installed)."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run
    runner(NodeService(config).serve())
