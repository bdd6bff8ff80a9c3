"""The door of a listening port: who may come in, and TLS before anything else is read.

Every listening port of node and balancer (events, REST API, alerts, metrics) can be put behind a
:class:`Gate`.  A connection is accepted as plain TCP; then, in order:

1. **Source.**  With an allow-list (``<AllowedSources>``), a peer outside it is aborted in
   ``connection_made``, before a single byte is read, logged (rate-limited) and counted
   (``threatgate_connections_total{outcome="refused_source"}``).
2. **TLS.**  A TLS port accepts on its own (:class:`GateServer`: the listening socket's readiness,
   ``accept()``, the source check on the bare socket) and runs each handshake through
   ``loop.connect_accepted_socket(ssl=...)`` with a deadline (the port's handshake timeout).  Not
   ``create_server(ssl=)``: its handshake starts before any protocol code runs, so the source check
   would come after bytes were read; not ``start_tls`` on an accepted transport: uvloop reads the
   ClientHello into the old protocol before the switch.
   At most :data:`MAX_TLS_HANDSHAKES` run at once per port; a newcomer past that evicts the *oldest*
   one still unfinished (a stalled or slow peer), as the event port does with connections that have
   not sent their flags: a flood of half-open handshakes then cannot lock a real sender out, which
   finishes its handshake in milliseconds.
   A handshake that fails (plain text sent to a TLS port, no or a refused client certificate, no
   common version, a stall) is logged in words (rate-limited: a scanner must not flood the log),
   counted under a stable reason (``threatgate_bad_input_total{reason="tls_plaintext"}``, ...;
   net/tls.py decides which), and the connection closed.  A certificate accepted only because it is
   pinned is checked once more after the handshake (``vet``, net/tls.py): OpenSSL took it as a trust
   anchor, the pin is the exact match.
3. **Handover.**  The port's own protocol (the event protocol, aiohttp's request handler) is then
   created and connected to the TLS transport, exactly as if the server had accepted a plain
   connection: it never knows a gate was there.

A plain port checks in ``connection_made`` (:class:`_Door`), before the transport reads: one check
per connection, nothing per byte, so a reload can give it a list (:class:`Gates`).

Renegotiation is refused by the context (``OP_NO_RENEGOTIATION``, TLS 1.2; TLS 1.3 has none).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

from threatgate.config.security import AllowedSources, Network, TLSListener
from threatgate.log import RateLimitedLog
from threatgate.net.describe import describe
from threatgate.net.sources import SourceList
from threatgate.stats import BoundaryStats

MAX_TLS_HANDSHAKES = 64
"""TLS handshakes in progress on one port; past it, the oldest is evicted for a newcomer if it has had
:data:`EVICT_AFTER` seconds, else accepting waits until one ends (a reconnect burst, not a flood)."""
EVICT_AFTER = 1.0
"""Seconds a handshake may take before a newcomer can take its slot: a real client finishes in milliseconds."""
HARD_LIMIT = 4
"""Handshakes given to a node's worker (which does not accept itself) may exceed the limit up to this factor
before the youngest-but-oldest is evicted anyway."""
ACCEPTS_PER_WAKEUP = 64
"""Connections accepted per readiness of the listening socket, so a connect flood cannot hold the loop."""
ACCEPT_PAUSE = 0.5
"""Seconds accepting pauses when the process is out of file descriptors (asyncio's own choice, 1 s, halved)."""

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
Vet = Callable[[Any], "str | None"]
"""Looks at a finished handshake's ``ssl_object``: None to accept, else why the client is refused."""
Classify = Callable[[BaseException], tuple[str, str]]
"""A failed handshake's exception -> (counter reason, words for the log)."""


def gate_for(
    port: str,
    *,
    stats: BoundaryStats,
    log: logging.Logger,
    handshake_timeout: float,
    sources: tuple[Network, ...] | None,
    tls: TLSListener | ssl.SSLContext | None,
) -> Gate:
    """The gate of a port as configured: its ``<AllowedSources>`` networks, and its TLS element or HTTPS context.

    Raises:
        TLSConfigError: a certificate, key or trusted client certificate cannot be loaded.
    """
    # net/tls.py (cryptography) is imported here, not at the top: a node's worker imports this module and
    # stays lean unless it serves TLS (tests/node/test_worker_imports.py).
    from threatgate.net.tlsport import ClientCheck, classify_handshake_error, listener_context

    context: ssl.SSLContext | None
    vet: Vet | None = None
    if tls is None or isinstance(tls, ssl.SSLContext):
        context = tls
    else:
        context = listener_context(tls)
        if tls.clients.mode != "none":
            vet = ClientCheck.load(tls).client_verdict
    return Gate(
        port,
        stats=stats,
        log=log,
        sources=SourceList(sources) if sources is not None else None,
        tls=context,
        handshake_timeout=handshake_timeout,
        vet=vet,
        classify=classify_handshake_error,
    )


async def start_servers(
    port: str,
    inner: ProtocolFactory,
    host: str,
    number: int,
    tls: TLSListener | None,
    gate: Callable[[TLSListener | None], Gate],
) -> list[tuple[str, Listening]]:
    """Listen on a port and, when its TLS element names a second address, on its TLS twin (a migration).

    Returns ``(name, server)`` pairs as the process reports them: ``events`` (TLS when the element has
    no address of its own), then ``events_tls``.  ``gate(tls)`` makes the gate of each.
    """
    own_port = tls is not None and tls.listen is not None
    main = await gate(None if own_port else tls).start_server(inner, host, number)
    servers: list[tuple[str, Listening]] = [(port, main)]
    if tls is not None and tls.listen is not None:
        try:
            twin = await gate(tls).start_server(inner, tls.listen.host, tls.listen.port)
        except BaseException:
            main.close()
            raise
        servers.append((f"{port}_tls", twin))
    return servers


class Gates:
    """Every gate of a process, by port name: what a reload reaches to give new allow-lists and deadlines.

    ``<AllowedSources>`` is applied live: adding a SIEM forwarder's address must not need a restart of
    the event path.  Connections already in are kept (they were admitted under the list of their time).
    """

    def __init__(self, stats: BoundaryStats, log: logging.Logger) -> None:
        self.stats = stats
        self.log = log
        self._by_port: dict[str, list[Gate]] = {}

    def open(
        self, port: str, allowed: AllowedSources, handshake_timeout: float, tls: TLSListener | ssl.SSLContext | None
    ) -> Gate:
        """A new gate for ``port`` as configured (:func:`gate_for`), kept for reloads."""
        gate = gate_for(
            port,
            stats=self.stats,
            log=self.log,
            handshake_timeout=handshake_timeout,
            sources=allowed.networks(port),
            tls=tls,
        )
        return self.add(gate)

    def add(self, gate: Gate) -> Gate:
        self._by_port.setdefault(gate.port, []).append(gate)
        return gate

    def apply(self, allowed: AllowedSources, handshake_timeout: Callable[[str], float]) -> list[str]:
        """Give every gate its port's networks (None: every source) and handshake deadline; returns, in words,
        the ports whose list changed (``events: 10.0.0.0/8``, ``api: every source``) for the reload's log."""
        changed = []
        for port, gates in self._by_port.items():
            networks = allowed.networks(port)
            sources = SourceList(networks) if networks is not None else None
            for gate in gates:
                before = gate.sources.networks if gate.sources is not None else None
                gate.sources = sources
                gate.handshake_timeout = handshake_timeout(port)
            if before != networks:
                changed.append(f"{port}: {', '.join(map(str, networks)) if networks is not None else 'every source'}")
        return changed


class Gate:
    """The door of one listening port (named as the process reports it: ``events``, ``api``, ...)."""

    def __init__(
        self,
        port: str,
        *,
        stats: BoundaryStats,
        log: logging.Logger,
        sources: SourceList | None = None,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        vet: Vet | None = None,
        classify: Classify | None = None,
        max_handshakes: int = MAX_TLS_HANDSHAKES,
        failure_level: int = logging.WARNING,
    ) -> None:
        self.port = port
        self.stats = stats
        self.log = log
        self.sources = sources
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.vet = vet
        self.classify = classify
        self.max_handshakes = max_handshakes
        self.handshaking: dict[asyncio.Task[Any], tuple[str, float]] = {}  # -> (peer, began); oldest first
        self.on_slot_free: Callable[[], None] | None = None  # a GateServer waiting to accept again
        self.tasks: set[asyncio.Task[bool]] = set()
        self.warn_source = RateLimitedLog(log)
        self.warn_tls = RateLimitedLog(log, failure_level)  # a failed handshake: counted whatever the level
        self.warn_flood = RateLimitedLog(log)

    async def start_server(self, inner: ProtocolFactory, host: str, port: int, *, backlog: int = 1024) -> Listening:
        """Listen on ``host:port`` and serve each admitted connection with a protocol from ``inner``."""
        loop = asyncio.get_running_loop()
        if self.tls is None:
            # Always the door, list or not: a reload may give the port a list (Gates.apply); it costs one
            # check per connection, nothing per byte.
            return await loop.create_server(lambda: _Door(self, inner), host, port, reuse_address=True, backlog=backlog)
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        socks: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):  # every address, once (as create_server)
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in socks:
                sock.close()
            raise
        server = GateServer(self, inner, socks)
        server.start()
        return server

    async def serve(self, sock: socket.socket, inner: ProtocolFactory) -> bool:
        """Serve one accepted socket: the source, the TLS handshake, then ``inner``'s protocol.

        Returns whether the connection was handed to ``inner`` (False: refused, failed, or gone; the
        socket is closed).  Used by :class:`GateServer` and by a node's worker, which receives sockets
        its master accepted (and already checked against the allow-list: checked again, it costs nothing).
        """
        try:
            peer = str(sock.getpeername()[0])
        except OSError:  # gone already
            sock.close()
            return False
        if not self.admits(peer):
            self.refuse_source(peer)
            reset(sock)
            return False
        if self.tls is None:
            try:
                await asyncio.get_running_loop().connect_accepted_socket(inner, sock)
            except OSError:  # the client left before we took it over
                sock.close()
                return False
            return True
        return await self._handshake(sock, peer, inner, self.tls)

    async def _handshake(self, sock: socket.socket, peer: str, inner: ProtocolFactory, context: ssl.SSLContext) -> bool:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        began = loop.time()
        if self.full(began):
            self._evict_oldest()
        self.handshaking[task] = (peer, began)
        try:
            # Our own reference: uvloop returns its SSLProtocol here, not the application's protocol.
            vetting = _Vetting(self, peer, inner)
            await loop.connect_accepted_socket(
                lambda: vetting,
                sock,
                ssl=context,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except asyncio.CancelledError:  # evicted by a newcomer, or the process stops
            sock.close()
            raise
        except (OSError, TimeoutError, RuntimeError) as exc:  # ssl.SSLError and ConnectionError are OSErrors
            failure: BaseException = exc
            if loop.time() - began >= self.handshake_timeout:
                # Both loops end a stalled handshake with an abort, not a TimeoutError: name it by the clock.
                failure = TimeoutError(f"no TLS handshake within {self.handshake_timeout:g} s")
            self._failed(peer, failure)
            sock.close()
            return False
        finally:
            self.handshaking.pop(task, None)
            if self.on_slot_free is not None:
                self.on_slot_free()
        return vetting.handed_over

    def full(self, now: float) -> bool:
        """Every handshake slot is taken by one younger than :data:`EVICT_AFTER`: a burst, not a flood."""
        if len(self.handshaking) < self.max_handshakes:
            return False
        _, began = next(iter(self.handshaking.values()))
        return now - began >= EVICT_AFTER or len(self.handshaking) >= HARD_LIMIT * self.max_handshakes

    def saturated(self, now: float) -> bool:
        """All slots taken by recent handshakes (counting those accepted and not started yet): accept nothing
        more until one ends; the kernel's backlog holds the newcomers meanwhile."""
        if len(self.tasks) < self.max_handshakes:
            return False
        return not self.handshaking or now - self.oldest_began() < EVICT_AFTER

    def oldest_began(self) -> float:
        """When the oldest handshake in progress began (loop time); call only while one is."""
        return next(iter(self.handshaking.values()))[1]

    def _evict_oldest(self) -> None:
        oldest, (oldest_peer, _) = next(iter(self.handshaking.items()))
        self.stats.bump(self.stats.connections, "evicted_tls_handshake")
        self.warn_flood(
            "more than %d TLS handshakes in progress on the %s port; closing the oldest (%s)",
            self.max_handshakes,
            self.port,
            oldest_peer,
        )
        del self.handshaking[oldest]
        oldest.cancel()

    def admits(self, host: str) -> bool:
        """The allow-list's verdict on a peer address (True without a list): for ports that accept themselves
        (a node's master passing connections to workers)."""
        return self.sources is None or self.sources.allows(host)

    def refuse_source(self, host: str) -> None:
        """Count and (rate-limited) log a peer outside the allow-list; the caller closes the connection."""
        self.stats.bump(self.stats.connections, "refused_source")
        self.warn_source(
            "refused a connection from %s to the %s port: not in its <AllowedSources> "
            '(threatgate_connections_total{outcome="refused_source"})',
            host,
            self.port,
        )

    def _failed(self, peer: str, exc: BaseException) -> None:
        if self.classify is None:
            from threatgate.net.tlsport import classify_handshake_error

            self.classify = classify_handshake_error
        reason, text = self.classify(exc)
        self.stats.bump(self.stats.bad_input, reason)
        self.warn_tls(
            '%s port: TLS connection from %s closed: %s (threatgate_bad_input_total{reason="%s"})',
            self.port,
            peer,
            text,
            reason,
        )

    def _refused_client(self, peer: str, why: str) -> None:
        self.stats.bump(self.stats.bad_input, "tls_client_cert_refused")
        self.warn_tls(
            '%s port: TLS connection from %s closed: %s (threatgate_bad_input_total{reason="tls_client_cert_refused"})',
            self.port,
            peer,
            why,
        )


class Listening(Protocol):
    """What :meth:`Gate.start_server` returns, asyncio's server or a :class:`GateServer`: what the services use."""

    @property
    def sockets(self) -> tuple[socket.socket, ...]: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class GateServer:
    """A TLS port's listening sockets: accepts by itself so the source is checked before any byte is read.

    One socket per address the host resolves to, as ``create_server`` does.  While every handshake slot
    is taken by a recent handshake it stops accepting (the kernel's backlog holds newcomers) and starts
    again when one ends: a reconnect burst of real senders waits milliseconds instead of being evicted.
    """

    def __init__(self, gate: Gate, inner: ProtocolFactory, socks: list[socket.socket]) -> None:
        self.gate = gate
        self.inner = inner
        self._socks = socks
        self._serving = False
        self._watching = False
        self._closed = asyncio.get_running_loop().create_future()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(sock for sock in self._socks if sock.fileno() >= 0)

    def start(self) -> None:
        self._serving = True
        self.gate.on_slot_free = self._slot_free
        self._watch(True)

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        """Stop accepting; connections already handed over stay (the services drain them); handshakes stop."""
        if not self._serving:
            return
        self._watch(False)
        self._serving = False
        self.gate.on_slot_free = None
        for sock in self._socks:
            sock.close()
        for task in list(self.gate.tasks):
            task.cancel()
        if not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await self._closed

    def _watch(self, on: bool) -> None:
        if on == self._watching:
            return
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            if on:
                loop.add_reader(sock.fileno(), self._accept, sock)
            else:
                loop.remove_reader(sock.fileno())
        self._watching = on

    def _slot_free(self) -> None:
        if self._serving and not self._watching:
            self._watch(True)

    def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        gate = self.gate
        for _ in range(ACCEPTS_PER_WAKEUP):
            now = loop.time()
            if gate.saturated(now):
                # Until a handshake ends (_slot_free), or the oldest is old enough to be evicted for a newcomer.
                self._watch(False)
                age = now - gate.oldest_began() if gate.handshaking else 0.0
                loop.call_later(EVICT_AFTER - age + 0.01, self._slot_free)
                return
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                gate.warn_flood(
                    "%s port: cannot accept a connection: %s; pausing accepts for %.1f s",
                    gate.port,
                    describe(exc),
                    ACCEPT_PAUSE,
                )
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._watch(False)
                    loop.call_later(ACCEPT_PAUSE, self._slot_free)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(gate.serve(conn, self.inner))
            gate.tasks.add(task)
            task.add_done_callback(gate.tasks.discard)


class _Door(asyncio.Protocol):
    """A plain port with an allow-list: a refused peer is aborted before its transport reads."""

    def __init__(self, gate: Gate, inner: ProtocolFactory) -> None:
        self.gate = gate
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        if not self.gate.admits(host):
            self.gate.refuse_source(host)
            cast(asyncio.Transport, transport).abort()
            return
        _hand_over(self.inner(), cast(asyncio.Transport, transport))


class _Vetting(asyncio.Protocol):
    """The protocol of a TLS connection whose handshake just finished: vets the client, then hands over."""

    def __init__(self, gate: Gate, peer: str, inner: ProtocolFactory) -> None:
        self.gate = gate
        self.peer = peer
        self.inner = inner
        self.handed_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self.gate
        tls = cast(asyncio.Transport, transport)
        ssl_object = tls.get_extra_info("ssl_object")
        why = gate.vet(ssl_object) if gate.vet is not None and ssl_object is not None else None
        if why is not None:
            gate._refused_client(self.peer, why)
            tls.abort()
            return
        self.handed_over = True
        _hand_over(self.inner(), tls)


def _hand_over(protocol: asyncio.BaseProtocol, transport: asyncio.Transport) -> None:
    """Make ``protocol`` the transport's, as if the server had created it for this connection."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)


def reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): a refused peer learns at once, and no TIME_WAIT is left here."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()
