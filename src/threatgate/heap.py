"""glibc's heap, tuned where it matters for a long-running process (a no-op with another libc).

Two cases, both measured:

- The balancer after a burst: CPython dicts never shrink and glibc keeps freed heap pages, so
  :func:`give_back` (``malloc_trim(0)``) returns them once the burst has drained.
- A node's worker process: it starts with a small heap, and every batch of events allocates and
  frees buffers just above it.  glibc trims the top of the heap back to the kernel after each free
  and grows it again with the next batch, so each batch took fresh zero pages: 83,000 page faults
  and 11 % more CPU per event than a single-process node (whose heap had grown during its feed
  loads).  :func:`keep_top_pad` makes glibc keep a margin above the heap, as ``MALLOC_TOP_PAD_`` would.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TOP_PAD = -2
"""mallopt(3) parameter: bytes kept above the heap top when it grows and when it is trimmed."""


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _load_libc()


def give_back() -> None:
    """Return freed heap pages to the kernel (``malloc_trim(0)``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def keep_top_pad(size: int) -> bool:
    """Keep ``size`` bytes above the heap top (``mallopt(M_TOP_PAD, size)``); False when not glibc."""
    return _LIBC is not None and bool(_LIBC.mallopt(M_TOP_PAD, size))
