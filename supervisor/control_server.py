"""The server side of the supervisor's control socket (`control.sock`): one JSON request line
in, one JSON reply line out (messages in docs/architecture.md; the client is `protocol`).
The socket is private to the user (mode 0600); the handler runs in the supervisor's loop."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable, Optional

from mlxsup.ipc import jsonlines
from mlxsup.supervisor.swaps import error_reply

log = logging.getLogger("mlxsup.supervisor")

Handler = Callable[[dict], Awaitable[dict]]


class ControlServer:
    def __init__(self, path: str, handle: Handler):
        self.path = path
        self._handle = handle
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> None:
        if os.path.lexists(self.path):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=jsonlines.MAX_LINE)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                request = jsonlines.decode(line)
            except ValueError as e:
                reply = error_reply("bad_request", f"one JSON object per line expected: {e}")
            else:
                reply = await self._handle(request)
            writer.write(jsonlines.encode(reply))
            await writer.drain()
        except (OSError, ValueError, asyncio.LimitOverrunError):
            pass  # the client went away or sent a line too long to read
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()
