"""Tests for threatgate.net.pinned: the pin is checked before a request byte, connections are reused under
their pin only, and every failure is an UpstreamFailed in words (against a local TLS server)."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

from threatgate.errors import MalformedAnswer, PeerCertificateMismatch, UpstreamFailed
from threatgate.net import pinned
from threatgate.net.pinned import PinnedPool, client_context

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Node: here\r\n\r\nok"


class Server:
    """A TLS server on 127.0.0.1 that answers each request with ``reply`` (None: never answers)."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("127.0.0.1")
        self.reply: bytes | None = ANSWER
        self.close_after_request = False
        self.received: list[bytes] = []  # application bytes, per connection
        self.accepted = 0
        self.server: asyncio.Server | None = None

    @property
    def pin(self) -> bytes:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(self.cert.cert_chain_pems[0].bytes().decode())).digest()

    async def start(self) -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.cert.configure_cert(ctx)
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        index = len(self.received)
        self.received.append(b"")
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.received[index] += data
                if not data.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in data:
                    continue
                if self.close_after_request:
                    break
                if self.reply is not None:
                    writer.write(self.reply)
                    if b"Connection: close" in self.reply:
                        await writer.drain()
                        break
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, PinnedPool]]:
    srv = Server()
    port = await srv.start()
    pool = PinnedPool("127.0.0.1", port, client_context())
    yield srv, pool
    pool.close()
    await srv.close()


async def test_requests_share_one_verified_connection(server: tuple[Server, PinnedPool]) -> None:
    srv, pool = server
    for _ in range(5):
        answer = await pool.request(srv.pin, "POST", "/api/1.1/lookup", {"X-Real-IP": "192.0.2.1"}, b"[]", 5.0)
        assert (answer.status, answer.body, ("X-Node", "here") in answer.headers) == (200, b"ok", True)
    assert (pool.connects, srv.accepted, pool.idle) == (1, 1, 1)
    assert srv.received[0].count(b"POST /api/1.1/lookup HTTP/1.1\r\n") == 5
    assert (
        f"Host: 127.0.0.1:{pool.port}\r\nX-Real-IP: 192.0.2.1\r\nContent-Length: 2\r\n\r\n[]".encode()
        in (srv.received[0])
    )


async def test_another_certificate_gets_no_request_byte(server: tuple[Server, PinnedPool]) -> None:
    srv, pool = server
    with pytest.raises(PeerCertificateMismatch) as caught:
        await pool.request(b"\x01" * 32, "GET", "/api/1.1/suppliers", {}, b"", 5.0)
    assert (caught.value.expected, caught.value.got) == (b"\x01" * 32, srv.pin)
    for _ in range(100):  # the server sees the close
        if srv.accepted and srv.received:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert srv.accepted == 1 and srv.received == [b""] and pool.idle == 0


async def test_a_connection_is_reused_only_under_the_pin_it_was_checked_against(
    server: tuple[Server, PinnedPool],
) -> None:
    srv, pool = server
    await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)
    with pytest.raises(PeerCertificateMismatch):  # a renewed pin: the kept connection is not used for it
        await pool.request(b"\x02" * 32, "GET", "/", {}, b"", 5.0)
    assert pool.connects == 2
    await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)  # and the old one was closed, not kept aside
    assert pool.connects == 3 and pool.idle == 1


async def test_a_connection_idle_too_long_is_not_reused(
    server: tuple[Server, PinnedPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ours expire before the node's (75 s): a kept connection is never one the node is closing."""
    srv, pool = server
    await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)
    monkeypatch.setattr(pinned, "IDLE", -1.0)
    await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)
    assert pool.connects == 2 and pool.idle == 1


async def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped(server: tuple[Server, PinnedPool]) -> None:
    srv, pool = server
    srv.reply = None
    with pytest.raises(UpstreamFailed, match="^timed out$"):
        await pool.request(srv.pin, "GET", "/", {}, b"", 0.2)
    assert pool.idle == 0
    srv.reply = ANSWER
    assert (await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)).status == 200
    assert pool.connects == 2


async def test_a_close_before_the_answer_says_so(server: tuple[Server, PinnedPool]) -> None:
    srv, pool = server
    srv.close_after_request = True
    with pytest.raises(UpstreamFailed, match="the connection was closed before the whole answer arrived"):
        await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)
    srv.close_after_request = False
    srv.reply = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nshort"
    with pytest.raises(UpstreamFailed, match="the answer was cut short"):
        await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)
    assert pool.idle == 0


async def test_a_malformed_answer_drops_the_connection(server: tuple[Server, PinnedPool]) -> None:
    srv, pool = server
    srv.reply = b"not http at all\r\n\r\n"
    with pytest.raises(MalformedAnswer, match="malformed answer"):
        await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)
    assert pool.idle == 0


async def test_an_answer_with_connection_close_is_not_reused(server: tuple[Server, PinnedPool]) -> None:
    srv, pool = server
    srv.reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    for _ in range(3):
        assert (await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)).body == b"ok"
    assert pool.connects == 3 and pool.idle == 0


async def test_no_server_is_cannot_connect(server: tuple[Server, PinnedPool]) -> None:
    srv, pool = server
    await srv.close()
    with pytest.raises(UpstreamFailed, match="^cannot connect: Connection refused$"):
        await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)


async def test_at_most_limit_connections_and_the_others_wait(server: tuple[Server, PinnedPool]) -> None:
    srv, _ = server
    pool = PinnedPool("127.0.0.1", pool_port(srv), client_context(), limit=2)
    answers = await asyncio.gather(*(pool.request(srv.pin, "GET", "/", {}, b"", 5.0) for _ in range(10)))
    assert [a.status for a in answers] == [200] * 10
    assert pool.connects == 2 and pool.idle == 2
    pool.close()


async def test_a_cancelled_request_does_not_leave_its_connection_in_the_pool(
    server: tuple[Server, PinnedPool],
) -> None:
    srv, pool = server
    srv.reply = None
    task = asyncio.create_task(pool.request(srv.pin, "GET", "/", {}, b"", 5.0))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.idle == 0
    srv.reply = ANSWER
    assert (await pool.request(srv.pin, "GET", "/", {}, b"", 5.0)).status == 200


def pool_port(srv: Server) -> int:
    assert srv.server is not None
    return int(srv.server.sockets[0].getsockname()[1])
