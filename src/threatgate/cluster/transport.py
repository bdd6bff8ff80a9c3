"""Mutually authenticated HTTPS between cluster nodes (and from the local CLI to its node).

Every node has a self-signed cluster certificate; its SHA-256 fingerprint is its node id.  Trust is
pinned, not delegated to a CA:

- as a client, a node trusts exactly the member certificate it expects at that address
  (``cadata`` holds that one certificate, hostname checks are off because the pin is stronger) and
  presents its own;
- as a server, a node asks for a client certificate (optional, so ``join`` works without one),
  accepts only certificates of members at the TLS layer, and checks the fingerprint against the
  current member list on every request, so a removed member is refused at once.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp
from aiohttp.web_request import BaseRequest

from threatgate.errors import ClusterError
from threatgate.net.describe import describe
from threatgate.net.tls import fingerprint_sha256, server_context


def client_context(cert_path: str, key_path: str, peer_cert_pem: str | None) -> ssl.SSLContext:
    """A TLS client context presenting our cluster certificate and trusting only ``peer_cert_pem``.

    ``peer_cert_pem`` None is the join case: no certificate is trusted by the context, the caller
    checks the fingerprint it was given out of band (:func:`peer_fingerprint`).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    if peer_cert_pem is None:
        ctx.verify_mode = ssl.CERT_NONE  # pinned by fingerprint right after the handshake
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=peer_cert_pem)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def cluster_server_context(cert_path: str, key_path: str, member_pems: list[str]) -> ssl.SSLContext:
    ctx = server_context(cert_path, key_path)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    for pem in member_pems:
        ctx.load_verify_locations(cadata=pem)
    return ctx


def request_fingerprint(request: BaseRequest) -> str | None:
    """The SHA-256 fingerprint of the client certificate on this request's connection, if any."""
    transport = request.transport
    if transport is None:
        return None
    obj = transport.get_extra_info("ssl_object")
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    return fingerprint_sha256(der) if der else None


class PeerClient:
    """Calls other nodes' cluster ports; one pooled session, one pinned context per peer."""

    def __init__(self, cert_path: str, key_path: str, timeout: float) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._contexts: dict[tuple[str, str], ssl.SSLContext] = {}
        self._session: aiohttp.ClientSession | None = None

    def _context(self, peer_cert_pem: str) -> ssl.SSLContext:
        key = (peer_cert_pem, self.cert_path)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = client_context(self.cert_path, self.key_path, peer_cert_pem)
        return ctx

    async def call(
        self, address: str, peer_cert_pem: str, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """One request; (status, decoded JSON body or None).

        Raises:
            ClusterError: the peer cannot be reached, TLS failed (wrong pin), or the body is not JSON.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit_per_host=4, enable_cleanup_closed=True),
                timeout=self.timeout,
                trust_env=False,
            )
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        url = f"https://{address}{path}"
        try:
            async with self._session.request(
                method,
                url,
                data=data,
                ssl=self._context(peer_cert_pem),
                headers={"Content-Type": "application/json"} if data is not None else None,
            ) as resp:
                payload = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            raise ClusterError(f"{address}: {describe(exc)}", 503) from None
        if not payload:
            return status, None
        try:
            return status, json.loads(payload)
        except ValueError:
            raise ClusterError(f"{address}: answered {status} with a body that is not JSON", 502) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
