"""A minimal asyncio HTTP probe of the server's `/health`, so the supervisor needs no thread
and no HTTP client library to know when the server answers."""

from __future__ import annotations

import asyncio
import json
from typing import Optional


def probe_host(host: str) -> str:
    """The address to reach a server bound to `host` from this machine."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


async def get_health(host: str, port: int, timeout: float = 2.0) -> Optional[dict]:
    """The JSON body of GET /health when it answers 200, else None."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(probe_host(host), port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET /health HTTP/1.1\r\nHost: {probe_host(host)}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(1 << 16), timeout)
        while raw and not reader.at_eof():
            more = await asyncio.wait_for(reader.read(1 << 16), timeout)
            if not more:
                break
            raw += more
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or status_line[1] != b"200":
        return None
    if b"chunked" in head.lower():
        body = _unchunk(body)
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def is_healthy(body: Optional[dict]) -> bool:
    return bool(body) and body.get("status") == "healthy"
