"""A node with two worker processes behind a real balancer: the balancer learns from ``/readyz`` to open one
event connection per worker ("lanes", ``connections`` auto), and a worker SIGKILLed mid-stream loses
nothing: the events its lane had not answered are sent again on the other lane, each answered exactly once
with the detections one node gives, the instance stays UP, and the restarted worker takes a lane again.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.helpers import FINISHED_LINE, REPLY_FLAGS, answers_in_order, prometheus_samples, wait_until
from tests.integration.test_balancer import (
    EVENTS,
    SLOW_NODES,
    STREAM_TIMEOUT,
    Dataset,
    assert_answers,
    client,
    dataset,  # noqa: F401 - the module-scoped fixture: 200,000 generated events and their reference answers
    nodes,
)
from tests.integration.test_balancer_lanes import lanes_balancer, lanes_open


def with_api(config: Path, api_port: int) -> Path:
    """The generated node config with a REST API (its ``/readyz`` tells the balancer how many lanes to open)."""
    text = config.read_text()
    api = (
        f"<HTTPServer><ConnectionString>127.0.0.1:{api_port}</ConnectionString>"
        "<CertificatePath>certs/node.pem</CertificatePath><PrivateKeyPath>certs/node.key</PrivateKeyPath>"
        f"<Database>state/{config.stem}.sqlite3</Database><Users></Users></HTTPServer>"
    )
    config.write_text(text.replace("</Configuration>", api + "</Configuration>"))
    return config


def per_worker(metrics_port: int) -> list[float]:
    samples = prometheus_samples(metrics_port)
    return [samples.get(f'threatgate_worker_active_connections{{worker="{w}"}}', -1) for w in (0, 1)]


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_stream_behind_the_balancer_every_event_exactly_once(
    dataset: Dataset,  # noqa: F811
    tmp_path: Path,
) -> None:
    config = with_api(dataset.node_config(0, 0, workers=2), 0)
    with (
        nodes((config, 0), env=SLOW_NODES) as [node],
        lanes_balancer(tmp_path, node.port, None, api_port=node.api_port) as (balancer, balancer_metrics),
    ):
        port, metrics = node.port, node.metrics_port
        wait_until(lambda: lanes_open(balancer_metrics, port) == 2, "two lanes, learned from /readyz")
        wait_until(lambda: per_worker(metrics) == [1.0, 1.0], "one lane on each worker")
        pids = dict(re.findall(r"worker (\d+) ready \(pid (\d+)\)", node.log()))
        with client(balancer.port) as (_, reader, writer):
            writer.send(REPLY_FLAGS + dataset.events)
            writer.shutdown()  # half-closed: the balancer answers everything, then closes
            reader.wait_finished(EVENTS // 3, timeout=STREAM_TIMEOUT)
            mark = balancer.log_offset()
            os.kill(int(pids["0"]), signal.SIGKILL)
            resent = balancer.wait_for_log(
                r"instance 127\.0\.0\.1:\d+: (\d+) unfinished event\(s\) of event connection \d+ sent again", after=mark
            )
            assert int(resent[1]) > 0
            writer.join(STREAM_TIMEOUT)
            lines = reader.join(STREAM_TIMEOUT)
        assert "is DOWN" not in balancer.log()[mark:]
        node.wait_for_log(r"alert KL_ALERT_WorkerRestarted worker=0")
        node.wait_for_log(r"worker 0 ready")
        # The lane that reconnected while worker 0 restarted sits on worker 1: worker 1 sheds one, the
        # balancer reconnects it, and each worker serves a lane again.
        wait_until(lambda: per_worker(metrics) == [1.0, 1.0], "one lane on each worker again", timeout=30)
    assert lines.count(FINISHED_LINE) == EVENTS
    assert_answers(answers_in_order(lines), dataset.reference)
    assert sum(map(len, dataset.reference)) == len(lines) - EVENTS  # and not one detection line more
