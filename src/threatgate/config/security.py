"""Transport security of the listening ports, shared by node and balancer: TLS, client certificates, sources.

Three elements, read the same way in both configuration files:

* a TLS element (``<InputSettings><TLS>`` on a node, ``<MatchingTLS>``/``<AlertTLS>`` on a balancer):
  the port speaks TLS 1.2+ with the given (or the process's default) certificate pair.  With its own
  address (``<ConnectionString>`` on a node, ``port=`` on a balancer) TLS is offered on a *second*
  port and the plain one stays, for a migration; without, the port itself speaks TLS only.
* ``<ClientCertificates mode="none|optional|required">`` inside a TLS element: which client
  certificates are accepted, by CA file (``<CAFile>``, any certificate it issued) or pinned exactly
  (``<Certificate>``: a client's own certificate file; the peer must present that very certificate,
  compared by SHA-256).  A pin is given as a file rather than a bare fingerprint because OpenSSL must
  hold the certificate to let it through the handshake (Python's ``ssl`` has no verify callback).
* ``<AllowedSources ports="events,api">`` (repeatable; ``ports`` absent: every port of the process)
  with ``<Source>`` IP addresses or networks: a peer outside is closed before any byte is read.  The
  port names are those the process reports when it starts (``X_THREATGATE_LISTEN``).

Paths are resolved against the configuration file's directory; whether the files exist and match is
checked where they are loaded (net/tls.py) and by ``threatgate validate``.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

import pydantic

from threatgate.config.common import Address, Frozen, parse_address, parse_bool, parse_field, resolve_path
from threatgate.config.xml import Node

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CLIENT_MODES = ("none", "optional", "required")
MAX_SOURCES = 10_000
"""Sources in one ``<AllowedSources>``: a list longer than this belongs in a firewall."""


class ClientCertificates(Frozen):
    """``<ClientCertificates mode=>``: whether the port asks TLS clients for a certificate, and which it accepts.

    ``optional`` asks and checks a certificate that is presented, but lets a client without one in;
    ``required`` refuses it at the handshake.
    """

    mode: Literal["none", "optional", "required"] = "none"
    ca_files: tuple[str, ...] = ()
    """``<CAFile>``: PEM files of CA certificates; a client certificate one of them issued is accepted."""
    certificates: tuple[str, ...] = ()
    """``<Certificate>``: client certificates pinned exactly (PEM files, e.g. a balancer's or a cluster
    member's own certificate)."""


class TLSListener(Frozen):
    """A TLS element on a listening port (``<InputSettings><TLS>``, ``<MatchingTLS>``, ``<AlertTLS>``)."""

    cert_path: str
    key_path: str
    listen: Address | None = None
    """A second port speaking TLS beside the plain one (a migration); None: the port itself speaks TLS."""
    clients: ClientCertificates = ClientCertificates()

    def describe(self) -> str:
        """``certificate X (key Y), client certificates required (CA a.pem; 2 pinned)`` for logs and validate."""
        text = f"certificate {self.cert_path} (key {self.key_path})"
        clients = self.clients
        if clients.mode == "none":
            return text
        trusted = [f"CA {', '.join(clients.ca_files)}"] if clients.ca_files else []
        if clients.certificates:
            trusted.append(f"{len(clients.certificates)} pinned")
        return f"{text}, client certificates {clients.mode} ({'; '.join(trusted)})"


class AllowedSources(Frozen):
    """Every ``<AllowedSources>``: per port name, the networks whose peers may connect."""

    by_port: tuple[tuple[str, tuple[Network, ...]], ...] = ()

    def networks(self, port: str) -> tuple[Network, ...] | None:
        """The networks allowed on ``port`` (an ``events``-named port covers its TLS twin); None: every source."""
        for name, networks in self.by_port:
            if name == port:
                return networks
        return None


class _SecondPort(Frozen):
    port: int = pydantic.Field(ge=0, le=65535)  # 0: picked at bind, reported at start


def read_tls_listener(
    node: Node | None,
    *,
    default_cert: str,
    default_key: str,
    listen_host: str | None = None,
) -> TLSListener | None:
    """A TLS element, or None when it is absent or ``enabled="false"``.

    ``default_cert``/``default_key`` are the process's own pair (a node's HTTPServer pair, the balancer's
    SSLCertificatePath pair), used when the element names none.  A separate TLS port is named by a
    ``<ConnectionString>`` child (node) or, given ``listen_host``, by a ``port=`` attribute (balancer,
    whose ports are attributes of ``<Balancer>`` and whose host is its text).
    """
    if node is None:
        return None
    if not parse_enabled(node):
        node.ignore()
        return None
    paths = {}
    for tag, key, default in (
        ("CertificatePath", "cert_path", default_cert),
        ("PrivateKeyPath", "key_path", default_key),
    ):
        child = node.only(tag)
        paths[key] = resolve_path(child, child.value) if child is not None else default
    if paths["cert_path"] == paths["key_path"]:
        raise node.error(f"certificate and private key must be separate files, both are {paths['cert_path']}")
    listen: Address | None = None
    if listen_host is None:
        address = node.only("ConnectionString")
        if address is not None:
            listen = parse_address(address, listen=True)
    elif "port" in node.attrs:
        listen = Address(listen_host, parse_field(node, node.attrs["port"], "port", _SecondPort, "port"))
    clients = _read_clients(node.only("ClientCertificates"))
    return TLSListener(listen=listen, clients=clients, **paths)


def parse_enabled(node: Node) -> bool:
    """``enabled=`` of a TLS element, true when absent (writing the element means wanting it)."""
    return parse_bool(node, "enabled", True)


def _read_clients(node: Node | None) -> ClientCertificates:
    if node is None:
        return ClientCertificates()
    mode = node.attrs.get("mode", "required").strip().lower()
    if mode not in CLIENT_MODES:
        raise node.error(f"mode {mode!r}: expected one of {', '.join(CLIENT_MODES)}")
    ca_files: list[str] = []
    certificates: list[str] = []
    for child in node.elements():
        if child.tag == "CAFile":
            ca_files.append(resolve_path(child, child.value))
        elif child.tag == "Certificate":
            certificates.append(resolve_path(child, child.value))
        else:
            raise node.unknown_child(child, ("CAFile", "Certificate"))
    if mode == "none" and (ca_files or certificates):
        raise node.error('mode="none" asks for no client certificate, yet certificates to trust are listed')
    if mode != "none" and not (ca_files or certificates):
        raise node.error(
            f'mode="{mode}" needs what to trust: a <CAFile> (certificates it issued) or a <Certificate> (pinned)'
        )
    return ClientCertificates(mode=mode, ca_files=tuple(ca_files), certificates=tuple(certificates))  # type: ignore[arg-type]


def read_allowed_sources(root: Node, ports: tuple[str, ...]) -> AllowedSources:
    """Every ``<AllowedSources ports=>`` child of ``root``; ``ports`` are the names this process listens under.

    A port named twice is an error (one list per port, never a merge to guess at); ``ports`` absent
    means every port not named by another element.
    """
    named: dict[str, tuple[Network, ...]] = {}
    first_line: dict[str, int] = {}
    every: tuple[Network, ...] | None = None
    for node in root.findall("AllowedSources"):
        networks = _read_sources(node)
        raw = node.attrs.get("ports")
        if raw is None:
            if every is not None:
                raise node.error("a second <AllowedSources> without ports=: name the ports each list is for")
            every = networks
            continue
        names = [p.strip() for p in raw.split(",") if p.strip()]
        if not names:
            raise node.error(f"ports={raw!r}: name at least one of {', '.join(ports)}")
        for name in names:
            if name not in ports:
                raise node.error(f"ports: unknown port {name!r}; expected one of {', '.join(ports)}")
            if name in named:
                raise node.error(f"port {name!r} already has an <AllowedSources> (line {first_line[name]})")
            named[name] = networks
            first_line[name] = node.line
    if every is not None:
        for name in ports:
            named.setdefault(name, every)
    return AllowedSources(by_port=tuple((name, named[name]) for name in ports if name in named))


def _read_sources(node: Node) -> tuple[Network, ...]:
    networks: list[Network] = []
    for child in node.elements():
        if child.tag != "Source":
            raise node.unknown_child(child, ("Source",))
        networks.append(parse_network(child))
        if len(networks) > MAX_SOURCES:
            raise child.error(f"more than {MAX_SOURCES} sources: use a firewall for lists this long")
    if not networks:
        raise node.error("lists no <Source>: it would refuse every peer (remove it to allow every source)")
    return tuple(networks)


def parse_network(node: Node) -> Network:
    """``10.0.0.0/8``, ``192.0.2.7`` or ``2001:db8::/32``; host bits set or a host name are errors."""
    raw = node.value
    try:
        return ipaddress.ip_network(raw, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise node.error(
            f"{raw!r} is not an IP address or network (e.g. 10.0.0.0/8); host names are not accepted: "
            "their addresses can change under a running allow-list"
        ) from None
    raise node.error(f"{raw!r} has host bits set: did you mean {loose}?")
