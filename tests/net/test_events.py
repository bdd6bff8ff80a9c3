"""The event port's connection (net/events.py) driven in memory: bytes cut anywhere, time moved by hand.

Each test connects an :class:`EventProtocol` to a recording client through ``tests.fakes.transport_pair``
with the loop on a :class:`~tests.fakes.FakeClock`: the handshake, the framing, the timeouts, the
back-pressure and the end of a connection are checked without sockets and without waiting for time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from tests.fakes import FakeClock, FakeTransport, Recorder, settle, transport_pair
from threatgate.net.events import HIGH_WATER, ConnState, EventListener, EventProtocol, ListenerLimits
from threatgate.stats import NodeStats
from threatgate.wire.flags import PONG
from threatgate.wire.framing import FramedEvent

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
HANDSHAKE_TIMEOUT = 5.0
IDLE_TIMEOUT = 30.0


class Answering(EventProtocol):
    """Answers each event with ``<event> done`` (``reply_size`` bytes more when set), at once as a node does,
    or, with ``hold``, later (:meth:`answer_all`) as the balancer does once its nodes answered."""

    def __init__(self, listener: EventListener, *, hold: bool = False, reply_size: int = 0) -> None:
        super().__init__(listener)
        self.hold = hold
        self.reply_size = reply_size
        self.events: list[FramedEvent] = []
        self.held: list[FramedEvent] = []
        self.outstanding = 0  # events held, not answered yet
        self.closed_calls = 0

    def process(self, events: list[FramedEvent]) -> None:
        self.events.extend(events)
        if self.hold:
            self.held.extend(events)
            self.outstanding += len(events)
        else:
            self._answer(events)

    def _answer(self, events: list[FramedEvent]) -> None:
        assert self.transport is not None
        pad = b"p" * self.reply_size
        self.transport.write(b"".join(f"{event} done".encode() + pad + b"\n" for event in events))

    def answer_all(self) -> None:
        """The held events are answered; after the client's EOF, nothing more is owed: close."""
        held, self.held = self.held, []
        self.outstanding -= len(held)
        self._answer(held)
        if self.eof and not self.outstanding and self.transport is not None:
            self.transport.close()

    def keep_open_after_eof(self) -> bool:
        return self.outstanding > 0

    def unanswered(self) -> int:
        return self.outstanding

    def on_closed(self) -> None:
        self.closed_calls += 1


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    with FakeClock().installed() as fake:
        yield fake


def listener_for(scanners: int = 4, idle_timeout: float = IDLE_TIMEOUT) -> EventListener:
    limits = ListenerLimits(
        handshake_timeout=HANDSHAKE_TIMEOUT,
        scanners_count=scanners,
        max_event_size=64,
        delimiter=None,
        idle_timeout=idle_timeout,
    )
    return EventListener(NodeStats(), limits, logging.getLogger("test.events"))


def connect(listener: EventListener, **kwargs: bool | int) -> tuple[Answering, Recorder, FakeTransport]:
    """A connection on ``listener`` and its client; the server side's transport."""
    conn, client = Answering(listener, **kwargs), Recorder()  # type: ignore[arg-type]
    server_side, _ = transport_pair(conn, client)
    return conn, client, server_side


async def test_flags_and_events_cut_anywhere_are_put_back_together(clock: FakeClock) -> None:
    listener = listener_for()
    conn, client, _ = connect(listener)
    assert conn.peer == "192.0.2.10" and conn in listener.handshaking
    for piece in (FLAGS[:9], FLAGS[9:], b"1 a", b"bc\n2 d", b"ef\n3 g", b"hi\n"):
        client.send(piece)
        await settle()
        if piece is FLAGS[:9]:
            assert conn.state is ConnState.HANDSHAKE  # a proper prefix of a flag: wait for more
    assert conn.state is ConnState.ACTIVE and conn in listener.active and not listener.handshaking
    assert conn.flags.reply_back and conn.flags.send_finished
    assert conn.events == ["1 abc", "2 def", "3 ghi"]
    assert client.lines == ["1 abc done", "2 def done", "3 ghi done"]
    assert listener.stats.connections == {"accepted": 1}


async def test_a_ping_is_answered_without_a_scanner_when_every_scanner_is_busy(clock: FakeClock) -> None:
    listener = listener_for(scanners=1)
    busy, busy_client, _ = connect(listener, hold=True)
    busy_client.send(FLAGS + b"1 held\n")  # owed an answer: it cannot be evicted
    await settle()
    assert busy.state is ConnState.ACTIVE
    ping, ping_client, _ = connect(listener)
    ping_client.send(b"X-KF-ReplyBackPING")
    await settle()
    assert bytes(ping_client.data) == PONG and ping_client.eof and ping.state is ConnState.CLOSED
    refused, refused_client, refused_side = connect(listener)
    refused_client.send(FLAGS + b"2 x\n")
    await settle()
    assert refused_client.data == b"" and refused_client.eof and refused_side.closed  # closed, nothing said
    assert refused.events == [] and refused.state is ConnState.CLOSED and listener.active == {busy}
    assert listener.stats.connections == {"accepted": 1, "ping": 1, "rejected_scanners": 1}


async def test_a_connection_that_sends_no_flags_is_closed_at_the_handshake_timeout(clock: FakeClock) -> None:
    listener = listener_for()
    conn, client, side = connect(listener)
    clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    await settle()
    assert not side.is_closing() and conn in listener.handshaking
    clock.advance(0.2)
    await settle()
    assert client.eof and side.closed and not listener.handshaking
    assert listener.stats.bad_input == {"handshake_timeout": 1}


async def test_an_idle_connection_is_closed_by_the_sweep_but_not_one_owed_an_answer(clock: FakeClock) -> None:
    listener = listener_for()
    idle, idle_client, idle_side = connect(listener)
    owed, owed_client, owed_side = connect(listener, hold=True)
    idle_client.send(FLAGS + b"1 x\n")
    owed_client.send(FLAGS + b"2 y\n")
    await settle()
    listener.start_sweeps(interval=1.0)
    for _ in range(int(IDLE_TIMEOUT) - 1):
        clock.advance(1.0)
        await settle(3)
    assert not idle_side.is_closing() and idle.state is ConnState.ACTIVE
    clock.advance(2.0)
    await settle()
    assert idle_client.eof and idle_side.closed and idle.state is ConnState.CLOSED and idle.closed_calls == 1
    assert not owed_side.is_closing() and listener.active == {owed}  # waits for its answer: never idle
    assert listener.stats.connections["idle_timeout"] == 1
    listener.close_all()
    await settle()


async def test_a_newcomer_evicts_the_connection_idle_the_longest_when_every_scanner_is_taken(clock: FakeClock) -> None:
    listener = listener_for(scanners=1)
    old, old_client, old_side = connect(listener)
    old_client.send(FLAGS + b"1 x\n")
    await settle()
    clock.advance(HANDSHAKE_TIMEOUT + 1)
    new, new_client, _ = connect(listener)
    new_client.send(FLAGS + b"2 y\n")
    await settle()
    assert old_client.eof and old_side.closed and old.state is ConnState.CLOSED
    assert new.state is ConnState.ACTIVE and new_client.lines == ["2 y done"]
    assert listener.stats.connections == {"accepted": 2, "evicted_idle": 1}


async def test_a_client_that_does_not_read_its_replies_stops_being_read_until_it_does(clock: FakeClock) -> None:
    listener = listener_for()
    conn, client, server_side = connect(listener, reply_size=HIGH_WATER)
    assert client.transport is not None
    client.transport.pause_reading()  # the client reads no reply
    client.send(FLAGS + b"1 x\n")
    await settle()
    assert server_side.get_write_buffer_size() > HIGH_WATER  # the reply waits for the client ...
    assert not server_side.is_reading()  # ... and the connection is no longer read (pause_writing)
    client.send(b"2 y\n")
    await settle()
    assert conn.events == ["1 x"] and client.transport.get_write_buffer_size() == 4  # held in the client
    clock.advance(IDLE_TIMEOUT * 2)
    assert not conn.is_idle(clock.now(), IDLE_TIMEOUT)  # held back by us: not idle, whatever the time
    assert listener.sweep(clock.now()) == 0
    client.transport.resume_reading()
    await settle()
    assert conn.events == ["1 x", "2 y"] and server_side.is_reading()
    assert [line[:8] for line in client.lines] == ["1 x done", "2 y done"]


async def test_at_eof_the_last_unterminated_event_is_answered_then_the_node_side_closes(clock: FakeClock) -> None:
    listener = listener_for()
    conn, client, server_side = connect(listener)
    assert client.transport is not None
    client.send(FLAGS + b"1 x\n2 y")
    client.transport.write_eof()
    await settle()
    assert conn.events == ["1 x", "2 y"] and client.lines == ["1 x done", "2 y done"]
    assert client.eof and server_side.closed and conn.state is ConnState.CLOSED and not listener.active


async def test_eof_with_answers_outstanding_keeps_the_connection_until_they_are_sent(clock: FakeClock) -> None:
    listener = listener_for()
    conn, client, server_side = connect(listener, hold=True)
    assert client.transport is not None
    client.send(FLAGS + b"1 x\n2 y\n")
    client.transport.write_eof()
    await settle()
    assert conn.eof and conn.outstanding == 2
    assert not server_side.is_closing() and client.data == b"" and conn in listener.active
    clock.advance(IDLE_TIMEOUT * 2)
    assert listener.sweep(clock.now()) == 0  # owed answers: not idle either
    conn.answer_all()
    await settle()
    assert client.lines == ["1 x done", "2 y done"] and client.eof
    assert conn.state is ConnState.CLOSED and conn.closed_calls == 1 and not listener.active


async def test_a_client_gone_mid_event_is_counted(clock: FakeClock) -> None:
    listener = listener_for()
    conn, client, _ = connect(listener)
    assert client.transport is not None
    client.send(FLAGS + b"1 x\n2 unfinis")
    await settle()
    client.transport.abort()
    await settle()
    assert conn.events == ["1 x"] and conn.state is ConnState.CLOSED and conn.closed_calls == 1
    assert listener.stats.bad_input == {"disconnected_mid_event": 1}


class Deferred(Answering):
    """A connection whose scanner verdict comes later (a node's worker asks its master)."""

    detached_closed = 0

    def _answer(self, events: list[FramedEvent]) -> None:
        if self.transport is not None:  # detached: nobody to answer
            super()._answer(events)

    def on_detached_closed(self) -> None:
        self.detached_closed += 1


@pytest.mark.parametrize("ok", [True, False], ids=["granted", "refused"])
async def test_a_sender_gone_while_its_slot_is_asked_for_is_still_matched(clock: FakeClock, ok: bool) -> None:
    """A TLS shipper that sends and closes at once (close_notify cannot half-close) loses no event: what it sent
    is matched when the verdict comes; its replies go nowhere; the connection is then done."""
    listener = listener_for()
    listener.admit = lambda conn: None  # type: ignore[method-assign]
    conn = Deferred(listener)
    client = Recorder()
    server_side, _ = transport_pair(conn, client)
    client.send(b"X-KF-SendFinishedEvent\n1 abc\n2 def\n")
    await settle()
    assert conn._admitting is not None and not conn.events
    server_side.abort()  # the session ends before the verdict
    await settle()
    assert conn.detached and conn.transport is None
    conn.admitted(ok)
    assert conn.events == (["1 abc", "2 def"] if ok else [])
    assert conn.state is ConnState.CLOSED and conn.detached_closed == 1
    assert conn not in listener.active and conn.closed_calls == (1 if ok else 0)
