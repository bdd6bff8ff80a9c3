"""A throw-away certificate authority on disk for tests of real shippers: a CA file, server and client pairs.

Real shippers (rsyslog's GnuTLS driver, syslog-ng's OpenSSL) verify a server the way they do in
production: by a CA file and the name in the certificate, so tests give them a real chain rather than a
self-signed leaf.  The certificates themselves are made by :mod:`tests.certs` (one way to make them);
this module only writes them where a shipper's configuration can name them, keys 0600.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.certs import Authority


@dataclass(frozen=True)
class Pair:
    """A certificate and its key on disk; ``fingerprint`` is the certificate's SHA-256, hex with colons."""

    name: str
    cert: Path
    key: Path
    fingerprint: str


class TestCA:
    """A CA whose certificate is at :attr:`cert_path`; :meth:`issue` signs leaf pairs into the same directory."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, directory: Path, name: str = "threatgate test CA") -> None:
        self.directory = directory
        self.authority = Authority(name)
        self.cert_path = Path(self.authority.pair.write_cert(directory, name.replace(" ", "-")))

    def issue(self, name: str, *, hosts: tuple[str, ...] = (), server: bool = False, client: bool = False) -> Pair:
        """A leaf pair for ``name`` (its CN, also a DNS SAN) and ``hosts`` (IP addresses or DNS names)."""
        issued = self.authority.issue(name, hosts=[name, *hosts], server=server, client=client)
        cert, key = issued.write(self.directory, name)
        return Pair(name, Path(cert), Path(key), issued.fingerprint)
