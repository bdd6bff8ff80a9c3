"""Service alerts: rendered with AlertFormat, one line each, queued while the destination is down."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from tests.helpers import example_config, exchange, free_port, running_node

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"


def _alert_config(tmp: Path, alert_port: int) -> Path:
    config = example_config(tmp)
    text = config.read_text().replace(
        '<AlertConnectionString enabled="false">127.0.0.1:9997</AlertConnectionString>',
        f'<AlertConnectionString enabled="true">127.0.0.1:{alert_port}</AlertConnectionString>'
        "<EventSendingRetriesTimeout>1</EventSendingRetriesTimeout>",
    )
    config.write_text(text)
    return config


def _read_until(conn: socket.socket, needle: bytes, timeout: float = 20.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        data = conn.recv(65536)
        if not data:
            break
        buf += data
    return buf


def test_alerts_wait_for_an_unreachable_destination_without_blocking_matching(tmp_path: Path) -> None:
    alert_port = free_port()  # nothing listens there at first: the point of the test
    config = _alert_config(tmp_path, alert_port)
    with running_node(config) as node:
        port = node.port
        # Nobody listens on the alert port: matching goes on regardless.
        node.wait_for_log(r"alerts: cannot send to 127\.0\.0\.1:\d+ .*queued, retrying")
        reply = exchange(port, FLAGS + b"1 url=http://fakess123.nu\n").decode()
        assert "1 category=Malicious_URL" in reply and reply.endswith("1 LookupFinished\n")
        # The destination comes up: everything raised during the outage arrives, in order, one per line.
        with socket.create_server(("127.0.0.1", alert_port)) as server:
            server.settimeout(20)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(20)
                buf = _read_until(conn, b"KL_ALERT_ServiceStarted")
                node.signal(signal.SIGHUP)
                buf += _read_until(conn, b"KL_ALERT_ConfigurationUpdated")
    lines = buf.decode().splitlines()
    alerts = [line.split("alert=", 1)[1].split(" ", 1)[0] for line in lines]
    assert alerts[: alerts.index("KL_ALERT_ServiceStarted") + 1] == [
        *["KL_ALERT_UpdatedFeed"] * 8,
        "KL_ALERT_ServiceStarted",
    ]
    assert "KL_ALERT_ConfigurationUpdated" in alerts
    # AlertFormat "%Date% alert=%Alert%%RecordContext%": Mon DD HH:MM:SS, then the context fields.
    first = lines[0]
    assert first[3] == " " and first[6] == " " and first[9] == ":"
    assert "alert=KL_ALERT_UpdatedFeed feed=malicious_urls.json records=5" in buf.decode()


def test_a_broken_config_on_sighup_keeps_the_running_one(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    with running_node(config) as node:
        port = node.port
        good = config.read_text()
        config.write_text(good.replace("url=(\\S+)", "url=(\\S+"))
        node.signal(signal.SIGHUP)
        node.wait_for_log(r"configuration not reloaded, keeping the running one: .*node\.conf:10: <RE_URL>")
        reply = exchange(port, FLAGS + b"1 url=http://fakess123.nu\n").decode()
        assert "1 category=Malicious_URL" in reply
        # A valid change applies without a restart: a new rule name shows up in the output.
        config.write_text(good.replace("confidence=%Confidence%", "confidence=%Confidence% reloaded=yes"))
        node.signal(signal.SIGHUP)
        node.wait_for_log(r"configuration reloaded from")
        reply = exchange(port, FLAGS + b"2 url=http://fakess123.nu\n").decode()
        assert "reloaded=yes" in reply
