"""TLS on a listening port (events, alerts): its server context, the client-certificate check, failures in words.

Three pieces, used by whichever listener terminates TLS:

* :func:`listener_context` builds the ``ssl.SSLContext`` for a :class:`~threatgate.config.security.TLSListener`:
  the HTTPS API's suites and options (:func:`threatgate.net.tls.server_context`), no renegotiation, and the
  client certificates it asks for and trusts.
* :class:`ClientCheck` finishes what OpenSSL cannot say alone.  A pinned client certificate
  (``<Certificate>``) is loaded as a trust anchor with ``VERIFY_X509_PARTIAL_CHAIN``, so that a
  self-signed leaf passes the handshake as itself (Python's ``ssl`` has no verify callback to compare
  fingerprints in).  But a trust anchor also vouches for whatever its key signed, so after the handshake
  the peer's certificate must be a pinned one *exactly*, unless a ``<CAFile>`` certificate anchors its
  chain.  The check runs before the first byte is read.
* :func:`classify_handshake_error` maps a failed handshake (or a renegotiation refused on an established
  connection) to a stable counter reason and a log line an operator can act on.  The OpenSSL reasons are
  those OpenSSL 3.0 reports on the server side (checked by sending ``X-KF-ReplyBack`` and an HTTP request to a
  TLS port, and in tests/net/test_tlsport.py with real handshakes).

Decide first: the check and the classification take values (DER bytes, an exception) and return values;
the listener does the I/O.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization

from threatgate.config.security import TLSListener
from threatgate.errors import TLSConfigError
from threatgate.net.describe import describe
from threatgate.net.tls import load_certificates, server_context

_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}

# -- counter reasons (threatgate_bad_input_total{reason=...}) ------------------------------------------------
PLAINTEXT = "tls_plaintext"
NO_CLIENT_CERT = "tls_no_client_cert"
CLIENT_CERT_REFUSED = "tls_client_cert_refused"
SERVER_CERT_REFUSED = "tls_server_cert_refused"
VERSION = "tls_version"
RENEGOTIATION = "tls_renegotiation"
TIMEOUT = "tls_timeout"
RESET = "tls_reset"
OTHER = "tls_other"
REASONS = (
    PLAINTEXT,
    NO_CLIENT_CERT,
    CLIENT_CERT_REFUSED,
    SERVER_CERT_REFUSED,
    VERSION,
    RENEGOTIATION,
    TIMEOUT,
    RESET,
    OTHER,
)
"""Every reason :func:`classify_handshake_error` returns (and :meth:`ClientCheck.client_verdict` stands for
as ``tls_client_cert_refused``), so a counter can be pre-declared at zero."""


def listener_context(settings: TLSListener) -> ssl.SSLContext:
    """The server context of a TLS port: TLS 1.2+, forward-secret AEAD suites, no compression, no renegotiation.

    ``settings.clients.mode`` sets whether a client certificate is asked for (``optional``: a client
    without one is let in; ``required``: it is refused at the handshake).  Certificates of the
    ``<CAFile>`` files and the pinned ``<Certificate>`` files are the trust anchors; pair the context
    with :class:`ClientCheck` (``ClientCheck.load(settings)``) so a pinned certificate vouches for
    itself only.

    The certificate pair must exist: a generated pair is made by the caller first
    (:func:`threatgate.net.tls.ensure_server_pair`).

    Raises:
        TLSConfigError: the pair or a trusted certificate file cannot be loaded (the message names the file).
    """
    ctx = server_context(settings.cert_path, settings.key_path)
    # Renegotiation lets a client make the server redo expensive handshakes on one connection (a
    # denial of service no connection limit sees) and is gone from TLS 1.3; OpenSSL 3 refuses a client's by default.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    clients = settings.clients
    ctx.verify_mode = _VERIFY[clients.mode]
    if clients.mode == "none":
        return ctx
    for path in clients.ca_files:
        _trust(ctx, path, "CA file")
    for path in clients.certificates:
        _trust(ctx, path, "pinned client certificate")
    if clients.certificates:
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def _trust(ctx: ssl.SSLContext, path: str, what: str) -> None:
    """Load the certificates of ``path`` as trust anchors: the bytes checked are the bytes loaded (one read)."""
    certs = load_certificates(path, what)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    try:
        ctx.load_verify_locations(cadata=pem.decode("ascii"))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"cannot use TLS {what} {path}: {describe(exc).removeprefix('TLS: ')}") from None


def _sha256s(paths: Iterable[str], what: str) -> frozenset[bytes]:
    return frozenset(
        hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).digest()
        for path in paths
        for c in load_certificates(path, what)
    )


@dataclass(frozen=True)
class ClientCheck:
    """Which client certificates a port accepts once OpenSSL has verified the chain.

    ``pinned``: SHA-256 digests of the ``<Certificate>`` files' certificates; ``authorities``: of the
    ``<CAFile>`` files' certificates.  A certificate whose verified chain ends at an authority is
    accepted; any other must be pinned exactly.
    """

    mode: str = "none"
    pinned: frozenset[bytes] = frozenset()
    authorities: frozenset[bytes] = frozenset()

    @classmethod
    def load(cls, settings: TLSListener) -> ClientCheck:
        """The check for ``settings`` (reads the same files as :func:`listener_context`).

        Raises:
            TLSConfigError: a trusted certificate file cannot be loaded.
        """
        clients = settings.clients
        if clients.mode == "none":
            return cls()
        return cls(
            mode=clients.mode,
            pinned=_sha256s(clients.certificates, "pinned client certificate"),
            authorities=_sha256s(clients.ca_files, "CA file"),
        )

    def client_verdict(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
        """None when the peer of a completed handshake may go on; else why not, in an operator's words."""
        if self.mode == "none":
            return None
        leaf = ssl_object.getpeercert(binary_form=True)
        return self.verdict(leaf, verified_chain(ssl_object) if leaf else None)

    def verdict(self, leaf: bytes | None, chain: Sequence[bytes] | None) -> str | None:
        """The decision on DER bytes: the peer's certificate and its verified chain (leaf first; None: unknown)."""
        if self.mode == "none":
            return None
        if not leaf:
            return "no client certificate" if self.mode == "required" else None
        digest = hashlib.sha256(leaf).digest()
        if digest in self.pinned:
            return None
        if chain and hashlib.sha256(chain[-1]).digest() in self.authorities:
            return None
        if chain is None and self.authorities and not self.pinned:
            return None  # every trust anchor is a CA the operator named: OpenSSL's verification is the answer
        fingerprint = ":".join(f"{b:02X}" for b in digest)
        pins = len(self.pinned)
        if not pins:
            return f"client certificate SHA-256 {fingerprint}: no <CAFile> certificate issued it"
        which = "the pinned certificate" if pins == 1 else f"one of the {pins} pinned certificates"
        text = f"client certificate SHA-256 {fingerprint} is not {which}"
        return f"{text} and no <CAFile> certificate issued it" if self.authorities else text


def verified_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes] | None:
    """DER bytes of the chain OpenSSL verified (leaf first, trust anchor last); None when ``ssl`` cannot say.

    Python 3.13 has ``get_verified_chain()``; 3.10 to 3.12 keep it on the private ``_sslobj``.
    """
    getter: Any = getattr(ssl_object, "get_verified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_verified_chain", None)
    if getter is None:
        return None
    try:
        chain = getter()
    except (ValueError, ssl.SSLError):
        return None
    der: list[bytes] = []
    for cert in chain or ():
        if isinstance(cert, bytes):
            der.append(cert)
        else:
            der.append(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
    return der or None


# -- handshake failures ---------------------------------------------------------------------------------------

_PLAINTEXT = frozenset(
    {
        "WRONG_VERSION_NUMBER",  # any text line: "X-KF-ReplyBack", a syslog line, an event
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "UNKNOWN_PROTOCOL",
        "LENGTH_MISMATCH",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LENGTH_MISMATCH",
        "UNSUPPORTED_SSL_VERSION",
    }
)
_NO_CLIENT_CERT = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"})
_VERSION = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "NO_SHARED_CIPHER",
        "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "NO_SUITABLE_SIGNATURE_ALGORITHM",
        "NO_SHARED_SIGNATURE_ALGORITHMS",
        "NO_SUITABLE_KEY_SHARE",
        "NO_SHARED_GROUPS",
        "INAPPROPRIATE_FALLBACK",
        "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    }
)
_CLIENT_REFUSED_US = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
    }
)
_RENEGOTIATION = frozenset({"NO_RENEGOTIATION", "RENEGOTIATION_MISMATCH", "UNSAFE_LEGACY_RENEGOTIATION_DISABLED"})
_RESET = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


def classify_handshake_error(exc: BaseException, *, established: bool = False) -> tuple[str, str]:
    """``(reason, text)`` for a TLS failure on a listening port: a counter reason of :data:`REASONS` and a log text.

    ``established``: the failure came after the handshake, while reading; a handshake alert then is
    the client answering our refusal to renegotiate (OpenSSL's client sends ``handshake_failure``).
    """
    if isinstance(exc, TimeoutError):
        return TIMEOUT, "the TLS handshake did not finish in time"
    if isinstance(exc, _RESET) or (isinstance(exc, ssl.SSLError) and exc.reason == "UNEXPECTED_EOF_WHILE_READING"):
        when = "the TLS session" if established else "the TLS handshake"
        return RESET, f"the client closed the connection during {when}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or "verify failed"
        return CLIENT_CERT_REFUSED, f"client certificate not accepted: {why}"
    if not isinstance(exc, ssl.SSLError):
        return OTHER, describe(exc)
    reason = exc.reason or ""
    if reason in _RENEGOTIATION or (established and reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"):
        return RENEGOTIATION, "the client tried to renegotiate the TLS session: refused, the connection is closed"
    if reason in _PLAINTEXT:
        if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
            return PLAINTEXT, "the client sent a plain HTTP request to a TLS port: it must use TLS (https)"
        return PLAINTEXT, "the client sent plain text to a TLS port: configure it for TLS, or use the plain port"
    if reason in _NO_CLIENT_CERT:
        return NO_CLIENT_CERT, "the client presented no certificate, and this port requires one"
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return CLIENT_CERT_REFUSED, f"client certificate not accepted: {describe(exc).removeprefix('TLS: ')}"
    if reason in _VERSION:
        return VERSION, f"no TLS version or cipher suite in common with the client (TLS 1.2+ needed): {_text(exc)}"
    if reason in _CLIENT_REFUSED_US:
        return SERVER_CERT_REFUSED, f"the client refused this port's certificate ({_text(exc)}): give it the CA or pin"
    return OTHER, f"TLS handshake failed: {_text(exc)}"


def _text(exc: ssl.SSLError) -> str:
    return describe(exc).removeprefix("TLS: ")
