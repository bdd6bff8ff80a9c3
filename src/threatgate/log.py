"""Logging: one logger per subpackage, CyberTrace's err/inf/dbg levels, and quiet hot paths.

Lifecycle events log at INFO; bad input logs at WARNING through :class:`RateLimitedLog` (first
occurrence, then at most one summary line per interval); each event only at DEBUG.

Every line names its level in three letters (``ERR``, ``WAR``, ``INF``, ``DBG``), and ``--log-level``
takes exactly those names (any case) or Python's long ones (``error``, ``warning``, ``info``,
``debug``): nothing else, so a typo is refused instead of logging at a level nobody asked for.
"""

from __future__ import annotations

import logging
import sys
import time

LEVELS = {
    "err": logging.ERROR,
    "war": logging.WARNING,
    "inf": logging.INFO,
    "dbg": logging.DEBUG,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}
"""What ``--log-level`` accepts (case-insensitive): the names the log prints, then Python's."""

LEVEL_NAMES = tuple(LEVELS)

SHORT_NAMES = {
    logging.CRITICAL: "CRI",
    logging.ERROR: "ERR",
    logging.WARNING: "WAR",
    logging.INFO: "INF",
    logging.DEBUG: "DBG",
}
"""The level a line shows: CyberTrace's three letters (``%(levelname).3s`` would print DEB for debug)."""


class _Formatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging API name
        record.level3 = SHORT_NAMES.get(record.levelno, record.levelname[:3])
        return super().formatMessage(record)


def setup_logging(level: str = "inf", worker: int | None = None) -> None:
    """Log to stderr at ``level``, one of :data:`LEVEL_NAMES` in any case.

    ``worker``: a node's worker process, whose lines say ``w<N>`` after the logger name (one
    stderr for the whole node, so an operator can tell which process a line comes from).

    Raises:
        ValueError: another name (the CLI refuses it before: click.Choice over LEVEL_NAMES).
    """
    numeric = LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(LEVEL_NAMES)}")
    handler = logging.StreamHandler(sys.stderr)
    who = "%(name)s" if worker is None else f"%(name)s w{worker}"
    handler.setFormatter(_Formatter(f"%(asctime)s %(level3)s {who}: %(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)


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

    def due(self) -> bool:
        """Whether the next call would log (else it is only counted): build costly arguments only then."""
        return time.monotonic() - self._last >= self._interval

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
