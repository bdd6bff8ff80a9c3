"""Request paths: one normalisation for routing and allow-lists, so encoding tricks change nothing.

Rules:
1. A path is split at ``/`` *before* percent-decoding, so ``%2F`` stays inside its segment (``a%2Fb``
   is the one segment ``a/b``, never two) and can only ever fail a name check.
2. Each segment is then percent-decoded as UTF-8 (invalid UTF-8 or a stray ``%`` is an error) and
   dot segments are removed after decoding (RFC 3986 §5.2.4), so ``%2e%2e`` is ``..`` and climbs
   exactly like ``..``; climbing above the root stops at the root.
3. Empty segments (``//``) are dropped, but only after dot segments are removed: as in RFC 3986
   and WHATWG an empty segment is a segment, so ``/a/b//..`` is ``/a/b`` (never ``/a``), the same
   order as indicator URLs (docs/normalization.md).  ``;parameters`` are not special: ``lookup;x``
   is a different, unknown segment.  The query string is not part of the path.
4. The API version is the segment after ``api``; ``v.1.1`` (the spelling of CyberTrace's balancer
   seed texts) and ``1.1`` are one version: :func:`api_version` reads it, :func:`canonical_version`
   spells a whole path with the plain form, :func:`version_spellings` lists what is accepted.
5. Routes are data: a :class:`RoutePattern` is a tuple of literal segments and ``{placeholder}``
   segments, each placeholder matching exactly one non-empty segment.

Pure: used by the node's API and the balancer's allow-list alike, tested without sockets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from threatgate.errors import PathError


def normalize_path(target: str) -> tuple[str, ...]:
    """The decoded segments of a request target's path (query and fragment removed).

    Raises:
        PathError: a malformed escape, invalid UTF-8, a NUL or control character, or a target
            that is not a path (absolute-form ``http://host/...`` must be handled by the caller).
    """
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise PathError(f"request target {target[:100]!r} is not an absolute path")
    out: list[str] = []
    for raw in path.split("/")[1:]:
        if not raw:
            out.append("")  # a segment until dot segments are removed; dropped below
            continue
        if "%" in raw:
            _check_escapes(raw)
            try:
                segment = unquote_to_bytes(raw).decode("utf-8")
            except UnicodeDecodeError:
                raise PathError(f"path segment {raw[:100]!r} is not UTF-8 once decoded") from None
        else:
            segment = raw
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in segment):
            raise PathError(f"path segment {raw[:100]!r} holds a control character")
        if segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return tuple(segment for segment in out if segment)


def _check_escapes(raw: str) -> None:
    i = raw.find("%")
    while i >= 0:
        pair = raw[i + 1 : i + 3]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            raise PathError(f"path segment {raw[:100]!r} has a malformed %-escape")
        i = raw.find("%", i + 3)


def render_path(segments: tuple[str, ...]) -> str:
    """The normalised path as text for messages and logs (not re-encoded)."""
    return "/" + "/".join(segments)


VERSION_PREFIX = "v."
"""The optional prefix of an API version segment (``/api/v.1.1/``)."""


def api_version(segment: str) -> str:
    """The API version a path segment names, spelled without ``v.`` (``v.1.1`` -> ``1.1``)."""
    return segment[len(VERSION_PREFIX) :] if segment.startswith(VERSION_PREFIX) else segment


def canonical_version(segments: tuple[str, ...]) -> tuple[str, ...]:
    """``/api/v.1.1/...`` and ``/api/1.1/...`` are one request: the version spelled without ``v.``.

    Only the segment after a leading ``api`` is a version; everything else is left as it is.
    """
    if len(segments) >= 2 and segments[0] == "api" and segments[1].startswith(VERSION_PREFIX):
        return ("api", api_version(segments[1]), *segments[2:])
    return segments


def version_spellings(versions: Iterable[str]) -> list[str]:
    """Every accepted spelling of ``versions``: each plain, then each with ``v.`` (in the order given)."""
    plain = list(versions)
    return plain + [VERSION_PREFIX + v for v in plain]


@dataclass(frozen=True, slots=True)
class RoutePattern:
    """A path pattern such as ``suppliers/{name}/indicators`` (segments after the API version)."""

    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> RoutePattern:
        return cls(tuple(s for s in text.strip("/").split("/") if s))

    def match(self, segments: tuple[str, ...]) -> dict[str, str] | None:
        """Placeholder values when ``segments`` fit the pattern, else None."""
        if len(segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.segments, segments, strict=True):
            if want.startswith("{") and want.endswith("}"):
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params

    def __str__(self) -> str:
        return "/".join(self.segments)
