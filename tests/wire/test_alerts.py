"""Tests for threatgate.wire.alerts: one rule for the level of an alert, on the node and on the balancer."""

from __future__ import annotations

import logging

import pytest

from threatgate.wire.alerts import INFORMATIONAL, UNKNOWN, alert_level, alert_name


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("Apr 16 09:05:41 alert=KL_ALERT_UpdatedFeed feed=urls.json records=6", "KL_ALERT_UpdatedFeed"),
        ("KL_ALERT_ServiceStarted", "KL_ALERT_ServiceStarted"),
        ("x alert=KL_ALERT_A_b9 then KL_ALERT_Second", "KL_ALERT_A_b9"),  # the first one
        ("no alert name here", UNKNOWN),
        ("alert=KL_ALERT_ (empty name)", UNKNOWN),
        ("\x00\xff garbage", UNKNOWN),
    ],
)
def test_alert_name(line: str, name: str) -> None:
    assert alert_name(line) == name


@pytest.mark.parametrize(
    "name",
    [
        "KL_ALERT_UpdatedFeed",
        "KL_ALERT_ServiceStarted",
        "KL_ALERT_ServiceStopped",
        "KL_ALERT_ConfigurationUpdated",
        "KL_ALERT_ClusterControlChanged",
    ],
)
def test_news_is_info(name: str) -> None:
    assert alert_level(name) == logging.INFO


@pytest.mark.parametrize(
    "name",
    [
        "KL_ALERT_FailedToUpdateFeed",
        "KL_ALERT_FailedToUpdateConfiguration",
        "KL_ALERT_FeedLoadedPartially",
        "KL_ALERT_DetectionsDropped",
        "KL_ALERT_ClusterEmergencyState",
        "KL_ALERT_ClusterConsistencyError",
        "KL_ALERT_SettingsSynchronizationError",
        "KL_ALERT_SomethingNew",  # unknown: may be one an operator must see
        UNKNOWN,
    ],
)
def test_failures_and_unknown_alerts_are_warnings(name: str) -> None:
    assert alert_level(name) == logging.WARNING


def test_no_alert_is_an_error() -> None:
    """The sender's problem: its own log carries it at the right level; the receiver is fine."""
    assert all(alert_level(n) < logging.ERROR for n in (*INFORMATIONAL, "KL_ALERT_FailedToUpdateFeed", UNKNOWN))
