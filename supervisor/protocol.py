"""The supervisor's control socket: one JSON request line in, one JSON reply line out.

Used by the CLI (`mlxsup reload-adapter`, `status`, `stop`) and by API workers for the adapter
routes. The supervisor is the single authority for adapter swaps, so every swap goes through
here. Messages are listed in docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import os
import socket

from mlxsup.ipc import jsonlines

SOCKET_NAME = "control.sock"


class ControlError(Exception):
    """The supervisor could not be reached or answered something unreadable."""


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


def call(run_dir: str, request: dict, timeout: float = 30.0) -> dict:
    """Send one request to the supervisor of `run_dir` and return its reply (blocking)."""
    path = socket_path(run_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(jsonlines.encode(request))
            try:
                line = next(jsonlines.iter_lines(sock, jsonlines.MAX_LINE), b"")
            except ValueError as e:
                raise ControlError(f"reply from the supervisor is too long: {e}") from None
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise ControlError(f"no supervisor is listening at {path}: {e}") from e
    except socket.timeout as e:
        raise ControlError(f"the supervisor did not answer within {timeout:.0f} s") from e
    except OSError as e:
        raise ControlError(f"control socket {path}: {e}") from e
    return _parse(line)


async def acall(run_dir: str, request: dict, timeout: float = 30.0) -> dict:
    """Asyncio twin of `call`, for API workers."""
    path = socket_path(run_dir)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path, limit=jsonlines.MAX_LINE), timeout
        )
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise ControlError(f"no supervisor is listening at {path}: {e}") from e
    except (asyncio.TimeoutError, OSError) as e:
        raise ControlError(f"control socket {path}: {e!r}") from e
    try:
        writer.write(jsonlines.encode(request))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError as e:
        raise ControlError(f"the supervisor did not answer within {timeout:.0f} s") from e
    except (OSError, ValueError) as e:
        raise ControlError(f"control socket {path}: {e!r}") from e
    finally:
        writer.close()
    return _parse(line)


def _parse(line: bytes) -> dict:
    try:
        return jsonlines.decode(line)
    except ValueError as e:
        raise ControlError(f"unreadable reply from the supervisor ({e}): {bytes(line[:200])!r}") from None
