"""Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), and the two ways
reading a request body can end early."""

from __future__ import annotations

import orjson


class ClientGone(Exception):
    """The client disconnected; nothing more can be sent to it."""


class BodyTooLarge(Exception):
    pass


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
