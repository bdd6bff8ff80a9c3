"""Tests for threatgate.node.auth: scrypt password hashes and the HTTP Basic checker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from threatgate.config.passwords import check_hash_format
from threatgate.errors import ConfigError
from threatgate.node import auth
from threatgate.node.auth import BasicAuth, hash_password, parse_basic, verify_password

# One real hash for the whole module: scrypt is deliberately slow.
STORED = hash_password("correct horse")
OTHER = hash_password("battery staple")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- hashes --------------------------------------------------------------------------------------------


def test_hash_format() -> None:
    prefix, n, r, p, salt, digest = STORED.split("$")
    assert (prefix, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) == 32
    check_hash_format(STORED)


def test_hashes_are_salted_but_same_shape() -> None:
    again = hash_password("correct horse")
    assert again != STORED
    assert [len(part) for part in again.split("$")] == [len(part) for part in STORED.split("$")]


def test_verify() -> None:
    assert verify_password(STORED, "correct horse")
    assert not verify_password(STORED, "correct horse ")
    assert not verify_password(STORED, "")
    assert verify_password(hash_password("pässwörd ✓"), "pässwörd ✓")


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plaintext",
        "bcrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==",
        "scrypt$16385$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$-16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16384$0$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$1048576$32$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16384$8$1$not base64!$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16384$8$1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA",
    ],
)
def test_malformed_hash_is_value_error(stored: str) -> None:
    with pytest.raises(ValueError):
        check_hash_format(stored)
    with pytest.raises(ValueError):
        verify_password(stored, "x")


def test_malformed_hash_message_does_not_echo_it() -> None:
    stored = STORED[:-4] + "!!!!"
    with pytest.raises(ValueError) as excinfo:
        check_hash_format(stored)
    assert STORED.split("$")[4] not in str(excinfo.value)


def test_basic_auth_rejects_malformed_table_at_construction() -> None:
    with pytest.raises(ValueError, match="'bob'"):
        BasicAuth({"alice": STORED, "bob": "scrypt$broken"})


# -- header parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Basic",
        "Basic ",
        "Bearer " + base64.b64encode(b"alice:x").decode(),
        "Basic " + base64.b64encode(b"alice:x").decode() + " ",
        "Basic  " + base64.b64encode(b"alice:x").decode(),
        "Basic " + base64.b64encode(b"alice:x").decode().rstrip("="),
        "Basic not*base64",
        "Basic " + base64.b64encode(b"no colon here").decode(),
        "Basic " + base64.b64encode(b"alice:\xff\xfe").decode(),
        "Basic é" + base64.b64encode(b"alice:x").decode(),
        "Basic " + "A" * 5000,
    ],
)
def test_parse_basic_is_strict(header: str) -> None:
    assert parse_basic(header) is None


def test_parse_basic_good() -> None:
    assert parse_basic(basic("alice", "p:w:d")) == ("alice", "p:w:d")
    assert parse_basic("basic " + base64.b64encode(b"alice:").decode()) == ("alice", "")
    assert parse_basic(basic("ünï", "ß")) == ("ünï", "ß")


# -- BasicAuth -----------------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Count calls of the module's verify function (each one is a scrypt run)."""
    calls: list[tuple[str, str]] = []
    real: Callable[[str, str], bool] = auth.verify_password

    def counting(stored: str, password: str) -> bool:
        calls.append((stored, password))
        return real(stored, password)

    monkeypatch.setattr(auth, "verify_password", counting)
    return calls


async def test_good_header(counted: list[tuple[str, str]]) -> None:
    checker = BasicAuth({"alice": STORED, "bob": OTHER})
    assert await checker.authenticate(basic("alice", "correct horse")) == "alice"
    assert await checker.authenticate(basic("bob", "battery staple")) == "bob"
    assert checker.stats.ok == 2 and checker.stats.bad_credentials == 0
    assert len(counted) == 2


async def test_wrong_password_and_unknown_user(counted: list[tuple[str, str]]) -> None:
    checker = BasicAuth({"alice": STORED})
    assert await checker.authenticate(basic("alice", "wrong")) is None
    assert await checker.authenticate(basic("mallory", "correct horse")) is None
    assert await checker.authenticate(basic("", "correct horse")) is None
    assert checker.stats.bad_credentials == 3 and checker.stats.ok == 0
    # An unknown user still pays one scrypt (against the dummy hash), like a known one.
    assert len(counted) == 3
    assert counted[1][0] != STORED and counted[1][0].startswith("scrypt$16384$8$1$")


async def test_malformed_headers_are_refused_without_scrypt(counted: list[tuple[str, str]]) -> None:
    checker = BasicAuth({"alice": STORED})
    headers = [
        "",
        "Token abc",
        basic("alice", "correct horse").replace("Basic", "Digest"),
        "Basic %%%",
        "Basic " + base64.b64encode(b"alice").decode(),
        "Basic " + base64.b64encode(b"alice:\xc3(").decode(),
    ]
    for header in headers:
        assert await checker.authenticate(header) is None
    assert await checker.authenticate(None) is None
    assert checker.stats.malformed == len(headers)
    assert checker.stats.missing == 1
    assert counted == []


async def test_cache_hit_skips_scrypt(counted: list[tuple[str, str]]) -> None:
    checker = BasicAuth({"alice": STORED})
    header = basic("alice", "correct horse")
    for _ in range(50):
        assert await checker.authenticate(header) == "alice"
    assert len(counted) == 1
    assert checker.stats.ok == 50 and checker.stats.cache_hits == 49


async def test_cache_does_not_hold_plaintext() -> None:
    checker = BasicAuth({"alice": STORED})
    header = basic("alice", "correct horse")
    assert await checker.authenticate(header) == "alice"
    cache = checker._cache  # white-box: what is kept in memory
    assert len(cache) == 1
    (key, user), *_ = cache.items()
    assert user == "alice"
    assert b"correct horse" not in key and header.encode() not in key and len(key) == 16


async def test_failures_are_never_cached(counted: list[tuple[str, str]]) -> None:
    checker = BasicAuth({"alice": STORED})
    assert await checker.authenticate(basic("alice", "correct horse")) == "alice"
    for _ in range(3):
        assert await checker.authenticate(basic("alice", "wrong")) is None
    assert await checker.authenticate(basic("alice", "correct horse")) == "alice"
    assert len(counted) == 4  # each wrong attempt paid scrypt again; the right one came from the cache
    assert checker.stats.bad_credentials == 3


async def test_cache_is_bounded() -> None:
    checker = BasicAuth({"alice": STORED}, cache_size=2)
    # Same user, headers that differ only in scheme spelling: three distinct cache keys.
    token = base64.b64encode(b"alice:correct horse").decode()
    for scheme in ("Basic", "basic", "BASIC"):
        assert await checker.authenticate(f"{scheme} {token}") == "alice"
        assert len(checker._cache) <= 2


async def test_concurrency_limit_and_loop_stays_free(monkeypatch: pytest.MonkeyPatch) -> None:
    lock = threading.Lock()
    running = 0
    peak = 0

    def slow_verify(stored: str, password: str) -> bool:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return False

    monkeypatch.setattr(auth, "verify_password", slow_verify)
    checker = BasicAuth({"alice": STORED}, max_concurrent=2)

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(*(checker.authenticate(basic("alice", f"guess{i}")) for i in range(10)))
    finally:
        tick_task.cancel()
    assert results == [None] * 10
    assert peak == 2
    assert ticks >= 20  # ~250 ms of scrypt did not stall the event loop
    assert checker.stats.bad_credentials == 10


async def test_identical_concurrent_headers_share_one_check(counted: list[tuple[str, str]]) -> None:
    checker = BasicAuth({"alice": STORED})
    header = basic("alice", "correct horse")
    results = await asyncio.gather(*(checker.authenticate(header) for _ in range(20)))
    assert results == ["alice"] * 20
    assert len(counted) == 1
    assert checker.stats.ok == 20


async def test_cancelled_caller_does_not_break_others(monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()
    release = threading.Event()

    def blocking_verify(stored: str, password: str) -> bool:
        started.set()
        release.wait(5)
        return password == "correct horse"

    monkeypatch.setattr(auth, "verify_password", blocking_verify)
    checker = BasicAuth({"alice": STORED})
    header = basic("alice", "correct horse")
    first = asyncio.create_task(checker.authenticate(header))
    second = asyncio.create_task(checker.authenticate(header))
    await asyncio.to_thread(started.wait, 5)
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await second == "alice"
    assert first.cancelled()


def _cheap_hash(password: str) -> str:
    """A valid hash with small parameters (n=1024), as an older or tuned config might hold."""
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1024, r=4, p=1, dklen=32)
    return f"scrypt$1024$4$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


async def test_other_parameters_verify_and_shape_the_dummy(
    counted: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = _cheap_hash("pw")
    assert verify_password(stored, "pw")
    calls = 0
    real_scrypt = hashlib.scrypt

    def counting_scrypt(*args: Any, **kwargs: Any) -> bytes:
        nonlocal calls
        calls += 1
        return real_scrypt(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting_scrypt)
    checker = BasicAuth({"old": stored})
    assert calls == 0  # construction is cheap: it runs at every config reload, on the event loop
    assert await checker.authenticate(basic("old", "pw")) == "old"
    assert await checker.authenticate(basic("nobody", "pw")) is None
    # The unknown user was checked against a dummy with the real user's cost parameters.
    assert counted[-1][0].startswith("scrypt$1024$4$1$") and counted[-1][0] != stored


# -- users that follow the config file -------------------------------------------------------------------


class UsersFile:
    """A stand-in config file: its users (or a ConfigError to raise), and how often it was read."""

    def __init__(self, tmp_path: Any, users: dict[str, str]) -> None:
        self.path = str(tmp_path / "node.conf")
        self.users: dict[str, str] | ConfigError = dict(users)
        self.reads = 0
        self.counted: list[str] = []
        self.write()

    def write(self) -> None:
        """Change the file's identity (size and mtime) as an edit would."""
        with open(self.path, "a") as fh:
            fh.write(f"<!-- edit {self.reads} {time.monotonic_ns()} -->\n")

    def read(self, path: str) -> dict[str, str]:
        assert path == self.path
        self.reads += 1
        if isinstance(self.users, ConfigError):
            raise self.users
        return dict(self.users)

    def node_users(self, start: dict[str, str]) -> auth.NodeUsers:
        return auth.NodeUsers(start, path=self.path, read=self.read, count=self.counted.append)


async def test_a_user_added_to_the_file_gets_in_with_the_first_request(tmp_path: Any) -> None:
    file = UsersFile(tmp_path, {"alice": STORED})
    users = file.node_users({"alice": STORED})
    assert await users.authenticate(basic("alice", "correct horse")) == "alice"
    file.users = {"alice": STORED, "bob": OTHER}
    file.write()
    assert await users.authenticate(basic("bob", "battery staple")) == "bob"  # no check() ran before
    assert file.reads == 1


async def test_a_removed_user_or_an_old_password_stops_working_at_the_next_look(tmp_path: Any) -> None:
    file = UsersFile(tmp_path, {"alice": STORED, "bob": OTHER})
    users = file.node_users({"alice": STORED, "bob": OTHER})
    assert await users.authenticate(basic("bob", "battery staple")) == "bob"  # now cached
    file.users = {"alice": OTHER}
    file.write()
    assert await users.check() is True
    assert await users.authenticate(basic("bob", "battery staple")) is None
    assert await users.authenticate(basic("alice", "correct horse")) is None
    assert await users.authenticate(basic("alice", "battery staple")) == "alice"


async def test_each_version_is_read_once_and_unchanged_users_keep_the_cache(tmp_path: Any) -> None:
    file = UsersFile(tmp_path, {"alice": STORED})
    users = file.node_users({"alice": STORED})
    kept = users.auth
    assert await users.check() is False  # first look: read once, same users
    assert await users.check() is False
    for _ in range(3):
        assert await users.authenticate(basic("alice", "wrong")) is None
    assert file.reads == 1
    file.write()  # a comment changed: read again, same users, same BasicAuth (and cache)
    assert await users.check() is False
    assert file.reads == 2 and users.auth is kept


async def test_an_invalid_file_is_logged_and_counted_once_and_the_users_stay(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "threatgate.node")
    file = UsersFile(tmp_path, {"alice": STORED})
    users = file.node_users({"alice": STORED})
    file.users = ConfigError(file.path, 7, "User", "password_hash: expected scrypt$...")
    file.write()
    assert await users.check() is False
    assert await users.check() is False
    assert await users.authenticate(basic("alice", "correct horse")) == "alice"
    assert file.counted == ["users_file_invalid"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].message == (
        f"API users not re-read: {file.path}:7: <User>: password_hash: expected scrypt$...; "
        "the running users stay until the file is valid"
    )
    file.users = {"alice": STORED, "bob": OTHER}
    file.write()
    assert await users.check() is True
    assert "API users re-read from" in caplog.text and "added bob (no reload needed)" in caplog.text


async def test_no_path_never_looks(tmp_path: Any) -> None:
    file = UsersFile(tmp_path, {"bob": OTHER})
    users = auth.NodeUsers({}, path=None, read=file.read, count=file.counted.append)
    assert await users.authenticate(basic("bob", "battery staple")) is None
    assert await users.check() is False
    assert file.reads == 0
    users.replace({"bob": OTHER}, None)  # cluster settings
    assert await users.authenticate(basic("bob", "battery staple")) == "bob"


async def test_a_reload_during_a_look_is_not_undone(tmp_path: Any) -> None:
    file = UsersFile(tmp_path, {"alice": STORED})
    users = file.node_users({"alice": STORED})
    reading = threading.Event()
    go_on = threading.Event()
    old_read = file.read

    def slow_read(path: str) -> dict[str, str]:
        reading.set()
        go_on.wait(10)
        return old_read(path)

    users._read = slow_read
    look = asyncio.ensure_future(users.check())
    await asyncio.to_thread(reading.wait, 10)
    users.replace({"bob": OTHER}, file.path)  # SIGHUP applied a newer file meanwhile
    go_on.set()
    assert await look is False
    assert users.auth.users == {"bob": OTHER}


def test_users_change_names_what_changed() -> None:
    change = auth.users_change({"a": "1", "b": "2", "c": "3"}, {"b": "2", "c": "4", "d": "5"})
    assert (change.added, change.removed, change.new_password) == (("d",), ("a",), ("c",))
    assert str(change) == "added d; removed a; new password for c"
    assert not auth.users_change({"a": "1"}, {"a": "1"})
