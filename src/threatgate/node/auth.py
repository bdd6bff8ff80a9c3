"""HTTP Basic authentication for the node's REST API.

Rules:
1. Passwords are stored as scrypt hashes (``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``): scrypt is
   in the standard library and memory-hard, so a stolen config file is expensive to brute-force on
   GPUs.  A malformed hash is found when the config is loaded, never while serving a request: the
   format and its check live in :mod:`threatgate.config.passwords`, so the config reader needs
   nothing of this module.
2. scrypt costs ~50 ms of CPU on purpose, so it never runs on the event loop: it runs in a thread,
   at most ``max_concurrent`` at a time, so a flood of wrong passwords costs at most that many cores
   and cannot stall event matching.
3. The hot path (a SIEM or the balancer sending thousands of requests per second with the same
   header) must not pay scrypt each time: a successful header is remembered as
   ``BLAKE2b-128(keyed with a per-process random key, header) -> user``.  Neither the header nor the password is
   ever stored, the key never leaves the process, and only successes are remembered.
4. Timing reveals nothing useful: digests are compared with :func:`hmac.compare_digest`, and an
   unknown user pays the same scrypt as a known one (against a dummy hash).
5. Nothing here logs credentials; callers see a user name or None and the counters in ``stats``.
6. A node's users follow its config file without a reload (:class:`NodeUsers`): ``threatgate users
   add`` followed at once by a request works.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from threatgate.config.passwords import PREFIX, HashParams, check_hash_format, parse_hash, scrypt_memory
from threatgate.errors import ConfigError

log = logging.getLogger("threatgate.node")

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
"""Parameters of new hashes: 16 MiB and ~50 ms per check, OWASP's scrypt minimum as of 2024."""

MAX_HEADER_CHARS = 4096
"""An Authorization header longer than this is malformed: real credentials are far shorter."""


def _scrypt(params: HashParams, password: bytes) -> bytes:
    return hashlib.scrypt(
        password,
        salt=params.salt,
        n=params.n,
        r=params.r,
        p=params.p,
        dklen=len(params.digest),
        maxmem=scrypt_memory(params.n, params.r, params.p) + 1024 * 1024,
    )


def hash_password(password: str) -> str:
    """A new ``scrypt$...`` hash of ``password`` with a random salt, for the config file."""
    salt = secrets.token_bytes(SALT_BYTES)
    params = HashParams(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt, b"\0" * HASH_BYTES)
    digest = _scrypt(params, password.encode("utf-8"))
    b64 = base64.b64encode
    return f"{PREFIX}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches ``stored``; the digests are compared in constant time.

    Raises:
        ValueError: ``stored`` is malformed (the config check catches that at load time).
    """
    params = parse_hash(stored)
    return hmac.compare_digest(_scrypt(params, password.encode("utf-8")), params.digest)


class Authenticator(Protocol):
    """What a request handler asks: who sent this ``Authorization`` header (:class:`BasicAuth`, :class:`NodeUsers`)."""

    async def authenticate(self, header: str | None) -> str | None: ...


@dataclass
class AuthStats:
    """Counters of :meth:`BasicAuth.authenticate` outcomes, plain ints for a metrics exporter to read."""

    ok: int = 0
    """Successful authentications, cache hits included."""
    cache_hits: int = 0
    """Successes answered from the cache, without scrypt."""
    bad_credentials: int = 0
    """Well-formed headers with an unknown user or a wrong password."""
    malformed: int = 0
    """Headers that are not ``Basic <base64 of user:password>`` in UTF-8."""
    missing: int = 0
    """Requests without an Authorization header (a client's normal first try)."""


def parse_basic(header: str) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` value, or None when it is malformed.

    Strict on purpose (RFC 7617): one scheme token (case-insensitive), one space, canonical padded
    base64, UTF-8, and a colon; anything else is refused rather than guessed at.
    """
    if len(header) > MAX_HEADER_CHARS:
        return None
    scheme, sep, token = header.partition(" ")
    if not sep or scheme.lower() != "basic" or not token or not token.isascii():
        return None
    try:
        raw = base64.b64decode(token, validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    user, colon, password = text.partition(":")
    if not colon:
        return None
    return user, password


def _dummy_hash(model: str | None) -> str:
    """A hash nobody knows the password of, with the cost parameters of ``model`` (a real user's hash).

    Checked for unknown users so that they take as long as known ones.  Random bytes stand in for
    the digest: running scrypt here would block the event loop at every config reload for nothing.
    """
    params = (
        parse_hash(model) if model is not None else HashParams(SCRYPT_N, SCRYPT_R, SCRYPT_P, b"", b"\0" * HASH_BYTES)
    )
    b64 = base64.b64encode
    salt = b64(secrets.token_bytes(SALT_BYTES)).decode()
    digest = b64(secrets.token_bytes(len(params.digest))).decode()
    return f"{PREFIX}${params.n}${params.r}${params.p}${salt}${digest}"


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against a fixed table of users.

    The table is fixed at construction: a config reload builds a new instance, which also drops the
    cache, so a removed user or a changed password takes effect at once.  Use from one event loop.
    """

    def __init__(self, users: Mapping[str, str], *, max_concurrent: int = 2, cache_size: int = 4096) -> None:
        """``users`` maps user name to stored hash.

        Raises:
            ValueError: a stored hash is malformed (the message names the user, not the hash).
        """
        for name, stored in users.items():
            try:
                check_hash_format(stored)
            except ValueError as exc:
                raise ValueError(f"user {name!r}: {exc}") from None
        self._users = dict(users)
        self._dummy = _dummy_hash(next(iter(self._users.values()), None))
        self._cache_key = secrets.token_bytes(32)
        self._cache: dict[bytes, str] = {}
        self._cache_size = cache_size
        self._semaphore = asyncio.Semaphore(max_concurrent)
        # Concurrent requests with the same new header share one scrypt instead of queueing N of them.
        self._inflight: dict[bytes, asyncio.Task[bool]] = {}
        self.stats = AuthStats()

    @property
    def users(self) -> dict[str, str]:
        """A copy of the table: user name -> stored hash."""
        return dict(self._users)

    async def authenticate(self, header: str | None) -> str | None:
        """The authenticated user name, or None (missing, malformed or wrong credentials)."""
        if header is None:
            self.stats.missing += 1
            return None
        # Keyed BLAKE2b is a MAC like HMAC-SHA256 at a fifth of the cost (this runs for every request).
        key = hashlib.blake2b(header.encode("utf-8", "surrogatepass"), key=self._cache_key, digest_size=16).digest()
        user = self._cache.get(key)
        if user is not None:
            self.stats.ok += 1
            self.stats.cache_hits += 1
            return user
        credentials = parse_basic(header)
        if credentials is None:
            self.stats.malformed += 1
            return None
        name, password = credentials
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._check(name, password))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, name, done))
        # shield: a client that disconnects must not cancel the check others wait on, nor release
        # the semaphore while its scrypt thread is still running.
        if await asyncio.shield(task):
            self.stats.ok += 1
            return name
        self.stats.bad_credentials += 1
        return None

    async def _check(self, name: str, password: str) -> bool:
        stored = self._users.get(name)
        async with self._semaphore:
            # Looked up at call time (not bound at import) so tests can count calls.
            matches = await asyncio.to_thread(verify_password, self._dummy if stored is None else stored, password)
        return matches and stored is not None

    def _finished(self, key: bytes, name: str, task: asyncio.Task[bool]) -> None:
        self._inflight.pop(key, None)
        if task.cancelled() or task.exception() is not None or not task.result():
            return
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[key] = name


# -- users that follow the config file ------------------------------------------------------------------

Identity = tuple[int, int, int]
"""(inode, size, mtime_ns) of a file; (-1, -1, -1) when it is missing."""


def file_identity(path: str) -> Identity:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class UsersChange:
    """What differs between two user tables, by name (never the hashes)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    new_password: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.new_password)

    def __str__(self) -> str:
        parts = [("added", self.added), ("removed", self.removed), ("new password for", self.new_password)]
        return "; ".join(f"{what} {', '.join(names)}" for what, names in parts if names) or "no change"


def users_change(old: Mapping[str, str], new: Mapping[str, str]) -> UsersChange:
    """The users added, removed, and given a new password from ``old`` to ``new`` (name -> hash), sorted."""
    return UsersChange(
        added=tuple(sorted(new.keys() - old.keys())),
        removed=tuple(sorted(old.keys() - new.keys())),
        new_password=tuple(sorted(n for n in old.keys() & new.keys() if old[n] != new[n])),
    )


class NodeUsers:
    """A node's API users: the :class:`BasicAuth` in force, kept in step with ``<Users>`` of its config file.

    Why the node looks at its file rather than being told (a signal sent by ``threatgate users add``):
    the command often runs as another user (root) than the service, perhaps in another container, and
    there is no pid file to find the process by; a SIGHUP would also reload everything else, which the
    operator did not ask for.  Looking costs one stat (inode, size, mtime) once a second and after a
    failed login -- microseconds, against the ~50 ms of scrypt a failed login has already cost -- and
    the file is parsed only when it changed.

    Rules:
    1. Only the users are taken from a changed file; everything else waits for SIGHUP.  The file must be
       valid as a whole, as at SIGHUP: one that is not (a half-finished edit) is not used, and that is
       logged at WARNING and counted once per version of the file.
    2. Each version of the file is read once, used or refused; it is read again only after it changes.
    3. Unchanged users keep the BasicAuth in force and its cache of checked credentials; changed users
       replace it, so a removed user or an old password stops working at once (within a second).
    4. Credentials that fail are checked once more after a look at the file, so a user added a moment
       ago gets in with the first request.
    5. ``path`` None (a cluster member: its users are cluster settings, applied through :meth:`replace`):
       the file is never looked at.
    """

    def __init__(
        self,
        users: Mapping[str, str],
        *,
        path: str | None,
        read: Callable[[str], Mapping[str, str]],
        count: Callable[[str], None],
    ) -> None:
        """``read(path)``: the users of a valid config file, else ConfigError; ``count(reason)`` bumps bad input."""
        self.auth = BasicAuth(users)
        self.path = path
        self._read = read
        self._count = count
        self._seen: Identity | None = None  # the version of the file last read (used or refused); None: none yet
        self._generation = 0  # bumped by replace(): a look that started before it must not undo it
        self._lock = asyncio.Lock()

    def replace(self, users: Mapping[str, str], path: str | None) -> None:
        """A config reload or cluster settings put ``users`` in force (a new cache only if they differ)."""
        self._generation += 1
        self.path = path
        self._seen = None  # the reload may have read an older version of the file: look at it again
        if users_change(self.auth.users, users):
            self.auth = BasicAuth(users)

    async def authenticate(self, header: str | None) -> str | None:
        """The authenticated user name or None, with one more try after a look at the file (rule 4)."""
        user = await self.auth.authenticate(header)
        if user is None and header is not None and parse_basic(header) is not None and await self.check():
            user = await self.auth.authenticate(header)
        return user

    async def check(self) -> bool:
        """Look at the config file; True when its users replaced the ones in force.  Never raises."""
        try:
            return await self._check()
        except Exception:  # a bug here must never cost the node its API
            log.exception("API users: looking at the configuration file failed; the running users stay")
            return False

    async def _check(self) -> bool:
        async with self._lock:  # concurrent failed logins share one look
            path, generation = self.path, self._generation
            if path is None:
                return False
            identity = await asyncio.to_thread(file_identity, path)
            if identity == self._seen:
                return False
            self._seen = identity
            try:
                users = await asyncio.to_thread(self._read, path)
                change = users_change(self.auth.users, users)
                if generation != self._generation:
                    self._seen = None  # a reload came in meanwhile: look again next time
                    return False
                if change:
                    self.auth = BasicAuth(users)
            except (ConfigError, ValueError) as exc:
                # A ConfigError names the file and line; a ValueError (a hash BasicAuth refused) does not.
                where = "" if isinstance(exc, ConfigError) else f"{path}: "
                log.warning("API users not re-read: %s%s; the running users stay until the file is valid", where, exc)
                self._count("users_file_invalid")
                return False
        if change:
            log.info("API users re-read from %s: %s (no reload needed)", path, change)
        return bool(change)
