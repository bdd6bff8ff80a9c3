"""node/openapi.py: the OpenAPI document is generated from the route table, whole and self-consistent.

Checked without a node: one operation per route under its path and method, the version parameter lists the
versions (both spellings) that serve the route, every ``$ref`` resolves, and the statuses the handler
answers are documented.  Against a running node, schemathesis: tests/integration/test_openapi.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from threatgate._version import __version__
from threatgate.node.openapi import ERRORS, openapi_document
from threatgate.node.routes import ROUTES


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_document()


def refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_each_route_is_one_operation_under_its_path_and_method(document: dict[str, Any]) -> None:
    operations = {
        (path, method): op["operationId"] for path, item in document["paths"].items() for method, op in item.items()
    }
    expected = {("/api/{version}/" + str(r.pattern), r.method.lower()): r.name for r in ROUTES}
    assert {k: v for k, v in operations.items() if k[0].startswith("/api/")} == expected
    assert operations[("/ioc_exports/{task}", "get")] == "ioc_export"


def test_the_version_parameter_lists_the_versions_that_serve_the_route(document: dict[str, Any]) -> None:
    lookup = document["paths"]["/api/{version}/lookup"]["post"]["parameters"][0]
    assert lookup["schema"]["enum"] == ["1.0", "1.1", "1.2", "v.1.0", "v.1.1", "v.1.2"]
    tags = document["paths"]["/api/{version}/tags/{tag}"]["get"]["parameters"]
    assert tags[0]["schema"]["enum"] == ["1.1", "1.2", "v.1.1", "v.1.2"]
    assert [(p["name"], p["in"], p["required"]) for p in tags] == [("version", "path", True), ("tag", "path", True)]


def test_every_reference_resolves_and_the_document_is_json(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    missing = {ref for ref in refs(document) if ref.removeprefix("#/components/schemas/") not in schemas}
    assert missing == set()
    assert json.loads(json.dumps(document)) == document
    assert (document["openapi"], document["info"]["version"]) == ("3.0.3", __version__)
    assert document["security"] == [{"basic": []}]


def test_the_answers_the_handler_gives_are_documented(document: dict[str, Any]) -> None:
    paths = document["paths"]
    assert "201" in paths["/api/{version}/suppliers"]["post"]["responses"]
    assert "200" not in paths["/api/{version}/suppliers"]["post"]["responses"]
    assert "202" in paths["/api/{version}/suppliers/{name}/indicators"]["put"]["responses"]
    assert {"200", "201"} <= set(paths["/api/{version}/tags/{tag}"]["put"]["responses"])
    for item in paths.values():
        for op in item.values():
            if op["operationId"] != "ioc_export":
                assert set(ERRORS) <= set(op["responses"]), op["operationId"]
    bodies = {op["operationId"] for item in paths.values() for op in item.values() if "requestBody" in op}
    assert bodies == {r.name for r in ROUTES if r.body is not None}
