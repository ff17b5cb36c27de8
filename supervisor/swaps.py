"""The single authority for adapter swaps.

Swaps are serialised: one at a time, later callers wait their turn. The version to commit as
is chosen here and passed to the engine; the committed state is written (`os.replace`) only
after the engine answers that the swap committed, so a failed swap never moves the version and
a restarted engine comes back on the last committed adapter and version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import Awaitable, Callable, Optional

from mlxsup.config import FIRST_TOKEN_FIELDS, SWAP_MODES, SWAP_TIMINGS
from mlxsup.supervisor import weight_store
from mlxsup.supervisor.engine_link import EngineControlLink, EngineGone
from mlxsup.supervisor.state import AdapterState, write_state

log = logging.getLogger("mlxsup.supervisor")



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
    if not os.path.exists(path):
        return None, error_reply("not_found", f"adapter path {path} does not exist", field="path")
    if not os.path.isdir(path):
        return None, error_reply("invalid_adapter", f"adapter path {path} is not a directory", field="path")
    return path, None


class SwapCoordinator:
    """Owns the committed `AdapterState` of one run directory."""

    def __init__(self, run_dir: str, state: AdapterState):
        self.run_dir = run_dir
        self.state = state
        self.num_swaps = 0
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
            version = self.state.next_version
            log.info("swap to %s as version %d (%s)", path or "the base model", version, mode)
            try:
                reply = await link.swap(path, mode, version)
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
