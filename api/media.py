"""Reading request bodies: a size cap, then orjson.

The body is parsed as JSON whatever its Content-Type (curl -d sends form-urlencoded by
default; the seed's clients send JSON). orjson rejects NaN, Infinity, invalid UTF-8 and lone
surrogates, and (since 3.9.15, the version pinned) stops at arrays and objects nested more
than 1024 deep with a JSONDecodeError instead of recursing until the process crashes: no scan
of the body ahead of it (which cost ~40 bytes per body byte) is needed.
"""

from __future__ import annotations

import orjson

from mlxsup.api.errors import invalid, invalid_json, too_large

MAX_JSON_BYTES = 32 << 20
MAX_DEPTH = 1024  # orjson's own limit
_CHUNK = 1 << 16


async def read_body(req, limit: int) -> bytes:
    """The whole body, or 413 once it exceeds `limit` bytes (Content-Length checked first)."""
    length = req.content_length
    if length is not None and length > limit:
        raise too_large(f"request body of {length} bytes exceeds the limit of {limit} bytes")
    chunks = []
    size = 0
    while True:
        chunk = await req.stream.read(_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise too_large(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def loads(data: bytes, what: str = "request body"):
    """Parse JSON safely: 400 for anything that is not JSON, 422 for absurd nesting."""
    if not data.strip():
        raise invalid_json(f"{what} is empty; send a JSON object")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        if "depth" in str(e) or "recursion" in str(e).lower():
            raise invalid("", f"{what} nests arrays/objects more than {MAX_DEPTH} deep") from None
        raise invalid_json(f"{what} is not valid JSON: {e}") from None


async def read_json_object(req, limit: int = MAX_JSON_BYTES) -> dict:
    body = loads(await read_body(req, limit))
    if not isinstance(body, dict):
        raise invalid("", f"request body must be a JSON object, not {_json_type(body)}")
    return body


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
