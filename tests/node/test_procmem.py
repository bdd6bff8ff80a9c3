"""Tests for threatgate.node.procmem: memory, CPU time and children of processes, from /proc."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest

from threatgate.node import procmem
from threatgate.node.procmem import Memory

ROLLUP = """\
55d0c8a4e000-7ffd4a1f5000 ---p 00000000 00:00 0                          [rollup]
Rss:               73012 kB
Pss:               49010 kB
Pss_Anon:          30000 kB
Pss_File:          19010 kB
Shared_Clean:      39700 kB
Shared_Dirty:          0 kB
Private_Clean:      1200 kB
Private_Dirty:     31900 kB
Referenced:        73012 kB
Anonymous:         31900 kB
Swap:                  0 kB
"""


def test_parse_smaps_rollup_in_bytes() -> None:
    assert procmem.parse_smaps_rollup(ROLLUP) == Memory(rss=73012 * 1024, pss=49010 * 1024, uss=33100 * 1024)
    with pytest.raises(ValueError, match="Pss"):
        procmem.parse_smaps_rollup("Rss: 1 kB\n")


def test_memory_of_this_process_counts_what_it_touches_privately() -> None:
    before = procmem.memory(os.getpid())
    assert before is not None and 0 < before.uss <= before.pss <= before.rss
    block = mmap.mmap(-1, 64 << 20)  # private anonymous memory, touched page by page
    for at in range(0, len(block), mmap.PAGESIZE):
        block[at] = 1
    after = procmem.memory(os.getpid())
    assert after is not None and after.uss - before.uss >= 60 << 20
    block.close()


def test_a_process_that_is_gone_has_no_memory_nor_cpu_nor_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its /proc entry is gone
    assert procmem.memory(child.pid) is None
    assert procmem.cpu_seconds(child.pid) is None
    assert procmem.children(child.pid) == []


def test_cpu_seconds_and_stat_parsing() -> None:
    text = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 10"
    assert procmem.parse_stat_times(text) == 300 / procmem.CLK_TCK
    with pytest.raises(ValueError):
        procmem.parse_stat_times("1 (x) S 1 2")
    spent = procmem.cpu_seconds(os.getpid())
    assert spent is not None and spent > 0


def test_children_are_found_by_both_ways() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in procmem.children(os.getpid())
        assert child.pid in procmem._children_by_ppid(os.getpid())  # noqa: SLF001 - the fallback
        assert procmem.children(child.pid) == []
    finally:
        child.kill()
        child.wait()
