"""JSON lines, the format of the control sockets: one JSON object per line, at most `MAX_LINE`
bytes. Used by both ends of the engine's control socketpair (engine/control.py,
supervisor/engine_link.py) and of the supervisor's control socket (supervisor/protocol.py,
supervisor/control_server.py); the messages are listed in docs/architecture.md."""

from __future__ import annotations

import asyncio
import socket
from typing import Iterator, Optional

import orjson

MAX_LINE = 1 << 20


def encode(msg: dict) -> bytes:
    """One message as its line, newline included."""
    return orjson.dumps(msg) + b"\n"


def decode(line: bytes) -> dict:
    """The object on one line; ValueError for anything that is not one JSON object."""
    try:
        msg = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ValueError("not a JSON object")
    return msg


def iter_lines(sock: socket.socket, max_line: Optional[int] = None) -> Iterator[bytes]:
    """The non-blank lines read from a blocking socket until it reaches EOF (an unterminated
    last line included). ValueError when a line grows past `max_line` bytes (no limit by
    default)."""
    buf = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            if buf.strip():
                yield bytes(buf)
            return
        buf += chunk
        *lines, rest = buf.split(b"\n")
        buf = bytearray(rest)
        for line in lines:
            if line.strip():
                yield bytes(line)
        if max_line is not None and len(buf) > max_line:
            raise ValueError(f"a line longer than {max_line} bytes")


async def read_message(reader: asyncio.StreamReader) -> Optional[dict]:
    """The next line's object from a stream opened with `limit=MAX_LINE`; None at EOF.
    ValueError for a line that is not one JSON object, or one longer than the limit (which
    is dropped, so that the next call reads the line after it)."""
    line = await reader.readline()  # ValueError past the limit, the line dropped
    if not line:
        return None
    return decode(line)
