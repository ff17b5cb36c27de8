"""Every error the API answers, as one exception type and the handlers that render it.

The body is always `{"error": {"type", "message", "field"}}` (docs/api.md, Errors); the OpenAI
routes add `param` (= field) and `code` so the official SDK shows the message. Resources raise
`ApiError`; falcon's own errors (unknown route, wrong method) and anything unexpected are
rendered by the handlers below into the same shape.
"""

from __future__ import annotations

import logging
from typing import Optional

import falcon
import orjson

log = logging.getLogger("mlxsup.api")

RETRY_AFTER_OVERLOADED = 1
RETRY_AFTER_UNAVAILABLE = 2


class ApiError(Exception):
    """An HTTP error with the project's JSON body. `field` names the offending request field
    ("" when none); `retry_after` (seconds) adds a Retry-After header."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        field: str = "",
        *,
        retry_after: Optional[int] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.field = field
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(int(retry_after))

    def body(self, openai: bool = False) -> dict:
        error = {"type": self.type, "message": self.message, "field": self.field or None}
        if openai:
            error["param"] = self.field or None
            error["code"] = self.type
        return {"error": error}


def invalid_json(message: str) -> ApiError:
    return ApiError(400, "invalid_json", message)


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "validation_error", message, field)


def not_found(message: str, field: str = "") -> ApiError:
    return ApiError(404, "not_found", message, field)


def too_large(message: str, field: str = "") -> ApiError:
    return ApiError(413, "payload_too_large", message, field)


def unavailable(message: str, retry_after: int = RETRY_AFTER_UNAVAILABLE) -> ApiError:
    return ApiError(503, "engine_unavailable", message, retry_after=retry_after)


def overloaded(message: str) -> ApiError:
    return ApiError(503, "overloaded", message, retry_after=RETRY_AFTER_OVERLOADED)


def _is_openai(req) -> bool:
    return req.path.startswith("/v1/")


def render(resp, error: ApiError, openai: bool = False) -> None:
    resp.status = error.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(error.body(openai))
    for name, value in error.headers.items():
        resp.set_header(name, value)


async def handle_api_error(req, resp, ex: ApiError, params) -> None:
    render(resp, ex, _is_openai(req))


_FALCON_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
}


async def handle_http_error(req, resp, ex: falcon.HTTPError, params) -> None:
    """falcon's own errors (unknown route, wrong method, ...) in the project's shape."""
    status = ex.status_code
    if status == 404:
        message = f"no route {req.method} {req.path}"
    else:
        message = ex.description or ex.title or falcon.code_to_http_status(status)
    error = ApiError(status, _FALCON_TYPES.get(status, "http_error"), str(message))
    if ex.headers:
        for name, value in ex.headers.items():
            if name.lower() != "content-type":
                error.headers[name] = value
    render(resp, error, _is_openai(req))


async def handle_unexpected(req, resp, ex: Exception, params) -> None:
    """Last resort: a bug. Answer 500 in the project's shape and log the traceback."""
    log.exception("unhandled error on %s %s", req.method, req.path)
    error = ApiError(500, "internal", f"internal error ({type(ex).__name__}); see the server log")
    render(resp, error, _is_openai(req))
