"""The single authority for adapter swaps.

Swaps are serialised: one at a time, later callers wait their turn. The version to commit as
is chosen here and passed to the engine; the committed state is written (`os.replace`) only
after the engine answers that the swap committed, so a failed swap never moves the version and
a restarted engine comes back on the last committed adapter and version.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from typing import Awaitable, Callable, Optional

from mlxsup.config import FIRST_TOKEN_FIELDS, SWAP_MODES, SWAP_TIMINGS
from mlxsup.files import directory_problem
from mlxsup.supervisor import weight_store
from mlxsup.supervisor.engine_link import EngineControlLink, EngineGone
from mlxsup.supervisor.state import AdapterState, write_state

log = logging.getLogger("mlxsup.supervisor")

MAX_PREPARED = 4  # prepared swaps held at once (each holds an adapter's arrays in the engine)
PREPARED_TTL_S = 300.0  # a prepared swap nobody commits or cancels is dropped after this long
MAX_PREPARED_TTL_S = 3600.0


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A swap the engine of epoch `epoch` prepared and holds under `key`, not committed."""

    key: str
    path: Optional[str]
    epoch: int
    expires_at: float  # time.monotonic()

def error_reply(kind: str, message: str, field: Optional[str] = None, **extra) -> dict:
    err = {"type": kind, "message": message}
    if field:
        err["field"] = field
    return {"ok": False, "error": err, **extra}


def check_adapter_path(path) -> tuple[Optional[str], Optional[dict]]:
    """(absolute path, None) or (None, error reply). None stands for the base model."""
    if path is None:
        return None, None
    if not isinstance(path, str) or not path:
        return None, error_reply("bad_request", "path must be a non-empty string or null", field="path")
    path = os.path.abspath(os.path.expanduser(path))
    problem = directory_problem(path)
    if problem is not None:
        return None, error_reply(*problem, field="path")
    return path, None


class SwapCoordinator:
    """Owns the committed `AdapterState` of one run directory."""

    def __init__(self, run_dir: str, state: AdapterState):
        self.run_dir = run_dir
        self.state = state
        self.num_swaps = 0
        self.prepared: dict[str, Prepared] = {}
        self._lock = asyncio.Lock()
        self._last: Optional[dict] = None  # the last committed swap's reply
        self._first_token: Optional[dict] = None  # the engine's last swap_first_token

    def note_first_token(self, msg: dict) -> None:
        """The engine's `swap_first_token`: the first tokens of a committed version exist."""
        self._first_token = msg
        log.info("version %s: first token %.1f ms after the engine received the swap (%s rows "
                 "were running at the commit)", msg.get("policy_version"),
                 msg.get("first_token_ms") or 0.0, msg.get("running_at_commit"))

    def last_swap(self) -> Optional[dict]:
        """The last committed swap: its reply fields and, once the engine has produced a token
        under it, `first_token_ms` (engine's receipt of the swap to the end of the first step
        under the new weights), `commit_to_first_token_ms` and `running_at_commit`; None
        before the first swap of this supervisor."""
        if self._last is None:
            return None
        out = dict(self._last, **dict.fromkeys(FIRST_TOKEN_FIELDS))
        ft = self._first_token
        if ft is not None and ft.get("policy_version") == out["policy_version"]:
            out.update({k: ft.get(k) for k in FIRST_TOKEN_FIELDS})
        return out

    async def reload(
        self,
        path,
        mode,
        ready_link: Callable[[], Awaitable[Optional[EngineControlLink]]],
    ) -> dict:
        """Swap to the adapter at `path` (None: the base model) in `mode`; the reply is the
        control socket's (`ok`, `policy_version`, ... or `ok: false` with `error`).

        `ready_link` waits for a ready engine and returns its link, or None when there is none
        to be had (stopping, or still restarting after a long wait)."""
        if mode not in SWAP_MODES:
            return error_reply("bad_request", f"mode must be one of {', '.join(SWAP_MODES)}", field="mode")
        path, err = check_adapter_path(path)
        if err:
            return err
        async with self._lock:
            link = await ready_link()
            if link is None:
                return error_reply("engine_unavailable", "no engine is ready (restarting or stopping); try again")
            return await self._swap(link, path, mode, self.state.next_version)

    # ------------------------------------------------------------ two-phase swaps (fleets)

    async def prepare(
        self,
        path,
        ready_link: Callable[[], Awaitable[Optional[EngineControlLink]]],
        ttl_s: float = PREPARED_TTL_S,
    ) -> dict:
        """Read, validate and prepare the adapter at `path` (None: the base model) in the engine
        without committing it; the reply's `prepared_id` commits or cancels it later. Nothing
        changes for requests meanwhile. Refused (`too_many_prepared`) while MAX_PREPARED are
        held; one not committed or cancelled within `ttl_s` is dropped."""
        path, err = check_adapter_path(path)
        if err:
            return err
        if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or not 0 < ttl_s <= MAX_PREPARED_TTL_S:
            return error_reply("bad_request", f"ttl_s must be a number in (0, {MAX_PREPARED_TTL_S:g}]",
                               field="ttl_s")
        async with self._lock:
            expired = self.expired()
            link = await ready_link()
            await self._drop(expired, link)
            if len(self.prepared) >= MAX_PREPARED:
                return error_reply("too_many_prepared",
                                   f"{MAX_PREPARED} prepared swaps are held already: commit or cancel one "
                                   f"({', '.join(self.prepared)})", field="prepared_id")
            if link is None:
                return error_reply("engine_unavailable", "no engine is ready (restarting or stopping); try again")
            key = secrets.token_hex(8)
            try:
                reply = await link.swap(path, "drain", None, hold=key)
            except EngineGone:
                return error_reply("engine_restarted", "the engine died while preparing; prepare again",
                                   policy_version=self.state.policy_version)
            if not reply.get("ok"):
                err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
                log.warning("prepare of %s refused: %s", path, err.get("message"))
                return error_reply(err.get("type") or "invalid_adapter",
                                   err.get("message") or "the engine refused the adapter",
                                   policy_version=self.state.policy_version)
            self.prepared[key] = Prepared(key, path, link.epoch, time.monotonic() + ttl_s)
            log.info("prepared %s as %s (engine epoch %d)", path or "the base model", key, link.epoch)
            return {"ok": True, "prepared_id": key, "adapter": path,
                    "policy_version": self.state.policy_version,
                    "next_policy_version": self.state.next_version, "expires_in_s": float(ttl_s),
                    "read_ms": reply.get("read_ms"), "prepare_ms": reply.get("prepare_ms")}

    async def commit_prepared(
        self,
        key,
        mode,
        ready_link: Callable[[], Awaitable[Optional[EngineControlLink]]],
        version: Optional[int] = None,
    ) -> dict:
        """Commit the prepared swap `key` in `mode` as `version` (None: the next version; a
        fleet names one version for all its replicas, which must not be below the next one
        here: versions never repeat). Its reply is `reload`'s. An engine restarted since the
        prepare lost what it held: the swap is then prepared again from the same files."""
        if mode not in SWAP_MODES:
            return error_reply("bad_request", f"mode must be one of {', '.join(SWAP_MODES)}", field="mode")
        async with self._lock:
            expired = self.expired()
            entry = self.prepared.get(key) if isinstance(key, str) else None
            if entry is None:
                return error_reply("not_found", f"no prepared swap {key!r} (never prepared, committed, "
                                   "cancelled, or expired)", field="prepared_id")
            wanted = self.state.next_version if version is None else version
            if wanted < self.state.next_version:
                return error_reply("version_conflict",
                                   f"version {wanted} is below this server's next version "
                                   f"{self.state.next_version} (versions never repeat)",
                                   field="policy_version", policy_version=self.state.policy_version,
                                   next_policy_version=self.state.next_version)
            del self.prepared[key]
            link = await ready_link()
            await self._drop(expired, link)
            if link is None:
                return error_reply("engine_unavailable", "no engine is ready (restarting or stopping); "
                                   "the prepared swap is dropped: prepare again")
            if link.epoch != entry.epoch:
                log.info("prepared swap %s was held by engine epoch %d; epoch %d prepares it again",
                         key, entry.epoch, link.epoch)
                return await self._swap(link, entry.path, mode, wanted, prepared_id=key)
            return await self._swap(link, entry.path, mode, wanted, prepared_id=key, held=key)

    async def cancel_prepared(self, key, link: Optional[EngineControlLink]) -> dict:
        """Drop the prepared swap `key` (the engine behind `link`, the current one if any,
        frees its arrays); nothing else changes."""
        async with self._lock:
            entry = self.prepared.pop(key, None) if isinstance(key, str) else None
            if entry is None:
                return error_reply("not_found", f"no prepared swap {key!r} (never prepared, committed, "
                                   "cancelled, or expired)", field="prepared_id")
            await self._drop([entry], link)
            log.info("cancelled prepared swap %s (%s)", key, entry.path or "the base model")
            return {"ok": True, "prepared_id": key, "policy_version": self.state.policy_version}

    def has_expired(self) -> bool:
        now = time.monotonic()
        return any(e.expires_at <= now for e in self.prepared.values())

    async def drop_expired(self, link: Optional[EngineControlLink]) -> None:
        """Drop the prepared swaps past their time to live (the supervisor's periodic check)."""
        async with self._lock:
            await self._drop(self.expired(), link)

    def expired(self) -> list["Prepared"]:
        """Remove and return the prepared swaps past their time to live."""
        now = time.monotonic()
        gone = [e for e in self.prepared.values() if e.expires_at <= now]
        for e in gone:
            del self.prepared[e.key]
            log.warning("prepared swap %s (%s) expired uncommitted", e.key, e.path or "the base model")
        return gone

    async def _drop(self, entries, link: Optional[EngineControlLink]) -> None:
        """Ask the engine behind `link` to free what it holds for `entries` (an engine
        restarted since holds nothing: then nothing to do)."""
        for e in entries:
            if link is not None and not link.closed and link.epoch == e.epoch:
                with contextlib.suppress(EngineGone):
                    await link.drop_prepared(e.key)

    async def _swap(self, link: EngineControlLink, path: Optional[str], mode: str, version: int,
                    prepared_id: Optional[str] = None, held: Optional[str] = None) -> dict:
        """Commit `path` (or the engine's held swap `held`) as `version`; the lock is held."""
        log.info("swap to %s as version %d (%s)", path or "the base model", version, mode)
        try:
            if held is None:
                reply = await link.swap(path, mode, version)
            else:
                reply = await link.swap(path, mode, version, prepared=held)
        except EngineGone:
            # Nobody knows whether tokens went out under `version`: never issue it again.
            self._commit(dataclasses.replace(self.state, max_issued_version=version))
            return error_reply(
                "engine_restarted",
                f"the engine died during the swap; it restarts on version {self.state.policy_version}",
                policy_version=self.state.policy_version,
            )
        if not reply.get("ok"):
            err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            log.warning("swap to %s refused: %s", path, err.get("message"))
            return error_reply(
                err.get("type") or "invalid_adapter",
                err.get("message") or "the engine refused the adapter",
                policy_version=self.state.policy_version,
            )
        if reply.get("policy_version", version) != version:
            log.warning("engine committed as %s, asked for %d", reply.get("policy_version"), version)
        self._commit(dataclasses.replace(self.state, adapter_path=path, policy_version=version,
                                         max_issued_version=version))
        self.num_swaps += 1
        log.info(
            "committed version %d: %s (prepare %.1f ms, commit %.1f ms)",
            version, path or "the base model", reply.get("prepare_ms") or 0.0, reply.get("commit_ms") or 0.0,
        )  # fmt: skip
        result = {
            "ok": True,
            "policy_version": version,
            "adapter": path,
            "mode": mode,
            "message": f"Loaded adapter from {path}" if path else "Back to the base model",
            **{k: reply.get(k) for k in SWAP_TIMINGS},
        }
        self._last = {k: v for k, v in result.items() if k not in ("ok", "message")}
        if prepared_id is not None:
            result["prepared_id"] = prepared_id
        return result

    async def update_weights(
        self,
        path,
        mode,
        ready_link: Callable[[], Awaitable[Optional[EngineControlLink]]],
        move: bool = False,
    ) -> dict:
        """Commit the weights in the directory `path` (safetensors files, any subset of the
        model's parameters) in `mode`, on the adapters' version counter. The files are copied
        into the run dir first (moved with `move`, for uploads already there), so a restarted
        engine replays them; a refused update leaves no copy and changes nothing."""
        if mode not in SWAP_MODES:
            return error_reply("bad_request", f"mode must be one of {', '.join(SWAP_MODES)}", field="mode")
        if not isinstance(path, str) or not path:
            return error_reply("bad_request", "weight_dir must be a non-empty string", field="weight_dir")
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.exists(path):
            return error_reply("not_found", f"weight directory {path} does not exist", field="weight_dir")
        if not os.path.isdir(path):
            return error_reply("invalid_weights", f"{path} is not a directory", field="weight_dir")
        if move and os.path.commonpath([path, os.path.join(self.run_dir, "uploads")]) != os.path.join(
                self.run_dir, "uploads"):
            return error_reply("bad_request", "only uploads in the run directory can be moved", field="weight_dir")
        async with self._lock:
            if self.state.adapter_path is not None:
                return error_reply(
                    "adapter_loaded",
                    f"an adapter is loaded ({self.state.adapter_path}): go back to the base model first "
                    "(load_adapter with adapter_path null), then update the weights and load an adapter "
                    "trained on them",
                    field="weight_dir", policy_version=self.state.policy_version)
            if not weight_store.safetensors_in(path):
                return error_reply("invalid_weights", f"{path} holds no .safetensors files", field="weight_dir")
            link = await ready_link()
            if link is None:
                return error_reply("engine_unavailable", "no engine is ready (restarting or stopping); try again")
            version = self.state.next_version
            try:
                copy = await asyncio.to_thread(weight_store.take, self.run_dir, path, version, move)
            except OSError as e:
                return error_reply("internal", f"could not keep a copy of the weights in the run dir: {e}")
            log.info("weight update from %s as version %d (%s)", path, version, mode)
            try:
                reply = await link.swap(copy, mode, version, kind="weights")
            except EngineGone:
                self._commit(dataclasses.replace(self.state, max_issued_version=version))
                weight_store.remove([copy])
                return error_reply(
                    "engine_restarted",
                    f"the engine died during the update; it restarts on version {self.state.policy_version}",
                    policy_version=self.state.policy_version,
                )
            if not reply.get("ok"):
                weight_store.remove([copy])
                err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
                log.warning("weight update from %s refused: %s", path, err.get("message"))
                return error_reply(
                    err.get("type") or "invalid_weights",
                    err.get("message") or "the engine refused the weights",
                    field="weight_dir", policy_version=self.state.policy_version,
                )
            tensors = [t for t in reply.get("tensors") or [] if isinstance(t, str)]
            entries, dropped = weight_store.superseded(self.state.weights + ((copy, tuple(tensors)),))
            self._commit(dataclasses.replace(self.state, policy_version=version, max_issued_version=version,
                                             weights=entries))
            weight_store.remove(dropped)
            self.num_swaps += 1
            log.info("committed version %d: %d tensor(s) from %s (prepare %.1f ms, commit %.1f ms)",
                     version, len(tensors), path, reply.get("prepare_ms") or 0.0, reply.get("commit_ms") or 0.0)
            result = {
                "ok": True,
                "policy_version": version,
                "weight_dir": path,
                "num_tensors": len(tensors),
                "mode": mode,
                "message": f"Updated {len(tensors)} tensor(s) from {path}",
                **{k: reply.get(k) for k in SWAP_TIMINGS},
            }
            self._last = {k: v for k, v in result.items() if k not in ("ok", "message")}
            return result

    def _commit(self, state: AdapterState) -> None:
        write_state(self.run_dir, state)
        self.state = state
