"""Tests for threatgate.net.describe: failures and answers in words, never Python internals.

Real failures where they are cheap (a refused connection, a TLS server with an unknown CA, a name that
does not resolve), so the tests follow aiohttp's and asyncio's texts as they change.
"""

from __future__ import annotations

import asyncio
import errno
import re
import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest
import trustme

from threatgate.errors import ClusterError
from threatgate.net.describe import body_text, describe, printable

INTERNALS = re.compile(r"<\w[\w.]* object at 0x|\(_ssl\.c:\d+\)|Error\b|Exception\b|\[\{'|\{'|\('[\d.]+', \d+\)")
"""What must never reach an operator: object reprs, ssl's C source lines, class names, Python containers."""


async def refused_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


@pytest.fixture
async def tls_port() -> AsyncIterator[int]:
    """A TLS server whose certificate no client here trusts."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(ctx)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=ctx)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


async def aiohttp_failure(url: str, **kwargs: object) -> BaseException:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError) as excinfo:
            await session.get(url, **kwargs)  # type: ignore[arg-type]
    return excinfo.value


async def test_aiohttp_connection_refused_reads_as_the_system_says() -> None:
    """aiohttp's own text is ``Cannot connect to host ... ssl:<ssl.SSLContext object at 0x...> [...]``."""
    port = await refused_port()
    exc = await aiohttp_failure(f"https://127.0.0.1:{port}/", ssl=ssl.create_default_context())
    assert "object at 0x" in str(exc)  # what would have been printed
    assert describe(exc) == "cannot connect: Connection refused"


async def test_asyncio_connection_refused_has_no_address_tuple() -> None:
    port = await refused_port()
    with pytest.raises(OSError) as excinfo:
        await asyncio.open_connection("127.0.0.1", port)
    assert describe(excinfo.value) == "Connection refused"


async def test_a_port_in_use_names_the_address_without_a_tuple() -> None:
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(taken.sockets[0].getsockname()[1])
    try:
        with pytest.raises(OSError) as excinfo:
            await asyncio.start_server(lambda r, w: None, "127.0.0.1", port, reuse_address=True)
    finally:
        taken.close()
    assert "('127.0.0.1'," in str(excinfo.value)  # what would have been printed
    assert describe(excinfo.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"


async def test_an_untrusted_certificate(tls_port: int) -> None:
    exc = await aiohttp_failure(f"https://127.0.0.1:{tls_port}/", ssl=ssl.create_default_context())
    assert describe(exc) == "TLS: certificate verify failed: unable to get local issuer certificate"


async def test_a_pinned_fingerprint_mismatch(tls_port: int) -> None:
    exc = await aiohttp_failure(f"https://127.0.0.1:{tls_port}/", ssl=aiohttp.Fingerprint(bytes(32)))
    text = describe(exc)
    assert re.fullmatch(r"TLS: the certificate presented has SHA-256 [0-9A-F:]{95}, not the pinned (00:){31}00", text)


async def test_a_name_that_does_not_resolve() -> None:
    exc = await aiohttp_failure("http://nonexistent.invalid/")
    assert describe(exc).startswith("cannot connect: cannot resolve the host name")


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (TimeoutError(), "timed out"),
        (aiohttp.ServerTimeoutError(), "timed out"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "Connection reset by peer"),
        (
            OSError(
                "Multiple exceptions: [Errno 111] Connect call failed ('::1', 9, 0, 0), "
                "[Errno 111] Connect call failed ('127.0.0.1', 9)"
            ),
            "Connection refused",
        ),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"), "/x/y: No such file or directory"),
        (aiohttp.ServerDisconnectedError(), "the connection was closed before the whole answer arrived"),
        (ClusterError("the Control node is away"), "the Control node is away"),
        (
            ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)"),
            "TLS: wrong version number",
        ),
        (ValueError(), "failed"),
        (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"), "not UTF-8 (byte 2)"),
        (RuntimeError("first line\nsecond line"), "first line"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_describe(exc: BaseException, text: str) -> None:
    assert describe(exc) == text
    assert not INTERNALS.search(describe(exc))


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ([{"status": "authentication required"}], "authentication required"),
        (b'[{"status": "authentication required"}]', "authentication required"),
        ({"error": "not a member", "status": {"role": "control"}}, "not a member"),  # a cluster answer
        ([{"status": "a"}, {"status": "b"}], "a; b"),
        ([{"name": "x"}], '[{"name": "x"}]'),  # JSON, never a Python repr
        (b"<html>502 Bad Gateway</html>\n", '"<html>502 Bad Gateway</html>\\n"'),
        ("plain", "plain"),
    ],
)
def test_body_text(body: object, text: str) -> None:
    assert body_text(body) == text


def test_printable_quotes_and_escapes_what_a_peer_sent() -> None:
    assert printable(b"HTTP/1.1 400 Bad Request\r\n\x00", 40) == '"HTTP/1.1 400 Bad Request\\r\\n\\u0000"'
    assert printable(b"\xff" * 50, 2) == '"\ufffd\ufffd"'
