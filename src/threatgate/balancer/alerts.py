"""Service alerts from the nodes on cybertrace_port: logged by severity, counted, optionally forwarded.

Each line a node sends is one alert (its AlertFormat, e.g. ``Apr 16 09:05:41 alert=KL_ALERT_UpdatedFeed
feed=... records=...``).  The balancer logs it with the node's address at the level the node logs it
at itself (:mod:`threatgate.wire.alerts`: a feed update is INFO, a failure or an alert it does not
know WARNING), counts it per alert name (``KL_ALERT_*`` found in the line, else ``unknown``) and,
with ``<AlertForwardConnectionString>``, forwards it to a SIEM through a bounded, retrying queue.

The last :data:`KEPT` alerts are kept (:attr:`AlertListener.recent`, latest last) for the operator
console (balancer/console.py), which shows them latest first with the counts by name.

Bounded against garbage and floods, and never in the way of the event path: at most 64 connections,
lines longer than 64 KiB are cut and counted, log lines are rate-limited per node (the count always
moves), and the forward queue drops (counted) instead of growing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from threatgate.config.balancer import BalancerConfig
from threatgate.config.common import Address
from threatgate.config.security import TLSListener
from threatgate.log import RateLimitedLog
from threatgate.net.gate import Gate, Listening, start_servers
from threatgate.net.sender import ALERT_QUEUE, LineSender
from threatgate.stats import BalancerStats
from threatgate.wire.alerts import alert_level, alert_name

log = logging.getLogger("threatgate.alerts")

MAX_CONNECTIONS = 64
MAX_LINE = 64 * 1024
KEPT = 100
"""Alerts kept for the console (the latest); the counts by name cover all of them."""
KEPT_CHARS = 1000
"""Characters of an alert line kept for the console."""


LOG_BURST = 100
LOG_RATE = 10
"""Alerts logged per node: a burst of 100 (a node starting up reports every feed), then 10 per second."""


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """One service alert as received (``time``: wall clock, seconds since the epoch; ``peer``: who sent it)."""

    time: float
    peer: str
    name: str
    line: str


class _Bucket:
    def __init__(self) -> None:
        self.tokens = float(LOG_BURST)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(LOG_BURST), self.tokens + (now - self.stamp) * LOG_RATE)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class AlertConnection(asyncio.Protocol):
    def __init__(self, listener: AlertListener) -> None:
        self.listener = listener
        self.peer = ""
        self._buf = b""
        self._discarding = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if len(self.listener.connections) >= MAX_CONNECTIONS:
            self.listener.count_bad("alert_connections_refused")
            self.transport.close()
            return
        self.listener.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            # The rest of an over-long line: dropped as it arrives (never buffered, never reported again).
            end = data.find(b"\n")
            if end < 0:
                return
            self._discarding = False
            data = data[end + 1 :]
        buf = self._buf + data
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        for line in lines:
            if len(line) > MAX_LINE:  # arrived whole in one read: cut and counted all the same
                self.listener.count_bad("alert_line_too_long")
                line = line[:MAX_LINE]
            self.listener.on_line(self.peer, line)
        if len(self._buf) > MAX_LINE:
            self.listener.on_line(self.peer, self._buf[:MAX_LINE])
            self.listener.count_bad("alert_line_too_long")
            self._buf = b""
            self._discarding = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._buf and not self._discarding:
            self.listener.on_line(self.peer, self._buf)
        self.listener.connections.discard(self)


class AlertHost(Protocol):
    """What :class:`AlertListener` reads of the balancer (``BalancerService`` is one): its config, its counters."""

    @property
    def config(self) -> BalancerConfig: ...
    @property
    def stats(self) -> BalancerStats: ...


class AlertListener:
    def __init__(self, service: AlertHost) -> None:
        self.service = service
        self.connections: set[AlertConnection] = set()
        self.forward = self._forward_sender(service.config.alert_forward)
        self._buckets: dict[str, _Bucket] = {}
        self._flood = RateLimitedLog(log)
        self._servers: list[Listening] = []
        self.bound: list[tuple[str, Any]] = []  # (port name, bound address): alerts, and alerts_tls during a migration
        self.recent: deque[AlertRecord] = deque(maxlen=KEPT)
        self.sockname: Any = None  # the bound address once started (a port 0 is the one picked)

    def count_bad(self, reason: str) -> None:
        self.service.stats.bump(self.service.stats.bad_input, reason)

    def on_line(self, peer: str, raw: bytes) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line.strip():
            return
        name = alert_name(line)
        stats = self.service.stats
        stats.bump(stats.alerts, name)
        self.recent.append(AlertRecord(time.time(), peer, name, line[:KEPT_CHARS]))
        host = peer.rsplit(":", 1)[0]
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) > 1024:
                self._buckets.clear()
            bucket = self._buckets[host] = _Bucket()
        if bucket.take():
            log.log(alert_level(name), "service alert from %s: %s", peer, line[:2000])
        else:
            self._flood(f"service alerts from {host} arrive faster than {LOG_RATE}/s; not all are logged (all counted)")
        if self.forward is not None:
            self.forward.send_or_drop((line + "\n").encode("utf-8", "replace"))  # full: counted, logged

    def raise_own(self, name: str, **context: object) -> None:
        """An alert of the balancer itself: logged at its level (a failure: WARNING), counted with the nodes'
        alerts, forwarded (``<date> alert=NAME source=balancer k=v ...``) when AlertForwardConnectionString is set."""
        detail = " ".join(f"{k}={v}" for k, v in context.items())
        log.log(alert_level(name), "alert %s %s", name, detail)
        self.service.stats.bump(self.service.stats.alerts, name)
        self.recent.append(AlertRecord(time.time(), "balancer", name, f"alert={name} {detail}"[:KEPT_CHARS]))
        if self.forward is not None:
            date = time.strftime("%b %d %H:%M:%S")
            self.forward.send_or_drop(f"{date} alert={name} source=balancer {detail}\n".encode("utf-8", "replace"))

    def _forward_sender(self, address: Address | None) -> LineSender | None:
        if address is None:
            return None
        stats = self.service.stats
        return LineSender(
            address,
            name="alert-forward",
            retries=None,
            max_queue_bytes=ALERT_QUEUE[0],
            max_queue_lines=ALERT_QUEUE[1],
            on_drop=lambda d: stats.drop_lines(d.destination, d.reason, d.lines),
        )

    async def replace_forward(self, address: Address | None) -> None:
        """SIGHUP changed AlertForwardConnectionString: a new sender; the old one hands over what it holds."""
        old, self.forward = self.forward, self._forward_sender(address)
        if self.forward is not None:
            self.forward.start()
        log.info("service alerts now forwarded to %s", address or "nowhere")
        if old is not None:
            await old.aclose(successor=self.forward)

    async def start(self, gate: Callable[[TLSListener | None], Gate]) -> None:
        """Listen on cybertrace_port (and its TLS twin), each behind ``gate(tls)`` (sources, TLS: net/gate.py)."""
        config = self.service.config
        servers = await start_servers(
            "alerts", lambda: AlertConnection(self), config.listen_host, config.cybertrace_port, config.alert_tls, gate
        )
        self._servers = [server for _, server in servers]
        self.bound = [(name, server.sockets[0].getsockname()) for name, server in servers]
        self.sockname = self.bound[0][1]
        if self.forward is not None:
            self.forward.start()
        log.info("listening for service alerts on %s:%d", config.listen_host, self.sockname[1])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self.forward is not None:
            await self.forward.aclose()
