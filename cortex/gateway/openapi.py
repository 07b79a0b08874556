"""The gateway's OpenAPI document (served at /openapi.json; fuzzed by the test suite).

The admin paths are generated from `admin.ADMIN_ROUTES`, the same table the router reads, with
each request body's schema taken from its pydantic model. The /v1 request bodies are open
objects on purpose: the gateway passes every field through to the engine unchanged, so it only
requires `model`.
"""

from __future__ import annotations

from functools import lru_cache

from .admin import ADMIN_ROUTES, AdminRoute, body_schemas

_ERROR = {"$ref": "#/components/schemas/Error"}
_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]


def _responses(ok: str, *codes: int, ok_status: int = 200) -> dict:
    out: dict[str, dict] = {str(ok_status): {"description": ok}}
    for code in sorted(codes):
        out[str(code)] = {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
    return out


def _proxy(summary: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "security": [{"apiKey": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["model"],
                            "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}},
                            "additionalProperties": True,
                        }
                    }
                },
            },
            "responses": _responses("the engine's answer, passed through", 400, 401, 403, 404, 413, 502, 503),
        }
    }


def _admin_operation(route: AdminRoute) -> dict:
    errors = {401, *route.errors}
    operation: dict = {"summary": route.summary, "security": _ADMIN}
    if route.params:
        operation["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in route.params
        ]
        errors.add(404)
    if route.query is not None:
        properties = route.query.model_json_schema()["properties"]
        operation.setdefault("parameters", []).extend(
            {
                "name": name,
                "in": "query",
                "required": field.is_required(),
                "description": field.description or "",
                # a query parameter is present or absent, never null
                "schema": next((s for s in properties[name].get("anyOf", []) if s != {"type": "null"}), {}),
            }
            for name, field in route.query.model_fields.items()
        )
        errors.add(400)
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body.__name__}"}}},
        }
        errors |= {400, 413}
    operation["responses"] = _responses(route.summary, *errors, ok_status=route.status)
    if route.content_type != "application/json":
        operation["responses"][str(route.status)]["content"] = {route.content_type: {"schema": {"type": "string"}}}
    return operation


@lru_cache(maxsize=1)
def schema() -> dict:
    paths: dict[str, dict] = {
        "/v1/chat/completions": _proxy("Chat completion, routed by model"),
        "/v1/completions": _proxy("Text completion, routed by model"),
        "/v1/embeddings": _proxy("Embeddings, routed by model"),
        "/v1/models": {
            "get": {
                "summary": "Models with a healthy replica",
                "security": [{"apiKey": []}],
                "responses": _responses("model list", 401),
            }
        },
        "/health": {"get": {"summary": "The gateway is up", "responses": _responses("ok")}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": _responses("metrics")}},
    }
    for route in ADMIN_ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _admin_operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cortex gateway", "version": "1"},
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer"},
                "adminToken": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "code": {"type": ["string", "null"]},
                                "param": {"type": ["string", "null"]},
                            },
                        }
                    },
                },
                **body_schemas(),
            },
        },
        "paths": paths,
    }
