"""Tests for threatgate.net.sender: the line queue's bounds, drop reporting in lines, and real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from threatgate.config.common import Address
from threatgate.config.destinations import Destination, DestinationTLS
from threatgate.net.sender import (
    QUEUE_FULL,
    RETRIES_EXHAUSTED,
    SHUTDOWN,
    Dropped,
    DropTally,
    LineQueue,
    LineSender,
)


def closed_port() -> int:
    """A port nobody listens on (connects are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lines(first: int, count: int) -> bytes:
    return b"".join(b"detection %d\n" % i for i in range(first, first + count))


class Sink:
    """A real TCP destination on 127.0.0.1 collecting what it receives."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.got = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> Address:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(65536):
                self.data += chunk
                self.got.set()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", port)
        return Address("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def wait_lines(self, count: int) -> list[bytes]:
        async with asyncio.timeout(10):
            while self.data.count(b"\n") < count:
                self.got.clear()
                await self.got.wait()
        return bytes(self.data).splitlines()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class FirstFailure(logging.Handler):
    """Set once a sender logs its first failed attempt ("cannot send to ...")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = asyncio.Event()
        self.logger = logging.getLogger("threatgate.net")

    def emit(self, record: logging.LogRecord) -> None:
        if "cannot send to" in record.getMessage():
            self.seen.set()

    async def __aenter__(self) -> FirstFailure:
        self.logger.addHandler(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)

    async def wait(self) -> None:
        async with asyncio.timeout(10):
            await self.seen.wait()


# -- LineQueue (sans-IO) ---------------------------------------------------------------------------


def test_queue_is_bounded_in_lines_and_refuses_the_newest() -> None:
    q = LineQueue(max_bytes=1 << 20, max_lines=3)
    assert q.offer(lines(0, 2)) and q.offer(lines(2, 1))
    assert q.full and (q.lines, len(q)) == (3, 2)
    assert not q.offer(lines(3, 1))  # refused: what is queued stays, the newest is not taken
    assert (q.lines, q.bytes) == (3, len(lines(0, 3)))


def test_queue_is_bounded_in_bytes() -> None:
    q = LineQueue(max_bytes=20, max_lines=1000)
    assert q.offer(b"x" * 25 + b"\n")  # below the bound when offered: taken whole
    assert q.full and not q.offer(b"y\n")


def test_batch_then_settle_removes_exactly_the_batch() -> None:
    q = LineQueue(max_bytes=1 << 20, max_lines=100)
    q.offer(lines(0, 2))
    q.offer(lines(2, 3))
    batch = q.take_batch()
    q.offer(lines(5, 4))  # arrives while the batch is out: waits behind it
    assert batch == lines(0, 5)
    assert q.settle() == (5, len(batch))
    assert (q.lines, q.bytes) == (4, len(lines(5, 4)))
    assert q.take_batch() == lines(5, 4)
    q.force(lines(9, 1))  # handed over past the bound
    assert q.clear() == [lines(5, 4), lines(9, 1)] and (q.lines, q.bytes, len(q)) == (0, 0, 0)


def test_drop_tally_releases_at_most_once_per_interval_and_never_forgets() -> None:
    tally = DropTally(interval=60)
    assert tally.add("d", RETRIES_EXHAUSTED, 5, now=0) == 5  # first: at once
    assert tally.add("d", RETRIES_EXHAUSTED, 7, now=10) == 0  # held
    assert tally.add("d", SHUTDOWN, 1, now=11) == 1  # another reason is another alert
    assert tally.add("d", RETRIES_EXHAUSTED, 2, now=20) == 0
    assert tally.next_due() == 60
    assert tally.due(59) == []
    assert tally.due(60) == [("d", RETRIES_EXHAUSTED, 9)]  # the held lines, in one alert
    assert tally.next_due() is None
    assert tally.add("d", RETRIES_EXHAUSTED, 3, now=121) == 3


# -- LineSender on real sockets --------------------------------------------------------------------


async def test_lines_reach_a_real_destination() -> None:
    sink = Sink()
    address = await sink.start()
    drops: list[Dropped] = []
    sender = LineSender(address, name="detections", on_drop=drops.append)
    sender.start()
    try:
        assert sender.send(lines(0, 3)) and sender.send(lines(3, 2))
        assert await sink.wait_lines(5) == lines(0, 5).splitlines()
    finally:
        await sender.aclose()
        await sink.close()
    assert drops == [] and sender.queued_lines == 0


async def test_a_closed_port_past_the_retries_drops_the_lines_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = Address("127.0.0.1", closed_port())
    drops: list[Dropped] = []
    dropped_once = asyncio.Event()

    def on_drop(d: Dropped) -> None:
        drops.append(d)
        dropped_once.set()

    sender = LineSender(address, name="detections", retries=2, retry_timeout=0.01, on_drop=on_drop)
    sender.start()
    with caplog.at_level(logging.WARNING, logger="threatgate.net"):
        sender.send(lines(0, 7))
        async with asyncio.timeout(10):
            await dropped_once.wait()
        await sender.aclose()
    [dropped] = drops
    assert (dropped.destination, dropped.address, dropped.reason) == ("detections", address, RETRIES_EXHAUSTED)
    assert (dropped.lines, dropped.bytes) == (7, len(lines(0, 7)))
    assert dropped.error.startswith("3 attempt(s), last: ")
    assert sender.queued_lines == 0 and sender.dropped_lines == 7
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"detections: 7 line(s) ({len(lines(0, 7))} bytes) dropped for {address}: {RETRIES_EXHAUSTED} ({dropped.error})"
    ]
    assert sum("retry" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 2


async def test_a_full_queue_drops_the_newest_in_lines() -> None:
    drops: list[Dropped] = []
    sender = LineSender(
        Address("127.0.0.1", closed_port()), name="alerts", retries=None, max_queue_lines=4, on_drop=drops.append
    )  # not started: nothing leaves the queue
    assert sender.send_or_drop(lines(0, 4))
    assert not sender.send_or_drop(lines(4, 3))
    assert [(d.reason, d.lines) for d in drops] == [(QUEUE_FULL, 3)]
    assert not sender.send(lines(7, 1))  # plain send: refused, not counted (the caller waits)
    assert len(drops) == 1
    await sender.aclose()
    assert [(d.reason, d.lines) for d in drops] == [(QUEUE_FULL, 3), (SHUTDOWN, 4)]


async def test_closing_while_the_destination_is_down_drops_with_reason_shutdown() -> None:
    drops: list[Dropped] = []
    sender = LineSender(
        Address("127.0.0.1", closed_port()), name="detections", retries=3, retry_timeout=30, on_drop=drops.append
    )
    async with FirstFailure() as failed:
        sender.start()
        sender.send(lines(0, 5))
        await failed.wait()
    sender.send(lines(5, 2))
    await sender.aclose(flush_timeout=0.2)
    assert [(d.reason, d.lines) for d in drops] == [(SHUTDOWN, 7)]


@pytest.mark.parametrize("retries", [3, None])
async def test_closing_while_waiting_to_retry_tries_once_more_at_once_then_gives_up(retries: int | None) -> None:
    """A node stopping with its destination down does not wait for the whole flush timeout (its DrainTimeout)."""
    drops: list[Dropped] = []
    sender = LineSender(
        Address("127.0.0.1", closed_port()), name="detections", retries=retries, retry_timeout=30, on_drop=drops.append
    )
    async with FirstFailure() as failed:
        sender.start()
        sender.send(lines(0, 5))
        await failed.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await sender.aclose(flush_timeout=20)
    assert loop.time() - started < 2
    assert [(d.reason, d.lines) for d in drops] == [(SHUTDOWN, 5)]


async def test_closing_while_waiting_to_retry_delivers_to_a_destination_that_is_back() -> None:
    sink = Sink()
    address = Address("127.0.0.1", closed_port())
    drops: list[Dropped] = []
    sender = LineSender(address, name="detections", retries=3, retry_timeout=30, on_drop=drops.append)
    try:
        async with FirstFailure() as failed:
            sender.start()
            sender.send(lines(0, 5))
            await failed.wait()
        await sink.start(address.port)  # back, while the sender waits 30 s to retry
        await sender.aclose(flush_timeout=20)
        assert await sink.wait_lines(5) == lines(0, 5).splitlines() and drops == []
    finally:
        await sink.close()


async def test_a_successor_takes_over_what_a_closing_sender_could_not_deliver() -> None:
    sink = Sink()
    new_address = await sink.start()
    drops: list[Dropped] = []
    old = LineSender(
        Address("127.0.0.1", closed_port()), name="detections", retries=3, retry_timeout=30, on_drop=drops.append
    )
    new = LineSender(new_address, name="detections", on_drop=drops.append)
    old.start()
    new.start()
    released: list[bool] = []
    old.when_drained(lambda: released.append(True))
    try:
        async with FirstFailure() as failed:
            old.send(lines(0, 4))
            await failed.wait()
        new.send(lines(4, 1))
        await old.aclose(flush_timeout=0.2, successor=new)
        assert released == [True]  # paused readers go on (with the successor)
        got = await sink.wait_lines(5)
    finally:
        await new.aclose()
        await sink.close()
    assert sorted(got) == sorted(lines(0, 5).splitlines()) and drops == []


async def test_a_destination_that_closed_the_connection_gets_the_next_batch_on_a_new_one() -> None:
    """A destination (a SIEM restarting, an idle timeout) closes the connection after the first batch: the
    next batch goes over a new connection instead of into the closed socket, where it was silently lost."""
    received: list[bytes] = []
    connections = 0
    first_closed = asyncio.Event()
    second_line = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            received.append(await reader.readline())
            writer.close()  # drop the connection after one line
            await writer.wait_closed()
            first_closed.set()
            return
        while line := await reader.readline():
            received.append(line)
            second_line.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    address = Address("127.0.0.1", server.sockets[0].getsockname()[1])
    drops: list[Dropped] = []
    sender = LineSender(address, name="detections", on_drop=drops.append)
    sender.start()
    try:
        assert sender.send(b"one\n")
        await asyncio.wait_for(first_closed.wait(), 10)
        for _ in range(100):  # the sender sees the close (its reader gets EOF)
            if sender._writer is None:
                break
            await asyncio.sleep(0.01)
        assert sender.send(b"two\n")
        await asyncio.wait_for(second_line.wait(), 10)
    finally:
        await sender.aclose()
        server.close()
        await server.wait_closed()
    assert received == [b"one\n", b"two\n"] and connections == 2 and drops == []


# -- TLS destinations (tls="true" with fingerprint= or ca=) -------------------------------------------------


class TLSSink(Sink):
    """A TLS destination (a trustme certificate for 127.0.0.1) recording what it decrypts."""

    def __init__(self, ca: trustme.CA) -> None:
        super().__init__()
        self.cert = ca.issue_cert("127.0.0.1")
        self.connections = 0

    @property
    def sha256(self) -> bytes:
        pem = self.cert.cert_chain_pems[0].bytes().decode()
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest()

    async def start(self, port: int = 0) -> Address:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.cert.configure_cert(ctx)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            with contextlib.suppress(OSError):
                while chunk := await reader.read(65536):
                    self.data += chunk
                    self.got.set()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
        return Address("127.0.0.1", self.server.sockets[0].getsockname()[1])


async def send_over_tls(sink: TLSSink, tls: DestinationTLS, count: int) -> list[Dropped]:
    plain = await sink.start()
    drops: list[Dropped] = []
    done = asyncio.Event()

    def dropped(d: Dropped) -> None:
        drops.append(d)
        done.set()

    sender = LineSender(
        Destination(plain.host, plain.port, tls), name="detections", retries=0, retry_timeout=0.01, on_drop=dropped
    )
    sender.start()
    try:
        sender.send(lines(0, count))
        sender.when_drained(done.set)
        async with asyncio.timeout(10):
            await done.wait()  # delivered (the queue settled) or dropped
        if not drops:
            await sink.wait_lines(count)
    finally:
        await sender.aclose()
        await sink.close()
    return drops


async def test_lines_reach_a_tls_destination_whose_certificate_is_pinned() -> None:
    sink = TLSSink(trustme.CA())
    assert await send_over_tls(sink, DestinationTLS(sha256=sink.sha256), 5) == []
    assert bytes(sink.data) == lines(0, 5)


async def test_a_tls_destination_with_another_certificate_gets_no_byte(caplog: pytest.LogCaptureFixture) -> None:
    sink = TLSSink(trustme.CA())
    with caplog.at_level(logging.ERROR, logger="threatgate.net"):
        [dropped] = await send_over_tls(sink, DestinationTLS(sha256=b"\xab" * 32), 5)
    assert sink.connections >= 1 and bytes(sink.data) == b""  # handshakes, not one line
    assert dropped.reason == RETRIES_EXHAUSTED and "certificate mismatch: pinned AB:AB:" in dropped.error
    presented = ":".join(f"{b:02X}" for b in sink.sha256)
    assert any(f"presented {presented}; nothing sent" in r.getMessage() for r in caplog.records)


async def test_a_tls_destination_is_verified_by_its_ca_and_host(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sink = TLSSink(ca)
    assert await send_over_tls(sink, DestinationTLS(ca_file=str(ca_file)), 3) == []
    assert bytes(sink.data) == lines(0, 3)
    stranger = TLSSink(trustme.CA())  # another CA issued its certificate
    [dropped] = await send_over_tls(stranger, DestinationTLS(ca_file=str(ca_file)), 3)
    assert bytes(stranger.data) == b"" and "certificate verify failed" in dropped.error
