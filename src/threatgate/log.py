"""Logging: one logger per subpackage, CyberTrace's err/inf/dbg levels, and quiet hot paths.

Lifecycle events log at INFO; bad input logs at WARNING through :class:`RateLimitedLog` (first
occurrence, then at most one summary line per interval); each event only at DEBUG.
"""

from __future__ import annotations

import logging
import sys
import time

LEVELS = {"err": logging.ERROR, "inf": logging.INFO, "dbg": logging.DEBUG}


def setup_logging(level: str = "inf") -> None:
    """Log to stderr at ``level`` (err, inf or dbg, or a Python level name)."""
    numeric = LEVELS.get(level.lower(), None) or logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(
        stream=sys.stderr,
        level=numeric,
        format="%(asctime)s %(levelname).3s %(name)s: %(message)s",
        force=True,
    )


class RateLimitedLog:
    """Logs a recurring problem once, then at most once per ``interval`` seconds with a count.

    Used for per-connection or per-record problems, so a hostile peer cannot flood the log.
    """

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, interval: float = 10.0) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._last = -1e18
        self._suppressed = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" (and {self._suppressed} similar since the last report)"
        self._suppressed = 0
        self._last = now
        self._logger.log(self._level, msg, *args)
