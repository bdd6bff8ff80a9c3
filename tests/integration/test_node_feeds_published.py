"""A real ``threatgate node`` loads abuse.ch URLhaus and Feodo Tracker CSV files exactly as published
(issue 12, item 9) and detects events that hit them, including a URL whose ``..`` follows ``//``
(item 10: it must look up the path it names, not its parent)."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.abusech import FEODO, URLHAUS
from tests.helpers import NodeProcess, example_config, exchange, running_node

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
FEEDS = (
    '<Feed filename="feeds/urlhaus.csv" category="URLhaus" confidence="90" '
    'context_columns="threat,tags,urlhaus_link"/>'
    '<Feed filename="feeds/ipblocklist.csv" category="Feodo_CnC" confidence="100" indicator_column="dst_ip" '
    'context_columns="dst_port,malware,c2_status"/>'
)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[NodeProcess, int]]:
    config = example_config(tmp_path)
    (tmp_path / "feeds" / "urlhaus.csv").write_bytes(URLHAUS.replace("\n", "\r\n").encode())
    (tmp_path / "feeds" / "ipblocklist.csv").write_bytes(FEODO.encode())
    text, n = re.subn(
        r"(<Feeds[^>]*>).*?(</Feeds>)", lambda m: m.group(1) + FEEDS + m.group(2), config.read_text(), flags=re.S
    )
    assert n == 1
    config.write_text(re.sub(r"<IoCExports>.*?</IoCExports>", "", text, flags=re.S))
    with running_node(config) as proc:
        yield proc, proc.port
        assert "Traceback" not in proc.log(), proc.log()


def test_node_loads_abusech_feeds_as_published_and_detects(node: tuple[NodeProcess, int]) -> None:
    proc, port = node
    log = proc.log()  # the node listens only once its feeds are loaded
    assert "alert KL_ALERT_UpdatedFeed feed=urlhaus.csv records=5\n" in log
    assert "alert KL_ALERT_UpdatedFeed feed=ipblocklist.csv records=3\n" in log
    assert "feeds loaded (startup): 8 indicator(s) from 2 feed(s)" in log
    events = (
        "1 url=http://198.51.100.23:57501/bin.sh\n"
        "2 dst=203.0.113.211\n"
        "3 url=http://files.example-host.test/dl/invoice//..\n"
        "4 url=http://pagos-banc0.example/any/page\n"
        "5 url=http://files.example-host.test/dl/x//../invoice/../..\n"
    )
    reply = exchange(port, FLAGS + events.encode()).decode()
    assert reply.splitlines() == [
        "1 category=URLhaus matchedIndicator=http://198.51.100.23:57501/bin.sh confidence=90 source=default "
        "threat=malware_download tags=32-bit,elf,mips,Mozi urlhaus_link=https://urlhaus.abuse.ch/url/3853890/",
        "1 LookupFinished",
        "2 category=Feodo_CnC matchedIndicator=203.0.113.211 confidence=100 source=default "
        "dst_port=443 c2_status=online malware=QakBot",
        "2 LookupFinished",
        "3 category=URLhaus matchedIndicator=http://files.example-host.test/dl/invoice/ confidence=90 "
        "source=default threat=malware_download tags=None urlhaus_link=https://urlhaus.abuse.ch/url/3853887/",
        "3 LookupFinished",
        "4 category=URLhaus matchedIndicator=http://Pagos-Banc0.example confidence=90 source=default "
        "threat=malware_download tags=exe urlhaus_link=https://urlhaus.abuse.ch/url/3853888/",
        "4 LookupFinished",
        "5 LookupFinished",  # /dl/x//../invoice/../.. is /dl/x/: not the listed /dl/invoice/
    ]


def test_node_applies_changed_context_columns_on_reload(node: tuple[NodeProcess, int]) -> None:
    proc, port = node
    event = FLAGS + b"2 dst=203.0.113.211\n"
    assert "dst_port=443 c2_status=online malware=QakBot\n" in exchange(port, event).decode()
    proc.config.write_text(proc.config.read_text().replace('"dst_port,malware,c2_status"', '"Malware"'))
    proc.signal(signal.SIGHUP)
    proc.wait_for_log(r"configuration reloaded from ")
    proc.wait_for_log(r"alert KL_ALERT_UpdatedFeed feed=ipblocklist\.csv records=3\n")
    assert exchange(port, event).decode().splitlines() == [
        "2 category=Feodo_CnC matchedIndicator=203.0.113.211 confidence=100 source=default malware=QakBot",
        "2 LookupFinished",
    ]
