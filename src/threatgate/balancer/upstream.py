"""Connections to instances: the persistent event connections ("lanes") and the PING health check.

Each enabled instance gets one or more persistent event connections, its *lanes*, opened with
``X-KF-SendFinishedEventX-KF-ReplyBack`` (the CyberTrace HA recipe); lines are written in batches,
replies are split into lines here and handed to the :class:`LaneHost` (the balancer's edge), which
hands them to the dispatcher.  Why several: a node with worker processes serves each connection in one
worker for the connection's whole life, so a single connection would keep one worker busy and leave
the others idle.  What an instance and a lane *are* (state, what a lane owes, how many lanes) is sans-IO,
in ``lb/instances.py``; this module is only the I/O.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, cast

from threatgate.config.balancer import BalancerConfig
from threatgate.lb.instances import Instance
from threatgate.net.describe import describe, printable
from threatgate.stats import BalancerStats
from threatgate.wire.flags import PONG, SessionFlags

UPSTREAM_FLAGS = SessionFlags(reply_back=True, send_finished=True).to_bytes()
PING_FLAGS = SessionFlags(reply_back=True, ping=True).to_bytes()
WRITE_HIGH = 8 * 1024 * 1024
"""Event bytes buffered toward one lane before the balancer stops dispatching to it."""
MAX_REPLY_LINE = 16 * 1024 * 1024
"""A reply line longer than this is a broken node: the connection is dropped (its events redispatched)."""


def json_answer(status: int, body: bytes, accepted: tuple[int, ...] = (200,)) -> Any:
    """A node's JSON answer to a probe (``/readyz``, ``/statz``), decoded.

    Raises:
        ValueError: another status (an older node, another server on that port) or not JSON.
    """
    if status not in accepted:
        raise ValueError(f"HTTP {status}")
    try:
        return json.loads(body)
    except ValueError:
        raise ValueError("not JSON") from None


class LaneHost(Protocol):
    """What an :class:`UpstreamProtocol` reports to (the balancer's edge)."""

    def lane_lines(self, upstream: UpstreamProtocol, data: bytes) -> None: ...
    def lane_broken(self, upstream: UpstreamProtocol, why: str) -> None: ...
    def lane_lost(self, upstream: UpstreamProtocol, exc: Exception | None) -> None: ...
    def lane_writable(self, upstream: UpstreamProtocol, writable: bool) -> None: ...


class UpstreamProtocol(asyncio.Protocol):
    """One event connection (one lane, by its key): writes tagged events, hands on replies in whole lines."""

    def __init__(self, host: LaneHost, key: str) -> None:
        self.host = host
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._buf = b""

    def __repr__(self) -> str:
        return f"<UpstreamProtocol {self.key} open={self.transport is not None}>"

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
                self.host.lane_broken(self, f"reply line longer than {MAX_REPLY_LINE} bytes")
            return
        self._buf = buf[end + 1 :]
        self.host.lane_lines(self, buf[: end + 1] if self._buf else buf)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.host.lane_lost(self, exc)

    def pause_writing(self) -> None:
        self.host.lane_writable(self, False)

    def resume_writing(self) -> None:
        self.host.lane_writable(self, True)


Opened = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
"""Opens a checked connection for a health check (balancer/lanes_tls.py: TLS, the pin compared)."""


async def ping(host: str, port: int, check_timeout: float, opened: Opened | None = None) -> str | None:
    """One active health check: ``X-KF-ReplyBackPING`` -> ``PONG``.  None when healthy, else the error.

    ``opened``: how to connect instead of plain TCP (what it raises, other than ``OSError`` and
    ``TimeoutError``, reaches the caller).
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check_timeout):
            reader, writer = await (opened() if opened is not None else asyncio.open_connection(host, port))
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
