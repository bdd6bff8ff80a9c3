"""The operator console's login rules, sans-IO: sessions, failed-login limits, cookies, forms.

Why here and not in the handlers (balancer/console.py): every decision about who is logged in and
who must wait is a function of the inputs and ``now``, so it is tested without sockets or clocks.
Password checks (scrypt, ~50 ms) are the edge's: this module only decides whether one may be tried.

Rules:
1. A session is a random token (256 bits, :func:`secrets.token_urlsafe`) in an ``HttpOnly; Secure;
   SameSite=Strict`` cookie scoped to ``/console/``; the server keeps only a keyed hash of it, with
   the user and an absolute expiry (:data:`SESSION_TTL`).  Sessions live in memory (a restart logs
   everybody out) and are bounded (:data:`MAX_SESSIONS`: the oldest goes first).
2. Failed logins (form or Basic) are limited by two token buckets, one per source address and one
   per user name: a burst of :data:`FAIL_BURST` failures, then one per :data:`FAIL_REFILL` seconds.
   An empty bucket answers 429 with ``Retry-After`` *before* the password is checked, so guessing
   costs the guesser time and the balancer no scrypt.  A success does not refill the buckets.
3. Nothing here sees a password after the check; the log lines of the edge name user and address only.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

COOKIE = "console_session"
COOKIE_PATH = "/console/"
SESSION_TTL = 8 * 3600.0
"""Seconds a session lasts after the login (a working day), whatever it is used for."""
MAX_SESSIONS = 1000
"""Sessions kept at most; a new login past this ends the oldest session."""
FAIL_BURST = 5
FAIL_REFILL = 10.0
"""Failed logins allowed per source address and per user: a burst of 5, then one every 10 s."""
MAX_BUCKETS = 4096
"""Addresses and user names tracked at most (the least recently failed are forgotten first)."""
MAX_FORM = 4096
"""Bytes of a login form; longer is refused (a name and a password are far shorter)."""


class TokenBucket:
    """``capacity`` tokens, refilled at one per ``refill`` seconds; a failure takes one."""

    __slots__ = ("capacity", "refill", "stamp", "tokens")

    def __init__(self, capacity: float, refill: float, now: float) -> None:
        self.capacity = capacity
        self.refill = refill
        self.tokens = capacity
        self.stamp = now

    def _update(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) / self.refill)
            self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now)."""
        self._update(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) * self.refill

    def take(self, now: float) -> None:
        self._update(now)
        self.tokens = max(0.0, self.tokens - 1)

    def full(self, now: float) -> bool:
        self._update(now)
        return self.tokens >= self.capacity


class LoginLimiter:
    """Failed-login buckets per source address and per user name (rule 2)."""

    def __init__(self, burst: int = FAIL_BURST, refill: float = FAIL_REFILL, max_buckets: int = MAX_BUCKETS) -> None:
        self.burst = burst
        self.refill = refill
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def retry_after(self, source: str, user: str | None, now: float) -> int:
        """Whole seconds to wait before a login from ``source`` as ``user`` may be tried (0: now)."""
        waits = [self._buckets[k].wait(now) for k in self._keys(source, user) if k in self._buckets]
        return math.ceil(max(waits, default=0.0))

    def failed(self, source: str, user: str | None, now: float) -> None:
        """Count one failed login (a wrong password, an unknown user, a malformed Basic header)."""
        for key in self._keys(source, user):
            bucket = self._buckets.pop(key, None)
            if bucket is None:
                bucket = TokenBucket(self.burst, self.refill, now)
            bucket.take(now)
            self._buckets[key] = bucket  # most recently failed last
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)

    def sweep(self, now: float) -> None:
        """Forget buckets that have filled up again (they would allow a full burst anyway)."""
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)

    @staticmethod
    def _keys(source: str, user: str | None) -> list[str]:
        return [f"addr:{source}"] + ([f"user:{user}"] if user else [])


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    created: float
    expires: float


class Sessions:
    """Logged-in sessions by keyed token hash (rule 1).  ``token_factory`` is for tests."""

    def __init__(
        self,
        ttl: float = SESSION_TTL,
        max_sessions: int = MAX_SESSIONS,
        token_factory: Callable[[], str] = lambda: secrets.token_urlsafe(32),
    ) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._new_token = token_factory
        self._key = secrets.token_bytes(32)
        self._by_hash: OrderedDict[bytes, Session] = OrderedDict()  # oldest first

    def _hash(self, token: str) -> bytes:
        return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), key=self._key, digest_size=16).digest()

    def create(self, user: str, now: float) -> str:
        """A new session for ``user``: its token (for the cookie)."""
        token = self._new_token()
        self._by_hash[self._hash(token)] = Session(user, now, now + self.ttl)
        while len(self._by_hash) > self.max_sessions:
            self._by_hash.popitem(last=False)
        return token

    def user(self, token: str | None, now: float, users: frozenset[str] | None = None) -> str | None:
        """The user of a live session, or None (no token, unknown, expired, or the user was removed).

        ``users``: the configured user names now (a user removed from the config is logged out).
        """
        if not token or len(token) > 128:
            return None
        key = self._hash(token)
        session = self._by_hash.get(key)
        if session is None:
            return None
        if now >= session.expires or (users is not None and session.user not in users):
            del self._by_hash[key]
            return None
        return session.user

    def end(self, token: str | None) -> bool:
        """Log out: True when there was such a session."""
        return bool(token) and self._by_hash.pop(self._hash(token or ""), None) is not None

    def sweep(self, now: float) -> None:
        for key in [k for k, s in self._by_hash.items() if now >= s.expires]:
            del self._by_hash[key]

    def __len__(self) -> int:
        return len(self._by_hash)


def session_cookie(token: str, ttl: float) -> str:
    """The ``Set-Cookie`` value of a new session."""
    return f"{COOKIE}={token}; Path={COOKIE_PATH}; Max-Age={int(ttl)}; HttpOnly; Secure; SameSite=Strict"


def cleared_cookie() -> str:
    """The ``Set-Cookie`` value that ends the session in the browser (logout)."""
    return f"{COOKIE}=; Path={COOKIE_PATH}; Max-Age=0; HttpOnly; Secure; SameSite=Strict"


def cookie_token(header: str | None) -> str | None:
    """The session token from a ``Cookie`` header (the first of ours), or None."""
    if not header:
        return None
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name == COOKIE:
            return value.strip() or None
    return None


class FormError(ValueError):
    """A login form that cannot be read; the text says why (never quoting the password)."""


def parse_login_form(body: bytes) -> tuple[str, str]:
    """``(user, password)`` from an ``application/x-www-form-urlencoded`` body with ``user`` and ``password``.

    Raises:
        FormError: too long, not UTF-8, or a field missing or repeated.
    """
    if len(body) > MAX_FORM:
        raise FormError(f"login form longer than {MAX_FORM} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        raise FormError("login form is not UTF-8 form data") from None
    user, password = fields.get("user", []), fields.get("password", [])
    if len(user) != 1 or len(password) != 1 or not user[0]:
        raise FormError("login form needs one user and one password field")
    return user[0], password[0]


__all__ = [
    "COOKIE",
    "FormError",
    "LoginLimiter",
    "Session",
    "Sessions",
    "TokenBucket",
    "cleared_cookie",
    "cookie_token",
    "parse_login_form",
    "session_cookie",
]
