"""The cluster port's routes, as data: method, path, who may call, what body (sans-IO).

One table that the agent dispatches on and the module docstring of cluster/agent.py describes, like
the node API's ``ROUTES`` (node/api.py).  Who may call a route is part of the route:

- ``anyone``: a join request carries its credential in the body (a one-time token) and comes from
  a node that has no member certificate yet;
- ``member``: the caller's TLS client certificate is a member's (the port is mutually authenticated);
- ``self``: this node's own certificate, i.e. the local CLI (``threatgate cluster ...``).

Paths match exactly, segment by segment (a trailing ``/`` is another path): the control plane has no
reason to be lenient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from threatgate.wire.paths import RoutePattern

MAX_BODY = 256 * 1024 * 1024
"""The largest cluster message a member may send (a whole settings document, suppliers included)."""
MAX_JOIN_BODY = 64 * 1024
"""A join request is a token, an address and one certificate: anything bigger is not one."""

Who = Literal["anyone", "member", "self"]
Body = Literal["none", "json", "raw"]


@dataclass(frozen=True, slots=True)
class ClusterRoute:
    method: str
    pattern: RoutePattern
    name: str  # the agent's handler is ``_route_<name>``
    who: Who
    body: Body
    summary: str

    @property
    def limit(self) -> int:
        """The largest body accepted (0: none is read)."""
        if self.body == "none":
            return 0
        return MAX_JOIN_BODY if self.who == "anyone" else MAX_BODY


def _route(method: str, path: str, name: str, who: Who, body: Body, summary: str) -> ClusterRoute:
    return ClusterRoute(method, RoutePattern.parse(path), name, who, body, summary)


ROUTES: tuple[ClusterRoute, ...] = (
    _route("POST", "/cluster/v1/heartbeat", "heartbeat", "member", "json", "a member's status in, ours out"),
    _route("POST", "/cluster/v1/settings", "pushed", "member", "raw", "a pushed settings document (Control -> member)"),
    _route("GET", "/cluster/v1/settings", "settings", "member", "none", "the applied document if newer than ?since"),
    _route("GET", "/cluster/v1/status", "status", "member", "none", "the node table (self and every member)"),
    _route("GET", "/cluster/v1/history", "history", "member", "none", "the kept revisions"),
    _route("POST", "/cluster/v1/join", "join", "anyone", "json", "token + certificate -> membership and settings"),
    _route("POST", "/cluster/v1/admin/{action}", "admin", "self", "json", "the local CLI's actions"),
)


def route_for(method: str, path: str) -> tuple[ClusterRoute, dict[str, str]] | None:
    """The route for ``method`` and ``path`` with its placeholder values, or None."""
    if not path.startswith("/"):
        return None
    segments = tuple(path[1:].split("/"))
    for route in ROUTES:
        if route.method == method and (params := route.pattern.match(segments)) is not None:
            return route, params
    return None
