"""Tests for threatgate.runtime.run: the coroutine runs once, whatever it raises."""

from __future__ import annotations

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
