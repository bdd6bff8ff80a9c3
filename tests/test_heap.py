"""heap.py: glibc's heap calls, and a no-op (not an error) where the libc is another.

What must hold: on glibc :func:`keep_top_pad` reaches ``mallopt(M_TOP_PAD, size)`` and :func:`give_back`
reaches ``malloc_trim(0)``; without glibc both do nothing, and ``keep_top_pad`` says so (False), so a
node on musl starts as before.
"""

from __future__ import annotations

import platform
from typing import Any

import pytest

from threatgate import heap


class StandInLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", (pad,)))
        return 1

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", (param, value)))
        return 1


def test_the_calls_reach_glibc_with_the_documented_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = StandInLibc()
    monkeypatch.setattr(heap, "_LIBC", libc)
    heap.give_back()
    assert heap.keep_top_pad(64 << 20) is True
    assert libc.calls == [("malloc_trim", (0,)), ("mallopt", (-2, 64 << 20))]


def test_without_glibc_both_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_LIBC", None)
    heap.give_back()
    assert heap.keep_top_pad(1 << 20) is False


def test_a_refused_mallopt_is_false(monkeypatch: pytest.MonkeyPatch) -> None:
    libc: Any = StandInLibc()
    libc.mallopt = lambda param, value: 0
    monkeypatch.setattr(heap, "_LIBC", libc)
    assert heap.keep_top_pad(1) is False


def test_a_libc_without_the_glibc_calls_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda name: None)
    assert heap._load_libc() is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_on_glibc_the_real_calls_work() -> None:
    assert heap._LIBC is not None
    heap.give_back()
    assert heap.keep_top_pad(128 * 1024) is True
