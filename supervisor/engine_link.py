"""The supervisor's end of the engine control channel: a socketpair, one JSON object per line.

Messages are listed in docs/architecture.md. The engine sends `ready` once after loading,
`swap_done` in answer to each `swap` and `swap_first_token` when the first tokens of a committed
swap's weights exist; anything else it sends is logged. When the engine dies the
channel reaches EOF and every pending swap fails with `EngineGone`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import Callable, Optional

from mlxsup.ipc import jsonlines

log = logging.getLogger("mlxsup.supervisor")


class EngineGone(Exception):
    """The engine's end of the channel closed (it exited or was killed)."""


class EngineControlLink:
    """The supervisor's end of one engine's control socket (not the API workers' `EngineLink`,
    which carries requests over shared memory). Reads the engine's lines in a task; `swap`
    and `stop` write commands to it."""

    def __init__(self, sock: socket.socket, epoch: int, on_ready: Callable[[dict], None],
                 on_first_token: Optional[Callable[[dict], None]] = None):
        self.sock = sock
        self.epoch = epoch
        self._on_ready = on_ready
        self._on_first_token = on_first_token
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: Optional[asyncio.StreamWriter] = None
        self._task: Optional[asyncio.Task] = None
        self.closed = False

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self.sock, limit=jsonlines.MAX_LINE)
        self._task = asyncio.create_task(self._read(reader), name=f"engine-link-{self.epoch}")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    msg = await jsonlines.read_message(reader)
                except ValueError as e:
                    log.warning("engine (epoch %d) sent an unreadable line: %s", self.epoch, e)
                    continue
                except OSError:
                    break
                if msg is None:
                    break
                self._dispatch(msg)
        finally:
            self._fail_pending()

    def _dispatch(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "ready":
            self._on_ready(msg)
        elif op in ("swap_done", "reset_prefix_cache_done", "drop_prepared_done"):
            fut = self._pending.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif fut is None:
                log.warning("engine answered a swap nobody waits for: %s", msg)
        elif op == "swap_first_token" and self._on_first_token is not None:
            self._on_first_token(msg)
        else:
            log.info("engine (epoch %d): %s", self.epoch, msg)

    def _fail_pending(self) -> None:
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(EngineGone(f"engine epoch {self.epoch} went away"))
        self._pending.clear()

    def _send(self, msg: dict) -> None:
        if self.closed or self._writer is None or self._writer.is_closing():
            raise EngineGone(f"engine epoch {self.epoch} is not connected")
        self._writer.write(jsonlines.encode(msg))

    async def swap(self, path: Optional[str], mode: str, version: Optional[int], kind: str = "adapter",
                   hold: Optional[str] = None, prepared: Optional[str] = None) -> dict:
        """Ask the engine to commit `path` (an adapter, or with kind "weights" a weight
        directory) as `version`; return its swap_done message. With `hold`, the engine only
        prepares it and keeps it under that key; with `prepared`, it commits what it holds
        under that key (path unused)."""
        extra = {"kind": kind} if kind != "adapter" else {}
        if hold is not None:
            extra["hold"] = hold
        if prepared is not None:
            extra["prepared"] = prepared
        return await self._call({"op": "swap", "path": path, "mode": mode, "version": version, **extra})

    async def drop_prepared(self, hold: str) -> dict:
        """Ask the engine to forget the swap it holds under `hold` (`dropped`: it held one)."""
        return await self._call({"op": "drop_prepared", "hold": hold})

    async def reset_prefix_cache(self) -> dict:
        """Ask the engine to drop its prefix cache; its reply (`entries_dropped`)."""
        return await self._call({"op": "reset_prefix_cache"})

    async def _call(self, msg: dict) -> dict:
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        try:
            self._send({**msg, "id": call_id})
            await self._writer.drain()
        except (OSError, EngineGone) as e:
            self._pending.pop(call_id, None)
            raise EngineGone(str(e)) from e
        return await fut

    def stop(self, drain: bool = True) -> bool:
        """Ask the engine to finish (or abort) its work and exit; False if it is unreachable."""
        try:
            self._send({"op": "stop", "drain": drain})
        except (OSError, EngineGone):
            return False
        return True

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()
        self._fail_pending()
