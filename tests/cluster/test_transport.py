"""cluster/transport.py: mutually authenticated, pinned HTTPS between cluster nodes.

Two node identities are made as a cluster node makes its own (self-signed, clientAuth), and one node's
cluster port runs in process on 127.0.0.1 port 0.  What must hold: a call trusts exactly the pinned peer
certificate and presents the caller's own, which the server reads back as the caller's node id; a member
the server does not list is refused at the handshake; every failure is a ClusterError with the status the
cluster API answers (503 unreachable or refused, 502 not JSON).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from threatgate.cluster.transport import (
    PeerClient,
    client_context,
    cluster_server_context,
    request_fingerprint,
)
from threatgate.errors import ClusterError
from threatgate.net.tls import PairInfo, ensure_server_pair


def identity(tmp_path: Path, name: str) -> tuple[PairInfo, str]:
    pair = ensure_server_pair(
        str(tmp_path / f"{name}.pem"),
        str(tmp_path / f"{name}.key"),
        common_name=f"threatgate cluster node {name}",
        hosts=["127.0.0.1", "localhost"],
        client_auth=True,
    )
    return pair, Path(pair.cert_path).read_text(encoding="ascii")


class Port:
    """A node's cluster port: answers who called (by certificate), or a body that is not JSON, or nothing."""

    def __init__(self, server: PairInfo, members: list[str]) -> None:
        self.server, self.members = server, members
        self.address = ""

    async def who(self, request: web.Request) -> web.Response:
        return web.json_response({"caller": request_fingerprint(request), "body": await request.text()})

    async def garbage(self, request: web.Request) -> web.Response:
        return web.Response(status=500, text="<html>oops</html>")

    async def empty(self, request: web.Request) -> web.Response:
        return web.Response(status=204)


Rig = tuple[Port, tuple[PairInfo, str], tuple[PairInfo, str]]
"""The served port, the server's identity and the caller's (each a pair and its certificate PEM)."""


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[Rig]:
    server, caller = identity(tmp_path, "server"), identity(tmp_path, "caller")
    served = Port(server[0], [caller[1]])
    app = web.Application()
    app.router.add_post("/cluster/v1/who", served.who)
    app.router.add_get("/garbage", served.garbage)
    app.router.add_get("/empty", served.empty)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = cluster_server_context(server[0].cert_path, server[0].key_path, served.members)
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    host, number = runner.addresses[0][:2]
    served.address = f"{host}:{number}"
    try:
        yield served, server, caller
    finally:
        await runner.cleanup()


async def test_a_call_reaches_the_pinned_peer_which_sees_the_callers_node_id(
    port: Rig,
) -> None:
    served, (_, server_pem), (caller, _) = port
    client = PeerClient(caller.cert_path, caller.key_path, timeout=5)
    try:
        status, body = await client.call(served.address, server_pem, "POST", "/cluster/v1/who", {"a": 1})
        assert (status, body) == (200, {"caller": caller.fingerprint_sha256, "body": '{"a": 1}'})
        status, body = await client.call(served.address, server_pem, "POST", "/cluster/v1/who", raw=b"raw")
        assert body["body"] == "raw"
        assert await client.call(served.address, server_pem, "GET", "/empty") == (204, None)
        with pytest.raises(ClusterError) as not_json:
            await client.call(served.address, server_pem, "GET", "/garbage")
        assert (str(not_json.value), not_json.value.status) == (
            f"{served.address}: answered 500 with a body that is not JSON",
            502,
        )
    finally:
        await client.aclose()
        await client.aclose()  # twice is harmless


async def test_another_certificate_at_the_address_is_refused_before_any_request(tmp_path: Path, port: Rig) -> None:
    served, _, (caller, _) = port
    _, impostor_pem = identity(tmp_path, "impostor")  # what the caller expected at that address
    client = PeerClient(caller.cert_path, caller.key_path, timeout=5)
    try:
        with pytest.raises(ClusterError) as refused:
            await client.call(served.address, impostor_pem, "POST", "/cluster/v1/who", {})
        assert refused.value.status == 503 and str(refused.value).startswith(f"{served.address}: ")
    finally:
        await client.aclose()


async def test_a_caller_the_server_does_not_list_is_refused_at_the_handshake(tmp_path: Path, port: Rig) -> None:
    served, (_, server_pem), _ = port
    stranger, _ = identity(tmp_path, "stranger")
    client = PeerClient(stranger.cert_path, stranger.key_path, timeout=5)
    try:
        with pytest.raises(ClusterError) as refused:
            await client.call(served.address, server_pem, "POST", "/cluster/v1/who", {})
        assert refused.value.status == 503
    finally:
        await client.aclose()


async def test_an_unreachable_peer_is_503(tmp_path: Path) -> None:
    caller, pem = identity(tmp_path, "caller")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening: refused
        client = PeerClient(caller.cert_path, caller.key_path, timeout=5)
        try:
            with pytest.raises(ClusterError) as refused:
                await client.call(address, pem, "GET", "/cluster/v1/status")
            assert refused.value.status == 503 and str(refused.value).startswith(f"{address}: ")
        finally:
            await client.aclose()


def test_client_contexts_pin_one_certificate_or_none_for_a_join(tmp_path: Path) -> None:
    caller, _ = identity(tmp_path, "caller")
    _, peer_pem = identity(tmp_path, "peer")
    pinned = client_context(caller.cert_path, caller.key_path, peer_pem)
    assert (pinned.verify_mode, pinned.check_hostname) == (ssl.CERT_REQUIRED, False)
    assert pinned.minimum_version == ssl.TLSVersion.TLSv1_2
    assert pinned.cert_store_stats()["x509"] == 1
    join = client_context(caller.cert_path, caller.key_path, None)
    assert join.verify_mode == ssl.CERT_NONE and join.cert_store_stats()["x509"] == 0
    server = cluster_server_context(caller.cert_path, caller.key_path, [peer_pem])
    assert server.verify_mode == ssl.CERT_OPTIONAL  # join works without a certificate


def test_a_peer_client_keeps_one_context_per_peer(tmp_path: Path) -> None:
    caller, _ = identity(tmp_path, "caller")
    (_, one), (_, two) = identity(tmp_path, "one"), identity(tmp_path, "two")
    client = PeerClient(caller.cert_path, caller.key_path, timeout=5)
    assert client._context(one) is client._context(one)
    assert client._context(two) is not client._context(one)
