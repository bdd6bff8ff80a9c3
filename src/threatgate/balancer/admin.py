"""The balancer's run-time control: HAProxy's runtime API, for threatgate, on a local UNIX socket.

``threatgate balancer instance list|disable|enable|drain ADDRESS:PORT --config balancer.conf`` talks
to a running balancer through ``<AdminSocket>`` (default: next to the configuration file, mode
0600, only the balancer's user or root may connect).  A change holds until the next SIGHUP (which
applies the configuration's ``enabled`` again) or restart.

The exchange is one JSON line each way per connection:

* request ``{"command": "list"}`` or ``{"command": "disable"|"enable"|"drain", "instance": "host:port"}``;
* answer ``{"ok": true, "instances": [...]}`` (every instance after the command) or
  ``{"ok": false, "error": "..."}``.

Parsing and answers are pure functions (:func:`parse_request`, :func:`answer`); :class:`AdminServer`
is the asyncio edge and reaches the balancer only through its :class:`AdminHost` port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from threatgate.lb.instances import Instance
from threatgate.net import unix
from threatgate.net.describe import describe
from threatgate.stats import BalancerStats

log = logging.getLogger("threatgate.balancer")

COMMANDS = ("list", "disable", "enable", "drain")
CHANGES = ("disable", "enable", "drain")
MAX_REQUEST = 4096
"""Bytes of a request line; longer is refused."""
REQUEST_TIMEOUT = 5.0
"""Seconds a connection may take to send its request line."""


class AdminRequestError(ValueError):
    """A request the admin socket refuses: the text says what is wrong."""


@dataclass(frozen=True, slots=True)
class Request:
    command: str
    instance: str | None = None


def parse_request(line: bytes) -> Request:
    """One request line: ``{"command": ..., "instance": ...}``.

    Raises:
        AdminRequestError: not JSON, not an object, an unknown command or field, a missing instance.
    """
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdminRequestError(f"the request is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdminRequestError("the request must be a JSON object")
    unknown = sorted(set(data) - {"command", "instance"})
    if unknown:
        raise AdminRequestError(f"unknown field(s) {', '.join(unknown)}: expected command and instance")
    command = data.get("command")
    if command not in COMMANDS:
        raise AdminRequestError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")
    instance = data.get("instance")
    if command in CHANGES:
        if not isinstance(instance, str) or not instance:
            raise AdminRequestError(f"{command} needs an instance (ADDRESS:PORT, as in <Instances>)")
        return Request(command, instance)
    if instance is not None:
        raise AdminRequestError("list takes no instance")
    return Request(command)


def instance_row(inst: Instance, why: str) -> dict[str, Any]:
    """One instance as ``list`` shows it."""
    return {
        "instance": inst.key,
        "state": inst.state.value,
        "why": why,
        "weight": inst.settings.weight,
        "lanes": inst.open_lanes,
        "inflight": inst.owned_count,
        "dispatched": inst.dispatched,
        "answered": inst.finished,
        "redispatched": inst.redispatched,
    }


def render(rows: list[dict[str, Any]]) -> str:
    """The ``list`` table."""
    columns = ("INSTANCE", "STATE", "LANES", "INFLIGHT", "DISPATCHED", "ANSWERED", "REDISPATCHED", "WHY")
    keys = ("instance", "state", "lanes", "inflight", "dispatched", "answered", "redispatched", "why")
    table = [columns, *(tuple(str(row[k]) for k in keys) for row in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)


class AdminHost(Protocol):
    """What the admin socket asks of the balancer (``BalancerService`` is one)."""

    def operate(self, command: str, key: str) -> None: ...
    def instance_rows(self) -> list[dict[str, Any]]: ...
    @property
    def stats(self) -> BalancerStats: ...
    @property
    def instances(self) -> Mapping[str, Instance]: ...


def answer(host: AdminHost, request: Request, uid: int) -> dict[str, Any]:
    """Carry out ``request`` (from user ``uid``) and say what the instances are now."""
    if request.command in CHANGES:
        assert request.instance is not None
        if request.instance not in host.instances:
            known = ", ".join(sorted(host.instances)) or "none"
            return {"ok": False, "error": f"no instance {request.instance} (instances: {known})"}
        host.operate(request.command, request.instance)
        log.info("admin socket: %s %s (by uid %d)", request.command, request.instance, uid)
    return {"ok": True, "instances": host.instance_rows()}


class AdminServer:
    """The admin socket's listener (started and closed with the balancer)."""

    def __init__(self, host: AdminHost, path: str) -> None:
        self.host = host
        self.path = path
        self.refused = 0  # connections from another user, or bad requests (also in threatgate_bad_input_total)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen (raises OSError when the path cannot be used: a configuration problem, said at start)."""
        sock = unix.listen_owner_only(self.path)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST + 1)
        log.info("admin socket on %s (mode 0600)", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            unix.remove(self.path)

    def _refuse(self, reason: str) -> None:
        self.refused += 1
        stats = self.host.stats
        stats.bump(stats.bad_input, reason)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock: socket.socket = writer.get_extra_info("socket")
            uid = unix.peer_uid(sock)
            if not unix.peer_allowed(uid):
                self._refuse("admin_other_user")
                log.warning("admin socket: connection from uid %d refused (only the balancer's user or root)", uid)
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    line = await reader.readline()
            except TimeoutError:
                reply: dict[str, Any] = {"ok": False, "error": f"no request within {REQUEST_TIMEOUT:.0f} s"}
            except ValueError:  # longer than the limit
                reply = {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
            else:
                try:
                    reply = answer(self.host, parse_request(line), uid)
                except AdminRequestError as exc:
                    reply = {"ok": False, "error": str(exc)}
            if not reply["ok"]:
                self._refuse("admin_request")
                log.warning("admin socket: %s", reply["error"])
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except OSError as exc:
            log.debug("admin socket: connection failed: %s", describe(exc))
        finally:
            writer.close()


def request(path: str, command: str, instance: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The client side (``threatgate balancer instance``): one request, its answer.

    Raises:
        OSError: no balancer listens on ``path`` (or it did not answer in time).
        ValueError: the answer is not JSON.
    """
    payload: dict[str, Any] = {"command": command}
    if instance is not None:
        payload["instance"] = instance
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        with unix.short_name(path) as name:
            sock.connect(name)
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError("the balancer's answer is not a JSON object")
    return reply
