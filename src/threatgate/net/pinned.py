"""A keep-alive pool of pinned HTTPS/1.1 connections to one server: the gateway's upstream client.

The pinning guarantee: a connection is checked once, right after its TLS handshake and before it
carries a byte of any request: the SHA-256 of the certificate the server presented must equal the
pin, else the connection is closed and :class:`~threatgate.errors.PeerCertificateMismatch` raised.
A verified connection is kept for requests made under the same pin only: when the pin changes
(renewed on disk), connections verified against the old one are closed, never reused.

Why a pool of plain protocols instead of aiohttp's ``ClientSession``: see :mod:`threatgate.net.http1`.
Per request this costs one buffer write, one future and one timer handle; idle connections wait in a
LIFO list (the most recently used one is the least likely to have been closed by the server) and
are dropped after :data:`IDLE` seconds unused.  At most ``limit`` connections are open at once;
further requests wait for one to come back.

Every failure reaches the caller as :class:`~threatgate.errors.UpstreamFailed` in an operator's words
(:func:`threatgate.net.describe.describe`), with "timed out" for the deadline.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ipaddress
import ssl
import time
from typing import Any, cast

from threatgate.errors import MalformedAnswer, PeerCertificateMismatch, UpstreamFailed
from threatgate.net.describe import describe
from threatgate.net.http1 import Response, ResponseReader, encode_request

IDLE = 30.0
"""Seconds an idle connection is kept (the nodes keep theirs 75 s: ours expire first, no race at reuse)."""
LIMIT = 64
"""Connections per server at most (aiohttp's ``limit_per_host`` before)."""
MAX_ANSWER = 256 * 1024 * 1024
"""Largest answer body read from a node (a suppliers listing or a lookup of many objects stays far below)."""


def client_context() -> ssl.SSLContext:
    """TLS without CA verification: the pin is the check (a node's certificate is self-signed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the SHA-256 pin is compared before any byte is sent
    return ctx


class _Connection(asyncio.Protocol):
    """One TLS connection: at most one request in flight, its answer delivered through ``waiter``."""

    __slots__ = ("transport", "reader", "waiter", "pin", "idle_since", "closed", "timer")

    def __init__(self, pin: bytes) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = ResponseReader(MAX_ANSWER)
        self.waiter: asyncio.Future[Response] | None = None
        self.pin = pin
        self.idle_since = 0.0
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TLS transport is not a subclass

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():  # bytes nobody asked for: the connection cannot be trusted
            self.close(abort=True)
            return
        try:
            answer = self.reader.feed(data)
        except MalformedAnswer as exc:
            self._fail(exc)
            return
        if answer is not None:
            self.waiter = None
            waiter.set_result(answer)

    def eof_received(self) -> bool | None:
        return False  # close; connection_lost finishes a close-delimited answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            answer = self.reader.eof()
            self.waiter = None
            if answer is not None:
                waiter.set_result(answer)
            elif exc is not None:
                waiter.set_exception(UpstreamFailed(describe(exc)))
            elif self.reader.started:
                waiter.set_exception(UpstreamFailed("the answer was cut short"))
            else:
                waiter.set_exception(UpstreamFailed("the connection was closed before the whole answer arrived"))

    def send(self, data: bytes, *, head: bool) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.reader.expect(head=head)
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return waiter

    def expire(self) -> None:
        """The request's deadline passed: the answer is abandoned, and so is the connection."""
        self._fail(UpstreamFailed("timed out"))

    def _fail(self, exc: UpstreamFailed) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close(abort=True)

    def close(self, *, abort: bool = False) -> None:
        """Close with a TLS close_notify, after what is buffered (our handshake's last flight included, so
        the server sees the handshake done); ``abort``: at once, for a connection whose answer is abandoned."""
        self.closed = True
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


class PinnedPool:
    """Pinned keep-alive connections to ``host:port`` (``server_hostname`` for SNI, None for none)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, *, limit: int = LIMIT) -> None:
        self.host = host
        self.port = port
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._context = context
        self._sni = None if _is_ip(host) else host
        self._idle: list[_Connection] = []
        self._open = 0
        self._limit = limit
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.connects = 0  # connections opened (for tests and the bench: reuse shows as few connects)

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def request(
        self, pin: bytes, method: str, target: str, headers: dict[str, str], body: bytes, within: float
    ) -> Response:
        """Send one request over a connection verified against ``pin`` and return the whole answer.

        ``within`` seconds for all of it (a free connection, connect and handshake, the answer): one
        deadline, one timer handle, instead of an ``asyncio.timeout`` context per request.

        Raises:
            PeerCertificateMismatch: a new connection presented another certificate (nothing was sent).
            UpstreamFailed: no answer (connect, TLS, timeout, closed or malformed before the answer).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        conn = await self._acquire(pin, deadline)
        data = encode_request(method, target, self.authority, headers, body)
        timer = loop.call_at(deadline, conn.expire)
        try:
            answer = await conn.send(data, head=method == "HEAD")
        except BaseException:
            conn.close(abort=True)
            self._release(conn, reuse=False)
            raise
        finally:
            timer.cancel()
        self._release(conn, reuse=answer.keep_alive)
        return answer

    async def _acquire(self, pin: bytes, deadline: float) -> _Connection:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if (
                conn.closed
                or transport is None
                or transport.is_closing()
                or conn.pin != pin
                or now - conn.idle_since > IDLE
            ):
                conn.close()
                self._open -= 1
                continue
            return conn
        while self._open >= self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise UpstreamFailed("timed out waiting for a free connection") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if idle:
                return await self._acquire(pin, deadline)
        self._open += 1
        try:
            return await self._connect(pin, deadline)
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _connect(self, pin: bytes, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        self.connects += 1
        try:
            async with asyncio.timeout_at(deadline):
                transport, conn = await loop.create_connection(
                    lambda: _Connection(pin), self.host, self.port, ssl=self._context, server_hostname=self._sni
                )
        except TimeoutError:
            raise UpstreamFailed("timed out") from None
        except ssl.SSLError as exc:
            raise UpstreamFailed(describe(exc)) from None
        except OSError as exc:
            raise UpstreamFailed("cannot connect: " + describe(exc)) from None
        ssl_object: Any = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        got = hashlib.sha256(der).digest() if der else b""
        if got != pin:  # the check: no request byte has been written on this connection
            conn.close()
            raise PeerCertificateMismatch(pin, got)
        return conn

    def _release(self, conn: _Connection, *, reuse: bool) -> None:
        if reuse and not conn.closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
            self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections (those in use close when their answer is in)."""
        for conn in self._idle:
            conn.close()
            self._open -= 1
        self._idle.clear()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


__all__ = ["IDLE", "LIMIT", "PinnedPool", "client_context"]
