"""Fakes for the asyncio edges: a clock the test moves, and two transports connected in memory.

A protocol (``EventProtocol``, a sender, a gateway connection) meets the world through its transport
and the loop's clock.  With :func:`transport_pair` and :class:`FakeClock` a unit test drives it the way
the kernel and time would — bytes cut anywhere, a peer that stops reading, an idle minute — without a
socket, without sleeping, and the same on every machine.

* :class:`FakeClock` replaces the running loop's ``time()``: ``loop.call_later`` timers (handshake and
  idle timeouts, sweeps) fire when the test :meth:`~FakeClock.advance`\\ s past them and lets the loop
  run (:func:`settle`).  Real time plays no part in when they fire.
* :func:`transport_pair` gives two :class:`FakeTransport` objects, each the other's peer.  What one
  writes is delivered to the other's protocol (``data_received``) on a later turn of the loop, as a
  socket does.  A side that :meth:`~FakeTransport.pause_reading`\\ s leaves the peer's writes in the
  peer's buffer, which calls the peer protocol's ``pause_writing`` above its high-water mark and
  ``resume_writing`` once back under the low-water mark: the back-pressure chain of a real connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any


class FakeClock:
    """The time of the running loop, moved only by :meth:`advance` (starts at ``start``)."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time on; timers now due fire at the loop's next turn (``await settle()``)."""
        assert seconds >= 0, "time does not run backwards"
        self._now += seconds

    @contextlib.contextmanager
    def installed(self, loop: asyncio.AbstractEventLoop | None = None) -> Iterator[FakeClock]:
        """Make ``loop`` (the running one by default) read this clock while in the block.

        The asyncio loop's scheduler reads ``loop.time()`` for every timer, so timers follow the clock.
        (uvloop's loop cannot be patched: these tests run on asyncio's.)
        """
        loop = loop or asyncio.get_running_loop()
        loop.time = self.now  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del loop.time  # the class's method again


async def settle(turns: int = 10) -> None:
    """Let the loop run ``turns`` times: deliveries and due timers happen, chains of them too."""
    for _ in range(turns):
        await asyncio.sleep(0)


class FakeTransport(asyncio.Transport):
    """One end of an in-memory connection (see :func:`transport_pair`).

    Its write buffer holds what was written and not yet delivered to the peer: delivery waits while
    the peer does not read (:meth:`pause_reading` on the peer's side).  ``closed`` is set once
    ``connection_lost`` was called on this side's protocol.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, peername: tuple[str, int]) -> None:
        super().__init__()
        self.loop = loop
        self.peername = peername
        self.peer: FakeTransport | None = None
        self.protocol: asyncio.BaseProtocol | None = None
        self.buffer = bytearray()
        self.high = 64 * 1024
        self.low = 16 * 1024
        self.reading = True
        self.closing = False
        self.closed = False
        self.eof_written = False
        self.eof_seen = False  # the peer's EOF was given to this side's protocol
        self.aborted = False
        self._writing_paused = False
        self._delivery: asyncio.Handle | None = None

    # -- asyncio.Transport -----------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peername}.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.eof_written:
            return  # as asyncio's socket transports: writes after close are dropped
        self.buffer += data
        self._check_high_water()
        self._schedule_delivery()

    def write_eof(self) -> None:
        self.eof_written = True
        self._schedule_delivery()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """Close once the buffer is delivered (a FIN after the last byte); the peer sees EOF."""
        if self.closing:
            return
        self.closing = True
        self._schedule_delivery()

    def abort(self) -> None:
        """Close at once, dropping the buffer; the peer sees a reset."""
        if self.closed:
            return
        self.closing = self.aborted = True
        self.buffer.clear()
        self._lose(None)
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.closing = True
            peer._lose(ConnectionResetError("connection reset by peer"))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            if self.peer is not None:
                self.peer._schedule_delivery()

    def is_reading(self) -> bool:
        return self.reading and not self.closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 64 * 1024 if high is None else high
        self.low = self.high // 4 if low is None else low
        self._check_high_water()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low, self.high

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    # -- delivery --------------------------------------------------------------------------------

    def _check_high_water(self) -> None:
        if not self._writing_paused and len(self.buffer) > self.high and self.protocol is not None:
            self._writing_paused = True
            self.protocol.pause_writing()

    def _schedule_delivery(self) -> None:
        if self._delivery is None and not self.closed:
            self._delivery = self.loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        """Hand the buffer to the peer's protocol if it reads; then EOF and close, in a socket's order."""
        self._delivery = None
        peer = self.peer
        if self.closed or peer is None:
            return
        if self.buffer and peer.closed:
            self.buffer.clear()  # nobody reads any more (a socket would get a reset)
        if self.buffer and peer.reading:
            data = bytes(self.buffer)
            self.buffer.clear()
            assert isinstance(peer.protocol, asyncio.Protocol)
            peer.protocol.data_received(data)
            if self._writing_paused and len(self.buffer) <= self.low and self.protocol is not None:
                self._writing_paused = False
                self.protocol.resume_writing()
        if self.buffer:
            return  # the peer does not read: the rest waits for its resume_reading
        if self.eof_written or self.closing:
            self._send_eof(peer)
        if self.closing:
            self._lose(None)

    def _send_eof(self, peer: FakeTransport) -> None:
        """The peer learns that nothing more comes; a protocol answering falsy has its side closed."""
        if peer.closed or peer.eof_seen:
            return
        peer.eof_seen = True
        assert isinstance(peer.protocol, asyncio.Protocol)
        if not peer.protocol.eof_received():
            peer.close()

    def _lose(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = self.closing = True
        if self._delivery is not None:
            self._delivery.cancel()
            self._delivery = None
        protocol = self.protocol
        if protocol is not None:
            self.loop.call_soon(protocol.connection_lost, exc)


def transport_pair(
    server: asyncio.BaseProtocol,
    client: asyncio.BaseProtocol,
    *,
    client_address: tuple[str, int] = ("192.0.2.10", 50000),
    server_address: tuple[str, int] = ("127.0.0.1", 9999),
) -> tuple[FakeTransport, FakeTransport]:
    """Connect ``server`` and ``client`` protocols in memory; returns (server's transport, client's).

    ``connection_made`` is called on both at once (the server first), as an accepted socket would;
    each transport's ``peername`` is the other side's address.  Must be called with a running loop.
    """
    loop = asyncio.get_running_loop()
    server_side = FakeTransport(loop, client_address)
    client_side = FakeTransport(loop, server_address)
    server_side.peer, client_side.peer = client_side, server_side
    server_side.protocol, client_side.protocol = server, client
    server.connection_made(server_side)
    client.connection_made(client_side)
    return server_side, client_side


class Recorder(asyncio.Protocol):
    """A client protocol that keeps what it receives: the bytes, EOF, and how the connection ended."""

    def __init__(self) -> None:
        self.transport: FakeTransport | None = None
        self.data = bytearray()
        self.eof = False
        self.lost: list[Exception | None] = []  # one item once connection_lost was called
        self.paused = 0  # pause_writing calls (the server does not read what this client sends)
        self.resumed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, FakeTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True  # keep our side open: the test decides when the client closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    @property
    def lines(self) -> list[str]:
        return self.data.decode().splitlines()
