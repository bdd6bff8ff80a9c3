"""cluster/tokens.py: one-time join tokens that expire, on a clock the test passes."""

from __future__ import annotations

import pytest

from threatgate.cluster.tokens import MAX_TOKEN_TTL, JoinTokens


def test_a_token_works_once_and_only_before_it_expires() -> None:
    tokens = JoinTokens()
    tokens.issue("alpha", now=100.0, ttl=60)
    tokens.issue("beta", now=100.0, ttl=60)
    assert tokens.redeem("alpha", now=159.0)
    assert not tokens.redeem("alpha", now=159.0)  # used up
    assert not tokens.redeem("beta", now=160.0)  # expired at 160
    assert not tokens.redeem("beta", now=100.0)  # and used up by the failed attempt


def test_unknown_odd_and_oversized_tokens_are_refused() -> None:
    tokens = JoinTokens()
    tokens.issue("alpha", now=0.0, ttl=10)
    for wrong in ("alph", "alpha ", None, 42, "a" * 201):
        assert not tokens.redeem(wrong, now=1.0)
    assert tokens.redeem("alpha", now=1.0)


def test_expired_tokens_are_forgotten_when_another_is_issued() -> None:
    tokens = JoinTokens()
    tokens.issue("old", now=0.0, ttl=5)
    tokens.issue("new", now=10.0, ttl=5)
    assert len(tokens) == 1


@pytest.mark.parametrize("ttl", [0, 0.5, MAX_TOKEN_TTL + 1])
def test_lifetimes_outside_the_range_are_refused(ttl: float) -> None:
    with pytest.raises(ValueError, match="token lifetime must be 1-86400 seconds"):
        JoinTokens().issue("x", now=0.0, ttl=ttl)
