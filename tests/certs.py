"""Certificates made in the tests, with ``cryptography``: a CA, the pairs it issues, self-signed and expired ones.

Why not trustme: it is not installed everywhere the tests run, and the TLS tests need what it does not
make (an expired certificate, a self-signed client certificate, a client certificate with or without the
clientAuth purpose).  Keys are P-256 (fast to make); files are written the way an operator would keep
them: the key 0600, the certificate 0644.

    ca = Authority("test CA")
    server = ca.issue("node", hosts=["127.0.0.1"])
    client = ca.issue("siem", client=True, server=False)
    cert_path, key_path = server.write(tmp_path, "node")
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = dt.timedelta(days=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, in memory until :meth:`write`."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def fingerprint(self) -> str:
        """``AB:CD:…``, as threatgate prints it."""
        return ":".join(f"{b:02X}" for b in self.cert.fingerprint(hashes.SHA256()))

    def write(self, directory: Path | str, name: str, *, key_mode: int = 0o600) -> tuple[str, str]:
        """``<name>.pem`` and ``<name>.key`` in ``directory`` (made if missing); returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        os.chmod(key_path, key_mode)
        return str(cert_path), str(key_path)

    def write_cert(self, directory: Path | str, name: str) -> str:
        """Only the certificate, as ``<name>.pem`` (a CA file, a pinned client certificate)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.pem"
        path.write_bytes(self.cert_pem)
        return str(path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _leaf(
    builder: x509.CertificateBuilder, public: ec.EllipticCurvePublicKey, hosts: list[str], client: bool, server: bool
) -> x509.CertificateBuilder:
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder


def self_signed(
    common_name: str,
    *,
    hosts: list[str] | None = None,
    client: bool = True,
    server: bool = True,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Pair:
    """A self-signed leaf (CA:FALSE), like the pairs threatgate generates; valid from a day ago for 90 days."""
    return _signed_leaf(common_name, None, hosts or [], client, server, not_before, not_after)


def _signed_leaf(
    common_name: str,
    issuer: Pair | None,
    hosts: list[str],
    client: bool,
    server: bool,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> Pair:
    """A new key and its leaf certificate, signed by ``issuer`` (None: by itself)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject if issuer is not None else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - DAY)
        .not_valid_after(not_after or now + 90 * DAY)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    builder = _leaf(builder, key.public_key(), hosts, client, server)
    return Pair(builder.sign(issuer.key if issuer is not None else key, hashes.SHA256()), key)


def expired(common_name: str, **kwargs: object) -> Pair:
    """A self-signed leaf that expired yesterday."""
    return self_signed(common_name, not_before=_now() - 10 * DAY, not_after=_now() - DAY, **kwargs)  # type: ignore[arg-type]


class Authority:
    """A test CA (self-signed, CA:TRUE) that issues leaves."""

    def __init__(self, common_name: str = "threatgate test CA") -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY)
            .not_valid_after(now + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        self.pair = Pair(cert, key)

    def issue(
        self,
        common_name: str,
        *,
        hosts: list[str] | None = None,
        client: bool = True,
        server: bool = True,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Pair:
        """A leaf signed by this CA; ``hosts`` go into SubjectAlternativeName (IP addresses or DNS names)."""
        return _signed_leaf(common_name, self.pair, hosts or [], client, server, not_before, not_after)
