"""Tests for threatgate.runtime.run: the coroutine runs once, whatever it raises."""

from __future__ import annotations

import asyncio
import logging

import pytest

from threatgate import runtime


def test_run_propagates_an_ImportError_raised_inside_main_and_runs_main_once() -> None:
    runs = 0

    async def main() -> None:
        nonlocal runs
        runs += 1
        raise ImportError("a module main needs is missing")

    with pytest.raises(ImportError, match="a module main needs is missing"):
        runtime.run(main())
    assert runs == 1


def test_run_runs_main_to_completion() -> None:
    done: list[bool] = []

    async def main() -> None:
        done.append(True)

    runtime.run(main())
    assert done == [True]


async def test_ticks_run_every_interval_and_stop_at_once_when_asked() -> None:
    import asyncio

    from threatgate import runtime

    stop = asyncio.Event()
    seen = 0
    started = asyncio.get_running_loop().time()
    async for _ in runtime.ticks(stop, lambda: 0.01):
        seen += 1
        if seen == 3:
            stop.set()
    assert seen == 3
    assert await runtime.pause(stop, 60) is True  # stopping: no wait at all
    assert asyncio.get_running_loop().time() - started < 5


async def test_periodic_work_goes_on_after_a_failed_round_and_stops_when_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds: list[int] = []
    second = asyncio.Event()

    async def work() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("a bug in one round")
        second.set()

    periodic = runtime.Periodic("test polls", work, lambda: 0.0, logging.getLogger("threatgate.test"))
    periodic.start()
    await asyncio.wait_for(second.wait(), 5)  # the interval is at least a second: the second round came after it
    await periodic.close()
    assert rounds == [0, 1]
    assert "test polls failed; trying again at the next interval" in caplog.text
    assert "RuntimeError: a bug in one round" in caplog.text
