"""Tests for threatgate.balancer.drill: the drill's options, commands, and its edge against fakes.

The edge is driven against a real admin socket (:class:`AdminServer` over a fake balancer whose states
the commands change) and a fake event port that answers canaries as a balancer does, so that a lost
or repeated answer, a refused step and Ctrl-C can be made to happen on purpose.  The real balancer
and nodes are in tests/integration/test_drill.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import trustme

from threatgate.balancer.admin import AdminServer
from threatgate.balancer.drill import (
    CanaryStream,
    Drill,
    DrillAborted,
    DrillOptions,
    build_options,
    command_for,
    connect_host,
    parse_command,
    run_drill,
)
from threatgate.config.balancer import BalancerConfig, CanarySettings, InstanceSettings
from threatgate.config.security import ClientCertificates, TLSListener
from threatgate.errors import DrillError
from threatgate.lb.drill import Canary, ReplyChecker
from threatgate.lb.instances import Instance

HIT = Canary("url=http://fakess123.nu", ("Malicious_URL",), "c:1")
MISS = Canary("url=http://example.org/", (), "c:2")
KEYS = ["127.0.0.1:1", "127.0.0.1:2"]


def test_commands_get_the_instance_filled_in_and_run_without_a_shell() -> None:
    words = parse_command("systemctl stop 'threatgate-node@{port}' --host={host} # {instance}")
    assert command_for(words, "10.0.0.5:10001") == [
        "systemctl",
        "stop",
        "threatgate-node@10001",
        "--host=10.0.0.5",
        "#",
        "10.0.0.5:10001",
    ]
    with pytest.raises(ValueError, match="empty command"):
        parse_command("  ")
    with pytest.raises(ValueError):
        parse_command("'unbalanced")


def test_a_wildcard_listen_address_is_reached_on_the_loopback() -> None:
    assert [connect_host(h) for h in ("0.0.0.0", "::", "10.1.2.3")] == ["127.0.0.1", "::1", "10.1.2.3"]


def config(tmp_path: Path, **changes: Any) -> BalancerConfig:
    values: dict[str, Any] = {
        "path": str(tmp_path / "kl_balancer.conf"),
        "listen_host": "0.0.0.0",
        "matching_port": 9000,
        "api_port": 9001,
        "cybertrace_port": 9002,
        "scanners_count": 10,
        "cert_path": str(tmp_path / "missing.pem"),
        "key_path": "k",
        "cert_dir": str(tmp_path),
        "instances": (
            InstanceSettings(host="127.0.0.1", matching_port=1),
            InstanceSettings(host="127.0.0.1", matching_port=2),
            InstanceSettings(host="127.0.0.1", matching_port=3, enabled=False),
        ),
        "allowed": (),
        "admin_socket": str(tmp_path / "kl_balancer.sock"),
        "canaries": (CanarySettings(event="url=x", expect=("Malicious_URL",), line=7),),
    }
    values.update(changes)
    return BalancerConfig(**values)


def options(cfg: BalancerConfig, **given: Any) -> DrillOptions:
    args: dict[str, Any] = {
        "canary_file": None,
        "stop_command": None,
        "start_command": None,
        "user": None,
        "password": None,
        "rest": False,
        "matching_port": None,
        "api_port": None,
    }
    args.update(given)
    return build_options(cfg, **args)


def test_options_from_the_config(tmp_path: Path) -> None:
    opts = options(config(tmp_path), stop_command="stop {instance}", start_command="start {instance}", hold=2.0)
    assert opts.events == ("127.0.0.1", 9000) and opts.api is None
    assert opts.instances == KEYS  # the disabled one is not drilled
    assert opts.canaries == [Canary("url=x", ("Malicious_URL",), f"{tmp_path / 'kl_balancer.conf'}:7")]
    assert opts.stop_command == ["stop", "{instance}"] and opts.hold == 2.0


def test_a_canary_file_replaces_the_config_s_canaries(tmp_path: Path) -> None:
    path = tmp_path / "canary.jsonl"
    path.write_text('{"event": "url=y", "expect": []}\n')
    assert options(config(tmp_path), canary_file=str(path)).canaries == [Canary("url=y", (), f"{path}:1")]
    path.write_text("{}\n")
    with pytest.raises(DrillError, match=r"canary file: .*canary.jsonl:1: expected"):
        options(config(tmp_path), canary_file=str(path))
    with pytest.raises(DrillError, match="cannot read the canary file"):
        options(config(tmp_path), canary_file=str(tmp_path / "none"))


@pytest.mark.parametrize(
    ("changes", "given", "fragment"),
    [
        ({"canaries": ()}, {}, "no canary events: give --canary FILE"),
        ({"admin_socket": None}, {}, 'has <AdminSocket enabled="false">'),
        ({}, {"stop_command": "x"}, "--stop-command and --start-command go together"),
        ({}, {"stop_command": "'x", "start_command": "y"}, "--stop-command/--start-command:"),
        ({"matching_port": 0}, {}, 'says matching_port="0" (picked at start): give --matching-port'),
        ({}, {"rest": True}, "need --user"),
        ({"api_port": 0}, {"rest": True, "user": "u"}, "give --api-port"),
        ({}, {"rest": True, "user": "u"}, "the balancer's certificate"),
        ({"instances": (InstanceSettings(host="127.0.0.1", matching_port=1),)}, {}, "at least two enabled"),
    ],
)
def test_unusable_options_are_refused_with_what_to_change(
    tmp_path: Path, changes: dict[str, Any], given: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(DrillError) as info:
        options(config(tmp_path, **changes), **given)
    assert fragment in str(info.value)


def test_ports_given_on_the_command_line_win(tmp_path: Path) -> None:
    opts = options(config(tmp_path, matching_port=0), matching_port=4000)
    assert opts.events == ("127.0.0.1", 4000)


# -- the edge against a fake balancer ---------------------------------------------------------------------------


class FakeBalancer:
    """The admin socket's host, and an event port answering canaries (``mode`` breaks it on purpose)."""

    def __init__(self) -> None:
        self.states = dict.fromkeys(KEYS, "UP")
        self.commands: list[tuple[str, str]] = []
        self.mode = ""  # "duplicate": one answer twice while an instance is out; "refuse_enable"
        self.drained = asyncio.Event()

    # AdminHost
    def operate(self, command: str, key: str) -> None:
        self.commands.append((command, key))
        if command == "drain":
            self.states[key] = "MAINT"
            self.drained.set()
        elif command == "enable" and self.mode != "stay_out":
            self.states[key] = "UP"

    def instance_rows(self) -> list[dict[str, Any]]:
        return [
            {"instance": k, "state": s, "why": "" if s == "UP" else "drained at run time", "redispatched": 0}
            for k, s in self.states.items()
        ]

    @property
    def instances(self) -> Mapping[str, Instance]:
        return cast(Mapping[str, Instance], self.states)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(b"X-KF-SendFinishedEventX-KF-ReplyBack"))
        duplicated = False
        while line := await reader.readline():
            answer = b"category=Malicious_URL matchedIndicator=http://fakess123.nu\n" if b"fakess123" in line else b""
            answer += b"LookupFinished\n"
            if self.mode == "duplicate" and not duplicated and "MAINT" in self.states.values():
                answer += b"LookupFinished\n"
                duplicated = True
            writer.write(answer)
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def fake(tmp_path: Path) -> AsyncIterator[tuple[FakeBalancer, DrillOptions]]:
    balancer = FakeBalancer()
    server = await asyncio.start_server(balancer.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    admin = AdminServer(balancer, str(tmp_path / "a.sock"))
    await admin.start()
    opts = DrillOptions(
        events=("127.0.0.1", port),
        api=None,
        admin_socket=admin.path,
        cert_pem=b"",
        canaries=[HIT, MISS],
        instances=KEYS,
        rate=200.0,
        hold=0.2,
        step_timeout=5.0,
        up_timeout=1.0,
    )
    try:
        yield balancer, opts
    finally:
        await admin.close()
        server.close()


async def test_a_drill_drains_and_enables_each_instance_in_turn(tmp_path: Path) -> None:
    async with fake(tmp_path) as (balancer, opts):
        said: list[str] = []
        results, problems = await run_drill(opts, said.append)
    assert problems == [] and [r.ok for r in results] == [True, True], (results, problems)
    assert balancer.commands == [("drain", KEYS[0]), ("enable", KEYS[0]), ("drain", KEYS[1]), ("enable", KEYS[1])]
    assert all(r.detect is not None and r.events > 0 for r in results)
    assert said == [f"drill: {KEYS[0]}: taking it out", f"drill: {KEYS[0]}: PASS"] + [
        f"drill: {KEYS[1]}: taking it out",
        f"drill: {KEYS[1]}: PASS",
    ]


async def test_a_duplicated_answer_fails_the_step_it_happened_in(tmp_path: Path) -> None:
    async with fake(tmp_path) as (balancer, opts):
        balancer.mode = "duplicate"
        results, problems = await run_drill(opts, lambda _: None)
    assert not results[0].ok
    assert any("answered" in p or "duplicate" in p for p in results[0].problems), results[0].problems


async def test_an_instance_that_stays_out_fails_and_the_next_is_refused(tmp_path: Path) -> None:
    async with fake(tmp_path) as (balancer, opts):
        balancer.mode = "stay_out"
        results, _ = await run_drill(opts, lambda _: None)
    assert results[0].problems == [
        "did not come back UP within 1 s (the balancer shows it MAINT (drained at run time))"
    ]
    assert results[1].problems == [
        f"refusing to take out {KEYS[1]}: it is the last UP instance (taking it out would stop the service)"
    ]
    assert ("drain", KEYS[1]) not in balancer.commands


async def test_canaries_answered_wrongly_stop_the_drill_before_anything_is_taken_out(tmp_path: Path) -> None:
    async with fake(tmp_path) as (balancer, opts):
        opts = DrillOptions(**{**_fields(opts), "canaries": [Canary("url=x", ("IP_Reputation",), "c:9")]})
        results, problems = await run_drill(opts, lambda _: None)
    assert results == [] and balancer.commands == []
    assert problems[0].startswith("the canaries are not answered as expected before any instance was taken out: ")
    assert "event #1 (c:9): expected IP_Reputation, got 0 detection(s)" in problems[0]


async def test_a_failing_stop_command_is_reported_and_the_instance_started_again(tmp_path: Path) -> None:
    async with fake(tmp_path) as (balancer, opts):
        opts = DrillOptions(
            **{**_fields(opts), "stop_command": ["false", "{instance}"], "start_command": ["true", "{instance}"]}
        )
        results, _ = await run_drill(opts, lambda _: None)
    assert results[0].problems == [f"the stop command false {KEYS[0]} exited with 1"]
    assert balancer.commands == []  # commands instead of the admin socket


async def test_cancelled_mid_step_the_instance_is_brought_back(tmp_path: Path) -> None:
    """Ctrl-C (asyncio.run cancels the main task): the instance out is enabled again before the drill ends."""
    async with fake(tmp_path) as (balancer, opts):
        opts = DrillOptions(**{**_fields(opts), "hold": 30.0})
        drill = Drill(opts, lambda _: None)
        task = asyncio.create_task(drill.run())
        async with asyncio.timeout(10):
            await balancer.drained.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert balancer.commands == [("drain", KEYS[0]), ("enable", KEYS[0])]
    assert balancer.states[KEYS[0]] == "UP"


def _fields(opts: DrillOptions) -> dict[str, Any]:
    return {name: getattr(opts, name) for name in DrillOptions.__slots__}


def test_the_cli_refuses_a_drill_without_canaries_with_exit_2() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "balancer.conf"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "threatgate"), "drill", "--config", str(example), "--no-rest"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("threatgate: drill: no canary events: give --canary FILE"), result.stderr


# -- a TLS event port (<MatchingTLS>) ---------------------------------------------------------------------------


def test_a_tls_event_port_gives_the_canaries_its_certificate_as_pin(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "events.pem"))
    tls = TLSListener(
        cert_path=str(tmp_path / "events.pem"),
        key_path="k",
        clients=ClientCertificates(mode="required", ca_files=("ca.pem",)),
    )
    opts = options(config(tmp_path, matching_tls=tls, client_cert_path="c.pem", client_key_path="c.key"))
    assert opts.events_cert_pem == (tmp_path / "events.pem").read_bytes()
    assert opts.client_pair == ("c.pem", "c.key")
    assert options(config(tmp_path)).events_cert_pem == b""


@pytest.mark.parametrize("pinned", [True, False], ids=["its-certificate", "another-certificate"])
async def test_canaries_go_over_tls_only_to_the_pinned_certificate(tmp_path: Path, pinned: bool) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(100))
        writer.close()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(context)
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    shown = server_cert if pinned else ca.issue_cert("127.0.0.1")
    opts = DrillOptions(
        events=("127.0.0.1", server.sockets[0].getsockname()[1]),
        api=None,
        admin_socket="",
        cert_pem=b"",
        canaries=[HIT],
        instances=KEYS,
        events_cert_pem=shown.cert_chain_pems[0].bytes(),
        step_timeout=5.0,
    )
    stream = CanaryStream(opts, ReplyChecker())
    try:
        if pinned:
            await stream.open()
            for _ in range(100):
                if received:
                    break
                await asyncio.sleep(0.02)
            assert received and received[0].startswith(b"X-KF-SendFinishedEvent")
        else:
            with pytest.raises(DrillAborted, match="presented another certificate"):
                await stream.open()
            await asyncio.sleep(0.1)
            assert received in ([], [b""])  # not a byte of the canaries
    finally:
        await stream.close()
        server.close()
