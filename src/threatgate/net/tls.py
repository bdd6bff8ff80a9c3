"""Server TLS material for the node's HTTPS API (and later the balancer's).

Rules:
1. A node must be able to start with TLS and no operator work, so when *both* files are missing we
   create a self-signed pair and log its SHA-256 fingerprint (clients pin or trust it).
2. We never overwrite or "repair" a half-present pair: if only one file exists, something is wrong
   (a lost key, a copy gone astray) and silently minting a new pair would break every client that
   trusts the old one.  The operator decides.
3. Files are written atomically (:func:`threatgate.fs.write_atomic`: temp file + fsync + rename), the
   key 0600 from its first byte, so a crash or a concurrent reader never sees a partial or briefly
   world-readable key.
4. Only this module (``net/``) turns ``cryptography``/``ssl``/``OSError`` failures into
   :class:`~threatgate.errors.TLSConfigError`, with the path(s) involved and what to do.
5. No secret ever reaches a log line: we log paths, fingerprints and dates only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
import stat
from dataclasses import dataclass, field

import idna
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from threatgate.errors import FileWriteError, TLSConfigError
from threatgate.fs import locked_directory, os_reason, write_atomic
from threatgate.net.describe import describe

log = logging.getLogger("threatgate.tls")

VALIDITY_DAYS = 825
"""Validity of a generated certificate: the longest some clients (Apple platforms) accept for a server cert."""

CLOCK_SKEW = dt.timedelta(minutes=5)
"""A generated certificate is back-dated this much so a client whose clock is slightly behind accepts it."""

EXPIRY_WARNING = dt.timedelta(days=30)
"""A certificate that expires sooner than this draws a warning (at start and from ``threatgate validate``)."""

MAX_PEM_BYTES = 1024 * 1024
"""A PEM file larger than this is refused: a key or a certificate chain is a few kilobytes."""

SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""TLS 1.2 suites: forward secrecy and AEAD only.  TLS 1.3 suites are OpenSSL's defaults (all AEAD)."""

_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class PairInfo:
    """What :func:`ensure_server_pair` found or made.

    ``warnings`` repeats, for callers that surface them elsewhere (a health endpoint, a test), the
    problems that were also logged at WARNING on ``threatgate.tls``.
    """

    cert_path: str
    key_path: str
    created: bool
    fingerprint_sha256: str
    not_after: dt.datetime
    warnings: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class PairFindings:
    """What :func:`inspect_pair` found in a certificate/key pair: facts and problems, nothing raised or logged.

    ``errors``: the pair cannot be used (the process refuses to start).  ``validity``: the certificate
    is expired or not yet valid (the process starts, with a warning; clients refuse it, so
    ``threatgate validate`` reports an error).  ``warnings``: a key readable by others, an expiry near.
    """

    cert_path: str
    key_path: str
    missing: bool = False
    """Both files are absent: a self-signed pair is generated at first start (:func:`ensure_server_pair`)."""
    fingerprint_sha256: str = ""
    not_after: dt.datetime | None = None
    client_auth: bool = False
    """The certificate may also authenticate a TLS client (clientAuth purpose, or no purpose restriction)."""
    errors: tuple[str, ...] = ()
    validity: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def inspect_pair(cert_path: str, key_path: str, *, now: dt.datetime | None = None) -> PairFindings:
    """Check a certificate/key pair as :func:`ensure_server_pair` loads it, collecting every problem.

    Reads the two files (and stats the key) but decides nothing: the start-up path raises the first
    error and logs the rest, ``threatgate validate`` prints them all.
    """
    now = now or dt.datetime.now(dt.UTC)
    if os.path.abspath(cert_path) == os.path.abspath(key_path):
        return PairFindings(
            cert_path, key_path, errors=(f"certificate and private key must be separate files, both are {cert_path}",)
        )
    cert_present, key_present = os.path.lexists(cert_path), os.path.lexists(key_path)
    if not cert_present and not key_present:
        return PairFindings(cert_path, key_path, missing=True)
    if not cert_present or not key_present:
        missing, present = (cert_path, key_path) if not cert_present else (key_path, cert_path)
        missing_what = "certificate" if not cert_present else "private key"
        present_what = "private key" if not cert_present else "certificate"
        return PairFindings(
            cert_path,
            key_path,
            errors=(
                f"TLS {missing_what} {missing} is missing but the {present_what} {present} exists: "
                f"remove {present} to have a new pair generated, or supply both files",
            ),
        )
    errors: list[str] = []
    cert: x509.Certificate | None = None
    key: _PrivateKey | None = None
    try:
        cert = _load_cert(cert_path)
    except TLSConfigError as exc:
        errors.append(str(exc))
    try:
        key = _load_key(key_path)
    except TLSConfigError as exc:
        errors.append(str(exc))
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if (
        cert is not None
        and key is not None
        and cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki)
    ):
        errors.append(
            f"TLS private key {key_path} does not belong to certificate {cert_path}: "
            "supply the matching pair, or remove both to have a new pair generated"
        )
    if cert is None:
        return PairFindings(cert_path, key_path, errors=tuple(errors), warnings=_check_key_mode(key_path))
    return PairFindings(
        cert_path,
        key_path,
        fingerprint_sha256=_colon_hex(cert.fingerprint(hashes.SHA256())),
        not_after=cert.not_valid_after_utc,
        client_auth=allows_client_auth(cert),
        errors=tuple(errors),
        validity=_check_validity(cert, cert_path, now),
        warnings=_check_key_mode(key_path) + _check_expiry(cert, cert_path, now),
    )


def allows_client_auth(cert: x509.Certificate) -> bool:
    """Whether OpenSSL accepts ``cert`` as a TLS client's: no ExtendedKeyUsage, or one naming clientAuth (or any)."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages


def ensure_server_pair(
    cert_path: str, key_path: str, *, common_name: str, hosts: list[str], client_auth: bool = False
) -> PairInfo:
    """Return the server certificate/key pair at the given paths, creating a self-signed one if both are missing.

    ``common_name`` and ``hosts`` (IP addresses or DNS names, which go into SubjectAlternativeName,
    the only place modern clients look) are used only when a pair is created.  ``client_auth`` adds
    the clientAuth key purpose, for identities that also authenticate as TLS clients (cluster nodes).

    Raises:
        TLSConfigError: exactly one file exists; a file is unreadable, not PEM, or the key is
            encrypted or of an unsupported type; the key does not belong to the certificate; or the
            pair cannot be written.
    """
    separate = os.path.abspath(cert_path) != os.path.abspath(key_path)
    if separate and not (os.path.lexists(cert_path) and os.path.lexists(key_path)):
        # Under a lock on the key's directory, looked at again: two processes starting together on one
        # configuration directory would otherwise each write half of a pair (one's key, the other's
        # cert), or one would read the other's pair half written.
        where = os.path.dirname(os.path.abspath(key_path))
        try:
            with locked_directory(where):
                if not os.path.lexists(cert_path) and not os.path.lexists(key_path):
                    return _create_pair(
                        cert_path, key_path, common_name=common_name, hosts=hosts, client_auth=client_auth
                    )
                return _load_pair(cert_path, key_path)
        except OSError as exc:
            raise TLSConfigError(f"cannot create the TLS pair in {where}: {os_reason(exc)}") from None
    return _load_pair(cert_path, key_path)


def fingerprint_sha256(cert: bytes) -> str:
    """SHA-256 fingerprint of a certificate (DER or PEM; the first one of a PEM chain), as ``AB:CD:...``.

    The format is what ``openssl x509 -fingerprint -sha256`` prints, so an operator can compare the
    log line with what a client shows without reformatting.

    Raises:
        ValueError: ``cert`` is not a certificate.
    """
    if cert.lstrip().startswith(b"-----BEGIN"):
        certs = x509.load_pem_x509_certificates(cert)
        der = certs[0].public_bytes(serialization.Encoding.DER)
    else:
        der = x509.load_der_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    return _colon_hex(hashlib.sha256(der).digest())


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A TLS server context for the HTTPS API: TLS 1.2+, ECDHE AEAD suites, no compression.

    Session tickets stay on (OpenSSL's default) so reconnecting clients such as the balancer skip the
    full handshake.

    Raises:
        TLSConfigError: the files cannot be loaded into the context.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Compression leaks plaintext length through the ciphertext (CRIME); server preference keeps the
    # strong suites first whatever order a client lists them in.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(SERVER_CIPHERS)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        why = describe(exc).removeprefix("TLS: ")  # "key values mismatch", not "[SSL: ...] ... (_ssl.c:3926)"
        raise TLSConfigError(f"cannot load TLS certificate {cert_path} with key {key_path}: {why}") from None
    return ctx


# -- creating ------------------------------------------------------------------------------------------


def _create_pair(
    cert_path: str, key_path: str, *, common_name: str, hosts: list[str], client_auth: bool = False
) -> PairInfo:
    san = _subject_alt_names(hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed(key, common_name, san, client_auth)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    # Key first: if we die between the two writes the operator finds "certificate missing, key
    # present", which the error message explains; the reverse would leave a cert nobody can use.
    try:
        write_atomic(key_path, key_pem, 0o600)
        try:
            write_atomic(cert_path, cert_pem, 0o644)
        except FileWriteError:
            _unlink_quietly(key_path)
            raise
    except FileWriteError as exc:  # this module's callers know one error: the pair cannot be used
        raise TLSConfigError(str(exc)) from None
    fp = _colon_hex(cert.fingerprint(hashes.SHA256()))
    log.info(
        "created self-signed TLS certificate %s (key %s) for %s, SHA-256 fingerprint %s, valid until %s",
        cert_path,
        key_path,
        ", ".join(hosts),
        fp,
        cert.not_valid_after_utc.isoformat(),
    )
    return PairInfo(cert_path, key_path, True, fp, cert.not_valid_after_utc)


def _subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    if not hosts:
        raise TLSConfigError("cannot create a TLS certificate without at least one host name or IP address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        try:
            # DNSName takes A-labels only; a wildcard label is kept as is.
            label = host if host.isascii() else idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise TLSConfigError(f"invalid host name {host!r} for the TLS certificate: {exc}") from None
        names.append(x509.DNSName(label))
    return names


def _self_signed(
    key: ec.EllipticCurvePrivateKey, common_name: str, san: list[x509.GeneralName], client_auth: bool = False
) -> x509.Certificate:
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        # Key identifiers cost nothing and keep strict verifiers (VERIFY_X509_STRICT) happy.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- loading -------------------------------------------------------------------------------------------


def _load_pair(cert_path: str, key_path: str) -> PairInfo:
    found = inspect_pair(cert_path, key_path)
    if found.errors:
        raise TLSConfigError(found.errors[0])
    assert found.not_after is not None  # no error: the certificate was read
    warnings = found.validity + found.warnings
    for warning in warnings:
        log.warning("%s", warning)
    log.info(
        "loaded TLS certificate %s (key %s), SHA-256 fingerprint %s, valid until %s",
        cert_path,
        key_path,
        found.fingerprint_sha256,
        found.not_after.isoformat(),
    )
    return PairInfo(cert_path, key_path, False, found.fingerprint_sha256, found.not_after, warnings)


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise TLSConfigError(f"cannot read TLS {what} {path}: {os_reason(exc)}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TLSConfigError(f"TLS {what} {path} is larger than {MAX_PEM_BYTES} bytes: not a PEM {what}")
    return data


def _load_cert(path: str) -> x509.Certificate:
    data = _read_pem(path, "certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"TLS certificate {path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    # A chain file is fine: the server certificate comes first, as load_cert_chain expects.
    return certs[0]


def load_certificates(path: str, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM file (a CA bundle, a pinned client certificate); ``what`` names it in errors.

    Raises:
        TLSConfigError: the file is missing, unreadable, too large or holds no PEM certificate.
    """
    if not os.path.lexists(path):
        raise TLSConfigError(
            f"TLS {what} {path} does not exist: check the path (a relative one is read from the configuration "
            "file's directory)"
        )
    data = _read_pem(path, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(
            f"TLS {what} {path} is not a PEM certificate file (-----BEGIN CERTIFICATE-----): "
            "convert it, e.g. openssl x509 -inform DER -in FILE -out FILE.pem"
        ) from None


def _load_key(path: str) -> _PrivateKey:
    data = _read_pem(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography's signal for "encrypted, and no password given".
        raise TLSConfigError(
            f"TLS private key {path} is encrypted: the node starts unattended, so store it unencrypted "
            "(mode 0600), e.g. openssl pkey -in KEY -out KEY.plain"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(f"TLS private key {path} is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise TLSConfigError(f"TLS private key {path} is a {type(key).__name__}: use an RSA, EC or Ed25519 key")
    return key


def _check_key_mode(path: str) -> tuple[str, ...]:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return ()
    if mode & 0o077:
        return (f"TLS private key {path} has mode {mode:04o}, readable by group or others: chmod 600 {path}",)
    return ()


def _check_validity(cert: x509.Certificate, path: str, now: dt.datetime) -> tuple[str, ...]:
    if now > cert.not_valid_after_utc:
        return (f"TLS certificate {path} expired on {cert.not_valid_after_utc.isoformat()}: clients will refuse it",)
    if now < cert.not_valid_before_utc:
        return (
            f"TLS certificate {path} is not valid before {cert.not_valid_before_utc.isoformat()}: "
            "clients will refuse it (check the clock)",
        )
    return ()


def _check_expiry(cert: x509.Certificate, path: str, now: dt.datetime) -> tuple[str, ...]:
    left = cert.not_valid_after_utc - now
    if dt.timedelta(0) <= left < EXPIRY_WARNING:
        return (
            f"TLS certificate {path} expires on {cert.not_valid_after_utc.isoformat()} (in {left.days} day(s)): "
            "renew it before clients refuse it",
        )
    return ()


def _colon_hex(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)
