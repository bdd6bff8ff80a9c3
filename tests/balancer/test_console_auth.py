"""balancer/console_auth.py: sessions, their expiry and bound, the failed-login buckets, cookies and the form."""

from __future__ import annotations

import itertools

import pytest

from threatgate.balancer.console_auth import (
    COOKIE,
    FormError,
    LoginLimiter,
    Sessions,
    TokenBucket,
    cleared_cookie,
    cookie_token,
    parse_login_form,
    session_cookie,
)
from threatgate.node.auth import parse_basic


def test_a_session_names_its_user_until_it_expires() -> None:
    sessions = Sessions(ttl=100)
    token = sessions.create("ops", now=1000)
    assert len(token) >= 40  # 32 random bytes, base64url
    assert sessions.user(token, 1099.9) == "ops"
    assert sessions.user(token, 1100) is None  # expired, and forgotten
    assert len(sessions) == 0


def test_unknown_empty_and_absurd_tokens_name_nobody() -> None:
    sessions = Sessions()
    sessions.create("ops", now=0)
    assert sessions.user(None, 1) is None
    assert sessions.user("", 1) is None
    assert sessions.user("x" * 129, 1) is None
    assert sessions.user("guess", 1) is None


def test_tokens_are_random_and_stored_only_hashed() -> None:
    sessions = Sessions()
    tokens = {sessions.create("ops", now=0) for _ in range(50)}
    assert len(tokens) == 50
    assert not any(t.encode() in repr(sessions._by_hash).encode() for t in tokens)


def test_a_user_removed_from_the_config_is_logged_out() -> None:
    sessions = Sessions()
    token = sessions.create("ops", now=0)
    assert sessions.user(token, 1, frozenset({"ops", "other"})) == "ops"
    assert sessions.user(token, 2, frozenset({"other"})) is None
    assert sessions.user(token, 3, frozenset({"ops"})) is None  # gone for good, not back with the user


def test_sessions_are_bounded_the_oldest_goes_first() -> None:
    counter = itertools.count()
    sessions = Sessions(max_sessions=3, token_factory=lambda: f"t{next(counter)}")
    tokens = [sessions.create(f"u{i}", now=i) for i in range(5)]
    assert len(sessions) == 3
    assert [sessions.user(t, 10) for t in tokens] == [None, None, "u2", "u3", "u4"]


def test_logout_and_sweep() -> None:
    sessions = Sessions(ttl=10)
    a, b = sessions.create("a", now=0), sessions.create("b", now=5)
    assert sessions.end(a) is True
    assert sessions.end(a) is False
    assert sessions.end(None) is False
    sessions.sweep(now=15)
    assert len(sessions) == 0 and sessions.user(b, 15) is None


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(capacity=2, refill=10, now=0)
    bucket.take(0)
    bucket.take(0)
    assert bucket.wait(0) == pytest.approx(10)
    assert bucket.wait(4) == pytest.approx(6)
    assert bucket.wait(10) == 0
    assert not bucket.full(10)
    assert bucket.full(20)


def test_failed_logins_are_limited_per_source_address() -> None:
    limiter = LoginLimiter(burst=3, refill=10)
    for i in range(3):
        assert limiter.retry_after("192.0.2.1", f"user{i}", now=0) == 0
        limiter.failed("192.0.2.1", f"user{i}", now=0)
    assert limiter.retry_after("192.0.2.1", "someone", now=0) == 10  # a new name does not help
    assert limiter.retry_after("192.0.2.2", "someone", now=0) == 0  # another address may try
    assert limiter.retry_after("192.0.2.1", "someone", now=9.5) == 1  # rounded up
    assert limiter.retry_after("192.0.2.1", "someone", now=10) == 0


def test_failed_logins_are_limited_per_user_from_any_address() -> None:
    limiter = LoginLimiter(burst=3, refill=10)
    for i in range(3):
        limiter.failed(f"192.0.2.{i}", "ops", now=0)
    assert limiter.retry_after("198.51.100.7", "ops", now=0) == 10
    assert limiter.retry_after("198.51.100.7", "other", now=0) == 0


def test_limiter_is_bounded_and_forgets_full_buckets() -> None:
    limiter = LoginLimiter(burst=2, refill=1, max_buckets=10)
    for i in range(50):
        limiter.failed(f"10.0.0.{i}", None, now=0)
    assert len(limiter) == 10
    limiter.sweep(now=5)
    assert len(limiter) == 0


def test_cookie_attributes() -> None:
    value = session_cookie("abc", 3600)
    assert value.startswith(f"{COOKIE}=abc;")
    for attribute in ("Path=/console/", "Max-Age=3600", "HttpOnly", "Secure", "SameSite=Strict"):
        assert attribute in value
    assert "Max-Age=0" in cleared_cookie()


def test_cookie_token_from_a_cookie_header() -> None:
    assert cookie_token(f"a=1; {COOKIE}=tok; b=2") == "tok"
    assert cookie_token(f"{COOKIE}=") is None
    assert cookie_token("other=1") is None
    assert cookie_token(None) is None


def test_login_form() -> None:
    assert parse_login_form(b"user=ops&password=p%26w+d") == ("ops", "p&w d")
    assert parse_login_form(b"user=ops&password=") == ("ops", "")
    for bad in (b"user=ops", b"password=x", b"user=&password=x", b"user=a&user=b&password=x", b"\xff", b"x" * 5000):
        with pytest.raises(FormError):
            parse_login_form(bad)


def test_basic_parsing_is_the_nodes() -> None:
    """The console reads Basic credentials with the node's strict parser (RFC 7617)."""
    assert parse_basic("Basic b3BzOnB3") == ("ops", "pw")
    assert parse_basic("basic b3BzOnB3") == ("ops", "pw")
    assert parse_basic("Basic b3Bz") is None  # no colon
    assert parse_basic("Bearer b3BzOnB3") is None
    assert parse_basic("Basic !!!") is None
