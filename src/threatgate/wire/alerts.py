"""Service alerts (``KL_ALERT_*``): which alert a line carries, and the log level it deserves.

A node logs the alerts it raises, and the balancer logs the alert lines nodes send to its
``cybertrace_port``; both decide the level here, so one alert reads the same in both logs.

Rules:
1. The alert of a line is the first ``KL_ALERT_<name>`` in it (``<name>``: 1-64 of ``A-Z a-z 0-9 _``);
   a line without one is alert ``unknown``.
2. Known news (a feed updated, the service started or stopped, a configuration applied, a new
   Control) logs at INFO.  Everything else logs at WARNING: failures (``FailedToUpdateFeed``,
   ``DetectionsDropped``, ``...Error``, ``...Emergency...``) and any name not known here, since an
   alert nobody told threatgate about may be one an operator must see.
3. No alert logs at ERROR: an alert reports a problem of the sender, which its own log and counters
   carry; the receiving process is fine.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import logging
import re
from typing import Final

UNKNOWN: Final = "unknown"
"""The alert name of a line that names no ``KL_ALERT_*``."""

_NAME: Final = re.compile(r"KL_ALERT_[A-Za-z0-9_]{1,64}")

INFORMATIONAL: Final = frozenset(
    {
        "KL_ALERT_ServiceStarted",
        "KL_ALERT_ServiceStopped",
        "KL_ALERT_UpdatedFeed",
        "KL_ALERT_ConfigurationUpdated",
        "KL_ALERT_ClusterControlChanged",
    }
)
"""Alerts that report normal operation (rule 2); every other name is a WARNING."""


def alert_name(line: str) -> str:
    """The alert a line carries (rule 1): ``KL_ALERT_UpdatedFeed``, or :data:`UNKNOWN`."""
    found = _NAME.search(line)
    return found.group() if found else UNKNOWN


def alert_level(name: str) -> int:
    """The ``logging`` level of alert ``name`` (rule 2): INFO for known news, else WARNING."""
    return logging.INFO if name in INFORMATIONAL else logging.WARNING
