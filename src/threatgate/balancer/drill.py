"""``threatgate drill``: the failover drill against a running balancer, under live canary traffic.

The edge of :mod:`threatgate.lb.drill`: one event connection to the balancer's matching_port that
streams canary events at a bounded rate (answers checked by :class:`~threatgate.lb.drill.ReplyChecker`),
the admin socket (``list`` to watch states, ``drain``/``enable`` to take an instance out and back),
the operator's stop and start commands when given, and REST lookups through the gateway over TLS
pinned to the balancer's own certificate (``<SSLCertificatePath>``).

Every wait has a deadline; an instance taken out is brought back whatever happens (a failure, a
timeout, Ctrl-C) before the drill ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import shlex
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from threatgate.balancer import admin
from threatgate.config.balancer import BalancerConfig
from threatgate.errors import DrillError, PeerCertificateMismatch, ThreatgateError, UpstreamFailed
from threatgate.lb import drill as core
from threatgate.net.describe import describe
from threatgate.net.pinned import PinnedPool, client_context
from threatgate.wire.flags import REPLY_BACK, SEND_FINISHED

log = logging.getLogger("threatgate.drill")

POLL = 0.05
"""Seconds between two ``list`` requests while waiting for a state."""
MAX_OUTSTANDING = 1000
"""Canary events sent and not yet answered before the sender waits (a stalled balancer is not flooded)."""
ADMIN_TIMEOUT = 5.0
REST_TIMEOUT = 10.0
REST_INTERVAL = 1.0
COMMAND_OUTPUT = 2000
"""Bytes of a failed command's output quoted in its problem."""


@dataclass(frozen=True, slots=True)
class DrillOptions:
    """What the drill is told: where, how, and how long each wait may take."""

    events: tuple[str, int]  # the balancer's event port (host, port)
    api: tuple[str, int] | None  # its REST gateway; None: no REST lookups (--no-rest)
    admin_socket: str
    cert_pem: bytes  # the balancer's certificate (the pin of the REST lookups)
    canaries: Sequence[core.Canary]
    instances: Sequence[str]  # the enabled instances, in config order
    events_cert_pem: bytes = b""  # the event port's certificate when it speaks TLS (<MatchingTLS>): its pin
    client_pair: tuple[str, str] | None = None  # what the canary connection presents when the port asks
    stop_command: Sequence[str] | None = None
    start_command: Sequence[str] | None = None
    user: str | None = None
    password: str | None = None
    lookup_object: str = "threatgate-drill.invalid"
    rate: float = 50.0  # canary events per second
    hold: float = 3.0  # seconds an instance stays out once the balancer shows it out
    step_timeout: float = 30.0  # each wait of a step: seen out, answers in, a command
    up_timeout: float = 60.0  # waiting for UP once it was brought back


class DrillAborted(ThreatgateError):
    """The drill cannot go on (no canary connection, no admin socket): the text says why."""


def command_for(template: Sequence[str], key: str) -> list[str]:
    """A stop/start command with ``{instance}`` (``host:port``), ``{host}`` and ``{port}`` filled in."""
    host, _, port = key.rpartition(":")
    return [part.replace("{instance}", key).replace("{host}", host).replace("{port}", port) for part in template]


def parse_command(text: str) -> list[str]:
    """A ``--stop-command``/``--start-command`` as words (shell quoting; run without a shell).

    Raises:
        ValueError: unbalanced quotes, or empty.
    """
    words = shlex.split(text)
    if not words:
        raise ValueError("empty command")
    return words


class CanaryStream:
    """The canary connection: sends events at ``rate`` per second, reads every answer into the checker."""

    def __init__(self, options: DrillOptions, checker: core.ReplyChecker) -> None:
        self.options = options
        self.checker = checker
        self.closed: str | None = None  # why the connection ended, once it did
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sending = True
        self._answered = asyncio.Event()

    async def open(self) -> None:
        host, port = self.options.events
        context = _events_context(self.options)
        try:
            async with asyncio.timeout(self.options.step_timeout):
                reader, self._writer = await asyncio.open_connection(host, port, limit=1 << 20, ssl=context)
        except (OSError, TimeoutError) as exc:
            raise DrillAborted(f"cannot connect to the balancer's event port {host}:{port}: {describe(exc)}") from None
        if context is not None:
            presented = self._writer.get_extra_info("ssl_object").getpeercert(binary_form=True) or b""
            if presented != _der(self.options.events_cert_pem):
                self._writer.transport.abort()
                raise DrillAborted(
                    f"the balancer's event port {host}:{port} presented another certificate than its <MatchingTLS> "
                    "one: nothing sent (someone may be in between)"
                )
        self._writer.write(SEND_FINISHED + REPLY_BACK)
        self._tasks = [asyncio.create_task(self._read(reader)), asyncio.create_task(self._send())]

    async def _send(self) -> None:
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        canaries = self.options.canaries
        interval = 1.0 / self.options.rate
        n = 0
        next_at = loop.time()
        while self._sending and self.closed is None:
            if self.checker.unanswered >= MAX_OUTSTANDING:
                self._answered.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._answered.wait()
                next_at = loop.time()
                continue
            canary = canaries[n % len(canaries)]
            n += 1
            self.checker.sent(canary, loop.time())
            self._writer.write(canary.event.encode() + b"\n")
            try:
                await self._writer.drain()
            except OSError as exc:
                self.closed = f"the canary connection failed: {describe(exc)}"
                return
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    self.closed = "the balancer closed the canary connection"
                    return
                self.checker.line(line[:-1].decode("utf-8", "replace").rstrip("\r"), loop.time())
                self._answered.set()
        except (OSError, ValueError) as exc:  # ValueError: a line over the limit
            self.closed = f"the canary connection failed: {describe(exc) if isinstance(exc, OSError) else exc}"
        finally:
            self._answered.set()

    def stop_sending(self) -> None:
        self._sending = False

    async def wait_answered(self, count: int, within: float) -> bool:
        """Wait until the first ``count`` events sent are answered (or the connection ended); whether they were."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.checker.answered < count and self.closed is None:
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._answered.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._answered.wait()
        return self.checker.answered >= count

    async def close(self) -> None:
        self._sending = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


class Rest:
    """REST lookups through the gateway, over TLS pinned to the balancer's own certificate."""

    def __init__(self, options: DrillOptions) -> None:
        assert options.api is not None
        self.options = options
        self.pool = PinnedPool(options.api[0], options.api[1], client_context(), limit=2)
        self.pin = hashlib.sha256(_der(options.cert_pem)).digest()
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if options.user is not None:
            token = base64.b64encode(f"{options.user}:{options.password or ''}".encode()).decode()
            self.headers["Authorization"] = "Basic " + token

    async def lookup(self) -> str | None:
        """One ``POST /api/1.1/lookup``; None when it was answered as a lookup is, else what went wrong."""
        body = json.dumps([{"object": self.options.lookup_object}]).encode()
        try:
            answer = await self.pool.request(self.pin, "POST", "/api/1.1/lookup", self.headers, body, REST_TIMEOUT)
        except PeerCertificateMismatch:
            return "the gateway presented another certificate than <SSLCertificatePath>"
        except UpstreamFailed as exc:
            return f"no answer from the gateway: {exc}"
        if answer.status != 200:
            return f"HTTP {answer.status}: {answer.body[:200].decode('utf-8', 'replace')}"
        try:
            data = json.loads(answer.body)
        except ValueError:
            data = None
        if not isinstance(data, list) or len(data) != 1:
            return f"HTTP 200 but not a lookup answer: {answer.body[:200].decode('utf-8', 'replace')}"
        return None

    def close(self) -> None:
        self.pool.close()


def _events_context(options: DrillOptions) -> ssl.SSLContext | None:
    """TLS toward a ``<MatchingTLS>`` event port: its own certificate is the pin (checked before a byte is sent)."""
    if not options.events_cert_pem:
        return None
    context = client_context()
    if options.client_pair is not None:
        context.load_cert_chain(*options.client_pair)
    return context


def _der(pem: bytes) -> bytes:
    """The first certificate of a PEM file, as DER."""
    text = pem.decode("ascii", "replace")
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise ValueError("not a PEM certificate")
    return ssl.PEM_cert_to_DER_cert(text[start : end + len("-----END CERTIFICATE-----")])


class Drill:
    """One run: the canary stream, then each instance in turn (:meth:`run`)."""

    def __init__(self, options: DrillOptions, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        self.checker = core.ReplyChecker()
        self.stream = CanaryStream(options, self.checker)
        self.rest = Rest(options) if options.api is not None else None
        self.problems: list[str] = []  # drill-wide: before any step, or after the last
        self.results: list[core.StepResult] = []

    async def rows(self) -> list[Mapping[str, Any]]:
        """The admin socket's ``list``."""
        try:
            reply = await asyncio.to_thread(admin.request, self.options.admin_socket, "list", None, ADMIN_TIMEOUT)
        except (OSError, ValueError) as exc:
            reason = describe(exc) if isinstance(exc, OSError) else str(exc)
            raise DrillAborted(f"no answer from the admin socket {self.options.admin_socket}: {reason}") from None
        if not reply.get("ok"):
            raise DrillAborted(f"the balancer refused list: {reply.get('error')}")
        rows = reply.get("instances")
        return rows if isinstance(rows, list) else []

    async def run(self) -> list[core.StepResult]:
        loop = asyncio.get_running_loop()
        results = self.results
        await self.rows()  # the admin socket answers before anything starts
        await self.stream.open()
        try:
            # Warm-up: one round of canaries answered as expected before anything is taken out, so a
            # wrong expectation is not blamed on an instance.
            warm = len(self.options.canaries)
            if not await self.stream.wait_answered(warm, self.options.step_timeout) or self.checker.problems:
                self.problems.append(
                    "the canaries are not answered as expected before any instance was taken out: "
                    + "; ".join(self.checker.problems[:3] or [self._unanswered(loop.time())])
                )
                return results
            for key in self.options.instances:
                result = core.StepResult(key)
                results.append(result)
                await self.step(result)
                self.say(f"drill: {key}: {'PASS' if result.ok else 'FAIL'}")
                if self.stream.closed is not None:
                    break
            self.stream.stop_sending()
            if not await self.stream.wait_answered(self.checker.sent_count, self.options.step_timeout):
                self.problems.append("after the last step: " + self._unanswered(loop.time()))
            self.problems.extend(p for p in self.checker.window_problems() if p not in _all(results))
        finally:
            await self.stream.close()
            if self.rest is not None:
                self.rest.close()
        if self.stream.closed is not None and not any(self.stream.closed in p for p in _all(results)):
            self.problems.append(self.stream.closed)
        return results

    def _unanswered(self, now: float) -> str:
        return self.checker.unanswered_text(now) or self.stream.closed or "no canary answered"

    async def step(self, result: core.StepResult) -> None:
        """Take ``result.instance`` out, watch, bring it back, wait for UP: every wait bounded."""
        loop = asyncio.get_running_loop()
        key = result.instance
        rows = await self.rows()
        refused = core.refusal(rows, key)
        if refused is not None:
            result.problems.append(refused)
            return
        resent_before = _redispatched(rows)
        sent_before = self.checker.sent_count
        self.checker.step(loop.time())
        taken_out = False
        try:
            taken_out = True
            self.say(f"drill: {key}: taking it out")
            problem = await self._take_out(key)
            start = loop.time()  # out from here: the time to detect is the balancer's
            if problem is not None:
                result.problems.append(problem)
            else:
                result.detect = await self._wait_state(key, lambda s: s != "UP", self.options.step_timeout)
                if result.detect is None:
                    result.problems.append(f"the balancer did not show it out within {self.options.step_timeout:.0f} s")
                else:
                    result.detect -= start
                    await self._hold(result)
            mark = self.checker.sent_count
            if not await self.stream.wait_answered(mark, self.options.step_timeout):
                text = self.checker.unanswered_text(loop.time()) or self.stream.closed or "?"
                result.problems.append(f"while it was out: {text}")
            result.resent = _redispatched(await self.rows()) - resent_before
        finally:
            if taken_out:
                await self._bring_back(result)
        result.events = self.checker.sent_count - sent_before
        result.stall = self.checker.stall_now(loop.time())
        result.problems.extend(self.checker.window_problems())
        if self.stream.closed is not None:
            result.problems.append(self.stream.closed)

    async def _take_out(self, key: str) -> str | None:
        if self.options.stop_command is None:
            return await self._admin(key, "drain")
        return await self._run(command_for(self.options.stop_command, key), "the stop command")

    async def _bring_back(self, result: core.StepResult) -> None:
        key = result.instance
        if self.options.start_command is None:
            problem = await self._admin(key, "enable")
        else:
            problem = await self._run(command_for(self.options.start_command, key), "the start command")
        if problem is not None:
            result.problems.append(problem)
        up = await self._wait_state(key, lambda s: s == "UP", self.options.up_timeout)
        if up is None:
            rows = await self.rows()
            result.problems.append(
                f"did not come back UP within {self.options.up_timeout:.0f} s "
                f"(the balancer shows it {core.state_text(core.row_of(rows, key))})"
            )

    async def _admin(self, key: str, command: str) -> str | None:
        try:
            reply = await asyncio.to_thread(admin.request, self.options.admin_socket, command, key, ADMIN_TIMEOUT)
        except (OSError, ValueError) as exc:
            return f"{command} through the admin socket failed: {describe(exc) if isinstance(exc, OSError) else exc}"
        if not reply.get("ok"):
            return f"the balancer refused {command}: {reply.get('error')}"
        return None

    async def _run(self, argv: list[str], what: str) -> str | None:
        """Run an operator's command (no shell), bounded by the step timeout; None when it exits 0."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            return f"{what} {shlex.join(argv)} could not start: {describe(exc)}"
        try:
            async with asyncio.timeout(self.options.step_timeout):
                output, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"{what} {shlex.join(argv)} did not finish within {self.options.step_timeout:.0f} s (killed)"
        if proc.returncode != 0:
            text = output[-COMMAND_OUTPUT:].decode("utf-8", "replace").strip()
            return f"{what} {shlex.join(argv)} exited with {proc.returncode}" + (f": {text}" if text else "")
        log.info("%s %s: done", what, shlex.join(argv))
        return None

    async def _wait_state(self, key: str, done: Callable[[str], bool], within: float) -> float | None:
        """Poll ``list`` until ``key``'s state satisfies ``done``; the loop time then, None after ``within`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            row = core.row_of(await self.rows(), key)
            now = loop.time()
            if row is not None and done(str(row.get("state"))):
                return now
            if now >= deadline:
                return None
            await asyncio.sleep(POLL)

    async def _hold(self, result: core.StepResult) -> None:
        """Keep it out for ``hold`` seconds of canary traffic, with a REST lookup every second."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.options.hold
        while True:
            if self.rest is not None:
                problem = await self.rest.lookup()
                if problem is None:
                    result.rest_ok += 1
                else:
                    result.rest_failed += 1
                    result.problems.append(f"REST lookup through the gateway: {problem}")
            left = end - loop.time()
            if left <= 0 or self.stream.closed is not None:
                return
            await asyncio.sleep(min(left, REST_INTERVAL))


def _redispatched(rows: Sequence[Mapping[str, Any]]) -> int:
    return sum(int(r.get("redispatched") or 0) for r in rows)


def _all(results: Sequence[core.StepResult]) -> list[str]:
    return [p for r in results for p in r.problems]


async def run_drill(options: DrillOptions, say: Callable[[str], None]) -> tuple[list[core.StepResult], list[str]]:
    """Run the drill; every step's result and the drill-wide problems (an abort among them)."""
    drill = Drill(options, say)
    try:
        results = await drill.run()
    except DrillAborted as exc:
        return drill.results, [*drill.problems, str(exc)]
    return results, drill.problems


def connect_host(listen: str) -> str:
    """Where to reach a balancer listening on ``listen`` from this machine (a wildcard: the loopback)."""
    if listen in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if listen == "::":
        return "::1"
    return listen


def build_options(
    config: BalancerConfig,
    *,
    canary_file: str | None,
    stop_command: str | None,
    start_command: str | None,
    user: str | None,
    password: str | None,
    rest: bool,
    matching_port: int | None,
    api_port: int | None,
    **timing: Any,
) -> DrillOptions:
    """The drill's options from the configuration and the command line (``timing``: rate, hold, timeouts).

    Raises:
        DrillError: no canary, no admin socket, a port the config leaves to the kernel (0) and the
            command line does not name, a stop command without a start command, no user for REST.
    """
    if canary_file is not None:
        try:
            with open(canary_file, encoding="utf-8") as fh:
                canaries = core.parse_canaries(fh.read(), canary_file)
        except OSError as exc:
            raise DrillError(f"cannot read the canary file {canary_file}: {describe(exc)}") from None
        except (DrillError, UnicodeDecodeError) as exc:
            raise DrillError(f"canary file: {exc}") from None
    elif config.canaries:
        canaries = core.from_config(config.path, config.canaries)
    else:
        raise DrillError(
            'no canary events: give --canary FILE (JSON lines: {"event": "...", "expect": ["Category"]}) '
            f'or add <Drill><Canary expect="Category">event</Canary></Drill> to {config.path} '
            '(docs/operations.md, "Failover drill")'
        )
    if config.event_delimiter is not None:
        raise DrillError(f"{config.path} sets <EventDelimiter>: the drill sends one event per line only")
    if config.admin_socket is None:
        raise DrillError(f'{config.path} has <AdminSocket enabled="false">: the drill needs the admin socket')
    if (stop_command is None) != (start_command is None):
        raise DrillError("--stop-command and --start-command go together: what is stopped must be started")
    try:
        stop = parse_command(stop_command) if stop_command is not None else None
        start = parse_command(start_command) if start_command is not None else None
    except ValueError as exc:
        raise DrillError(f"--stop-command/--start-command: {exc}") from None
    events_port = matching_port or config.matching_port
    if not events_port:
        raise DrillError(f'{config.path} says matching_port="0" (picked at start): give --matching-port')
    host = connect_host(config.listen_host)
    api: tuple[str, int] | None = None
    cert = b""
    if rest:
        if user is None:
            raise DrillError("REST lookups through the gateway need --user (or THREATGATE_USER); --no-rest skips them")
        if not (api_port or config.api_port):
            raise DrillError(f'{config.path} says api_port="0" (picked at start): give --api-port')
        api = (host, api_port or config.api_port)
        try:
            with open(config.cert_path, "rb") as fh:
                cert = fh.read(1 << 20)
            _der(cert)
        except (OSError, ValueError) as exc:
            reason = describe(exc) if isinstance(exc, OSError) else str(exc)
            raise DrillError(f"the balancer's certificate {config.cert_path}: {reason}") from None
    try:
        instances = core.plan([s.key for s in config.instances if s.enabled])
    except ValueError as exc:
        raise DrillError(str(exc)) from None
    events_cert, client_pair = b"", None
    tls = config.matching_tls
    if tls is not None and tls.listen is None:  # the event port itself speaks TLS: the canaries go over TLS
        try:
            with open(tls.cert_path, "rb") as fh:
                events_cert = fh.read(1 << 20)
            _der(events_cert)
        except (OSError, ValueError) as exc:
            reason = describe(exc) if isinstance(exc, OSError) else str(exc)
            raise DrillError(f"the event port's certificate {tls.cert_path}: {reason}") from None
        if tls.clients.mode != "none":
            client_pair = (config.client_cert_path, config.client_key_path)
    return DrillOptions(
        events=(host, events_port),
        events_cert_pem=events_cert,
        client_pair=client_pair,
        api=api,
        admin_socket=config.admin_socket,
        cert_pem=cert,
        canaries=canaries,
        instances=instances,
        stop_command=stop,
        start_command=start,
        user=user,
        password=password,
        **timing,
    )
