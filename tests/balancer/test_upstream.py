"""Tests for threatgate.balancer.upstream: a lane's connection hands on whole lines; the PING health check.

The lane protocol is fed bytes as a socket would deliver them (split anywhere); the health check runs
against real listening sockets on port 0.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from threatgate.balancer.upstream import MAX_REPLY_LINE, UPSTREAM_FLAGS, UpstreamProtocol, ping


class Host:
    """Records what a lane's connection reports (the balancer's edge implements the same port)."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.broken: list[str] = []
        self.lost: list[Exception | None] = []
        self.writable: list[bool] = []

    def lane_lines(self, upstream: UpstreamProtocol, data: bytes) -> None:
        self.reads.append(data)

    def lane_broken(self, upstream: UpstreamProtocol, why: str) -> None:
        self.broken.append(why)

    def lane_lost(self, upstream: UpstreamProtocol, exc: Exception | None) -> None:
        self.lost.append(exc)

    def lane_writable(self, upstream: UpstreamProtocol, writable: bool) -> None:
        self.writable.append(writable)


class Wire:
    def __init__(self) -> None:
        self.data = bytearray()
        self.high: int | None = None

    def write(self, data: bytes) -> None:
        self.data += data

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high


def connected() -> tuple[UpstreamProtocol, Host, Wire]:
    host, wire = Host(), Wire()
    upstream = UpstreamProtocol(host, "127.0.0.1:1#0")
    upstream.connection_made(wire)  # type: ignore[arg-type]
    return upstream, host, wire


def test_the_connection_opens_with_the_ha_flags() -> None:
    _, _, wire = connected()
    assert bytes(wire.data) == UPSTREAM_FLAGS == b"X-KF-SendFinishedEventX-KF-ReplyBack"
    assert wire.high == 8 * 1024 * 1024


@pytest.mark.parametrize("cut", [1, 5, 17, 18, 30])
def test_replies_are_handed_on_in_whole_lines_wherever_the_reads_split(cut: int) -> None:
    upstream, host, _ = connected()
    stream = b"1 LookupFinished\n2 category=x\r\n2 LookupFinished\n"
    upstream.data_received(stream[:cut])
    upstream.data_received(stream[cut:])
    assert b"".join(host.reads) == stream and all(read.endswith(b"\n") for read in host.reads)


def test_a_reply_line_without_end_is_a_broken_node() -> None:
    upstream, host, _ = connected()
    upstream.data_received(b"1 " + b"x" * (MAX_REPLY_LINE - 3))
    assert host.broken == [] and host.reads == []
    upstream.data_received(b"xx")
    assert host.broken == [f"reply line longer than {MAX_REPLY_LINE} bytes"]


def test_back_pressure_and_loss_are_reported() -> None:
    upstream, host, _ = connected()
    upstream.pause_writing()
    upstream.resume_writing()
    upstream.connection_lost(None)
    assert host.writable == [False, True] and host.lost == [None] and upstream.transport is None


async def serve(answer: bytes | None) -> tuple[asyncio.Server, int, list[asyncio.Event]]:
    """A listener on port 0 that answers ``answer`` to the PING (None: never answers); each connection's
    event is set once it is closed (the test waits for them: nothing left open)."""
    done: list[asyncio.Event] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        closed = asyncio.Event()
        done.append(closed)
        try:
            await reader.read(64)
            if answer is not None:
                writer.write(answer)
                await writer.drain()
            else:
                await reader.read()  # until the health check gives up and closes
        finally:
            writer.close()
            closed.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], done


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"PONG", None),
        (b"HTTP/1.1 400 Bad Request\r\n", 'answered "HTTP/1.1 400 Bad Req" instead of PONG'),
        (None, "no PONG within 1 s"),
    ],
)
async def test_the_health_check(answer: bytes | None, error: Any) -> None:
    server, port, done = await serve(answer)
    async with server:
        got = await ping("127.0.0.1", port, 0.5 if answer is None else 5.0)
        await asyncio.wait_for(asyncio.gather(*(closed.wait() for closed in done)), 5)
    if answer is None:
        assert got is not None and got.startswith("no PONG within")
    else:
        assert got == error


async def test_the_health_check_of_a_port_nobody_listens_on() -> None:
    server, port, _ = await serve(b"PONG")
    server.close()
    await server.wait_closed()
    got = await ping("127.0.0.1", port, 5.0)
    assert got is not None and got.startswith("cannot connect: ")
