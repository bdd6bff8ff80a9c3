"""How a long-running threatgate process runs: signals, the lifecycle chain, the event loop.

Nodes and the balancer share uvicorn's chain: ``startup`` -> ``main_loop`` (until asked to exit)
-> ``shutdown``, with SIGHUP mapped to ``request_reload`` and SIGTERM/SIGINT to ``request_exit``.
``shutdown`` is graceful and bounded (a node drains its event connections for up to DrainTimeout);
a second SIGTERM/SIGINT, at any point after the first, forces the exit at once: whatever the
process is waiting for is cancelled (logged at WARNING), and it exits 0.
The loop is uvloop's when it is installed (the ``speed`` extra), else asyncio's.

Under systemd (``Type=notify``, packaging/), :func:`notify` tells the service manager when the
process is ready (feeds loaded, listening) and when it is stopping, so ``systemctl start`` returns
only once events can be sent, and dependent units start after it.  The READY notice also carries
what the process bound (:class:`Listening`, as ``X_THREATGATE_LISTEN``): a port configured as 0 is
picked by the kernel, and whoever started the process (a test, a supervisor) reads it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Literal, Protocol

log = logging.getLogger("threatgate")

LISTEN_VARIABLE = "X_THREATGATE_LISTEN"
"""The READY notice's variable naming the bound addresses (systemd leaves ``X_`` names to applications)."""


class Listening:
    """The addresses a process listens on, by name (``events``, ``api``, ``alerts``, ``metrics``).

    Filled at start-up with what each socket actually bound, so a port configured as 0 (the kernel
    picks one) is reported as the port in use: in the "listening" log lines and in the READY notice.
    """

    def __init__(self) -> None:
        self._bound: dict[str, tuple[str, int]] = {}

    def add(self, name: str, sockname: Any) -> tuple[str, int]:
        """Record ``name``'s bound address (a ``getsockname()`` result: IPv4 or IPv6); returns (host, port)."""
        host, port = str(sockname[0]), int(sockname[1])
        self._bound[name] = (host, port)
        return host, port

    def variable(self) -> str:
        """``X_THREATGATE_LISTEN=events=127.0.0.1:40123 api=[::1]:40124``, in the order they were bound."""
        spelled = (f"{name}=[{h}]:{p}" if ":" in h else f"{name}={h}:{p}" for name, (h, p) in self._bound.items())
        return f"{LISTEN_VARIABLE}={' '.join(spelled)}"


class Service(Protocol):
    listening: Listening
    """What :meth:`startup` bound: sent with READY=1."""

    async def startup(self) -> None: ...

    async def main_loop(self) -> None: ...

    async def shutdown(self) -> None: ...

    def request_reload(self) -> None: ...

    def request_exit(self) -> None: ...


class ExitSignals:
    """What one more SIGTERM/SIGINT means: the first asks for a graceful stop, the second forces the exit."""

    def __init__(self) -> None:
        self.received = 0

    @property
    def forced(self) -> bool:
        return self.received >= 2

    def receive(self) -> Literal["stop", "force", "ignore"]:
        self.received += 1
        return "stop" if self.received == 1 else "force" if self.received == 2 else "ignore"


async def serve(service: Service) -> None:
    """Run ``service`` through its lifecycle with the signal handlers installed (until it has stopped)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    signals = ExitSignals()

    def exit_signal(name: str) -> None:
        what = signals.receive()
        if what == "stop":
            service.request_exit()
        elif what == "force":
            log.warning("%s again while stopping: exiting now, without waiting for the rest of the drain", name)
            main.cancel()

    handlers = (
        (signal.SIGHUP, service.request_reload, ()),
        (signal.SIGTERM, exit_signal, ("SIGTERM",)),
        (signal.SIGINT, exit_signal, ("SIGINT",)),
    )
    for sig, handler, args in handlers:
        loop.add_signal_handler(sig, handler, *args)
    try:
        try:
            await service.startup()
            notify(f"READY=1\nSTATUS=serving\n{service.listening.variable()}")
            await service.main_loop()
        finally:
            notify("STOPPING=1")
            if not signals.forced:
                await service.shutdown()
    except asyncio.CancelledError:
        if not signals.forced:
            raise  # cancelled by someone else: not ours to swallow
    finally:
        for sig, _, _ in handlers:
            loop.remove_signal_handler(sig)


def notify(state: str) -> bool:
    """sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``; False when there is none.

    A socket name starting with ``@`` is in the abstract namespace.  A failure is logged, never
    raised: the service works the same without a service manager.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc.strerror or exc)
        return False
    return True


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to completion on uvloop when installed.

    The import is decided before ``main`` starts: an ImportError raised *inside* ``main`` is its
    own failure and propagates, it must not read as "no uvloop" and run the spent coroutine again.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        asyncio.run(main)
        return
    uvloop.run(main)


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``, or less when ``stop`` is set meanwhile; True when stopping.

    The periodic work of a service (feed watches, health checks, retention sweeps) waits here, so a
    SIGTERM ends every loop at once instead of after its interval.
    """
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def ticks(stop: asyncio.Event, seconds: float | Callable[[], float]) -> AsyncIterator[None]:
    """Every ``seconds`` (a number, or read before each wait: a reload may change it) until ``stop``."""
    while not await pause(stop, seconds() if callable(seconds) else seconds):
        yield


class Periodic:
    """Background work repeated every interval until closed: the balancer's readiness and statistics polls.

    A failure of one round (a bug: the work translates what it expects) is logged with its traceback and
    the next round runs at the next interval, so one bad answer cannot end the polls for the process's
    whole life.  ``interval`` is read before each wait (a reload may change it); at least a second.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[], Coroutine[Any, Any, None]],
        interval: Callable[[], float],
        logger: logging.Logger,
    ) -> None:
        self.name = name
        self._work = work
        self._interval = interval
        self._log = logger
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._work()
            except Exception:  # see the class docstring: logged, and the next round runs
                self._log.exception("%s failed; trying again at the next interval", self.name)
            await pause(self._stop, max(1.0, self._interval()))
