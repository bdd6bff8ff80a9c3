"""log.py: the level names ``--log-level`` takes, the three-letter level each line shows, and the rate limit.

A level is checked in a subprocess (``setup_logging`` replaces the root logger's handlers, which pytest's own
capture relies on); the formatter and :class:`RateLimitedLog` are checked in process, on a fake clock.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from threatgate import log
from threatgate.log import LEVEL_NAMES, RateLimitedLog, setup_logging

LOG_PROBE = """
import logging, sys
from threatgate.log import setup_logging
setup_logging(sys.argv[1])
log = logging.getLogger("threatgate.probe")
log.debug("d"); log.info("i"); log.warning("w"); log.error("e")
"""


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("err", ["ERR"]),
        ("ERR", ["ERR"]),
        ("war", ["WAR", "ERR"]),
        ("warning", ["WAR", "ERR"]),
        ("inf", ["INF", "WAR", "ERR"]),
        ("Info", ["INF", "WAR", "ERR"]),
        ("dbg", ["DBG", "INF", "WAR", "ERR"]),
        ("DEBUG", ["DBG", "INF", "WAR", "ERR"]),
    ],
)
def test_each_documented_level_logs_from_that_level_up_with_the_name_it_accepts(level: str, shown: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOG_PROBE, level], capture_output=True, text=True, timeout=60, check=True
    )
    assert [line.split()[2] for line in result.stderr.splitlines()] == shown
    assert all(line.split()[2].lower() in LEVEL_NAMES for line in result.stderr.splitlines())


def test_setup_logging_refuses_an_unknown_level() -> None:
    with pytest.raises(ValueError, match=r"unknown log level 'warn': expected one of err, war, inf, dbg, error"):
        setup_logging("warn")
    assert logging.getLogger().handlers  # nothing was replaced


def test_a_line_shows_the_three_letter_level_and_a_workers_number() -> None:
    record = logging.LogRecord("threatgate.node", logging.DEBUG, __file__, 1, "event %s", ("x",), None)
    formatter = log._Formatter("%(level3)s %(name)s w3: %(message)s")
    assert formatter.format(record) == "DBG threatgate.node w3: event x"  # not DEB, as %(levelname).3s gives
    record.levelno, record.levelname = 5, "TRACE"
    assert formatter.format(record).startswith("TRA ")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(log.time, "monotonic", fake)
    return fake


def test_RateLimitedLog_logs_the_first_then_one_summary_per_interval(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    limited = RateLimitedLog(logging.getLogger("threatgate.test"), interval=10.0)
    caplog.set_level(logging.WARNING, "threatgate.test")
    limited("bad line from %s", "a")
    assert not limited.due()
    for _ in range(3):
        clock.now += 3
        limited("bad line from %s", "b")  # counted, not logged
    clock.now += 1  # 10 s after the first
    assert limited.due()
    limited("bad line from %s", "c")
    clock.now += 10
    limited("bad line from %s", "d")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "bad line from a"),
        (logging.WARNING, "bad line from c (and 3 similar since the last report)"),
        (logging.WARNING, "bad line from d"),  # nothing suppressed in between: no count
    ]


def test_RateLimitedLog_logs_at_its_level(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "threatgate.test")
    RateLimitedLog(logging.getLogger("threatgate.test"), level=logging.INFO)("once")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, "once")]
