"""Trust-on-first-use pins of the nodes' HTTPS certificates, exactly as CyberTrace's Balancer keeps them.

A node's reference certificate lives in ``<CertDirPath>/<INSTANCE>_<matching_port>.pem`` (INSTANCE =
the ``<Instance>`` element's text).  The first HTTPS connection to a node without a reference file
saves the certificate it presents and continues; every later connection must present exactly that
certificate (compared by SHA-256 of its DER bytes) before any request byte is sent.  A changed host
or port means a new file name, so a new pin; old files stay until an administrator removes them.

Safer than the original: the directory is created 0700 and files 0600, written atomically (a crash
never leaves half a pin, which would look like a mismatch), and ``threatgate balancer pins --renew``
replaces one pin after an administrator has confirmed the new certificate.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from threatgate.config.balancer import InstanceSettings
from threatgate.fs import write_atomic
from threatgate.net.tls import fingerprint_sha256


@dataclass(frozen=True, slots=True)
class Pin:
    """A saved reference certificate; ``sha256`` is computed once (the gateway checks it per connection)."""

    path: str
    der: bytes
    sha256: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.der).digest())

    @property
    def fingerprint(self) -> str:
        return fingerprint_sha256(self.der)


class PinStore:
    """The reference certificates under one ``CertDirPath``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._cache: dict[str, tuple[tuple[int, int, int], Pin]] = {}

    def cached(self, instance: InstanceSettings) -> Pin | None:
        """:meth:`load` through a cache keyed on the file's (inode, size, mtime): one ``stat`` per call.

        So the gateway neither reads the file per request nor misses a pin renewed on disk.
        """
        path = self.path(instance)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(path, None)
            return None
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._cache.get(path)
        if hit is not None and hit[0] == identity:
            return hit[1]
        pin = self.load(instance)
        if pin is not None:
            self._cache[path] = (identity, pin)
        return pin

    def path(self, instance: InstanceSettings) -> str:
        return os.path.join(self.directory, f"{instance.host}_{instance.matching_port}.pem")

    def load(self, instance: InstanceSettings) -> Pin | None:
        """The pin of ``instance``, or None when there is none yet.

        Raises:
            ValueError: the file exists but holds no certificate (never treated as "no pin").
        """
        path = self.path(instance)
        try:
            with open(path, "rb") as fh:
                data = fh.read(1024 * 1024)
        except FileNotFoundError:
            return None
        try:
            cert = x509.load_pem_x509_certificates(data)[0]
        except ValueError:
            raise ValueError(f"{path} holds no PEM certificate; remove it or renew the pin") from None
        return Pin(path, cert.public_bytes(serialization.Encoding.DER))

    def save(self, instance: InstanceSettings, der: bytes) -> Pin:
        """Save ``der`` as the reference certificate of ``instance`` (0600, atomically; directory 0700)."""
        path = self.path(instance)
        write_atomic(path, ssl.DER_cert_to_PEM_cert(der).encode("ascii"), 0o600)
        return Pin(path, der)

    def all(self) -> list[Pin]:
        """Every pin file in the directory (old host/port combinations included)."""
        out: list[Pin] = []
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return out
        for name in names:
            if not name.endswith(".pem"):
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as fh:
                    cert = x509.load_pem_x509_certificates(fh.read(1024 * 1024))[0]
            except (OSError, ValueError):
                continue
            out.append(Pin(path, cert.public_bytes(serialization.Encoding.DER)))
        return out
