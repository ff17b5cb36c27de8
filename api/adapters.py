"""The adapter routes: POST /load_adapter, POST /upload_adapter, GET /adapter, and a fleet's
two-phase swap: POST /prepare_adapter, /commit_adapter, /cancel_adapter.

The supervisor is the one authority for swaps: these resources check the request (path inside
`--adapter-root`, upload size and files) and ask it over the control socket; the version moves
only when the swap commits. Auth (admin key, or loopback only) is the middleware's job.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import Optional

from mlxsup.api.common import send_json
from mlxsup.api.errors import ApiError, invalid, not_found
from mlxsup.api.media import read_json_object
from mlxsup.api.parsing import parse_body
from mlxsup.api.protocol import CancelAdapterRequest, CommitAdapterRequest, LoadAdapterRequest, PrepareAdapterRequest
from mlxsup.config import SWAP_TIMINGS
from mlxsup.api.uploads import (CONFIG_NAME, WEIGHTS_NAME, UploadStore, check_adapter_config, check_multipart_request,
                                check_safetensors, check_swap_mode, copy_part, multipart_form, read_mode_part)
from mlxsup.files import directory_problem
from mlxsup.supervisor.state import read_state

log = logging.getLogger("mlxsup.api")


class SupervisorAdapters:
    """Adapter swaps through the supervisor's control socket."""

    def __init__(self, run_dir: str, timeout_s: float = 600.0):
        self.run_dir = run_dir
        self.timeout_s = timeout_s

    async def reload(self, path: Optional[str], mode: str) -> dict:
        return await self.call({"op": "reload_adapter", "path": path, "mode": mode})

    async def prepare(self, path: Optional[str], ttl_s: float) -> dict:
        return await self.call({"op": "prepare_adapter", "path": path, "ttl_s": ttl_s})

    async def commit(self, prepared_id: str, mode: str, policy_version: Optional[int]) -> dict:
        return await self.call({"op": "commit_prepared", "prepared_id": prepared_id, "mode": mode,
                                "policy_version": policy_version})

    async def cancel(self, prepared_id: str) -> dict:
        return await self.call({"op": "cancel_prepared", "prepared_id": prepared_id})

    async def update_weights(self, path: str, mode: str, move: bool = False) -> dict:
        return await self.call({"op": "update_weights", "path": path, "mode": mode, "move": move})

    async def call(self, request: dict) -> dict:
        from mlxsup.supervisor.protocol import ControlError, acall

        try:
            return await acall(self.run_dir, request, timeout=self.timeout_s)
        except ControlError as e:
            raise ApiError(503, "supervisor_unavailable", str(e), retry_after=2) from None

    async def reset_prefix_cache(self) -> dict:
        """Ask the engine (through the supervisor) to drop its prefix cache."""
        from mlxsup.supervisor.protocol import ControlError, acall

        try:
            return await acall(self.run_dir, {"op": "reset_prefix_cache"}, timeout=self.timeout_s)
        except ControlError as e:
            raise ApiError(503, "supervisor_unavailable", str(e), retry_after=2) from None

    def committed(self) -> dict:
        """The committed-adapter state file (written by the supervisor) as a dict, or {}."""
        try:
            state = read_state(self.run_dir)
        except ValueError:
            return {}
        return {} if state is None else dataclasses.asdict(state)


def swap_answer(reply: dict, field: str = "adapter_path") -> dict:
    """The supervisor's reply as the seed's response, or the fitting ApiError."""
    if reply.get("ok"):
        return {
            "status": "success",
            "policy_version": reply.get("policy_version"),
            "message": reply.get("message") or "",
            "adapter_path": reply.get("adapter"),
            "mode": reply.get("mode"),
            **{k: reply.get(k) for k in SWAP_TIMINGS},
            **({"prepared_id": reply["prepared_id"]} if "prepared_id" in reply else {}),
        }
    raise swap_error(reply, field)


def swap_error(reply: dict, field: str = "adapter_path") -> ApiError:
    """The ApiError for a supervisor reply with `ok: false`."""
    error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    kind = str(error.get("type") or "adapter_error")
    message = str(error.get("message") or "the adapter swap failed")
    err_field = {"path": field}.get(error.get("field"), error.get("field") or field)
    if kind == "not_found":
        return_error = ApiError(404, "not_found", message, err_field)
    elif kind in ("engine_unavailable", "engine_restarted", "busy"):
        return_error = ApiError(503, kind, message, retry_after=2)
    elif kind == "bad_request":
        return_error = ApiError(422, "validation_error", message, err_field)
    elif kind in ("too_many_prepared", "version_conflict"):
        return_error = ApiError(409, kind, message, err_field)
    else:
        return_error = ApiError(422, kind, message, err_field)
    return return_error


def resolve_adapter_path(path: str, adapter_root: Optional[str], field: str = "adapter_path") -> str:
    """The real path of `path` (symlinks resolved), which must lie inside `adapter_root`.
    `field` names the request field in errors (weight_dir for /update_weights)."""
    if "\x00" in path:
        raise invalid(field, f"{field} contains a NUL character")
    what = "adapter path" if field == "adapter_path" else field
    expanded = os.path.expanduser(path)
    if adapter_root is not None:
        root = os.path.realpath(adapter_root)
        real = os.path.realpath(os.path.join(root, expanded))
        if os.path.commonpath([real, root]) != root:
            raise ApiError(403, "forbidden", f"{field} resolves outside --adapter-root", field)
    else:
        real = os.path.realpath(expanded)
    problem = directory_problem(real, what)
    if problem is not None:  # (worded with the path as given, not its real path)
        kind = problem[0]
        message = problem[1].replace(real, path, 1)
        raise not_found(message, field) if kind == "not_found" else invalid(field, message)
    return real


def optional_adapter_path(path: Optional[str], adapter_root: Optional[str]) -> Optional[str]:
    """`resolve_adapter_path` of a swap's `adapter_path`; None (the base model) stays None."""
    return None if path is None else resolve_adapter_path(path, adapter_root)


class LoadAdapterResource:
    def __init__(self, adapters: SupervisorAdapters, adapter_root: Optional[str]):
        self.adapters = adapters
        self.adapter_root = adapter_root

    async def on_post(self, req, resp):
        body = parse_body(LoadAdapterRequest, await read_json_object(req))
        path = optional_adapter_path(body.adapter_path, self.adapter_root)
        send_json(resp, swap_answer(await self.adapters.reload(path, body.mode)))


class PrepareAdapterResource:
    """POST /prepare_adapter: the first phase of a fleet's swap. The adapter is read, checked
    against the model and made ready in the engine, not committed; nothing changes for
    requests. The answer's `prepared_id` goes to /commit_adapter or /cancel_adapter."""

    def __init__(self, adapters: SupervisorAdapters, adapter_root: Optional[str]):
        self.adapters = adapters
        self.adapter_root = adapter_root

    async def on_post(self, req, resp):
        body = parse_body(PrepareAdapterRequest, await read_json_object(req))
        path = optional_adapter_path(body.adapter_path, self.adapter_root)
        reply = await self.adapters.prepare(path, body.ttl_s)
        if not reply.get("ok"):
            raise swap_error(reply)
        send_json(resp, {"status": "prepared", "prepared_id": reply["prepared_id"],
                         "adapter_path": reply.get("adapter"), "policy_version": reply["policy_version"],
                         "next_policy_version": reply["next_policy_version"],
                         "expires_in_s": reply["expires_in_s"], "read_ms": reply.get("read_ms"),
                         "prepare_ms": reply.get("prepare_ms")})


class CommitAdapterResource:
    """POST /commit_adapter: commit a prepared swap in `mode`, optionally as a named version
    (answered as /load_adapter, plus the prepared_id)."""

    def __init__(self, adapters: SupervisorAdapters):
        self.adapters = adapters

    async def on_post(self, req, resp):
        body = parse_body(CommitAdapterRequest, await read_json_object(req))
        reply = await self.adapters.commit(body.prepared_id, body.mode, body.policy_version)
        send_json(resp, swap_answer(reply, field="prepared_id"))


class CancelAdapterResource:
    """POST /cancel_adapter: drop a prepared swap (the engine frees it); nothing else changes."""

    def __init__(self, adapters: SupervisorAdapters):
        self.adapters = adapters

    async def on_post(self, req, resp):
        body = parse_body(CancelAdapterRequest, await read_json_object(req))
        reply = await self.adapters.cancel(body.prepared_id)
        if not reply.get("ok"):
            raise swap_error(reply, field="prepared_id")
        send_json(resp, {"status": "cancelled", "prepared_id": reply["prepared_id"],
                         "policy_version": reply["policy_version"]})


class ResetPrefixCacheResource:
    """POST /reset_prefix_cache (vLLM's route): drop every prefix-cache entry; rows decoding
    keep their own KV. No body."""

    def __init__(self, adapters: SupervisorAdapters):
        self.adapters = adapters

    async def on_post(self, req, resp):
        reply = await self.adapters.reset_prefix_cache()
        if not reply.get("ok"):
            error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            raise ApiError(503, str(error.get("type") or "engine_unavailable"),
                           str(error.get("message") or "the engine did not answer"), retry_after=2)
        send_json(resp, {"status": "success", "entries_dropped": int(reply.get("entries_dropped", 0))})


class UploadAdapterResource:
    """Multipart fields: `adapter_weights` (adapters.safetensors), `adapter_config`
    (adapter_config.json), optional `mode` (drain/abort/inflight; also a query parameter)."""

    FILES = {"adapter_weights": WEIGHTS_NAME, "adapter_config": CONFIG_NAME}

    def __init__(self, adapters: SupervisorAdapters, store: UploadStore, max_upload_bytes: int):
        self.adapters = adapters
        self.store = store
        self.max_bytes = max_upload_bytes

    async def on_post(self, req, resp):
        check_multipart_request(req, self.max_bytes, "adapter_weights and adapter_config")
        mode = req.get_param("mode") or "drain"
        tmp = self.store.new_dir()
        published = None
        try:
            mode = await self._receive(req, tmp, mode)
            check_safetensors(os.path.join(tmp, WEIGHTS_NAME))
            check_adapter_config(os.path.join(tmp, CONFIG_NAME))
            async with self.store.lock():
                published = self.store.publish(tmp)
                tmp = None
                try:
                    reply = await self.adapters.reload(published, mode)
                except ApiError:
                    published = None  # the supervisor may have committed it: keep the files
                    raise
                if not reply.get("ok"):
                    swap_answer(reply, field="adapter_weights")  # raises
                self.store.remove_replaced(keep=published)
                answer = swap_answer(reply, field="adapter_weights")
                published = None  # committed: it stays until a later upload replaces it
        finally:
            self.store.discard(tmp)
            self.store.discard(published)
        send_json(resp, answer)

    async def _receive(self, req, directory: str, mode: str) -> str:
        form = await multipart_form(req, "adapter_weights")
        seen = set()
        total = 0
        async for part in form:
            name = part.name or ""
            if name in seen:
                raise invalid(name, f"multipart field {name!r} given twice")
            seen.add(name)
            if name == "mode":
                mode = await read_mode_part(part)
                continue
            if name not in self.FILES:
                raise invalid(name[:64], f"unexpected multipart field {name[:64]!r}; expected "
                                         "adapter_weights, adapter_config and optionally mode")
            with self.store.open_file(directory, self.FILES[name]) as out:
                total = await copy_part(part, out, total, self.max_bytes, name)
        for name in self.FILES:
            if name not in seen:
                raise invalid(name, f"missing multipart field {name!r}")
        return check_swap_mode(mode)


class AdapterResource:
    """GET /adapter: what is being served."""

    def __init__(self, adapters: SupervisorAdapters, link):
        self.adapters = adapters
        self.link = link

    async def on_get(self, req, resp):
        state = self.adapters.committed()
        status = self.link.status()
        committed_at = state.get("committed_at")
        loaded_at = None
        if isinstance(committed_at, (int, float)) and not isinstance(committed_at, bool):
            loaded_at = datetime.datetime.fromtimestamp(committed_at, datetime.timezone.utc).isoformat()
        version = status.policy_version if status.link_open else state.get("policy_version", 0)
        send_json(resp, {
            "policy_version": version,
            "adapter_path": state.get("adapter_path"),
            "adapter_id": status.adapter_id or None,
            "loaded_at": loaded_at,
            "committed_version": state.get("policy_version"),
            "num_swaps": status.num_swaps,
        })
