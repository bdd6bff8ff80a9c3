"""The drain of an event port at shutdown: the pure decisions (net/drain.py), then real loopback connections.

The socket tests run on asyncio's loop and on uvloop (what the node runs on): transports differ in how
they report their write buffer and the socket under them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threatgate.metrics import NodeStats
from threatgate.net.drain import Drain, DrainResult, Owed, remaining
from threatgate.net.events import HOLDING, ConnState, EventListener, EventProtocol, ListenerLimits
from threatgate.wire.framing import FramedEvent

# -- the decisions ----------------------------------------------------------------------------------


def test_a_connection_owing_nothing_is_closed_at_the_first_look() -> None:
    plan = Drain(["a", "b"], now=0.0, deadline=5.0)
    step = plan.step(0.0, {"a": Owed(), "b": Owed(buffered=10)})
    assert (step.close, step.cut, step.done) == (["a"], [], False)
    step = plan.step(0.01, {"b": Owed(unacked=3)})
    assert (step.close, step.cut, step.done) == ([], [], False)
    step = plan.step(0.02, {"b": Owed()})
    assert (step.close, step.cut, step.done) == (["b"], [], True)
    assert plan.result(0.02) == DrainResult(connections=2, clean=2, cut=0, gone=0, elapsed=0.02)


def test_at_the_deadline_what_is_still_owed_is_cut_and_counted() -> None:
    plan = Drain(["a", "b", "c", "d"], now=10.0, deadline=11.0, handshaking=2)
    assert not plan.step(10.5, {"a": Owed(buffered=100), "b": Owed(held=True), "c": Owed()}, gone=["d"]).done
    step = plan.step(11.0, {"a": Owed(buffered=60, unacked=40), "b": Owed(held=True, outstanding=3)})
    assert step.close == [] and sorted(step.cut) == ["a", "b"] and step.done
    result = plan.result(11.0)
    assert result == DrainResult(
        connections=4, clean=1, cut=2, gone=1, handshaking=2, cut_bytes=100, cut_held=1, cut_events=3, elapsed=1.0
    )
    assert result.summary() == (
        "1 connection(s) closed cleanly, 2 cut at the deadline (100 reply byte(s) undelivered, "
        "1 with detections not queued, 3 event(s) unanswered), 1 closed by their client, 2 in handshake closed"
    )


def test_no_connection_means_done_at_once() -> None:
    plan: Drain[str] = Drain([], now=0.0, deadline=10.0)
    assert plan.step(0.0, {}).done
    assert plan.result(0.0).summary() == "0 connection(s) closed cleanly"


def test_a_connection_owing_nothing_even_at_the_deadline_is_closed_cleanly() -> None:
    plan = Drain(["a"], now=0.0, deadline=1.0)
    step = plan.step(2.0, {"a": Owed()})
    assert (step.close, step.cut, step.done) == (["a"], [], True)


def test_owed_and_remaining() -> None:
    assert not Owed().owing()
    assert all(o.owing() for o in (Owed(buffered=1), Owed(unacked=1), Owed(held=True), Owed(outstanding=1)))
    assert remaining(10.0, 4.0) == 6.0 and remaining(10.0, 12.0) == 0.0


OWED = st.builds(Owed, st.integers(0, 3), st.integers(0, 3), st.booleans(), st.integers(0, 3))


@given(
    st.integers(0, 6),
    st.lists(st.tuples(st.floats(0, 2), st.dictionaries(st.integers(0, 5), OWED), st.sets(st.integers(0, 5)))),
)
def test_every_connection_is_reported_once_and_never_waited_for_past_the_deadline(
    count: int, looks: list[tuple[float, dict[int, Owed], set[int]]]
) -> None:
    plan = Drain(range(count), now=0.0, deadline=1.0)
    decided: list[int] = []
    now = 0.0
    for advance, owed, gone in looks:
        now += advance
        waiting = plan.waiting
        step = plan.step(now, {c: o for c, o in owed.items() if c in waiting and c not in gone}, gone)
        decided += step.close + step.cut
        assert step.done == (not plan.waiting)
        if now >= 1.0:
            assert step.done
    result = plan.result(now)
    assert len(decided) == len(set(decided))
    assert result.clean + result.cut + result.gone == count - len(plan.waiting)
    assert result.clean + result.cut == len(decided)


# -- real connections -------------------------------------------------------------------------------

LOOPS = ["asyncio", "uvloop"]
REPLY = 4 * 1024 * 1024
"""Reply bytes per event: far more than the kernel buffers of a client that does not read."""
FLAGS = b"X-KF-ReplyBack\n"


def run(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


class Replier(EventProtocol):
    """Answers every event with REPLY bytes at once, as a node answers in ``data_received``.

    Its events (``connected``, ``processed``) let a test wait for what the server did, not sleep.
    """

    def __init__(self, listener: EventListener) -> None:
        super().__init__(listener)
        self.answered = 0
        self.connected = asyncio.Event()
        self.processed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connected.set()

    def process(self, events: list[FramedEvent]) -> None:
        self.answer(events)
        self.processed.set()

    def answer(self, events: list[FramedEvent]) -> None:
        assert self.transport is not None
        self.answered += len(events)
        self.transport.write((b"r" * (REPLY - 1) + b"\n") * len(events))


class Port:
    """An EventListener on 127.0.0.1 serving ``factory`` connections, and plain sockets as clients."""

    def __init__(self, factory: type[Replier] = Replier) -> None:
        limits = ListenerLimits(handshake_timeout=10, scanners_count=4, max_event_size=1024, delimiter=None)
        self.listener = EventListener(NodeStats(), limits, logging.getLogger("test.drain"))
        self.factory = factory
        self.made: asyncio.Queue[Replier] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Port:
        def make() -> Replier:
            conn = self.factory(self.listener)
            self.made.put_nowait(conn)
            return conn

        self.server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.listener.close_all()

    async def client(self, first: bytes = b"", rcvbuf: int = 0) -> tuple[socket.socket, Replier]:
        """A connected non-blocking client that sent ``first``, and its connection in the server.

        ``rcvbuf`` shrinks the client's receive buffer (the window of a client that stops reading).
        """
        assert self.server is not None
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, self.server.sockets[0].getsockname())
        if first:
            await loop.sock_sendall(sock, first)
        async with asyncio.timeout(5):
            conn = await self.made.get()
            await conn.connected.wait()
        return sock, conn

    async def answered(self, first: bytes, rcvbuf: int = 0) -> tuple[socket.socket, Replier]:
        """A client whose ``first`` events the server has processed."""
        sock, conn = await self.client(first, rcvbuf)
        async with asyncio.timeout(5):
            await conn.processed.wait()
        return sock, conn


async def read_to_end(sock: socket.socket) -> tuple[int, str]:
    """Bytes read until the server closed, and how it closed: ``"eof"`` or ``"reset"``."""
    loop = asyncio.get_running_loop()
    total = 0
    try:
        while data := await loop.sock_recv(sock, 65536):
            total += len(data)
    except ConnectionResetError:
        return total, "reset"
    return total, "eof"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_stops_reading_is_waited_for_until_the_deadline_then_cut(loop: str) -> None:
    async def main() -> None:
        async with Port() as port:
            sock, conn = await port.answered(FLAGS + b"event 1\n", rcvbuf=4096)
            assert conn.owed().buffered  # REPLY is far more than the kernel takes for a client that does not read
            result = await port.listener.drain(0.3)
            assert (result.connections, result.clean, result.cut, result.gone) == (1, 0, 1, 0)
            assert 0 < result.cut_bytes <= REPLY
            assert 0.29 <= result.elapsed < 1.0  # uvloop's clock has a millisecond grain
            received, _ = await read_to_end(sock)  # what the kernel had, then FIN or RST (the loop's choice)
            assert received < REPLY  # cut: the rest of the reply is lost
            sock.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_reads_is_drained_cleanly_with_every_reply(loop: str) -> None:
    async def main() -> None:
        async with Port() as port:
            sock, conn = await port.answered(FLAGS + b"event 1\nevent 2\n", rcvbuf=4096)
            assert conn.owed().buffered
            reader = asyncio.ensure_future(read_to_end(sock))  # the client reads its replies (slowly)
            result = await port.listener.drain(10)
            assert (result.connections, result.clean, result.cut) == (1, 1, 0)
            assert result.elapsed < 10
            assert await reader == (2 * REPLY, "eof")  # every byte, then FIN
            sock.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_events_sent_after_the_drain_began_are_not_read_and_the_replies_still_arrive(loop: str) -> None:
    """The client holds its replies (does not read) and keeps sending; once it reads, it gets every
    reply of the events the server had read, even though the close is a reset (unread input)."""

    async def main() -> None:
        loop_ = asyncio.get_running_loop()
        async with Port() as port:
            sock, conn = await port.answered(FLAGS + b"event 1\n", rcvbuf=4096)
            assert conn.owed().buffered
            drain = asyncio.ensure_future(port.listener.drain(10))
            await asyncio.sleep(0.05)
            await loop_.sock_sendall(sock, b"late 1\nlate 2\n")  # never read: never answered
            await asyncio.sleep(0.05)
            assert not drain.done()  # waiting for the client to take its reply
            received, _ = await read_to_end(sock)  # then a reset: the late events were never read
            result = await drain
            assert (result.clean, result.cut) == (1, 0)
            assert received == REPLY and conn.answered == 1
            sock.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_handshake_connections_and_newcomers_are_closed_at_once(loop: str) -> None:
    async def main() -> None:
        async with Port() as port:
            silent, conn = await port.client()  # connected, no flags yet
            assert conn.state is ConnState.HANDSHAKE
            result = await port.listener.drain(10)
            assert (result.connections, result.handshaking, result.elapsed < 1) == (0, 1, True)
            assert await read_to_end(silent) == (0, "eof")
            late, conn = await port.client()  # the listening socket is still open here: closed at once all the same
            assert await read_to_end(late) == (0, "eof")
            assert conn.state is ConnState.CLOSED and not port.listener.handshaking
            silent.close()
            late.close()

    run(loop, main)


class Holder(Replier):
    """Holds its batch back (as a node does while the output queue is full) until ``release``."""

    def answer(self, events: list[FramedEvent]) -> None:
        self.pause(HOLDING)

    def release(self) -> None:
        self.answered += 1
        self.resume(HOLDING)


class Waiter(Replier):
    """Answers later, as the balancer does once a node replied (``unanswered`` meanwhile)."""

    waiting = 0

    def unanswered(self) -> int:
        return self.waiting

    def answer(self, events: list[FramedEvent]) -> None:
        self.waiting += len(events)

    def release(self) -> None:
        assert self.transport is not None
        self.waiting = 0
        self.transport.write(b"answer\n")


@pytest.mark.parametrize("factory", [Holder, Waiter])
def test_the_drain_waits_for_held_batches_and_outstanding_answers(factory: type[Holder | Waiter]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with Port(factory) as port:
            sock, conn = await port.answered(FLAGS + b"event 1\n")
            assert isinstance(conn, Holder | Waiter) and conn.owed().owing()
            reader = asyncio.ensure_future(read_to_end(sock))
            loop.call_later(0.2, conn.release)
            result = await port.listener.drain(10)
            assert (result.clean, result.cut) == (1, 0) and 0.19 <= result.elapsed < 5
            assert (await reader)[1] == "eof"
            assert conn.owed() == Owed()
            sock.close()

    asyncio.run(main())


def test_a_held_batch_past_the_deadline_is_reported() -> None:
    async def main() -> None:
        async with Port(Holder) as port:
            sock, conn = await port.answered(FLAGS + b"event 1\n")
            assert conn.owed().held
            result = await port.listener.drain(0.1)
            assert (result.cut, result.cut_held, result.cut_bytes) == (1, 1, 0)
            assert "1 with detections not queued" in result.summary()
            sock.close()

    asyncio.run(main())
