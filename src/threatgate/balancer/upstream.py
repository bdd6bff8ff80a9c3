"""Connections to instances: the persistent event connection and the PING health check.

Each enabled instance gets one persistent event connection opened with
``X-KF-SendFinishedEventX-KF-ReplyBack`` (the CyberTrace HA recipe).  A node matches on one event
loop, so one connection carries all it can do; lines are written in batches.  Replies are split
into lines here and handed to the owner (the balancer service), which correlates them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from threatgate.config.balancer import InstanceSettings
from threatgate.lb.health import Health
from threatgate.lb.policy import InstanceState
from threatgate.net.describe import describe, printable
from threatgate.wire.flags import PONG, SessionFlags

log = logging.getLogger("threatgate.balancer")

UPSTREAM_FLAGS = SessionFlags(reply_back=True, send_finished=True).to_bytes()
PING_FLAGS = SessionFlags(reply_back=True, ping=True).to_bytes()
WRITE_HIGH = 8 * 1024 * 1024
"""Event bytes buffered toward one instance before the balancer stops dispatching to it."""
MAX_REPLY_LINE = 16 * 1024 * 1024
"""A reply line longer than this is a broken node: the connection is dropped (its events redispatched)."""
KEEPALIVE = 1.0
"""Seconds of silence after which an empty line is written to the event connection: the node skips it,
but it keeps the connection from being closed as idle (IdleTimeout) or evicted by a newcomer."""
LATENCY_WEIGHT = 0.2
"""Weight of each new sample in the moving average of an instance's reply latency."""


class UpstreamProtocol(asyncio.Protocol):
    """The event connection to one instance: writes tagged events, splits replies into lines."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
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
                self.instance.on_broken(f"reply line longer than {MAX_REPLY_LINE} bytes")
            return
        self._buf = buf[end + 1 :]
        self.instance.on_lines(buf[:end].decode("utf-8", "replace").replace("\r", "").split("\n"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.instance.on_connection_lost(self, exc)

    def pause_writing(self) -> None:
        self.instance.writable = False

    def resume_writing(self) -> None:
        self.instance.writable = True
        self.instance.on_writable()


class Instance:
    """One node as the balancer sees it: settings, state, health, owned events, connection."""

    def __init__(self, settings: InstanceSettings, *, rise: int, fall: int, owner: InstanceOwner) -> None:
        self.settings = settings
        self.key = settings.key
        self.health = Health(rise=rise, fall=fall)
        self.state = InstanceState.DOWN if settings.enabled else InstanceState.MAINT
        self.owner = owner
        self.owned: dict[int, float] = {}  # request id -> loop time of dispatch, in dispatch order
        self.protocol: UpstreamProtocol | None = None
        self.writable = True
        self.connecting = False
        self.last_progress = 0.0  # loop time of the last finished event (or of the first dispatch)
        self.last_write = 0.0  # loop time of the last bytes written to the event connection
        self.dispatched = 0  # events sent to it (redispatches to it included)
        self.finished = 0  # events it answered (their LookupFinished arrived)
        self.redispatched = 0  # events it owed that were sent again elsewhere after it failed
        self.check_seconds: float | None = None  # round trip of its last passed health check (connect to PONG)
        self.latency = 0.0  # moving average of dispatch-to-finish seconds of its oldest events
        self.suspect_since: float | None = None  # overdue: its events were re-sent; no new ones while others can
        self.overdue_streak = 0  # found overdue in a row without finishing an event
        self.ready: bool | None = True  # /readyz said ready (None: not polled yet), or readiness is not polled
        self.not_ready_reason = ""
        self.max_event_size: int | None = None  # the node's MaxEventSize, from /readyz when it says

    def observe_latency(self, seconds: float) -> None:
        """A finished event's dispatch-to-finish time (one sample per read of replies is enough)."""
        self.latency = seconds if not self.latency else self.latency + LATENCY_WEIGHT * (seconds - self.latency)

    def oldest_dispatch(self) -> float | None:
        """Loop time at which its oldest unfinished event was sent (None when it owes nothing)."""
        for sent in self.owned.values():
            return sent
        return None

    def __repr__(self) -> str:
        return f"<Instance {self.key} {self.state.value} owned={len(self.owned)} connected={self.connected}>"

    @property
    def connected(self) -> bool:
        return self.protocol is not None and self.protocol.transport is not None

    def write(self, data: bytes, now: float) -> None:
        assert self.protocol is not None and self.protocol.transport is not None
        self.protocol.transport.write(data)
        self.last_write = now

    def keep_alive(self, now: float) -> None:
        """Write an empty line when the connection has been silent for :data:`KEEPALIVE` seconds."""
        if self.connected and now - self.last_write >= KEEPALIVE:
            self.write(b"\n", now)

    async def connect(self, connect_timeout: float) -> None:
        """Open the event connection (called when the instance turns UP)."""
        if self.connected or self.connecting:
            return
        self.connecting = True
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamProtocol(self), self.settings.host, self.settings.matching_port),
                connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.owner.instance_failed(self, f"event connection failed: {describe(exc)}")
            return
        finally:
            self.connecting = False
        if self.state is InstanceState.MAINT:  # disabled or removed while we were connecting
            if protocol.transport is not None:
                protocol.transport.close()
            return
        self.protocol = protocol
        self.writable = True
        log.info("instance %s: event connection open", self.key)
        self.owner.instance_connected(self)

    def close(self) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    # -- callbacks from the protocol ----------------------------------------------------------

    def on_lines(self, lines: list[str]) -> None:
        self.owner.instance_lines(self, lines)

    def on_broken(self, why: str) -> None:
        self.owner.instance_failed(self, why)

    def on_writable(self) -> None:
        self.owner.instance_writable(self)

    def on_connection_lost(self, protocol: UpstreamProtocol, exc: Exception | None) -> None:
        if protocol is self.protocol:
            self.protocol = None
            self.owner.instance_failed(self, f"event connection lost: {describe(exc) if exc else 'closed by the node'}")


class InstanceOwner:
    """What an :class:`Instance` reports to (the balancer service implements it)."""

    def instance_lines(self, instance: Instance, lines: list[str]) -> None:
        raise NotImplementedError

    def instance_failed(self, instance: Instance, why: str) -> None:
        raise NotImplementedError

    def instance_connected(self, instance: Instance) -> None:
        raise NotImplementedError

    def instance_writable(self, instance: Instance) -> None:
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
