"""What a process costs, from ``/proc``: memory (RSS, PSS, USS), CPU time and child processes.

The master reports each worker's memory (``threatgate_worker_memory_bytes{worker,kind}``) and the
benchmark (bench/node_workers.py) measures what an extra worker adds.  RSS alone misleads there:
workers map the same snapshot files, and RSS counts every shared page in every process that touched
it.  USS (the pages only this process maps) is what one more worker adds; PSS shares each page among
the processes mapping it, so the PSS of all processes adds up to their memory.

Invariants:
1. The parsers (:func:`parse_smaps_rollup`, :func:`parse_stat_times`) are pure: text in, numbers out.
2. A process that is gone, or a file this process may not read, gives None: a reader polls processes
   that may exit at any moment, and that is not an error.  Text that does not parse raises ValueError
   (a kernel without ``smaps_rollup`` lines in this format: Linux >= 4.14 has it).
3. Memory is in bytes, CPU time in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second of ``/proc/<pid>/stat`` times."""

_PROC = "/proc"


@dataclass(frozen=True, slots=True)
class Memory:
    """A process's memory in bytes: resident (RSS), proportional (PSS) and unique (USS) set sizes."""

    rss: int
    pss: int
    uss: int  # Private_Clean + Private_Dirty: pages no other process maps


def parse_smaps_rollup(text: str) -> Memory:
    """The :class:`Memory` in the text of ``/proc/<pid>/smaps_rollup`` (values in kB there).

    Raises:
        ValueError: a field is missing or not a number.
    """
    kb: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and rest.strip().endswith("kB"):
            kb[key] = int(rest.split()[0])
    try:
        return Memory(
            rss=kb["Rss"] * 1024,
            pss=kb["Pss"] * 1024,
            uss=(kb["Private_Clean"] + kb["Private_Dirty"]) * 1024,
        )
    except KeyError as exc:
        raise ValueError(f"smaps_rollup without {exc.args[0]}") from None


def memory(pid: int) -> Memory | None:
    """The memory of process ``pid``, or None when it is gone or its ``smaps_rollup`` may not be read
    (another user's process: reading it needs the right to ptrace it).

    Reading ``smaps_rollup`` walks the process's page tables under its memory lock: about a millisecond
    for a worker mapping a gigabyte of snapshots.  Poll it at scrape time or less, never per event.
    """
    text = _read(f"{_PROC}/{pid}/smaps_rollup")
    if not text:  # an exited process that is not reaped yet (a zombie) has an empty one
        return None
    return parse_smaps_rollup(text)


def parse_stat_times(text: str) -> float:
    """utime + stime in seconds from the text of ``/proc/<pid>/stat`` (all the process's threads).

    The command name (field 2) is in parentheses and may hold spaces and parentheses itself, so the
    fields are counted from the last ``)``.

    Raises:
        ValueError: not the format of proc(5).
    """
    fields = text.rpartition(")")[2].split()
    if len(fields) < 13:
        raise ValueError(f"/proc stat with {len(fields)} fields after the command name")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of process ``pid`` in seconds, or None when it is gone."""
    text = _read(f"{_PROC}/{pid}/stat")
    return parse_stat_times(text) if text else None


def children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (a node's workers and snapshot builds), in ascending order.

    Read from each thread's ``/proc/<pid>/task/<tid>/children`` (Linux >= 3.5 with
    ``CONFIG_PROC_CHILDREN``, as on every distribution kernel); where that file is missing, by scanning
    the ``PPid`` of every process.  Empty when ``pid`` is gone.
    """
    found: set[int] = set()
    try:
        tasks = os.listdir(f"{_PROC}/{pid}/task")
    except OSError:
        return []
    listed = False
    for tid in tasks:
        text = _read(f"{_PROC}/{pid}/task/{tid}/children")
        if text is not None:
            listed = True
            found.update(int(p) for p in text.split())
    if not listed:
        found.update(_children_by_ppid(pid))
    return sorted(found)


def _children_by_ppid(pid: int) -> list[int]:
    out = []
    for name in os.listdir(_PROC):
        if not name.isdigit():
            continue
        text = _read(f"{_PROC}/{name}/status")
        if text is None:
            continue
        for line in text.splitlines():
            if line.startswith("PPid:"):
                if int(line.split()[1]) == pid:
                    out.append(int(name))
                break
    return out


def _read(path: str) -> str | None:
    """The text of a /proc file, or None when it (or its process) is gone or may not be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:  # ENOENT: gone; EACCES: another user's; ESRCH: exiting while read
        return None
