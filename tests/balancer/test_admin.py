"""Tests for threatgate.balancer.admin: requests, answers and the socket, against a real balancer edge.

The edge is a real :class:`BalancerService` with its dispatcher (no sockets to nodes): commands change
the instances' states exactly as the dispatcher's unit tests describe; here the point is the admin
protocol and its socket (mode, a refused user, bad requests, the CLI's client).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.config.configs import balancer_model, instance
from tests.net.test_unix import NOBODY, connect_as, open_dir  # noqa: F401 - the fixture
from threatgate.balancer import admin
from threatgate.balancer.app import build_balancer
from threatgate.balancer.service import BalancerService
from threatgate.config.balancer import BalancerConfig, load_balancer_config
from threatgate.lb.instances import InstanceState


def config(tmp_path: Path, socket_path: Path | None) -> BalancerConfig:
    return balancer_model(tmp_path, instance(1), instance(2), admin_socket=str(socket_path) if socket_path else None)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json\n", "the request is not JSON"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'{"command": "list", "user": "x"}\n', "unknown field(s) user"),
        (b'{"command": "reboot"}\n', "unknown command 'reboot'"),
        (b'{"command": "drain"}\n', "drain needs an instance"),
        (b'{"command": "disable", "instance": ""}\n', "disable needs an instance"),
        (b'{"command": "list", "instance": "127.0.0.1:1"}\n', "list takes no instance"),
        (b"\xff\xfe\n", "the request is not JSON"),
    ],
)
def test_bad_requests_say_what_is_wrong(line: bytes, error: str) -> None:
    with pytest.raises(admin.AdminRequestError, match=error.replace("(", r"\(").replace(")", r"\)")):
        admin.parse_request(line)


def test_good_requests() -> None:
    assert admin.parse_request(b'{"command": "list"}\n') == admin.Request("list")
    assert admin.parse_request(b'{"command": "drain", "instance": "h:1"}') == admin.Request("drain", "h:1")


async def test_commands_change_states_until_a_reload_and_an_unknown_instance_is_named(tmp_path: Path) -> None:
    service = build_balancer(config(tmp_path, None))
    d = service.dispatcher
    assert admin.answer(service, admin.Request("disable", "127.0.0.1:9"), 0) == {
        "ok": False,
        "error": "no instance 127.0.0.1:9 (instances: 127.0.0.1:1, 127.0.0.1:2)",
    }
    reply = admin.answer(service, admin.Request("disable", "127.0.0.1:1"), 0)
    rows = {row["instance"]: row for row in reply["instances"]}
    assert rows["127.0.0.1:1"]["state"] == "MAINT" and rows["127.0.0.1:1"]["why"] == "disabled at run time"
    assert rows["127.0.0.1:2"]["state"] == "DOWN" and rows["127.0.0.1:2"]["why"] == "not checked yet"
    admin.answer(service, admin.Request("enable", "127.0.0.1:1"), 0)
    assert d.instances["127.0.0.1:1"].state is InstanceState.DOWN
    admin.answer(service, admin.Request("drain", "127.0.0.1:2"), 0)  # DOWN owes nothing: MAINT at once
    assert d.instances["127.0.0.1:2"].state is InstanceState.MAINT
    assert d.why(d.instances["127.0.0.1:2"]) == "drained at run time"
    # A reload applies the configuration's enabled= again: run-time changes end.
    service.apply_config(config(tmp_path, None))
    assert d.instances["127.0.0.1:2"].state is InstanceState.DOWN and d.admin == {}
    text = admin.render(service.instance_rows())
    assert text.splitlines()[0].split() == [
        "INSTANCE",
        "STATE",
        "LANES",
        "INFLIGHT",
        "DISPATCHED",
        "ANSWERED",
        "REDISPATCHED",
        "WHY",
    ]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[BalancerService, Path, asyncio.AbstractEventLoop]]:
    """A balancer edge whose admin socket listens, on a loop in this thread (the test drives it)."""
    loop = asyncio.new_event_loop()
    path = tmp_path / "kl_balancer.sock"
    service = build_balancer(config(tmp_path, path))
    assert service.admin is not None
    loop.run_until_complete(service.admin.start())
    try:
        yield service, path, loop
    finally:
        loop.run_until_complete(service.admin.close())
        loop.close()


def ask(loop: asyncio.AbstractEventLoop, path: Path, payload: dict[str, Any] | bytes) -> dict[str, Any]:
    """One request from a client thread while the loop serves it."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode() + b"\n"

    def client() -> dict[str, Any]:
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(data)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        result: dict[str, Any] = json.loads(reply)
        return result

    return loop.run_until_complete(asyncio.to_thread(client))


def test_the_socket_answers_the_owner_and_refuses_bad_requests(
    served: tuple[BalancerService, Path, asyncio.AbstractEventLoop],
) -> None:
    service, path, loop = served
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    reply = ask(loop, path, {"command": "drain", "instance": "127.0.0.1:1"})
    assert reply["ok"] and service.dispatcher.instances["127.0.0.1:1"].state is InstanceState.MAINT
    assert ask(loop, path, b"x" * 5000 + b"\n") == {"ok": False, "error": "request longer than 4096 bytes"}
    assert ask(loop, path, b"{}\n")["error"].startswith("unknown command None")
    assert service.admin is not None and service.admin.refused == 2  # type: ignore[attr-defined]
    assert service.stats.bad_input == {"admin_request": 2}  # counted: threatgate_bad_input_total
    # The CLI's client, against the same socket.
    result = loop.run_until_complete(asyncio.to_thread(admin.request, str(path), "list"))
    assert [row["state"] for row in result["instances"]] == ["MAINT", "DOWN"]


def test_another_user_is_refused_even_when_the_mode_would_let_it_in(
    open_dir: Path,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    loop = asyncio.new_event_loop()
    path = open_dir / "kl_balancer.sock"
    service = build_balancer(config(tmp_path, path))
    assert service.admin is not None
    loop.run_until_complete(service.admin.start())
    try:
        assert loop.run_until_complete(asyncio.to_thread(connect_as, NOBODY, path)) == "EACCES"
        path.chmod(0o666)  # an operator's mistake: the peer's user is still checked
        got = loop.run_until_complete(asyncio.to_thread(connect_as, NOBODY, path))
        assert got in ("ok", "EPIPE", "ECONNRESET")  # connected, then closed without an answer
        assert service.admin.refused == 1  # type: ignore[attr-defined]
        assert service.stats.bad_input == {"admin_other_user": 1}
        assert all(i.state is not InstanceState.MAINT for i in service.dispatcher.instances.values())
    finally:
        loop.run_until_complete(service.admin.close())
        loop.close()
    assert not path.exists()


def test_the_admin_socket_is_next_to_the_config_or_off(tmp_path: Path) -> None:
    base = (
        '<Config><Balancer matching_port="9000" api_port="9001" cybertrace_port="9002" scanners_count="4">'
        '127.0.0.1</Balancer><Instances><Instance matching_port="9100">127.0.0.1</Instance></Instances>'
        "{extra}</Config>"
    )
    path = tmp_path / "kl_balancer.conf"
    path.write_text(base.format(extra=""))
    assert load_balancer_config(str(path)).admin_socket == str(tmp_path / "kl_balancer.sock")
    path.write_text(base.format(extra="<AdminSocket>run/admin.sock</AdminSocket>"))
    assert load_balancer_config(str(path)).admin_socket == str(tmp_path / "run" / "admin.sock")
    path.write_text(base.format(extra='<AdminSocket enabled="false"/>'))
    assert load_balancer_config(str(path)).admin_socket is None
    result = subprocess.run(
        [sys.executable, "-m", "threatgate", "balancer", "instance", "list", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and 'has <AdminSocket enabled="false">' in result.stderr
    path.write_text(base.format(extra=""))
    result = subprocess.run(
        [sys.executable, "-m", "threatgate", "balancer", "instance", "drain", "127.0.0.1:9100", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"no answer from the balancer's admin socket {tmp_path / 'kl_balancer.sock'}: " in result.stderr
