"""Health of one instance: active checks with rise/fall, passive failures, in HAProxy's terms.

An instance starts unchecked and becomes UP at its first successful check (HAProxy's ``init-state
fully-up`` spirit without trusting a node never seen: a balancer restarted in front of running nodes
serves at once instead of answering 503 for ``rise`` intervals); after that, a DOWN instance becomes
UP only after ``rise`` consecutive successful checks; an UP instance
becomes DOWN after ``fall`` consecutive failed checks, or at once on a passive failure (its event
connection broke, or an event went unanswered for longer than the reply timeout): the balancer
has then already redispatched that instance's events and should not send it more until checks pass
``rise`` times again.  Pure: the caller runs the checks and reports their outcome.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Health:
    rise: int = 2
    fall: int = 3
    up: bool = False
    successes: int = 0
    failures: int = 0
    last_error: str = ""
    transitions: int = 0
    checked: bool = False  # any check or failure recorded yet: after that, ``rise`` applies

    def check_passed(self) -> bool:
        """Record a successful check; True when this made the instance UP."""
        self.failures = 0
        self.successes += 1
        first = not self.checked
        self.checked = True
        if not self.up and (first or self.successes >= self.rise):
            self.up = True
            self.transitions += 1
            self.last_error = ""
            return True
        return False

    def check_failed(self, error: str) -> bool:
        """Record a failed check; True when this made the instance DOWN."""
        self.checked = True
        self.successes = 0
        self.failures += 1
        self.last_error = error
        if self.up and self.failures >= self.fall:
            self.up = False
            self.transitions += 1
            return True
        return False

    def passive_failure(self, error: str) -> bool:
        """The event path saw the instance fail; True when this made it DOWN."""
        self.checked = True
        self.successes = 0
        self.last_error = error
        if self.up:
            self.up = False
            self.failures = self.fall
            self.transitions += 1
            return True
        return False

    def reset(self) -> None:
        """Disabled (MAINT): when enabled again it must pass ``rise`` checks like any DOWN instance."""
        self.up = False
        self.successes = 0
        self.checked = True
