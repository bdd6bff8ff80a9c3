"""Detections that cannot be delivered, and configuration reloads, on real node and balancer processes.

A node or balancer whose output destination is down, missing or changed: every line it cannot deliver
is counted (``threatgate_output_dropped_lines_total{destination,reason}``), logged at ERROR and, on a
node, raised as ``KL_ALERT_DetectionsDropped``; a SIGHUP applies what it can (a new destination) and
names what needs a restart (``threatgate_config_restart_required``).  Waits are on log lines, metrics
and received lines, never on sleeps.
"""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import (
    REPLY_FLAGS,
    BalancerProcess,
    NodeProcess,
    balancer_config,
    example_config,
    exchange,
    free_port,
    line_sink,
    prometheus_samples,
    read_all,
    running_balancer,
    running_node,
    wait_for_log_count,
    wait_until,
)

EVENTS = b"".join(
    b"%d CEF:0|Squid|Proxy|3.5|TCP_MISS|GET|3|src=10.1.2.%d url=%s\n" % (n, n, url)
    for n, url in enumerate(
        [b"http://fakess123.nu/", b"http://nothing.example/", b"http://fakess123.nu/a", b"http://fakess123.nu/b"]
        + [b"http://benign.example/", b"http://fakess123.nu/c"],
        start=1,
    )
)
"""Six events, four of them listed in examples/feeds/malicious_urls.json."""
NO_RETRIES = (
    "<EventSendingRetriesCount>1</EventSendingRetriesCount><EventSendingRetriesTimeout>0</EventSendingRetriesTimeout>"
)
LONG_RETRIES = (
    "<EventSendingRetriesCount>3</EventSendingRetriesCount><EventSendingRetriesTimeout>30</EventSendingRetriesTimeout>"
)
DROPPED = "threatgate_output_dropped_lines_total"


def dropped(port: int, destination: str, reason: str) -> float:
    return prometheus_samples(port).get(f'{DROPPED}{{destination="{destination}",reason="{reason}"}}', 0.0)


def restart_required(port: int) -> float:
    return prometheus_samples(port)["threatgate_config_restart_required"]


def closed_port() -> int:
    """A port nobody listens on: connects are refused at once (free a moment ago: the point of the test)."""
    return free_port()


def send_plain(port: int, payload: bytes) -> bytes:
    """A client without session flags: detections go to the output destination, nothing comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return read_all(s)


def reference_detections(port: int) -> list[str]:
    """EVENTS' detection lines from a node asked directly with ReplyBack (``<n> category=...``)."""
    lines = exchange(port, REPLY_FLAGS + EVENTS).decode().splitlines()
    detections = [line for line in lines if not line.endswith(" LookupFinished")]
    assert len(detections) == 4, lines
    return detections


# -- the node -----------------------------------------------------------------------------------


def node_config(tmp: Path, output: int, retries: str, alert_port: int | None = None) -> Path:
    """The example node with detections to ``output`` (no finished lines there: detections only); its own
    ports 0 (bound by the node, read from its READY)."""
    config = example_config(
        tmp,
        extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
        output=f"<ConnectionString>127.0.0.1:{output}</ConnectionString>{retries}",
    )
    text = config.read_text().replace('<FinishedEventFormat enabled="true">', '<FinishedEventFormat enabled="false">')
    if alert_port is not None:
        text = text.replace(
            '<AlertConnectionString enabled="false">127.0.0.1:9997<',
            f'<AlertConnectionString enabled="true">127.0.0.1:{alert_port}<',
        )
    config.write_text(text)
    return config


def test_node_counts_logs_and_alerts_detections_it_cannot_deliver(tmp_path: Path) -> None:
    out = closed_port()
    with line_sink() as alerts:
        config = node_config(tmp_path, out, NO_RETRIES, alert_port=alerts.port)
        with running_node(config) as node:
            port, metrics = node.port, node.metrics_port
            want = len(reference_detections(port))
            assert send_plain(port, EVENTS) == b""
            # Destination down past its one retry: every detection line counted, none more.
            wait_until(lambda: dropped(metrics, "detections", "retries_exhausted") == want, f"{want} dropped lines")
            first = node.wait_for_log(
                rf"ERR threatgate\.net: detections: (\d+) line\(s\) \(\d+ bytes\) dropped for 127\.0\.0\.1:{out}: "
                r"retries_exhausted \(2 attempt\(s\), last: "
            )
            # One alert (at most one a minute), carrying the lines of the first drop; the rest follow later.
            alert = (
                rf"alert=KL_ALERT_DetectionsDropped destination=127\.0\.0\.1:{out} "
                rf"lines={first[1]} reason=retries_exhausted"
            )
            wait_until(lambda: re.search(alert, alerts.data.decode()) is not None, "the alert line at the destination")
            node.wait_for_log(rf"WAR threatgate\.node: alert KL_ALERT_DetectionsDropped destination=127\.0\.0\.1:{out}")
            samples = prometheus_samples(metrics)
            assert samples['threatgate_alerts_total{alert="KL_ALERT_DetectionsDropped"}'] == 1
            assert samples['threatgate_output_queue_lines{destination="detections"}'] == 0
            assert samples['threatgate_output_queue_bytes{destination="detections"}'] == 0


def test_node_sighup_moves_detections_to_a_new_destination_and_reports_what_needs_a_restart(tmp_path: Path) -> None:
    down = closed_port()
    other_metrics = closed_port()  # only a different address in the file: never bound (it needs a restart)
    config = node_config(tmp_path, down, LONG_RETRIES)
    with running_node(config) as node, line_sink() as siem:
        port, metrics = node.port, node.metrics_port
        want = reference_detections(port)
        assert restart_required(metrics) == 0
        # Queued for a destination that is down (retrying every 30 s) ...
        send_plain(port, EVENTS)
        node.wait_for_log(rf"detections: cannot send to 127\.0\.0\.1:{down} .*retry 1/3 in 30 s")
        wait_until(
            lambda: prometheus_samples(metrics)['threatgate_output_queue_lines{destination="detections"}'] == 4,
            "4 lines queued",
        )
        # ... then SIGHUP: a new destination (applied) and a new metrics address (needs a restart).
        good = config.read_text()
        config.write_text(
            good.replace(f"127.0.0.1:{down}<", f"127.0.0.1:{siem.port}<").replace(
                "127.0.0.1:0</MetricsConnectionString>", f"127.0.0.1:{other_metrics}</MetricsConnectionString>"
            )
        )
        mark = len(node.log())
        node.signal(signal.SIGHUP)
        node.wait_for_log(
            r"WAR threatgate\.node: configuration reload: needs a restart: ServiceSettings/MetricsConnectionString "
            r"\(running with the value it started with\)",
            after=mark,
        )
        node.wait_for_log(r"configuration reloaded from", after=mark)
        assert restart_required(metrics) == 1  # still served on the address it started with
        # What was queued for the old destination is handed over, and new detections go there too.
        node.wait_for_log(rf"detections: 4 line\(s\) not delivered to 127\.0\.0\.1:{down} handed over", after=mark)
        send_plain(port, EVENTS)
        got = siem.wait_lines(8)
        assert sorted(got) == sorted(want * 2)
        assert not any(k.startswith(DROPPED) for k in prometheus_samples(metrics))
        # The metrics address back as it runs: nothing needs a restart any more.
        config.write_text(good.replace(f"127.0.0.1:{down}<", f"127.0.0.1:{siem.port}<"))
        mark = len(node.log())
        node.signal(signal.SIGHUP)
        node.wait_for_log(r"configuration reloaded from", after=mark)
        assert restart_required(metrics) == 0
        assert "needs a restart" not in node.log()[mark:]


# -- the balancer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One example node behind every balancer of this module (HA settings: ReplyBack, LookupFinished)."""
    with running_node(example_config(tmp_path_factory.mktemp("node"))) as node:
        yield node


@contextmanager
def balancer(path: Path, node: NodeProcess, extra: str = "") -> Iterator[BalancerProcess]:
    """A balancer in front of ``node``, every port of its own 0 (its metrics: ``proc.metrics_port``)."""
    balancer_config(
        path,
        instances=[node.port],
        extra=f"<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>{extra}",
    )
    with running_balancer(path) as proc:
        wait_for_log_count(proc, r"instance 127\.0\.0\.1:\d+ is UP", 1)
        yield proc


NO_OUTPUT_WARNING = (
    r"WAR threatgate\.balancer: client 127\.0\.0\.1 sent no X-KF-ReplyBack and there is no "
    r"<OutputConnectionString>: its detections will be dropped"
)


def test_balancer_without_output_warns_per_client_counts_and_takes_a_destination_at_sighup(
    tmp_path: Path, instance: NodeProcess
) -> None:
    other_metrics = closed_port()  # only a different address in the file: never bound (it needs a restart)
    path = tmp_path / "kl_balancer.conf"
    want = [line.split(" ", 1)[1] for line in reference_detections(instance.port)]  # without the request id
    with balancer(path, instance) as proc, line_sink() as siem:
        metrics = proc.metrics_port
        # The example's <OutputConnectionString> is off: a plain client is warned about, its lines counted.
        assert send_plain(proc.port, EVENTS) == b""
        proc.wait_for_log(NO_OUTPUT_WARNING)
        wait_until(lambda: dropped(metrics, "detections", "no_output_destination") == len(want), "lines counted")
        # The balancer's own service alert (at most one a minute per destination and reason).
        proc.wait_for_log(
            rf"WAR threatgate\.alerts: alert KL_ALERT_DetectionsDropped destination=nowhere lines={len(want)} "
            r"reason=no_output_destination"
        )
        assert prometheus_samples(metrics)['threatgate_alerts_total{alert="KL_ALERT_DetectionsDropped"}'] == 1
        exchange(proc.port, REPLY_FLAGS + EVENTS)  # ReplyBack: nothing to warn about
        send_plain(proc.port, EVENTS)  # once per client connection
        wait_until(lambda: dropped(metrics, "detections", "no_output_destination") == 2 * len(want), "more lines")
        assert len(re.findall(NO_OUTPUT_WARNING, proc.log())) == 2
        assert restart_required(metrics) == 0
        # SIGHUP: a destination (applied at once) and another metrics address (needs a restart).
        mark = proc.log_offset()
        balancer_config(
            path,  # port 0 (and the API and alert ports 0, kept) as it started: only these two elements change
            instances=[instance.port],
            extra=f"<MetricsConnectionString>127.0.0.1:{other_metrics}</MetricsConnectionString>"
            f'<OutputConnectionString enabled="true">127.0.0.1:{siem.port}</OutputConnectionString>',
        )
        proc.signal(signal.SIGHUP)
        proc.wait_for_log(
            r"WAR threatgate\.balancer: configuration reload: needs a restart: MetricsConnectionString ", after=mark
        )
        proc.wait_for_log(rf"now go to 127\.0\.0\.1:{siem.port}", after=mark)
        proc.wait_for_log(r"configuration reloaded from", after=mark)
        assert restart_required(metrics) == 1
        send_plain(proc.port, EVENTS)
        assert sorted(siem.wait_lines(len(want))) == sorted(want)
        assert dropped(metrics, "detections", "no_output_destination") == 2 * len(want)
        assert len(re.findall(NO_OUTPUT_WARNING, proc.log())) == 2


def test_balancer_stopping_with_an_unreachable_destination_counts_the_lines_it_drops(
    tmp_path: Path, instance: NodeProcess
) -> None:
    down = closed_port()
    path = tmp_path / "kl_balancer.conf"
    extra = f'<OutputConnectionString enabled="true">127.0.0.1:{down}</OutputConnectionString>'
    with balancer(path, instance, extra) as proc:
        metrics = proc.metrics_port
        send_plain(proc.port, EVENTS)
        proc.wait_for_log(rf"detections: cannot send to 127\.0\.0\.1:{down} .*retry 1/3")
        samples = prometheus_samples(metrics)
        assert samples['threatgate_output_queue_lines{destination="detections"}'] == 4
        assert samples['threatgate_output_queue_bytes{destination="detections"}'] > 0
        assert proc.stop() == 0
    wait_for_log_count(
        proc,
        rf"ERR threatgate\.net: detections: 4 line\(s\) \(\d+ bytes\) dropped for 127\.0\.0\.1:{down}: shutdown",
        1,
    )
