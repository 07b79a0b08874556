"""The gateway's OpenAPI document (served at /openapi.json; fuzzed by the test suite).

The /v1 request bodies are open objects on purpose: the gateway passes every field through to
the engine unchanged, so it only requires `model`.
"""

from __future__ import annotations

from functools import lru_cache

_ERROR = {"$ref": "#/components/schemas/Error"}


def _responses(ok: str, *codes: int) -> dict:
    out: dict[str, dict] = {"200": {"description": ok}}
    for code in codes:
        out[str(code)] = {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
    return out


def _proxy(summary: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "security": [{"apiKey": []}],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}},
                    "additionalProperties": True,
                }}},
            },
            "responses": _responses("the engine's answer, passed through", 400, 401, 403, 404, 413, 502, 503),
        }
    }


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]


@lru_cache(maxsize=1)
def schema() -> dict:
    return {
        "openapi": "3.0.3",
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
                    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
                        "message": {"type": "string"}, "type": {"type": "string"},
                        "code": {"type": "string", "nullable": True}, "param": {"type": "string", "nullable": True},
                    }}},
                },
                "Registration": {
                    "type": "object",
                    "required": ["model", "url"],
                    "properties": {
                        "model": {"type": "string"},
                        "url": {"type": "string"},
                        "engine_api_key": {"type": "string", "nullable": True},
                        "aliases": {"type": "array", "items": {"type": "string"}},
                        "id": {"type": "string"},
                        "labels": {"type": "object"},
                    },
                },
                "NewKey": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "models": {"type": "array", "items": {"type": "string"}, "nullable": True},
                        "expires_at": {"type": "number", "nullable": True},
                    },
                },
            },
        },
        "paths": {
            "/v1/chat/completions": _proxy("Chat completion, routed by model"),
            "/v1/completions": _proxy("Text completion, routed by model"),
            "/v1/embeddings": _proxy("Embeddings, routed by model"),
            "/v1/models": {"get": {"summary": "Models with a healthy replica", "security": [{"apiKey": []}],
                                   "responses": _responses("model list", 401)}},
            "/health": {"get": {"summary": "The gateway is up", "responses": _responses("ok")}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": _responses("metrics")}},
            "/admin/replicas": {
                "get": {"summary": "List replicas", "security": _ADMIN, "responses": _responses("replicas", 401)},
                "post": {
                    "summary": "Register a replica", "security": _ADMIN,
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Registration"}}}},
                    "responses": {"201": {"description": "registered"}, **_responses("", 400, 401, 409)},
                },
            },
            "/admin/replicas/{id}/drain": {"post": {
                "summary": "Drain a replica (no new requests; removed when idle)", "security": _ADMIN,
                "parameters": _ID, "responses": _responses("draining", 401, 404)}},
            "/admin/replicas/{id}": {"delete": {
                "summary": "Deregister a replica now", "security": _ADMIN,
                "parameters": _ID, "responses": _responses("removed", 401, 404)}},
            "/admin/keys": {
                "get": {"summary": "List API keys (no secrets)", "security": _ADMIN, "responses": _responses("keys", 401)},
                "post": {
                    "summary": "Create an API key (the key is shown once)", "security": _ADMIN,
                    "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewKey"}}}},
                    "responses": {"201": {"description": "created"}, **_responses("", 400, 401)},
                },
            },
            "/admin/keys/{id}": {"delete": {
                "summary": "Revoke an API key", "security": _ADMIN,
                "parameters": _ID, "responses": _responses("revoked", 401, 404)}},
        },
    }
