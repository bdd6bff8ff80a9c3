"""Tests for threatgate.net.tlsport: a TLS port's context, client certificates, failures in words.

Handshakes are real: OpenSSL on both sides, joined by memory BIOs (no sockets, no waiting) or, for
``openssl s_client`` and ``socat``, by a loopback socket.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.certs import Authority, Pair, expired, self_signed
from threatgate.config.security import ClientCertificates, TLSListener
from threatgate.errors import TLSConfigError
from threatgate.net import tlsport
from threatgate.net.tlsport import ClientCheck, classify_handshake_error, listener_context, verified_chain

HANDSHAKE_ROUNDS = 10
"""Flights a handshake takes at most (TLS 1.2 with client certificates: 4); more means stuck."""


@dataclass
class World:
    """A CA, the server pair it issued, and client certificates of every kind, as files in ``tmp_path``."""

    dir: Path
    ca: Authority
    ca_file: str
    server: tuple[str, str]

    def client(self, pair: Pair, name: str) -> tuple[str, str]:
        return pair.write(self.dir / "clients", name)

    def listener(self, mode: str = "none", *, ca: bool = False, pins: tuple[str, ...] = ()) -> TLSListener:
        clients = ClientCertificates(
            mode=mode,  # type: ignore[arg-type]
            ca_files=(self.ca_file,) if ca else (),
            certificates=pins,
        )
        return TLSListener(cert_path=self.server[0], key_path=self.server[1], clients=clients)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    directory = tmp_path_factory.mktemp("tlsport")
    ca = Authority()
    return World(
        directory,
        ca,
        ca.pair.write_cert(directory, "ca"),
        ca.issue("node", hosts=["127.0.0.1"]).write(directory, "node"),
    )


def client_context(world: World, cert: tuple[str, str] | None = None, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(world.ca_file)
    for name, version in versions.items():
        setattr(ctx, name, version)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


@dataclass
class Outcome:
    """How a handshake ended: the server's SSLObject when it finished, else the exception each side raised."""

    server: ssl.SSLObject
    server_error: ssl.SSLError | None = None
    client_error: ssl.SSLError | None = None

    @property
    def done(self) -> bool:
        return self.server_error is None and self.client_error is None


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> Outcome:
    """A real handshake through memory BIOs, one flight at a time."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(HANDSHAKE_ROUNDS):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:  # the client's alert still goes out: what the server makes of it
                s_in.write(c_out.read())
                try:
                    server.do_handshake()
                except ssl.SSLError as seen:
                    return Outcome(server, server_error=seen, client_error=exc)
                return Outcome(server, client_error=exc)
        s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return Outcome(server, server_error=exc)
        c_in.write(s_out.read())
        if client_done and server_done:
            return Outcome(server)
    raise AssertionError("the handshake did not finish")


def server_error(server_ctx: ssl.SSLContext, data: bytes) -> ssl.SSLError:
    """What the server's handshake raises when a client sends ``data`` (plain text, say) first."""
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    s_in.write(data)
    with pytest.raises(ssl.SSLError) as caught:
        server.do_handshake()
    return caught.value


# -- the context ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "verify"),
    [("none", ssl.CERT_NONE), ("optional", ssl.CERT_OPTIONAL), ("required", ssl.CERT_REQUIRED)],
)
def test_context_options_and_client_modes(world: World, mode: str, verify: ssl.VerifyMode) -> None:
    ctx = listener_context(world.listener(mode, ca=mode != "none"))
    assert ctx.verify_mode == verify
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert not ctx.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN  # only pinned certificates need it
    assert ctx.cert_store_stats()["x509_ca"] == (1 if mode != "none" else 0)


def test_pinned_certificates_turn_partial_chains_on(world: World) -> None:
    pin = world.client(self_signed("balancer"), "balancer")[0]
    ctx = listener_context(world.listener("required", pins=(pin,)))
    assert ctx.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_client_is_refused_as_a_version_problem(world: World) -> None:
    old = client_context(world, maximum_version=ssl.TLSVersion.TLSv1_1, minimum_version=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("ALL:@SECLEVEL=0")
    outcome = handshake(old, listener_context(world.listener()))
    assert outcome.server_error is not None
    assert classify_handshake_error(outcome.server_error)[0] == tlsport.VERSION


# -- configuration errors name the file ----------------------------------------------------------------------


def test_missing_ca_file_names_it(world: World, tmp_path: Path) -> None:
    settings = world.listener("required").model_copy(
        update={"clients": ClientCertificates(mode="required", ca_files=(str(tmp_path / "nope.pem"),))}
    )
    with pytest.raises(TLSConfigError, match=r"TLS CA file .*nope\.pem does not exist: check the path"):
        listener_context(settings)
    with pytest.raises(TLSConfigError, match=r"nope\.pem"):
        ClientCheck.load(settings)


def test_ca_file_not_pem_names_it_and_the_fix(world: World, tmp_path: Path) -> None:
    der = tmp_path / "ca.der"
    der.write_bytes(world.ca.pair.der)
    settings = TLSListener(
        cert_path=world.server[0],
        key_path=world.server[1],
        clients=ClientCertificates(mode="optional", ca_files=(str(der),)),
    )
    with pytest.raises(TLSConfigError, match=r"CA file .*ca\.der is not a PEM certificate file.*openssl x509"):
        listener_context(settings)


def test_pinned_file_that_is_a_key_is_refused(world: World) -> None:
    settings = world.listener("required", pins=(world.server[1],))
    with pytest.raises(TLSConfigError, match=r"pinned client certificate .*node\.key is not a PEM certificate"):
        listener_context(settings)


def test_key_mismatch_names_both_files(world: World, tmp_path: Path) -> None:
    other_key = self_signed("other").write(tmp_path, "other")[1]
    settings = TLSListener(cert_path=world.server[0], key_path=other_key)
    with pytest.raises(TLSConfigError, match=r"node\.pem with key .*other\.key: key values mismatch"):
        listener_context(settings)


# -- client certificates: real handshakes --------------------------------------------------------------------


def test_ca_issued_client_is_accepted_and_checked(world: World) -> None:
    settings = world.listener("required", ca=True)
    client = world.client(world.ca.issue("siem", server=False), "siem")
    outcome = handshake(client_context(world, client), listener_context(settings))
    assert outcome.done
    assert ClientCheck.load(settings).client_verdict(outcome.server) is None


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_required_without_a_certificate(world: World, version: ssl.TLSVersion) -> None:
    ctx = client_context(world, maximum_version=version)
    outcome = handshake(ctx, listener_context(world.listener("required", ca=True)))
    assert outcome.server_error is not None
    reason, text = classify_handshake_error(outcome.server_error)
    assert (reason, text) == (tlsport.NO_CLIENT_CERT, "the client presented no certificate, and this port requires one")


def test_optional_lets_a_client_without_certificate_in(world: World) -> None:
    settings = world.listener("optional", ca=True)
    outcome = handshake(client_context(world), listener_context(settings))
    assert outcome.done
    assert ClientCheck.load(settings).client_verdict(outcome.server) is None


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: Authority("another CA").issue("stranger"), "unable to get local issuer certificate"),
        (lambda: self_signed("unknown"), "self-signed certificate"),
        (lambda: expired("old"), "self-signed certificate"),
    ],
    ids=["other-ca", "self-signed", "expired"],
)
def test_client_certificate_not_accepted(world: World, make: object, words: str) -> None:
    client = world.client(make(), "refused")  # type: ignore[operator]
    outcome = handshake(client_context(world, client), listener_context(world.listener("optional", ca=True)))
    assert outcome.server_error is not None
    assert classify_handshake_error(outcome.server_error) == (
        tlsport.CLIENT_CERT_REFUSED,
        f"client certificate not accepted: {words}",
    )


def test_pinned_self_signed_client_is_accepted_as_itself(world: World) -> None:
    pinned = world.client(self_signed("balancer"), "balancer")
    settings = world.listener("required", pins=(pinned[0],))
    outcome = handshake(client_context(world, pinned), listener_context(settings))
    assert outcome.done
    assert ClientCheck.load(settings).client_verdict(outcome.server) is None


def test_pinned_certificate_issued_by_an_unknown_ca_is_accepted_as_itself(world: World) -> None:
    """A cluster member's certificate, say: pinned without its CA, it passes as a partial chain."""
    pinned = world.client(Authority("cluster CA").issue("member", server=False), "member")
    settings = world.listener("required", pins=(pinned[0],))
    outcome = handshake(client_context(world, pinned), listener_context(settings))
    assert outcome.done
    assert ClientCheck.load(settings).client_verdict(outcome.server) is None


def test_expired_pinned_certificate_is_refused(world: World) -> None:
    pinned = world.client(expired("old balancer"), "old-balancer")
    settings = world.listener("required", pins=(pinned[0],))
    outcome = handshake(client_context(world, pinned), listener_context(settings))
    assert outcome.server_error is not None
    assert (
        classify_handshake_error(outcome.server_error)[1] == "client certificate not accepted: certificate has expired"
    )


def test_pinned_certificate_without_client_purpose_is_refused(world: World) -> None:
    """A server-only certificate (what ensure_server_pair makes without client_auth) cannot be a client's."""
    pinned = world.client(self_signed("server only", client=False), "server-only")
    outcome = handshake(client_context(world, pinned), listener_context(world.listener("required", pins=(pinned[0],))))
    assert outcome.server_error is not None
    assert "unsuitable certificate purpose" in classify_handshake_error(outcome.server_error)[1]


def test_pinned_certificate_vouches_for_itself_only(world: World) -> None:
    """A pinned certificate that can sign (the CA's own) lets its children through OpenSSL: the check stops them."""
    settings = world.listener("required", pins=(world.ca_file,))
    child = world.client(world.ca.issue("child of a pin", server=False), "child")
    outcome = handshake(client_context(world, child), listener_context(settings))
    assert outcome.done  # OpenSSL: a partial chain to a trust anchor
    verdict = ClientCheck.load(settings).client_verdict(outcome.server)
    assert verdict is not None
    assert verdict.startswith("client certificate SHA-256 ")
    assert verdict.endswith(" is not the pinned certificate")


def test_ca_and_pins_together(world: World) -> None:
    pinned = world.client(self_signed("balancer"), "balancer2")
    settings = world.listener("required", ca=True, pins=(pinned[0],))
    ctx, check = listener_context(settings), ClientCheck.load(settings)
    for client in (pinned, world.client(world.ca.issue("siem2", server=False), "siem2")):
        outcome = handshake(client_context(world, client), ctx)
        assert outcome.done
        assert check.client_verdict(outcome.server) is None


def test_verified_chain_ends_at_the_anchor(world: World) -> None:
    client = world.ca.issue("siem3", server=False)
    outcome = handshake(
        client_context(world, world.client(client, "siem3")), listener_context(world.listener("required", ca=True))
    )
    assert verified_chain(outcome.server) == [client.der, world.ca.pair.der]


def test_verdict_on_bytes() -> None:
    leaf, other, anchor = b"leaf", b"other", b"anchor"
    import hashlib

    sha = lambda b: hashlib.sha256(b).digest()  # noqa: E731
    pins_only = ClientCheck(mode="required", pinned=frozenset({sha(leaf)}))
    assert pins_only.verdict(leaf, [leaf]) is None
    assert pins_only.verdict(other, [other, leaf]) is not None
    assert pins_only.verdict(other, None) is not None  # chain unknown: pinned exactly or nothing
    assert pins_only.verdict(None, None) == "no client certificate"
    cas_only = ClientCheck(mode="optional", authorities=frozenset({sha(anchor)}))
    assert cas_only.verdict(other, [other, anchor]) is None
    assert cas_only.verdict(other, None) is None  # OpenSSL verified it against CAs only
    assert cas_only.verdict(None, None) is None
    both = ClientCheck(mode="required", pinned=frozenset({sha(leaf)}), authorities=frozenset({sha(anchor)}))
    assert both.verdict(other, None) is not None  # which anchor vouched is unknown: refused
    assert both.verdict(other, [other, leaf]) == (
        f"client certificate SHA-256 {':'.join(f'{b:02X}' for b in sha(other))} is not the pinned certificate "
        "and no <CAFile> certificate issued it"
    )
    assert ClientCheck().verdict(None, None) is None


def test_client_that_refuses_our_certificate(world: World) -> None:
    stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts nothing: our CA is unknown to it
    outcome = handshake(stranger, listener_context(world.listener()))
    assert outcome.client_error is not None and outcome.server_error is not None
    assert classify_handshake_error(outcome.server_error) == (
        tlsport.SERVER_CERT_REFUSED,
        "the client refused this port's certificate (tlsv1 alert unknown ca): give it the CA or pin",
    )


# -- handshake failures in words -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "http"),
    [
        (b"X-KF-ReplyBack\n", False),
        (b"<13>Dec  4 23:00:00 host app: user=alice url=http://example.com\n", False),
        (b"123 <13>octet-counted event\n", False),
        (b"GET / HTTP/1.1\r\nHost: node\r\n\r\n", True),
        (b"POST /api HTTP/1.1\r\n\r\n", True),
        (b"CONNECT node:9999 HTTP/1.1\r\n\r\n", True),
    ],
)
def test_plain_text_to_a_tls_port(world: World, data: bytes, http: bool) -> None:
    exc = server_error(listener_context(world.listener()), data)
    reason, text = classify_handshake_error(exc)
    assert reason == tlsport.PLAINTEXT
    assert ("HTTP request" in text) == http
    assert "_ssl.c" not in text and "[SSL" not in text


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (TimeoutError(), tlsport.TIMEOUT),
        (ConnectionResetError(104, "Connection reset by peer"), tlsport.RESET),
        (BrokenPipeError(32, "Broken pipe"), tlsport.RESET),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), tlsport.RESET),
        (ValueError("something else"), tlsport.OTHER),
    ],
)
def test_not_ssl_errors(exc: BaseException, reason: str) -> None:
    got, text = classify_handshake_error(exc)
    assert got == reason
    assert got in tlsport.REASONS
    assert text and "Error" not in text


def test_every_reason_is_declared() -> None:
    assert len(set(tlsport.REASONS)) == len(tlsport.REASONS)
    assert all(r.startswith("tls_") for r in tlsport.REASONS)


# -- real clients over a loopback socket ---------------------------------------------------------------------


@dataclass
class Served:
    """What the one-connection server saw: bytes read after the handshake, and the failure, classified."""

    received: bytearray = field(default_factory=bytearray)
    failure: tuple[str, str] | None = None
    established: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def serve_once(world: World) -> Iterator[object]:
    """Start a one-connection TLS server in a thread; yields ``start(ctx) -> (port, Served)``."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(ctx: ssl.SSLContext) -> tuple[int, Served]:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(10)
        listeners.append(listener)
        served = Served()

        def run() -> None:
            established = False
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    established = True
                    served.established.set()
                    while chunk := tls.recv(4096):
                        served.received += chunk
                        served.established.set()
            except (OSError, TimeoutError) as exc:
                served.failure = classify_handshake_error(exc, established=established)
            finally:
                served.done.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return listener.getsockname()[1], served

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(10)


OPENSSL = shutil.which("openssl")
SOCAT = shutil.which("socat")


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_openssl_renegotiation_is_refused(world: World, serve_once: object) -> None:
    port, served = serve_once(listener_context(world.listener()))  # type: ignore[operator]
    client = subprocess.Popen(
        [OPENSSL, "s_client", "-tls1_2", "-connect", f"127.0.0.1:{port}", "-CAfile", world.ca_file],  # type: ignore[list-item]
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert client.stdin is not None
        client.stdin.write(b"hello\n")
        client.stdin.flush()
        assert served.established.wait(10)
        for _ in range(100):  # "hello" read before "R" is written: s_client takes a line alone as its command
            if served.received == b"hello\n" or served.done.is_set():
                break
            served.established.clear()
            served.established.wait(0.1)
        assert served.received == b"hello\n"
        client.stdin.write(b"R\n")
        client.stdin.flush()
        assert served.done.wait(10)
        output = client.communicate(timeout=10)[0].decode(errors="replace")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert "RENEGOTIATING" in output
    assert "no renegotiation" in output
    assert served.received == b"hello\n"  # the R line never arrived as data
    assert served.failure is not None and served.failure[0] == tlsport.RENEGOTIATION


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_without_client_certificate_when_required(world: World, serve_once: object, version: str) -> None:
    port, served = serve_once(listener_context(world.listener("required", ca=True)))  # type: ignore[operator]
    result = subprocess.run(
        [OPENSSL, "s_client", version, "-connect", f"127.0.0.1:{port}", "-CAfile", world.ca_file],  # type: ignore[list-item]
        input=b"event\n",
        capture_output=True,
        timeout=20,
    )
    assert served.done.wait(10)
    assert served.failure == (tlsport.NO_CLIENT_CERT, "the client presented no certificate, and this port requires one")
    assert served.received == b""
    if version == "-tls1_2":  # with TLS 1.3 the client's handshake ends first: it may exit before the alert
        assert result.returncode != 0


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_openssl_with_client_certificate_delivers(world: World, serve_once: object) -> None:
    cert, key = world.client(world.ca.issue("siem-openssl", server=False), "siem-openssl")
    port, served = serve_once(listener_context(world.listener("required", ca=True)))  # type: ignore[operator]
    subprocess.run(
        [
            OPENSSL,
            "s_client",
            "-quiet",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            world.ca_file,
            "-cert",
            cert,
            "-key",
            key,
        ],  # type: ignore[list-item]
        input=b"event one\n",
        capture_output=True,
        timeout=20,
    )
    assert served.done.wait(10)
    assert served.received == b"event one\n"


@pytest.mark.skipif(SOCAT is None, reason="socat is not installed")
def test_socat_without_client_certificate_when_required(world: World, serve_once: object) -> None:
    port, served = serve_once(listener_context(world.listener("required", ca=True)))  # type: ignore[operator]
    subprocess.run(
        [SOCAT, "-", f"OPENSSL:127.0.0.1:{port},cafile={world.ca_file}"],  # type: ignore[list-item]
        input=b"event\n",
        capture_output=True,
        timeout=20,
    )
    assert served.done.wait(10)
    assert served.failure is not None and served.failure[0] == tlsport.NO_CLIENT_CERT
    assert served.received == b""


@pytest.mark.skipif(SOCAT is None, reason="socat is not installed")
def test_plain_socat_to_a_tls_port(world: World, serve_once: object) -> None:
    port, served = serve_once(listener_context(world.listener()))  # type: ignore[operator]
    subprocess.run([SOCAT, "-", f"TCP:127.0.0.1:{port}"], input=b"X-KF-ReplyBack\n", capture_output=True, timeout=20)  # type: ignore[list-item]
    assert served.done.wait(10)
    assert served.failure is not None and served.failure[0] == tlsport.PLAINTEXT
