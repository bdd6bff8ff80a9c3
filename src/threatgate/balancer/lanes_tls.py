"""How the balancer opens event connections ("lanes") and health checks to an instance: plain or TLS.

``<Instance tls="true">``: the node's event port speaks TLS (1.2 or later).  The balancer presents its
client certificate (``<ClientCertificatePath>``/``<ClientPrivateKeyPath>``, by default its own
SSLCertificatePath pair) to nodes that ask for one, and checks the node's certificate against the
same trust-on-first-use pin the REST gateway keeps for that instance (:mod:`threatgate.balancer.pins`,
``<CertDirPath>/<INSTANCE>_<matching_port>.pem``): one pin per instance, so a node's event port
presents the certificate of its REST port (a node's default).

The guarantee: the pin is compared right after the handshake, while the connection belongs to a
:class:`_Gate` protocol that writes nothing; only a connection that passed is handed to the lane's
protocol (whose ``connection_made`` writes the session flags at once) or to the PING.  A mismatch
raises :class:`~threatgate.errors.PinMismatch`: the edge reports it to the dispatcher, which takes the
instance out of rotation (``Dispatcher.pin_refused``); not one event byte was written.

Why not ``ssl.CERT_REQUIRED``: a node's certificate is self-signed by default; the pin is the check,
and a missing pin is trust on first use, saved (0600) and logged as the gateway does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any, TypeVar, cast

from threatgate.balancer.pins import Pin, PinStore
from threatgate.balancer.upstream import ping
from threatgate.config.balancer import BalancerConfig, InstanceSettings
from threatgate.errors import FileWriteError, PinMismatch, TLSConfigError, UpstreamFailed
from threatgate.net.describe import describe
from threatgate.net.tls import ensure_server_pair

log = logging.getLogger("threatgate.balancer")

P = TypeVar("P", bound=asyncio.BaseProtocol)
Refused = PinMismatch[InstanceSettings]

MAX_EARLY = 64 * 1024
"""Bytes a node may send before the pin is checked (it sends nothing before our session flags)."""


def client_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """The balancer's TLS client context toward nodes: TLS 1.2+, its client certificate, no renegotiation.

    The server's certificate is not verified by a CA here: its SHA-256 is compared with the instance's
    pin before any byte is written (:meth:`LaneOpener.open_lane`).

    Raises:
        TLSConfigError: the pair cannot be loaded (the message names both files).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pin is compared before any byte is written
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        why = describe(exc).removeprefix("TLS: ")
        raise TLSConfigError(
            f"cannot load the balancer's client certificate {cert_path} with key {key_path} "
            f"(<ClientCertificatePath>/<ClientPrivateKeyPath>): {why}"
        ) from None
    return ctx


def _load_client(config: BalancerConfig) -> ssl.SSLContext:
    """The client context of ``config``'s client pair.  The default pair is the balancer's own
    SSLCertificatePath pair, made here as the gateway would make it when both files are missing (with
    the clientAuth purpose, so nodes accept it as a client certificate; one file alone is an error the
    loader reports)."""
    default = (config.client_cert_path, config.client_key_path) == (config.cert_path, config.key_path)
    if default and not (os.path.exists(config.cert_path) or os.path.exists(config.key_path)):
        try:
            ensure_server_pair(
                config.cert_path,
                config.key_path,
                common_name=f"threatgate balancer {config.listen_host}",
                hosts=sorted({config.listen_host, "127.0.0.1", "localhost"} - {"0.0.0.0", "::"}),
                client_auth=True,
            )
        except FileWriteError as exc:
            raise TLSConfigError(str(exc)) from None
    return client_context(config.client_cert_path, config.client_key_path)


def colon(digest: bytes) -> str:
    """A SHA-256 digest as ``AB:CD:...`` (what ``openssl x509 -fingerprint -sha256`` prints); "none" if empty."""
    return ":".join(f"{b:02X}" for b in digest) if digest else "none"


class _Gate(asyncio.Protocol):
    """Holds a fresh TLS connection while its certificate is checked: writes nothing, keeps what arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.early = b""
        self.lost = False
        self.exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.early += data
        if len(self.early) > MAX_EARLY and self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.exc = True, exc

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        """Give the (checked) connection to ``protocol``, with what arrived meanwhile and its end if it came."""
        assert self.transport is not None
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if self.early:
            protocol.data_received(self.early)
        if self.lost:
            protocol.connection_lost(self.exc)


class LaneOpener:
    """Opens lanes and health checks to instances, over TLS with the pin check for ``tls="true"`` ones."""

    def __init__(self, cert_dir: str) -> None:
        self.pins = PinStore(cert_dir)
        self.context: ssl.SSLContext | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self, config: BalancerConfig) -> None:
        """Build the client context once (a pair that cannot be loaded stops the start).

        Raises:
            TLSConfigError: the client pair cannot be loaded (both files named).
        """
        self.context = await asyncio.to_thread(_load_client, config)

    async def open_lane(
        self, settings: InstanceSettings, factory: Callable[[], P], within: float
    ) -> tuple[asyncio.Transport, P]:
        """Connect to the instance's event port (``within`` seconds for connect, handshake and pin check).

        Raises:
            PinMismatch: the node presented another certificate than the pin (nothing was written).
            UpstreamFailed: the pin cannot be read or saved.
            OSError, TimeoutError: as a plain connect (a failed handshake is an ``ssl.SSLError``).
        """
        loop = asyncio.get_running_loop()
        if not settings.tls:
            async with asyncio.timeout(within):
                transport, protocol = await loop.create_connection(factory, settings.host, settings.matching_port)
            return transport, protocol
        async with asyncio.timeout(within):
            transport, gate = await loop.create_connection(
                _Gate, settings.host, settings.matching_port, ssl=self._context(), server_hostname=None
            )
            try:
                await self.check(settings, transport)
            except BaseException:
                transport.abort()
                raise
        protocol = factory()
        gate.hand_over(cast(asyncio.Protocol, protocol))
        return transport, protocol

    async def ping(self, settings: InstanceSettings, check_timeout: float) -> str | Refused | None:
        """One health check (:func:`threatgate.balancer.upstream.ping`), over TLS for a ``tls`` instance.

        None when healthy, else the error; a :class:`PinMismatch` when the node presented another certificate
        than the pin (no PING was written).
        """
        if not settings.tls:
            return await ping(settings.host, settings.matching_port, check_timeout)

        async def opened() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection(
                settings.host, settings.matching_port, ssl=self._context(), server_hostname=None
            )
            try:
                await self.check(settings, writer.transport)
            except BaseException:
                writer.transport.abort()
                raise
            return reader, writer

        try:
            return await ping(settings.host, settings.matching_port, check_timeout, opened)
        except PinMismatch as exc:
            return exc
        except UpstreamFailed as exc:
            return str(exc)

    async def check(self, settings: InstanceSettings, transport: asyncio.BaseTransport) -> Pin:
        """Compare the certificate the node presented on ``transport`` with the instance's pin (saved when
        there is none yet: trust on first use).  Nothing may have been written on ``transport``.

        Raises:
            PinMismatch: another certificate, or none.
            UpstreamFailed: the pin file cannot be read or saved.
        """
        ssl_object: Any = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        got = hashlib.sha256(der).digest() if der else b""
        pin = self._cached(settings)
        if pin is None and der:
            pin = await self._first_use(settings, bytes(der))
        if pin is None or got != pin.sha256:
            raise PinMismatch(settings, pin.fingerprint if pin is not None else "none", colon(got))
        return pin

    async def _first_use(self, settings: InstanceSettings, der: bytes) -> Pin:
        lock = self._locks.setdefault(settings.key, asyncio.Lock())
        async with lock:
            pin = self._cached(settings)  # saved meanwhile (another lane, the health check, the gateway)
            if pin is not None:
                return pin
            try:
                pin = await asyncio.to_thread(self.pins.save, settings, der)
            except FileWriteError as exc:
                raise UpstreamFailed(f"cannot save the reference certificate: {exc}") from None
            log.warning(
                "instance %s: no reference certificate yet; saved the one its event port presented as %s (SHA-256 %s)",
                settings.key,
                pin.path,
                pin.fingerprint,
            )
            return pin

    def _cached(self, settings: InstanceSettings) -> Pin | None:
        try:
            return self.pins.cached(settings)
        except ValueError as exc:  # a damaged pin file: never taken for "no pin"
            raise UpstreamFailed(str(exc)) from None
        except OSError as exc:
            raise UpstreamFailed(f"cannot read the reference certificate: {describe(exc)}") from None

    def _context(self) -> ssl.SSLContext:
        assert self.context is not None, "start() first"
        return self.context


__all__ = ["LaneOpener", "client_context"]
