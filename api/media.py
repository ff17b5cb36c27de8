"""Reading request bodies: a size cap, a nesting-depth guard, then orjson.

The body is parsed as JSON whatever its Content-Type (curl -d sends form-urlencoded by
default; the seed's clients send JSON). orjson rejects NaN, Infinity, invalid UTF-8 and lone
surrogates; it has no recursion limit and crashes the process on arrays nested a million
deep, so the depth is checked first, without parsing, when the body has many brackets.
"""

from __future__ import annotations

import numpy as np
import orjson

from mlxsup.api.errors import invalid, invalid_json, too_large

MAX_JSON_BYTES = 32 << 20
MAX_DEPTH = 64
_CHUNK = 1 << 16

_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


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


def json_depth(data: bytes) -> int:
    """Deepest nesting of arrays and objects, brackets inside strings not counted."""
    b = np.frombuffer(data, np.uint8)
    if b.size == 0:
        return 0
    is_bs = b == ord("\\")
    idx = np.arange(b.size)
    last_plain = np.maximum.accumulate(np.where(is_bs, -1, idx))
    quotes = np.flatnonzero(b == ord('"'))
    # a quote is escaped when an odd number of backslashes precede it
    prev = quotes - 1
    run = np.where(prev >= 0, prev - last_plain[np.maximum(prev, 0)], 0)
    real = quotes[(run % 2) == 0]
    toggles = np.zeros(b.size, np.int8)
    toggles[real] = 1
    in_string = (np.cumsum(toggles, dtype=np.int64) % 2) == 1
    steps = _OPEN[b].astype(np.int64)
    steps[in_string] = 0
    depth = np.cumsum(steps)
    return int(depth.max(initial=0))


def loads(data: bytes, what: str = "request body"):
    """Parse JSON safely: 400 for anything that is not JSON, 422 for absurd nesting."""
    if not data.strip():
        raise invalid_json(f"{what} is empty; send a JSON object")
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and json_depth(data) > MAX_DEPTH:
        raise invalid("", f"{what} nests arrays/objects more than {MAX_DEPTH} deep")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
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
