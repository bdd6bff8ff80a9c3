"""Helpers shared by every config loader: typed attribute/text readers that fail with file:line.

Each helper takes the :class:`~threatgate.config.xml.Node` it reads from, so the error it raises
points at that element.  Loaders stay declarative: read, convert, build a frozen model.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic

from threatgate.config.xml import Node
from threatgate.errors import ConfigError

T = TypeVar("T", bound=pydantic.BaseModel)

UNBOUNDED = 2**31 - 1
"""The largest integer a config file may write where the model sets no upper bound."""


class Frozen(pydantic.BaseModel):
    """The base of every configuration model: immutable, no field it does not declare."""

    model_config = pydantic.ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True, slots=True)
class Address:
    """A ``host:port`` listen or connect address (IPv6 hosts in brackets: ``[::1]:9999``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(node: Node, text: str | None = None, *, listen: bool = False) -> Address:
    """Parse ``host:port`` from ``text`` (default: the node's text).  Ports are 1-65535.

    A ``listen`` address may also have port 0: the kernel picks a free port when the socket is bound
    (the process reports it: runtime.Listening); an address to connect to never can.
    """
    raw = (node.value if text is None else text).strip()
    if raw.startswith("["):
        host, sep, port_s = raw[1:].partition("]:")
    else:
        host, sep, port_s = raw.rpartition(":")
    if not sep or not host:
        raise node.error(f"expected <host>:<port>, got {raw!r}")
    if raw.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise node.error(f"{host!r} is not an IPv6 address") from None
    lowest = 0 if listen else 1
    if not port_s.isdigit() or not lowest <= int(port_s) <= 65535:
        raise node.error(f"bad port {port_s!r} in {raw!r}: expected {lowest}-65535")
    return Address(host, int(port_s))


LOOPBACK = "127.0.0.1"


def parse_metrics_address(node: Node) -> Address:
    """``<MetricsConnectionString>``: ``host:port``, or a bare port (``9100``), which listens on loopback only.

    Metrics name instances, feeds and counts an outsider should not read: the short form is the safe
    one, and a wider address is written out on purpose (guard it with ``<AllowedSources ports="metrics">``).
    """
    raw = node.value
    if raw.isdigit():
        return parse_address(node, f"{LOOPBACK}:{raw}", listen=True)
    return parse_address(node, listen=True)


def parse_bool(node: Node, name: str, default: bool) -> bool:
    """An optional boolean attribute (true/false, 1/0, yes/no, on/off)."""
    raw = node.attrs.get(name)
    if raw is None:
        return default
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise node.error(f"attribute {name}={raw!r}: expected true or false")


def parse_int(node: Node, raw: str | None, what: str, lo: int, hi: int, default: int | None = None) -> int:
    """An integer in ``[lo, hi]``; ``raw`` None means absent, which needs a default."""
    if raw is None or not raw.strip():
        if default is None:
            raise node.error(f"{what} is mandatory")
        return default
    text = raw.strip()
    try:
        value = int(text)
    except ValueError:
        raise node.error(f"{what}={text!r}: expected an integer") from None
    if not lo <= value <= hi:
        raise node.error(f"{what}={value}: expected {lo}-{hi}")
    return value


def compile_regex(node: Node, pattern: str, what: str, flags: int = 0) -> re.Pattern[str]:
    """Compile a user regex; a bad one is a ConfigError with the compiler's own words."""
    try:
        return re.compile(pattern, flags)
    except (re.error, OverflowError, RecursionError) as exc:
        raise node.error(f"{what} {pattern!r} does not compile: {exc}") from None


def resolve_path(node: Node, raw: str) -> str:
    """A path from the config, relative to the config file's directory."""
    if not raw.strip():
        raise node.error("empty path")
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(node.path)), raw.strip()))


def field_bounds(model: type[pydantic.BaseModel], name: str) -> tuple[int, int]:  # noqa: C901 - one scan
    """The integer range a config file may write for ``model.name``: the model's own bounds.

    Bounds are declared once, on the model (``pydantic.Field(ge=, gt=, le=, lt=)``, also inside an
    ``Annotated`` member of a union such as ``int | Literal["auto"]``); the XML reader asks for them
    here, so the file and a configuration built in code accept the same values.  A strict lower bound
    on a float field (``gt=0``) is the first integer above it, since files write whole numbers.
    """
    lo, hi = -UNBOUNDED, UNBOUNDED
    info = model.model_fields[name]
    metadata = list(info.metadata)
    for arg in typing.get_args(info.annotation):
        metadata.extend(getattr(arg, "__metadata__", ()))
        for inner in getattr(arg, "__metadata__", ()):
            metadata.extend(getattr(inner, "metadata", ()))
    for m in metadata:  # pydantic's constraint objects (annotated_types Ge, Gt, Le, Lt)
        if (ge := getattr(m, "ge", None)) is not None:
            lo = max(lo, math.ceil(ge))
        if (gt := getattr(m, "gt", None)) is not None:
            lo = max(lo, math.floor(gt) + 1)
        if (le := getattr(m, "le", None)) is not None:
            hi = min(hi, math.floor(le))
        if (lt := getattr(m, "lt", None)) is not None:
            hi = min(hi, math.ceil(lt) - 1)
    return lo, hi


def parse_field(
    node: Node, raw: str | None, what: str, model: type[pydantic.BaseModel], name: str, default: int | None = None
) -> int:
    """:func:`parse_int` within the bounds the model declares for ``name`` (:func:`field_bounds`)."""
    lo, hi = field_bounds(model, name)
    return parse_int(node, raw, what, lo, hi, default)


def field_range(model: type[pydantic.BaseModel], name: str) -> tuple[float, float]:
    """The inclusive range of a float field (``ge``/``le``; a model that says ``gt`` is asked for ``ge``)."""
    info = model.model_fields[name]
    lo, hi = float("-inf"), float("inf")
    for m in info.metadata:
        if (ge := getattr(m, "ge", None)) is not None:
            lo = max(lo, float(ge))
        if (le := getattr(m, "le", None)) is not None:
            hi = min(hi, float(le))
    return lo, hi


def build(node: Node, model: type[T], data: Mapping[str, Any], lines: Mapping[str, Node] | None = None) -> T:
    """Validate ``data`` into the frozen pydantic ``model``, reporting the first error at its element.

    ``lines`` maps field names to the child element they came from, so the error points there.
    """
    try:
        return model.model_validate(dict(data))
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        where = (lines or {}).get(field, node)
        raise ConfigError(where.path, where.line, where.tag, f"{field}: {first['msg']}") from None
