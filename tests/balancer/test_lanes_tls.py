"""Tests for threatgate.balancer.lanes_tls: lanes and health checks over TLS against local TLS servers.

The pin is saved on first use (0600) and compared before any byte is written: a server with another
certificate receives nothing, neither session flags nor PING; the balancer's client certificate is
presented to a server that requires one; a client pair that cannot be loaded names its files.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.config.configs import balancer_model, instance
from threatgate.balancer.lanes_tls import LaneOpener, _load_client, client_context
from threatgate.balancer.upstream import PING_FLAGS, UPSTREAM_FLAGS
from threatgate.config.balancer import InstanceSettings
from threatgate.errors import PinMismatch, TLSConfigError
from threatgate.net.tls import ensure_server_pair, fingerprint_sha256


def pair(directory: Path, name: str) -> tuple[str, str]:
    cert, key = str(directory / f"{name}.pem"), str(directory / f"{name}.key")
    ensure_server_pair(cert, key, common_name=name, hosts=["127.0.0.1"], client_auth=True)
    return cert, key


def fingerprint(cert: str) -> str:
    with open(cert, "rb") as fh:
        return fingerprint_sha256(fh.read())


class Node:
    """A TLS event port: records what it decrypts per connection, answers PONG to a PING."""

    def __init__(self, cert: str, key: str, *, client_ca: str | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        if client_ca is not None:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(client_ca)
        self.received: list[bytes] = []
        self.peers: list[bytes | None] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.received)
        self.received.append(b"")
        self.peers.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        try:
            while data := await reader.read(65536):
                self.received[index] += data
                if self.received[index] == PING_FLAGS:
                    writer.write(b"PONG")
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class Lane(asyncio.Protocol):
    """The lane's protocol as UpstreamProtocol behaves: writes the session flags in connection_made."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = b""
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(UPSTREAM_FLAGS)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


@pytest.fixture
async def opener(tmp_path: Path) -> AsyncIterator[LaneOpener]:
    config = balancer_model(tmp_path)
    config = config.model_copy(
        update={"cert_path": str(tmp_path / "b.pem"), "key_path": str(tmp_path / "b.key"), "cert_dir": str(tmp_path)}
    )
    config = config.model_copy(update={"client_cert_path": config.cert_path, "client_key_path": config.key_path})
    opener = LaneOpener(str(tmp_path / "pins"))
    await opener.start(config)  # makes the balancer's pair, as at its first start
    yield opener


def tls_instance(port: int) -> InstanceSettings:
    return instance(port, tls=True)


async def wait_received(node: Node, index: int, want: bytes) -> None:
    for _ in range(200):
        if len(node.received) > index and node.received[index] == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{node.received!r}")


async def test_first_contact_saves_the_pin_then_the_lane_writes_its_flags(opener: LaneOpener, tmp_path: Path) -> None:
    cert, key = pair(tmp_path, "node")
    node = Node(cert, key)
    settings = tls_instance(await node.start())
    try:
        transport, lane = await opener.open_lane(settings, Lane, 5.0)
        await wait_received(node, 0, UPSTREAM_FLAGS)
        pin_file = opener.pins.path(settings)
        assert stat.S_IMODE(os.stat(pin_file).st_mode) == 0o600
        assert opener.pins.load(settings).fingerprint == fingerprint(cert)  # type: ignore[union-attr]
        assert await opener.ping(settings, 5.0) is None  # the same pin, a PONG
        transport.close()
        await asyncio.wait_for(lane.lost.wait(), 5)
    finally:
        await node.close()


async def test_another_certificate_gets_no_byte_neither_flags_nor_ping(opener: LaneOpener, tmp_path: Path) -> None:
    cert, key = pair(tmp_path, "node")
    node = Node(cert, key)
    port = await node.start()
    settings = tls_instance(port)
    assert await opener.ping(settings, 5.0) is None  # first contact: the pin is the node's
    await node.close()
    mitm_cert, mitm_key = pair(tmp_path, "mitm")
    mitm = Node(mitm_cert, mitm_key)
    mitm.server = await asyncio.start_server(mitm._serve, "127.0.0.1", port, ssl=mitm.ctx)
    try:
        made: list[Lane] = []

        def factory() -> Lane:
            made.append(Lane())
            return made[-1]

        with pytest.raises(PinMismatch) as caught:
            await opener.open_lane(settings, factory, 5.0)
        assert made == []  # the lane's protocol never saw the connection
        error = await opener.ping(settings, 5.0)
        assert isinstance(error, PinMismatch)
        for exc in (caught.value, error):
            assert exc.expected == fingerprint(cert)
            assert exc.got == fingerprint(mitm_cert)
            assert exc.reason.startswith("certificate mismatch: pinned ")
        for _ in range(100):  # both connections reached the server and were closed there
            if len(mitm.received) == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert mitm.received == [b"", b""]  # not one byte decrypted
    finally:
        await mitm.close()


async def test_the_client_certificate_is_presented_to_a_node_that_requires_one(
    opener: LaneOpener, tmp_path: Path
) -> None:
    cert, key = pair(tmp_path, "node")
    node = Node(cert, key, client_ca=str(tmp_path / "b.pem"))  # only the balancer's own certificate
    settings = tls_instance(await node.start())
    try:
        assert await opener.ping(settings, 5.0) is None
        assert node.peers == [ssl.PEM_cert_to_DER_cert((tmp_path / "b.pem").read_text())]
    finally:
        await node.close()


async def test_a_plain_instance_is_reached_without_tls(opener: LaneOpener) -> None:
    received = asyncio.Queue[bytes]()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.put_nowait(await reader.read(100))
        writer.write(b"PONG")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    settings = instance(server.sockets[0].getsockname()[1])
    try:
        assert await opener.ping(settings, 5.0) is None
        assert await received.get() == PING_FLAGS
    finally:
        server.close()
        await server.wait_closed()


def test_a_client_pair_that_cannot_be_loaded_names_both_files(tmp_path: Path) -> None:
    cert, _ = pair(tmp_path, "one")
    _, other_key = pair(tmp_path, "two")
    with pytest.raises(TLSConfigError, match=rf"{cert} with key {other_key}.*ClientCertificatePath"):
        client_context(cert, other_key)
    with pytest.raises(TLSConfigError, match="missing.pem"):
        client_context(str(tmp_path / "missing.pem"), other_key)


async def test_a_named_client_pair_that_cannot_be_loaded_stops_the_start(tmp_path: Path) -> None:
    config = balancer_model(tmp_path).model_copy(
        update={"client_cert_path": str(tmp_path / "client.pem"), "client_key_path": str(tmp_path / "client.key")}
    )
    with pytest.raises(TLSConfigError, match=r"client\.pem with key .*client\.key"):
        await LaneOpener(str(tmp_path / "pins")).start(config)


def test_the_generated_balancer_pair_serves_as_a_client_certificate(tmp_path: Path) -> None:
    config = balancer_model(tmp_path).model_copy(
        update={"cert_path": str(tmp_path / "b.pem"), "key_path": str(tmp_path / "b.key")}
    )
    config = config.model_copy(update={"client_cert_path": config.cert_path, "client_key_path": config.key_path})
    _load_client(config)
    cert = x509.load_pem_x509_certificate((tmp_path / "b.pem").read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage and ExtendedKeyUsageOID.SERVER_AUTH in usage
