"""The gate of a listening port (net/gate.py): the source is refused before a byte is read, TLS handshakes
are bounded, timed and failures counted in words, and the port's own protocol sees a plain connection."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from threatgate.config.security import AllowedSources
from threatgate.net.gate import Gate, Gates, Listening
from threatgate.net.sources import SourceList
from threatgate.stats import BoundaryStats

log = logging.getLogger("test.gate")


class Upper(asyncio.Protocol):
    """The port's own protocol: answers every read in capitals; counts how many were made."""

    made = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).made += 1
        self.transport = transport
        self.peer = transport.get_extra_info("peername")

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[attr-defined]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    return ctx


Start = Callable[..., Awaitable[tuple[Gate, int]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    servers: list[Listening] = []
    Upper.made = 0

    async def run(**kwargs: object) -> tuple[Gate, int]:
        gate = Gate("events", stats=BoundaryStats(), log=log, **kwargs)  # type: ignore[arg-type]
        server = await gate.start_server(Upper, "127.0.0.1", 0)
        servers.append(server)
        return gate, server.sockets[0].getsockname()[1]

    yield run
    for server in servers:
        server.close()


async def roundtrip(port: int, ctx: ssl.SSLContext | None, *, source: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, local_addr=(source, 0))
    try:
        writer.write(b"event\n")
        return await asyncio.wait_for(reader.readexactly(6), 5)
    finally:
        writer.close()


async def test_tls_port_hands_a_plain_looking_connection_to_the_port(
    start: Start, ca: trustme.CA, server_context: ssl.SSLContext
) -> None:
    gate, port = await start(tls=server_context)
    assert await roundtrip(port, client_context(ca)) == b"EVENT\n"
    assert Upper.made == 1
    assert not gate.handshaking


@pytest.mark.parametrize("tls", [False, True])
async def test_a_source_outside_the_list_is_refused_before_a_byte_is_read(
    start: Start, ca: trustme.CA, server_context: ssl.SSLContext, tls: bool
) -> None:
    only = SourceList([ipaddress.ip_network("127.0.0.2/32")])
    gate, port = await start(sources=only, tls=server_context if tls else None)
    ctx = client_context(ca) if tls else None
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
        await roundtrip(port, ctx, source="127.0.0.1")
    assert Upper.made == 0
    assert gate.stats.connections == {"refused_source": 1}
    assert await roundtrip(port, ctx, source="127.0.0.2") == b"EVENT\n"
    assert Upper.made == 1


async def test_plain_text_on_a_tls_port_is_closed_and_counted(
    start: Start, server_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    gate, port = await start(tls=server_context)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"X-KF-ReplyBack\nhttp://example.com/\n")
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()
    assert Upper.made == 0
    assert sum(gate.stats.bad_input.values()) == 1
    assert "events port: TLS connection from 127.0.0.1 closed" in caplog.text


async def test_a_stalled_handshake_is_closed_at_the_timeout(start: Start, server_context: ssl.SSLContext) -> None:
    gate, port = await start(tls=server_context, handshake_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    assert 0.25 < loop.time() - began < 3
    writer.close()
    assert gate.stats.bad_input == {"tls_timeout": 1}  # named by the clock: both loops only say "aborted"


async def test_a_handshake_flood_evicts_the_oldest_and_a_real_client_gets_in(
    start: Start, ca: trustme.CA, server_context: ssl.SSLContext
) -> None:
    gate, port = await start(tls=server_context, max_handshakes=3, handshake_timeout=30)
    stalled = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for _ in range(100):  # the three are accepted and in their handshakes
        if len(gate.handshaking) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(gate.handshaking) == 3
    assert await roundtrip(port, client_context(ca)) == b"EVENT\n"
    first_reader, _ = stalled[0]
    assert await asyncio.wait_for(first_reader.read(100), 5) == b""  # the oldest made room
    assert gate.stats.connections.get("evicted_tls_handshake") == 1
    for _, writer in stalled:
        writer.close()


async def test_vet_refuses_a_client_after_the_handshake(
    start: Start, ca: trustme.CA, server_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    gate, port = await start(tls=server_context, vet=lambda ssl_object: "certificate not pinned")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
        await roundtrip(port, client_context(ca))
    assert Upper.made == 0
    assert gate.stats.bad_input == {"tls_client_cert_refused": 1}
    assert "certificate not pinned" in caplog.text


async def test_a_list_given_or_taken_at_run_time_applies_to_the_next_connection(start: Start) -> None:
    """A reload gives a port a list it had none of, then takes it away (Gates.apply): no restart."""
    gate, port = await start()
    assert await roundtrip(port, None) == b"EVENT\n" and gate.stats.connections == {}
    gates = Gates(gate.stats, log)
    gates.add(gate)
    only = AllowedSources(by_port=(("events", (ipaddress.ip_network("127.0.0.2/32"),)),))
    assert gates.apply(only, lambda port: 5.0) == ["events: 127.0.0.2/32"] and gate.handshake_timeout == 5.0
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await roundtrip(port, None, source="127.0.0.1")
    assert await roundtrip(port, None, source="127.0.0.2") == b"EVENT\n"
    assert gates.apply(AllowedSources(), lambda port: 5.0) == ["events: every source"]
    assert await roundtrip(port, None, source="127.0.0.1") == b"EVENT\n"
    assert gate.stats.connections == {"refused_source": 1}


async def test_serve_takes_a_socket_accepted_elsewhere(ca: trustme.CA, server_context: ssl.SSLContext) -> None:
    """A node's worker gets sockets its master accepted: the same checks apply."""
    Upper.made = 0
    gate = Gate("events", stats=BoundaryStats(), log=log, tls=server_context)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    loop = asyncio.get_running_loop()
    client = asyncio.create_task(roundtrip(port, client_context(ca)))
    conn, _ = await loop.sock_accept(listener)
    await gate.serve(conn, Upper)
    assert await client == b"EVENT\n"
    listener.close()


def test_the_same_on_uvloop(ca: trustme.CA, server_context: ssl.SSLContext) -> None:
    """uvloop differs where it matters here: its TLS handshake, and what ``connect_accepted_socket`` returns."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        Upper.made = 0
        gate = Gate("events", stats=BoundaryStats(), log=log, tls=server_context)
        server = await gate.start_server(Upper, "127.0.0.1", 0)
        assert await roundtrip(server.sockets[0].getsockname()[1], client_context(ca)) == b"EVENT\n"
        server.close()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        for vet, served in ((None, True), (lambda _: "not pinned", False)):
            gate.vet = vet
            client = asyncio.create_task(roundtrip(listener.getsockname()[1], client_context(ca)))
            conn, _ = await loop.sock_accept(listener)
            assert await gate.serve(conn, Upper) is served
            if served:
                assert await client == b"EVENT\n"
            else:
                with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
                    await client
        listener.close()
        assert Upper.made == 2

    uvloop.run(scenario())


async def test_a_burst_of_real_clients_waits_its_turn_instead_of_being_evicted(
    start: Start, ca: trustme.CA, server_context: ssl.SSLContext
) -> None:
    """A reconnect storm (every shipper back at once after a restart) past the handshake limit: newcomers wait in
    the kernel's backlog for a slot, none is evicted, every one is served."""
    gate, port = await start(tls=server_context, max_handshakes=4)
    answers = await asyncio.gather(*(roundtrip(port, client_context(ca)) for _ in range(60)))
    assert answers == [b"EVENT\n"] * 60
    assert "evicted_tls_handshake" not in gate.stats.connections and Upper.made == 60
