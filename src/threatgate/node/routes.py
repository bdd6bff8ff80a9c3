"""The node's REST API routes as data: method, path pattern, first version, OpenAPI schema names.

The table is read by the request handler (:mod:`threatgate.node.api`) and by the OpenAPI generator
(:mod:`threatgate.node.openapi`), so the two cannot drift apart. It lives in its own module, below
both, so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from threatgate.wire.paths import RoutePattern

VERSIONS = {"1.0": 10, "1.1": 11, "1.2": 12}
"""API versions served; ``v.1.1`` (the spelling of the balancer seed texts) is accepted as ``1.1``."""


@dataclass(frozen=True, slots=True)
class Route:
    """One request: method, path after ``/api/<version>/``, first version, body or not."""

    method: str
    pattern: RoutePattern
    name: str
    since: int
    summary: str
    body: str | None = None  # OpenAPI schema name of the request body
    answer: str = "Status"  # OpenAPI schema name of the 200 answer


def _r(method: str, path: str, name: str, since: int, summary: str, body: str | None = None, answer: str = "Status"):  # type: ignore[no-untyped-def]
    return Route(method, RoutePattern.parse(path), name, since, summary, body, answer)


ROUTES: tuple[Route, ...] = (
    _r("POST", "lookup", "lookup", 10, "Look up indicators", "LookupRequest", "LookupResponse"),
    _r("GET", "suppliers", "list_suppliers", 10, "List suppliers", None, "SupplierList"),
    _r("POST", "suppliers", "add_supplier", 10, "Add a supplier", "Supplier", "SupplierDetails"),
    _r("GET", "suppliers/{name}", "get_supplier", 10, "Show a supplier", None, "SupplierDetails"),
    _r("PUT", "suppliers/{name}", "update_supplier", 10, "Update a supplier", "SupplierUpdate", "SupplierDetails"),
    _r("DELETE", "suppliers/{name}", "delete_supplier", 10, "Delete a supplier and its indicators"),
    _r("PUT", "suppliers/{name}/indicators", "put_indicators", 10, "Add or update indicators", "IndicatorPush"),
    _r("DELETE", "suppliers/{name}/indicators", "delete_indicators", 10, "Delete indicators", "IndicatorDelete"),
    _r("GET", "tags", "list_tags", 11, "List tags", None, "TagList"),
    _r("POST", "tags", "add_tag", 11, "Add a tag", "Tag", "TagList"),
    _r("GET", "tags/{tag}", "get_tag", 11, "Show a tag", None, "TagList"),
    _r("PUT", "tags/{tag}", "put_tag", 11, "Create or update a tag", "TagUpdate", "TagList"),
    _r("DELETE", "tags/{tag}", "delete_tag", 11, "Delete a tag (removed from every indicator)"),
)
