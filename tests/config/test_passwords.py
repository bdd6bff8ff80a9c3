"""config/passwords.py: the stored hash format is read whole, and every way it can be wrong is refused.

Refused without quoting the hash (the message reaches logs and the CLI), and with parameters whose scrypt
would need more memory than a check may take: a config with such a hash fails at load, not per request.
"""

from __future__ import annotations

import base64

import pytest

from threatgate.config.passwords import MAX_MEMORY, HashParams, check_hash_format, parse_hash, scrypt_memory

SALT = base64.b64encode(b"s" * 16).decode()
DIGEST = base64.b64encode(b"d" * 32).decode()


def stored(n: object = 16384, r: object = 8, p: object = 1, salt: str = SALT, digest: str = DIGEST) -> str:
    return f"scrypt${n}${r}${p}${salt}${digest}"


def test_a_hash_is_read_into_its_parts() -> None:
    assert parse_hash(stored()) == HashParams(16384, 8, 1, b"s" * 16, b"d" * 32)
    check_hash_format(stored())


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "expected scrypt\\$<n>"),
        (stored().replace("scrypt", "bcrypt"), "expected scrypt\\$<n>"),
        (stored() + "$x", "expected scrypt\\$<n>"),
        (stored(n="16k"), "decimal integers"),
        (stored(r="٣"), "decimal integers"),  # a Unicode digit int() would take
        (stored(p="1" * 11), "decimal integers"),
        (stored(n=16385), "n=16385: expected a power of two between 2 and 1048576"),
        (stored(n=1), "power of two"),
        (stored(n=2**21), "power of two"),
        (stored(r=0), "r=0, p=1"),
        (stored(r=33), "r=33"),
        (stored(p=17), "p=17"),
        (stored(n=2**20, r=16), "needs more than 256 MiB per check"),
        (stored(salt="not base64!"), "standard base64"),
        (stored(salt=base64.b64encode(b"s" * 7).decode()), "salt is 7 bytes, expected at least 8"),
        (stored(digest=base64.b64encode(b"d" * 15).decode()), "hash is 15 bytes, expected 16 to 64"),
        (stored(digest=base64.b64encode(b"d" * 65).decode()), "hash is 65 bytes"),
    ],
)
def test_each_fault_is_refused_saying_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        check_hash_format(text)


def test_the_message_never_quotes_the_hash() -> None:
    secret = base64.b64encode(b"secret-salt!").decode()
    with pytest.raises(ValueError) as caught:
        check_hash_format(stored(salt=secret, digest="!!!!"))
    assert secret not in str(caught.value)


def test_the_memory_bound_is_openssls_and_the_limits_are_inclusive() -> None:
    assert scrypt_memory(16384, 8, 1) == 128 * 8 * (16384 + 2 + 1)
    assert scrypt_memory(2**20, 1, 1) <= MAX_MEMORY < scrypt_memory(2**20, 2, 1)
    assert parse_hash(stored(n=2, r=32, p=16)).p == 16
    assert parse_hash(stored(n=2**20, r=1, p=1)).n == 2**20
    assert parse_hash(stored(salt=base64.b64encode(b"s" * 8).decode(), digest=base64.b64encode(b"d" * 64).decode()))
