"""Join tokens: one-time secrets the Control hands out so a new node can join (sans-IO).

Invariants:
- Only a digest of each token is kept (SHA-256): the process never holds a usable token after
  handing it out, and a memory dump gives nobody a way in.
- A token works once: redeeming it removes it, whatever the join does next (a second attempt with
  the same token fails even if the first failed later).
- A token is compared in constant time, and expires ``ttl`` seconds after it was issued.
- The caller passes ``now`` (a monotonic clock) and the token text (from ``secrets``): nothing here
  reads a clock or draws randomness, so expiry and reuse are tested without waiting.
"""

from __future__ import annotations

import hashlib
import hmac

MAX_TOKEN_TTL = 24 * 3600
"""The longest a join token may live (seconds)."""
MAX_TOKEN_LENGTH = 200
"""A longer string is not a token this node issued (refused before hashing)."""


class JoinTokens:
    """The join tokens issued and not yet used or expired."""

    def __init__(self) -> None:
        self._live: dict[bytes, float] = {}  # sha256(token) -> expiry

    def __len__(self) -> int:
        return len(self._live)

    def issue(self, token: str, now: float, ttl: float) -> None:
        """Accept ``token`` until ``now + ttl``; expired ones are forgotten meanwhile.

        Raises:
            ValueError: ``ttl`` outside 1-:data:`MAX_TOKEN_TTL` seconds.
        """
        if not 1 <= ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token lifetime must be 1-{MAX_TOKEN_TTL} seconds")
        self._live = {h: exp for h, exp in self._live.items() if exp > now}
        self._live[_digest(token)] = now + ttl

    def redeem(self, token: object, now: float) -> bool:
        """Whether ``token`` is a live token; it is used up either way."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            return False
        digest = _digest(token)
        for known, expiry in list(self._live.items()):
            if hmac.compare_digest(known, digest):
                del self._live[known]  # one-time, whatever happens next
                return expiry > now
        return False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
