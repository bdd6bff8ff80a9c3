"""How a long-running threatgate process runs: signals, the lifecycle chain, the event loop.

Nodes and the balancer share uvicorn's chain: ``startup`` -> ``main_loop`` (until asked to exit)
-> ``shutdown``, with SIGHUP mapped to ``request_reload`` and SIGTERM/SIGINT to ``request_exit``.
The loop is uvloop's when it is installed (the ``speed`` extra), else asyncio's.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, Protocol


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
        await service.main_loop()
    finally:
        for sig, _ in handlers:
            loop.remove_signal_handler(sig)
        await service.shutdown()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to completion on uvloop when installed."""
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:  # pragma: no cover - uvloop is optional
        asyncio.run(main)
