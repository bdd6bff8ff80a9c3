"""How a long-running threatgate process runs: signals, the lifecycle chain, the event loop.

Nodes and the balancer share uvicorn's chain: ``startup`` -> ``main_loop`` (until asked to exit)
-> ``shutdown``, with SIGHUP mapped to ``request_reload`` and SIGTERM/SIGINT to ``request_exit``.
The loop is uvloop's when it is installed (the ``speed`` extra), else asyncio's.

Under systemd (``Type=notify``, packaging/), :func:`notify` tells the service manager when the
process is ready (feeds loaded, listening) and when it is stopping, so ``systemctl start`` returns
only once events can be sent, and dependent units start after it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Coroutine
from typing import Any, Protocol

log = logging.getLogger("threatgate")


class Service(Protocol):
    async def startup(self) -> None: ...

    async def main_loop(self) -> None: ...

    async def shutdown(self) -> None: ...

    def request_reload(self) -> None: ...

    def request_exit(self) -> None: ...


async def serve(service: Service) -> None:
    """Run ``service`` through its lifecycle with the signal handlers installed."""
    loop = asyncio.get_running_loop()
    handlers = (
        (signal.SIGHUP, service.request_reload),
        (signal.SIGTERM, service.request_exit),
        (signal.SIGINT, service.request_exit),
    )
    for sig, handler in handlers:
        loop.add_signal_handler(sig, handler)
    try:
        await service.startup()
        notify("READY=1\nSTATUS=serving")
        await service.main_loop()
    finally:
        for sig, _ in handlers:
            loop.remove_signal_handler(sig)
        notify("STOPPING=1")
        await service.shutdown()


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
    """Run ``main`` to completion on uvloop when installed."""
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:  # pragma: no cover - uvloop is optional
        asyncio.run(main)
