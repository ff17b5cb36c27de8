"""A lean HTTP/1.1 client for the burst workload: one connection per request (`Connection:
close`), the body written in one call, the answer read to the end.

Why not httpx: measured on this 2-core host (scripts/profile_burst.py, the demo tiny model, 128
requests released together), httpx's AsyncClient spent 0.35-0.5 s of the client's own CPU per
round before the server saw the requests (the whole round with max_tokens 1: 0.43-0.64 s with
httpx, 0.11-0.16 s with this client), and on the H200 host the server read its first request
0.17-0.43 s after the release. A burst measures how the server takes requests that arrive
together, so the client's cost must stay out of it; aiohttp would do, but it is not on the GPU
host, which has no package index. Only what `Protocol.send` uses is here: `post(path,
json=...)` answering an object with `status_code`, `content` and `text`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

try:
    import orjson

    _dumps = orjson.dumps
except ImportError:  # pragma: no cover
    def _dumps(obj):
        return json.dumps(obj).encode()


@dataclass
class RawResponse:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


def _dechunk(body: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2


def parse_response(raw: bytes) -> RawResponse:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise httpx.RemoteProtocolError("the server closed the connection before a whole answer")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    elif b"content-length" in headers:
        body = body[: int(headers[b"content-length"])]
    return RawResponse(status, body)


class RawClient:
    def __init__(self, base_url: str, timeout: float):
        url = urlsplit(base_url)
        self.host, self.port = url.hostname, url.port or 80
        self.timeout = timeout

    async def __aenter__(self) -> "RawClient":
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    async def post(self, path: str, json=None) -> RawResponse:
        body = _dumps(json)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        try:
            return await asyncio.wait_for(self._exchange(head + body), self.timeout)
        except asyncio.TimeoutError as e:
            raise httpx.ReadTimeout(f"no whole answer within {self.timeout} s") from e

    async def _exchange(self, request: bytes) -> RawResponse:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(request)
            raw = await reader.read()
        finally:
            writer.close()
        return parse_response(raw)
