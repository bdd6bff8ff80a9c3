"""The stored password hash format: ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``.

The format is part of the configuration (``<User password_hash=...>``), so a config reader checks it
at load time, and the node's authenticator (:mod:`threatgate.node.auth`) reads it to verify a
password. It lives here, below both, so that reading a config never imports the authenticator.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

PREFIX = "scrypt"
MAX_N = 2**20
MAX_R = 32
MAX_P = 16
MAX_MEMORY = 256 * 1024 * 1024
"""Stored hashes may use other (stronger) parameters, but not ones that would eat the host's memory."""


@dataclass(frozen=True)
class HashParams:
    """A parsed hash: scrypt's cost parameters, the salt and the digest."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def parse_hash(stored: str) -> HashParams:
    """The parts of ``stored``; ValueError says what is wrong, never quoting the hash itself."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != PREFIX:
        raise ValueError("expected scrypt$<n>$<r>$<p>$<salt base64>$<hash base64>")
    if not all(x.isascii() and x.isdecimal() and len(x) <= 10 for x in parts[1:4]):
        raise ValueError("n, r and p must be decimal integers")
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or n > MAX_N:
        raise ValueError(f"n={n}: expected a power of two between 2 and {MAX_N}")
    if not 1 <= r <= MAX_R or not 1 <= p <= MAX_P:
        raise ValueError(f"r={r}, p={p}: expected 1 <= r <= {MAX_R} and 1 <= p <= {MAX_P}")
    if scrypt_memory(n, r, p) > MAX_MEMORY:
        raise ValueError(f"n={n}, r={r} needs more than {MAX_MEMORY // 2**20} MiB per check")
    try:
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("salt and hash must be standard base64") from None
    if len(salt) < 8:
        raise ValueError(f"salt is {len(salt)} bytes, expected at least 8")
    if not 16 <= len(digest) <= 64:
        raise ValueError(f"hash is {len(digest)} bytes, expected 16 to 64")
    return HashParams(n, r, p, salt, digest)


def scrypt_memory(n: int, r: int, p: int) -> int:
    """Bytes OpenSSL's scrypt allocates (its ``maxmem`` check): 128*r*(n+2) for V plus 128*r*p for B."""
    return 128 * r * (n + 2 + p)


def check_hash_format(stored: str) -> None:
    """Raise ValueError (with what is wrong, never the hash itself) unless ``stored`` is a usable hash.

    Called when the config is loaded so that a typo is a start-up error, not a 500 on every request.
    """
    parse_hash(stored)
