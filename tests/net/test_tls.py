"""Tests for threatgate.net.tls: self-signed pair creation, loading checks and the server context."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import stat
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from threatgate.errors import ThreatgateError, TLSConfigError
from threatgate.net.tls import (
    PairInfo,
    allows_client_auth,
    ensure_server_pair,
    fingerprint_sha256,
    inspect_pair,
    load_certificates,
    server_context,
)

HOSTS = ["127.0.0.1", "localhost", "::1"]


def _pair(tmp_path: Path, name: str = "node") -> tuple[str, str]:
    return str(tmp_path / "certs" / f"{name}.pem"), str(tmp_path / "certs" / f"{name}.key")


def _create(tmp_path: Path, name: str = "node") -> PairInfo:
    cert, key = _pair(tmp_path, name)
    return ensure_server_pair(cert, key, common_name="threatgate-node", hosts=HOSTS)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_key_cert(tmp_path: Path, key_pem: bytes, cert_pem: bytes) -> tuple[str, str]:
    cert, key = str(tmp_path / "own.pem"), str(tmp_path / "own.key")
    Path(cert).write_bytes(cert_pem)
    Path(key).write_bytes(key_pem)
    os.chmod(key, 0o600)
    return cert, key


# -- creation ------------------------------------------------------------------------------------------


def test_creates_self_signed_pair_with_modes_and_fingerprint(tmp_path: Path) -> None:
    info = _create(tmp_path)
    assert info.created
    assert _mode(info.key_path) == 0o600
    assert _mode(info.cert_path) == 0o644
    assert _mode(str(tmp_path / "certs")) == 0o700
    assert not [p for p in os.listdir(tmp_path / "certs") if p.endswith(".tmp")]

    cert = x509.load_pem_x509_certificate(Path(info.cert_path).read_bytes())
    expected = cert.fingerprint(hashes.SHA256()).hex().upper()
    assert info.fingerprint_sha256.replace(":", "") == expected
    assert len(info.fingerprint_sha256) == 32 * 3 - 1
    assert info.not_after == cert.not_valid_after_utc


def test_created_certificate_contents(tmp_path: Path) -> None:
    info = _create(tmp_path)
    cert = x509.load_pem_x509_certificate(Path(info.cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(info.key_path).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 825 <= days <= 826
    assert cert.subject.rfc4514_string() == "CN=threatgate-node"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]


def test_second_call_loads_same_pair(tmp_path: Path) -> None:
    first = _create(tmp_path)
    cert_bytes = Path(first.cert_path).read_bytes()
    second = _create(tmp_path)
    assert not second.created
    assert second.fingerprint_sha256 == first.fingerprint_sha256
    assert second.warnings == ()
    assert Path(first.cert_path).read_bytes() == cert_bytes


def test_creation_logs_fingerprint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="threatgate.tls"):
        info = _create(tmp_path)
    assert info.fingerprint_sha256 in caplog.text
    assert "BEGIN" not in caplog.text


def test_no_hosts_is_an_error(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    with pytest.raises(TLSConfigError, match="host"):
        ensure_server_pair(cert, key, common_name="x", hosts=[])
    assert not os.path.exists(key)


def test_same_path_for_both_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "both.pem")
    with pytest.raises(TLSConfigError, match="separate files"):
        ensure_server_pair(path, path, common_name="x", hosts=HOSTS)


# -- half pairs and broken files -----------------------------------------------------------------------


def test_only_cert_missing(tmp_path: Path) -> None:
    info = _create(tmp_path)
    os.unlink(info.cert_path)
    with pytest.raises(TLSConfigError) as excinfo:
        _create(tmp_path)
    message = str(excinfo.value)
    assert f"certificate {info.cert_path} is missing" in message
    assert info.key_path in message and "remove" in message and "supply both" in message
    assert isinstance(excinfo.value, ThreatgateError)
    assert not os.path.exists(info.cert_path)  # nothing regenerated behind the operator's back


def test_only_key_missing(tmp_path: Path) -> None:
    info = _create(tmp_path)
    os.unlink(info.key_path)
    with pytest.raises(TLSConfigError) as excinfo:
        _create(tmp_path)
    message = str(excinfo.value)
    assert f"private key {info.key_path} is missing" in message
    assert f"remove {info.cert_path}" in message


def test_crossed_pairs_are_refused(tmp_path: Path) -> None:
    a = _create(tmp_path, "a")
    b = _create(tmp_path, "b")
    with pytest.raises(TLSConfigError, match="does not belong") as excinfo:
        ensure_server_pair(a.cert_path, b.key_path, common_name="x", hosts=HOSTS)
    assert a.cert_path in str(excinfo.value) and b.key_path in str(excinfo.value)


def test_encrypted_key_is_refused(tmp_path: Path) -> None:
    info = _create(tmp_path)
    key = serialization.load_pem_private_key(Path(info.key_path).read_bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    Path(info.key_path).write_bytes(encrypted)
    with pytest.raises(TLSConfigError, match="is encrypted") as excinfo:
        _create(tmp_path)
    assert "secret" not in str(excinfo.value)


@pytest.mark.parametrize("which", ["cert", "key"])
def test_garbage_pem_is_refused(tmp_path: Path, which: str) -> None:
    info = _create(tmp_path)
    path = info.cert_path if which == "cert" else info.key_path
    Path(path).write_bytes(b"-----BEGIN GARBAGE-----\nnot base64\n-----END GARBAGE-----\n")
    with pytest.raises(TLSConfigError, match="is not a PEM") as excinfo:
        _create(tmp_path)
    assert path in str(excinfo.value)


def test_unreadable_path_is_refused(tmp_path: Path) -> None:
    info = _create(tmp_path)
    os.unlink(info.key_path)
    os.mkdir(info.key_path)
    with pytest.raises(TLSConfigError, match="cannot read"):
        _create(tmp_path)


# -- foreign pairs and warnings ------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def test_trustme_pair_loads(tmp_path: Path, key_type: trustme.KeyType) -> None:
    ca = trustme.CA(key_type=key_type)
    leaf = ca.issue_cert("127.0.0.1", key_type=key_type)
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    cert, key = _write_key_cert(tmp_path, leaf.private_key_pem.bytes(), chain)
    info = ensure_server_pair(cert, key, common_name="unused", hosts=["unused.example"])
    assert not info.created
    assert info.fingerprint_sha256 == fingerprint_sha256(leaf.cert_chain_pems[0].bytes())
    assert info.warnings == ()


def _self_signed(
    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey, not_before: dt.datetime, days: int
) -> bytes:
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "test")])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=days))
        .sign(key, algorithm)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_ed25519_pair_loads(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    cert, key_path = _write_key_cert(tmp_path, _key_pem(key), _self_signed(key, now - dt.timedelta(days=1), 30))
    assert not ensure_server_pair(cert, key_path, common_name="x", hosts=HOSTS).created


def test_expired_and_future_certificates_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert, key_path = _write_key_cert(tmp_path, _key_pem(key), _self_signed(key, now - dt.timedelta(days=30), 1))
    with caplog.at_level(logging.WARNING, logger="threatgate.tls"):
        info = ensure_server_pair(cert, key_path, common_name="x", hosts=HOSTS)
    assert any("expired" in w for w in info.warnings)
    assert "expired" in caplog.text

    Path(cert).write_bytes(_self_signed(key, now + dt.timedelta(days=2), 30))
    info = ensure_server_pair(cert, key_path, common_name="x", hosts=HOSTS)
    assert any("not valid before" in w for w in info.warnings)


def test_group_readable_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    info = _create(tmp_path)
    os.chmod(info.key_path, 0o640)
    with caplog.at_level(logging.WARNING, logger="threatgate.tls"):
        loaded = _create(tmp_path)
    assert any("0640" in w and "chmod 600" in w for w in loaded.warnings)
    assert "readable by group or others" in caplog.text
    key_text = Path(info.key_path).read_text()
    assert key_text.splitlines()[1] not in caplog.text  # no key material in the log


# -- fingerprint_sha256 --------------------------------------------------------------------------------


def test_fingerprint_pem_and_der_agree(tmp_path: Path) -> None:
    info = _create(tmp_path)
    pem = Path(info.cert_path).read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert fingerprint_sha256(pem) == fingerprint_sha256(der) == info.fingerprint_sha256
    assert fingerprint_sha256(b"\n" + pem) == info.fingerprint_sha256
    fp = info.fingerprint_sha256
    assert fp == fp.upper() and all(len(part) == 2 for part in fp.split(":"))


def test_fingerprint_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        fingerprint_sha256(b"definitely not a certificate")


# -- server_context ------------------------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(await reader.readline())
        await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _handshake(port: int, client: ssl.SSLContext) -> tuple[bytes, str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="127.0.0.1")
    try:
        writer.write(b"ping\n")
        reply = await reader.readline()
        cipher, version, _ = writer.get_extra_info("cipher")
        return reply, cipher, version
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def _client(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; our certificate must pass it
    return ctx


async def test_server_context_serves_tls(tmp_path: Path) -> None:
    info = _create(tmp_path)
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=server_context(info.cert_path, info.key_path))
    port = server.sockets[0].getsockname()[1]
    try:
        client = _client(info.cert_path)
        assert client.check_hostname
        reply, _, version = await _handshake(port, client)
        assert reply == b"ping\n"
        assert version == "TLSv1.3"

        tls12 = _client(info.cert_path)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        reply, cipher, version = await _handshake(port, tls12)
        assert reply == b"ping\n" and version == "TLSv1.2"
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
    finally:
        server.close()
        await server.wait_closed()


async def test_server_refuses_tls11_and_wrong_host(tmp_path: Path) -> None:
    info = _create(tmp_path)
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=server_context(info.cert_path, info.key_path))
    port = server.sockets[0].getsockname()[1]
    try:
        old = _client(info.cert_path)
        with warnings.catch_warnings():  # the deprecation is the point of the test
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1, so the *server* must refuse
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _handshake(port, old)

        other = _create(tmp_path, "other")
        with pytest.raises(ssl.SSLCertVerificationError):
            await _handshake(port, _client(other.cert_path))
    finally:
        server.close()
        await server.wait_closed()


def test_server_context_settings(tmp_path: Path) -> None:
    info = _create(tmp_path)
    ctx = server_context(info.cert_path, info.key_path)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert not ctx.options & ssl.OP_NO_TICKET
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(name.startswith("ECDHE-") for name in tls12)


def test_server_context_bad_files(tmp_path: Path) -> None:
    a = _create(tmp_path, "a")
    b = _create(tmp_path, "b")
    with pytest.raises(TLSConfigError, match=a.cert_path) as excinfo:
        server_context(a.cert_path, b.key_path)
    assert str(excinfo.value).endswith(": key values mismatch")  # ssl's words, without "(_ssl.c:...)"


# -- inspect_pair: every problem at once, for validate and for the start ------------------------------------


def test_inspect_pair_collects_every_problem(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    Path(cert).parent.mkdir()
    Path(cert).write_text("not a certificate\n")
    Path(key).write_text("not a key\n")
    os.chmod(key, 0o644)
    found = inspect_pair(cert, key)
    assert not found.missing and found.fingerprint_sha256 == ""
    assert found.errors == (
        f"TLS certificate {cert} is not a PEM certificate (-----BEGIN CERTIFICATE-----)",
        f"TLS private key {key} is not a PEM private key",
    )
    assert found.warnings == (f"TLS private key {key} has mode 0644, readable by group or others: chmod 600 {key}",)


def test_inspect_pair_both_missing_is_not_an_error(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    found = inspect_pair(cert, key)
    assert found.missing and found.errors == () and found.warnings == ()
    assert inspect_pair(cert, cert).errors == (f"certificate and private key must be separate files, both are {cert}",)


def test_inspect_pair_facts_and_clock(tmp_path: Path) -> None:
    info = _create(tmp_path)
    found = inspect_pair(info.cert_path, info.key_path)
    assert (found.fingerprint_sha256, found.not_after) == (info.fingerprint_sha256, info.not_after)
    assert found.errors == found.validity == found.warnings == ()
    assert not found.client_auth  # generated for a server only
    soon = inspect_pair(info.cert_path, info.key_path, now=info.not_after - dt.timedelta(days=3, hours=1))
    assert soon.validity == ()
    assert len(soon.warnings) == 1 and "(in 3 day(s)): renew it" in soon.warnings[0]
    late = inspect_pair(info.cert_path, info.key_path, now=info.not_after + dt.timedelta(seconds=1))
    assert len(late.validity) == 1 and "expired on" in late.validity[0]


def test_client_auth_purpose(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path, "member")
    info = ensure_server_pair(cert, key, common_name="member", hosts=HOSTS, client_auth=True)
    assert inspect_pair(info.cert_path, info.key_path).client_auth
    no_eku = x509.load_pem_x509_certificate(trustme.CA().cert_pem.bytes())  # a CA: no ExtendedKeyUsage
    assert allows_client_auth(no_eku)


def test_start_warns_of_a_near_expiry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "soon")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=5))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_path, key_path = _write_key_cert(tmp_path, key_pem, cert.public_bytes(serialization.Encoding.PEM))
    with caplog.at_level(logging.WARNING, logger="threatgate.tls"):
        info = ensure_server_pair(cert_path, key_path, common_name="x", hosts=HOSTS)
    assert len(info.warnings) == 1 and "renew it" in info.warnings[0]
    assert "renew it" in caplog.text


def test_load_certificates(tmp_path: Path) -> None:
    info = _create(tmp_path)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(info.cert_path).read_bytes() + trustme.CA().cert_pem.bytes())
    assert len(load_certificates(str(bundle), "CA file")) == 2
    with pytest.raises(TLSConfigError, match=r"TLS CA file .*nope\.pem does not exist: check the path"):
        load_certificates(str(tmp_path / "nope.pem"), "CA file")
    with pytest.raises(TLSConfigError, match=r"TLS CA file .*node\.key is not a PEM certificate file"):
        load_certificates(info.key_path, "CA file")
    os.mkdir(tmp_path / "dir.pem")
    with pytest.raises(TLSConfigError, match=r"cannot read TLS CA file .*dir\.pem: Is a directory"):
        load_certificates(str(tmp_path / "dir.pem"), "CA file")


def _make_at_once(paths: tuple[str, str], start: Any, results: Any) -> None:
    start.wait()
    try:
        results.put(ensure_server_pair(*paths, common_name="n", hosts=["127.0.0.1"]).fingerprint_sha256)
    except TLSConfigError as exc:
        results.put(f"error: {exc}")


def test_processes_creating_one_pair_at_once_end_with_one_matching_pair(tmp_path: Path) -> None:
    """Two nodes started together on one configuration directory: one creates the pair, the others load it
    (without the lock, each wrote half: one's key beside another's certificate)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(20):
        paths = (str(tmp_path / f"r{round_}" / "node.pem"), str(tmp_path / f"r{round_}" / "node.key"))
        start, results = context.Barrier(6), context.Queue()
        procs = [context.Process(target=_make_at_once, args=(paths, start, results)) for _ in range(6)]
        for proc in procs:
            proc.start()
        fingerprints = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(60)
        assert len(set(fingerprints)) == 1, fingerprints
        assert ensure_server_pair(*paths, common_name="n", hosts=["127.0.0.1"]).fingerprint_sha256 == fingerprints[0]
