"""``threatgate validate``'s TLS part: every certificate a configuration uses, checked, and which port uses which.

For a node or a balancer configuration this lists each listening port with what it speaks and whom it
lets in (``events 0.0.0.0:9999: TLS, certificate certs/node.pem (SHA-256 AB:…), client certificates
required (CA certs/ca.pem), sources 10.0.0.0/8``), and checks every file in use: the server pairs
(:func:`threatgate.net.tls.inspect_pair`, the very checks the process makes when it starts), the CA
and pinned client certificate files, the balancer's client pair.

Severity follows what the process would do with the file: a pair it cannot load, a CA or pinned file
it cannot read, or a certificate clients will refuse (expired, not yet valid) is an error; a key
readable by others, a certificate expiring within 30 days, a pinned certificate no client could
present (expired, or without the clientAuth purpose) is a warning.  A pair whose two files are both
absent is fine: the process generates a self-signed one at first start (and the line says so).

Reads files, logs nothing, raises nothing: the CLI prints what it returns.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from threatgate.config.balancer import BalancerConfig
from threatgate.config.common import Address
from threatgate.config.node import NodeConfig
from threatgate.config.security import AllowedSources, TLSListener
from threatgate.errors import TLSConfigError
from threatgate.net.tls import PairFindings, allows_client_auth, fingerprint_sha256, inspect_pair, load_certificates


@dataclass(frozen=True)
class TLSReport:
    """``ports``: one line per listening port (and per upstream hop); ``errors`` and ``warnings`` as found."""

    ports: tuple[str, ...]
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def node_report(config: NodeConfig, *, now: dt.datetime | None = None) -> TLSReport:
    """The ports of a node and the TLS files they use (``events``, ``api``, ``metrics``)."""
    check = _Checker(now or dt.datetime.now(dt.UTC), config.allowed_sources)
    check.events("events", config.input.listen, config.input.tls)
    if config.http is not None:
        check.port("api", config.http.listen, f"HTTPS, {check.pair(config.http.cert_path, config.http.key_path)}")
    check.metrics(config.service.metrics)
    return check.report()


def balancer_report(config: BalancerConfig, *, now: dt.datetime | None = None) -> TLSReport:
    """The ports of a balancer, its TLS hops to the instances and the TLS files they use."""
    check = _Checker(now or dt.datetime.now(dt.UTC), config.allowed_sources)
    check.events("events", config.address(config.matching_port), config.matching_tls)
    check.port("api", config.address(config.api_port), f"HTTPS, {check.pair(config.cert_path, config.key_path)}")
    check.events("alerts", config.address(config.cybertrace_port), config.alert_tls)
    check.metrics(config.metrics)
    over_tls = [i for i in config.instances if i.tls]
    if over_tls and config.client_cert_path:
        presented = check.pair(config.client_cert_path, config.client_key_path, client=True)
        for instance in over_tls:
            check.lines.append(
                f"to instance {instance.address}: TLS, its certificate checked against its pin in "
                f"{config.cert_dir} (trust on first use); client {presented} if it asks"
            )
    return check.report()


@dataclass
class _Checker:
    now: dt.datetime
    sources: AllowedSources
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _pairs: dict[tuple[str, str], PairFindings] = field(default_factory=dict)

    def report(self) -> TLSReport:
        return TLSReport(tuple(self.lines), tuple(dict.fromkeys(self.errors)), tuple(dict.fromkeys(self.warnings)))

    def port(self, name: str, address: Address, what: str) -> None:
        self.lines.append(f"{name} {address}: {what}, {self._sources(name)}")

    def events(self, name: str, address: Address, tls: TLSListener | None) -> None:
        """An event or alert port: plain, TLS itself, or plain with a TLS twin (a migration)."""
        if tls is None:
            self.port(name, address, "plain TCP")
            return
        described = f"TLS, {self.listener(tls)}"
        if tls.listen is None:
            self.port(name, address, described)
        else:
            self.port(name, address, "plain TCP (TLS on the port below: a migration)")
            self.port(name, tls.listen, described)

    def metrics(self, address: Address | None) -> None:
        if address is None:
            return
        if _loopback(address.host):
            self.port("metrics", address, "plain HTTP, loopback")
            return
        self.port("metrics", address, "plain HTTP, reachable from the network")
        if self.sources.networks("metrics") is None:
            self.warnings.append(
                f"metrics {address} is reachable from the network by every source: give a bare port "
                '(loopback) in <MetricsConnectionString>, or add <AllowedSources ports="metrics">'
            )

    def listener(self, tls: TLSListener) -> str:
        text = self.pair(tls.cert_path, tls.key_path)
        clients = tls.clients
        if clients.mode == "none":
            return f"{text}, no client certificate asked"
        trusted = [f"CA {path}" for path in clients.ca_files]
        for path in clients.ca_files:
            self._trust(path, "CA file", pinned=False)
        for path in clients.certificates:
            trusted.append(f"pinned {path}{self._trust(path, 'pinned client certificate', pinned=True)}")
        return f"{text}, client certificates {clients.mode} ({'; '.join(trusted)})"

    def pair(self, cert_path: str, key_path: str, *, client: bool = False) -> str:
        """``certificate PATH (SHA-256 …)``, its problems collected (once per pair however many ports use it)."""
        found = self._pairs.get((cert_path, key_path))
        if found is None:
            found = self._pairs[cert_path, key_path] = inspect_pair(cert_path, key_path, now=self.now)
            self.errors += found.errors + found.validity
            self.warnings += found.warnings
        if client and found.fingerprint_sha256 and not found.client_auth:
            self.warnings.append(
                f"TLS certificate {cert_path} is for servers only (no clientAuth purpose): a node that asks for a "
                "client certificate refuses it; use one with the clientAuth purpose (<ClientCertificatePath>)"
            )
        if found.missing:
            return f"certificate {cert_path} (not there yet: generated at first start, self-signed)"
        if found.fingerprint_sha256:
            return f"certificate {cert_path} (SHA-256 {found.fingerprint_sha256})"
        return f"certificate {cert_path} (unusable)"

    def _trust(self, path: str, what: str, *, pinned: bool) -> str:
        """Check a CA or pinned file; for a pinned one return `` (SHA-256 …)`` to print beside its name."""
        try:
            certs = load_certificates(path, what)
        except TLSConfigError as exc:
            self.errors.append(str(exc))
            return " (unusable)"
        for cert in certs:  # a file used by two ports is checked twice, reported once (report() drops repeats)
            self._check_trusted(cert, path, what, pinned=pinned)
        if not pinned:
            return ""
        return f" (SHA-256 {fingerprint_sha256(certs[0].public_bytes(serialization.Encoding.DER))})"

    def _check_trusted(self, cert: x509.Certificate, path: str, what: str, *, pinned: bool) -> None:
        if self.now > cert.not_valid_after_utc:
            who = "a client presenting it is refused" if pinned else "certificates it issued are refused"
            self.warnings.append(f"TLS {what} {path} expired on {cert.not_valid_after_utc.isoformat()}: {who}")
        if pinned and not allows_client_auth(cert):
            self.warnings.append(
                f"TLS {what} {path} is for servers only (no clientAuth purpose): a client presenting it is "
                "refused (unsuitable certificate purpose); pin a certificate made for client authentication"
            )

    def _sources(self, name: str) -> str:
        networks = self.sources.networks(name)
        if networks is None:
            return "open to every source"
        return f"sources {_join(str(n) for n in networks)}"


def _join(items: Iterable[str], limit: int = 8) -> str:
    listed = list(items)
    shown = ", ".join(listed[:limit])
    return shown if len(listed) <= limit else f"{shown} and {len(listed) - limit} more"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
