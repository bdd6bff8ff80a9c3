"""How much memory a process uses, as Linux counts it (``/proc/<pid>/smaps_rollup``).

RSS counts every resident page the process maps, shared ones included: each worker of a node
shows the snapshot pages it touched, though the page cache holds them once.  PSS splits shared
pages between the processes that map them; USS is what the process alone holds, what one more
worker costs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Memory:
    rss: int
    pss: int
    uss: int


def memory(pid: int) -> Memory | None:
    """The process's memory in bytes, or None when it is gone or its smaps cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    if "Rss" not in fields:
        return None
    return Memory(fields["Rss"], fields.get("Pss", 0), fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0))
