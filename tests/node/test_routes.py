"""node/routes.py: the node's REST routes as one table, which the request handler and the OpenAPI document read.

What must hold for both readers to agree: each route has a unique name with a handler in node/api.py, no two
routes of one method fit the same path, every ``since`` is a served version, the schema names exist in the
OpenAPI document, and a GET carries no body.  The served API itself: tests/integration/test_node_api.py.
"""

from __future__ import annotations

import itertools

import pytest

from threatgate.node.api import NodeAPI
from threatgate.node.openapi import SCHEMAS
from threatgate.node.routes import ROUTES, VERSIONS, Route


def route_for(method: str, path: str, version: int) -> tuple[str, dict[str, str]] | None:
    """The route the handler picks, as node/api.py does: pattern and version first, then the method."""
    segments = tuple(path.split("/"))
    for route in ROUTES:
        params = route.pattern.match(segments)
        if params is not None and route.since <= version and route.method == method:
            return route.name, params
    return None


@pytest.mark.parametrize(
    ("method", "path", "version", "expected"),
    [
        ("POST", "lookup", 10, ("lookup", {})),
        ("GET", "suppliers/ACME", 10, ("get_supplier", {"name": "ACME"})),
        ("PUT", "suppliers/ACME/indicators", 12, ("put_indicators", {"name": "ACME"})),
        ("DELETE", "tags/apt", 11, ("delete_tag", {"tag": "apt"})),
        ("GET", "tags", 10, None),  # tags came with 1.1
        ("GET", "lookup", 12, None),
        ("GET", "suppliers/ACME/x", 12, None),
    ],
)
def test_a_request_finds_its_route_by_path_version_and_method(
    method: str, path: str, version: int, expected: tuple[str, dict[str, str]] | None
) -> None:
    assert route_for(method, path, version) == expected


def test_names_are_unique_and_each_has_a_handler() -> None:
    names = [r.name for r in ROUTES]
    assert len(names) == len(set(names))
    assert [n for n in names if not callable(getattr(NodeAPI, "_" + n, None))] == []


def overlap(a: Route, b: Route) -> bool:
    """Whether some path fits both patterns."""
    if len(a.pattern.segments) != len(b.pattern.segments):
        return False
    return all(
        x == y or x.startswith("{") or y.startswith("{")
        for x, y in zip(a.pattern.segments, b.pattern.segments, strict=True)
    )


def test_no_two_routes_of_one_method_fit_the_same_path() -> None:
    clashes = [(a.name, b.name) for a, b in itertools.combinations(ROUTES, 2) if a.method == b.method and overlap(a, b)]
    assert clashes == []


def test_versions_and_schemas_are_the_ones_served_and_documented() -> None:
    assert VERSIONS == {"1.0": 10, "1.1": 11, "1.2": 12}
    assert {r.since for r in ROUTES} <= set(VERSIONS.values())
    assert [r.name for r in ROUTES if r.body is not None and r.body not in SCHEMAS] == []
    assert [r.name for r in ROUTES if r.answer not in SCHEMAS] == []
    assert [r.name for r in ROUTES if r.method == "GET" and r.body is not None] == []
    assert {r.method for r in ROUTES} <= {"GET", "POST", "PUT", "DELETE"}
