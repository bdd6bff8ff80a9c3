"""Types of the compiled engine (src/threatgate/node/_engine.c)."""

from collections.abc import Callable, Sequence
from typing import Any

_Candidate = tuple[int, int, int, str]  # (slot, record, kind, probe): store.Candidate's fields

INTERFACE: int

def key_of(kind: int, data: bytes, /) -> int: ...
def keys_of(kinds: bytes, values: Sequence[str], /) -> bytes: ...
def compile_error(pattern: str, options: int, /) -> str | None: ...
def step_values(pattern: str, options: int, groups: int, mode: int, all: int, text: str, /) -> list[str]: ...

class Engine:
    reference_events: int
    detect_events: int
    def __init__(
        self,
        plans: list[tuple[Any, ...]],
        nfields: int,
        host_re: tuple[str, int] | None,
        by_host: dict[str, int],
        fast_url: tuple[str, int],
        fast_domain: tuple[str, int],
        normalisers: tuple[Callable[..., Any], ...],
        template: tuple[bytes | int, ...] | None,
        /,
    ) -> None: ...
    def use_indexes(self, views: Sequence[tuple[Any, ...]], /) -> None: ...
    def lookup(self, objects: Sequence[str], /) -> list[None | bool | list[_Candidate]]: ...
    def match(
        self,
        events: list[Any],
        peer_plan: int,
        date: str,
        finished: bool,
        out: list[str],
        reference: Callable[[Any], None],
        detect: Callable[
            [str, int, tuple[str | None, ...], list[tuple[int, str, list[tuple[int, int, int, str]]]]], None
        ],
        /,
    ) -> tuple[int, int, int, int, int, dict[str, int] | None, list[tuple[int, str]] | None]: ...
    def use_detection(
        self,
        event_format: tuple[bytes | int, ...] | None,
        record_field_format: tuple[bytes | int, ...],
        actionable_field_format: tuple[bytes | int, ...],
        finished_dynamic: tuple[bytes | int, ...],
        needs_context: bool,
        limit: int,
        /,
    ) -> None: ...
