"""Where a sender sends lines (detections, service alerts), plain or over verified TLS.

``<ConnectionString>``/``<AlertConnectionString>`` (node), ``<OutputConnectionString>``/
``<AlertForwardConnectionString>`` (balancer) take ``tls="true"`` with one of:

* ``fingerprint="SHA256 AB:CD:…"``: the destination's certificate, pinned (SHA-256 of its DER, the
  form ``openssl x509 -noout -fingerprint -sha256`` prints; the ``SHA256`` word, colons and case are
  optional); compared after the handshake and before any byte is sent;
* ``ca="FILE"``: PEM CA certificates; the chain and the host name (or IP address) are verified.

Never unverified: ``tls="true"`` without either is refused, as are both at once (one check, one
place to renew it).  Without ``tls`` the address is a plain :class:`Address`, as before.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

from threatgate.config.common import Address, parse_address, parse_bool, resolve_path
from threatgate.config.xml import Node

_PREFIX = re.compile(r"\A\s*SHA-?256\s*[:=]?\s*", re.I)


@dataclass(frozen=True, slots=True)
class DestinationTLS:
    """How the sender checks the server: ``sha256`` (a pinned certificate) or ``ca_file`` (a CA file)."""

    sha256: bytes = b""
    ca_file: str = ""


@dataclass(frozen=True, slots=True)
class Destination(Address):
    """An address to send to over TLS, with how the server is verified."""

    tls: DestinationTLS = DestinationTLS()


def parse_fingerprint(node: Node, raw: str) -> bytes:
    """``SHA256 AB:CD:…`` (64 hex digits; the prefix, colons, spaces and case optional) as 32 bytes."""
    digits = re.sub(r"[\s:]", "", _PREFIX.sub("", raw))
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", digits):
        raise node.error(
            f"fingerprint={raw!r}: expected the certificate's SHA-256 fingerprint, 32 hex bytes "
            "(openssl x509 -in CERT -noout -fingerprint -sha256)"
        )
    return bytes.fromhex(digits)


def parse_destination(node: Node) -> Address:
    """The element's ``host:port`` with its TLS attributes: a :class:`Destination` when ``tls="true"``."""
    address = parse_address(node)
    tls = parse_bool(node, "tls", False)
    fingerprint = node.attrs.get("fingerprint")
    ca = node.attrs.get("ca")
    if not tls:
        if fingerprint is not None or ca is not None:
            raise node.error('fingerprint= and ca= apply to tls="true" only')
        return address
    if (fingerprint is None) == (ca is None):
        raise node.error(
            'tls="true" needs one of fingerprint="SHA256 AB:CD:..." (the destination\'s certificate, pinned) '
            'or ca="FILE" (CA certificates: chain and host name verified); never unverified'
        )
    if fingerprint is not None:
        return Destination(address.host, address.port, DestinationTLS(sha256=parse_fingerprint(node, fingerprint)))
    path = resolve_path(node, ca or "")
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise node.error(f"ca={ca!r}: cannot load CA certificates from {path}: {reason}") from None
    return Destination(address.host, address.port, DestinationTLS(ca_file=path))


__all__ = ["Destination", "DestinationTLS", "parse_destination", "parse_fingerprint"]
