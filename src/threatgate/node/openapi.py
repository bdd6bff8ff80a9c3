"""The OpenAPI 3.0 document of the node's REST API, generated from :data:`threatgate.node.routes.ROUTES`.

Served at ``/api/openapi.json`` and checked against the running node by schemathesis in the tests,
so the document, the route table and the handlers cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any

from threatgate._version import __version__
from threatgate.config.node import MAX_BODY_SIZE
from threatgate.node.routes import ROUTES, VERSIONS
from threatgate.node.suppliers import MAX_NAME, NAME_PATTERN
from threatgate.wire.paths import version_spellings

_STR = {"type": "string"}
_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME,
    "pattern": NAME_PATTERN,
    "not": {"enum": [".", ".."]},
}

_SUPPLIER = {
    "name": _NAME,
    "status": {"type": "string", "enum": ["enabled", "disabled"]},
    "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    "retention": {"type": "integer", "minimum": 0, "maximum": 10 * 365 * 24 * 60},
    "vendor": {"type": "string", "maxLength": 256},
}

SCHEMAS: dict[str, Any] = {
    "Status": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": _STR,
                "rejected": {"type": "array", "items": {"$ref": "#/components/schemas/Rejected"}},
            },
        },
    },
    "Rejected": {
        "type": "object",
        "required": ["index", "indicator", "error"],
        "properties": {"index": {"type": "integer"}, "indicator": _STR, "error": _STR},
    },
    "LookupRequest": {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["object"],
            "additionalProperties": False,
            "properties": {"object": _STR},
        },
    },
    "LookupResponse": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["object", "result", "categories"],
            "properties": {
                "object": _STR,
                "result": {"type": "string", "enum": ["detected", "not detected", "false positive"]},
                "categories": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["category", "detected_indicator", "context"],
                        "properties": {
                            "category": _STR,
                            "detected_indicator": _STR,
                            "context": {"type": "object", "additionalProperties": _STR},
                            "feed": _STR,
                            "confidence": {"type": "integer"},
                        },
                    },
                },
            },
        },
    },
    "Supplier": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": _SUPPLIER},
    "SupplierUpdate": {"type": "object", "additionalProperties": False, "properties": _SUPPLIER},
    "SupplierList": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "status"],
            "properties": {"name": _STR, "status": {"type": "string", "enum": ["enabled", "disabled"]}},
        },
    },
    "SupplierDetails": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "status", "confidence", "retention", "vendor"],
            "properties": {
                "name": _STR,
                "status": _STR,
                "confidence": {"type": "integer"},
                "retention": {"type": "integer"},
                "vendor": _STR,
                "indicators": {"type": "integer"},
            },
        },
    },
    "IndicatorPush": {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["indicator"],
            "additionalProperties": False,
            "properties": {
                "indicator": {"type": "string", "minLength": 1, "maxLength": 8192},
                "context": {
                    "type": "object",
                    "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]},
                },
                "tags": {"type": "array", "maxItems": 64, "items": _STR},
                "false_positive": {"type": "boolean", "description": "API 1.2+: suppress this indicator"},
            },
        },
    },
    "IndicatorDelete": {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["indicator"],
            "additionalProperties": False,
            "properties": {"indicator": {"type": "string", "minLength": 1, "maxLength": 8192}},
        },
    },
    "Tag": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": _NAME,
            "description": {"type": "string", "maxLength": 1024},
            "weight": {"type": "integer", "minimum": 0, "maximum": 100},
        },
    },
    "TagUpdate": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "description": {"type": "string", "maxLength": 1024},
            "weight": {"type": "integer", "minimum": 0, "maximum": 100},
        },
    },
    "TagList": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "description", "weight"],
            "properties": {"name": _STR, "description": _STR, "weight": {"type": "integer"}},
        },
    },
}

ERRORS = {
    "400": "Bad request: the body is not valid JSON or not the documented shape (nothing stored)",
    "401": "No or wrong credentials",
    "403": "Not allowed (built-in suppliers cannot be deleted or renamed)",
    "404": "Unknown request, version, supplier or tag",
    "405": "Method not allowed for this path",
    "406": "Accept does not allow application/json",
    "408": "Request body not received in time",
    "409": "A supplier or tag of that name already exists",
    "413": f"Body larger than {MAX_BODY_SIZE} bytes",
    "425": "Feeds are still loading",
    "429": "More requests in progress than ScannersCount",
    "500": "Internal error",
}


def _version_param(since: int) -> dict[str, Any]:
    versions = version_spellings(v for v, n in VERSIONS.items() if n >= since)
    return {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "enum": versions}}


def openapi_document() -> dict[str, Any]:
    """The whole document (OpenAPI 3.0.3)."""
    error_ref = {"$ref": "#/components/schemas/Status"}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        path = "/api/{version}/" + "/".join(route.pattern.segments)
        params = [_version_param(route.since)]
        for segment in route.pattern.segments:
            if segment.startswith("{"):
                params.append({"name": segment[1:-1], "in": "path", "required": True, "schema": _NAME})
        ok = "201" if route.name in ("add_supplier", "add_tag") else "200"
        responses: dict[str, Any] = {
            ok: {
                "description": "Success",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.answer}"}}},
            }
        }
        if route.name == "put_indicators":
            responses["202"] = {
                "description": "Partial success: some indicators rejected (listed)",
                "content": {"application/json": {"schema": error_ref}},
            }
        if route.name == "put_tag":
            responses["201"] = {
                "description": "Created",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TagList"}}},
            }
        for code, text in ERRORS.items():
            responses[code] = {"description": text, "content": {"application/json": {"schema": error_ref}}}
        operation: dict[str, Any] = {
            "operationId": route.name,
            "summary": route.summary,
            "parameters": params,
            "responses": responses,
        }
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}},
            }
        paths.setdefault(path, {})[route.method.lower()] = operation
    paths["/ioc_exports/{task}"] = {
        "get": {
            "operationId": "ioc_export",
            "summary": "Download the CSV of an IoC export task",
            "parameters": [
                {
                    "name": "task",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{2,64}$"},
                }
            ],
            "responses": {
                "200": {"description": "The CSV", "content": {"text/csv": {"schema": _STR}}},
                **{
                    code: {"description": ERRORS[code], "content": {"application/json": {"schema": error_ref}}}
                    for code in ("401", "404", "405", "425")
                },
            },
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "threatgate node REST API (CyberTrace-compatible)", "version": __version__},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
        },
        "security": [{"basic": []}],
        "paths": paths,
    }
