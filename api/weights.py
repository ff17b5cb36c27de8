"""The weight routes: POST /update_weights (a directory on the server, vLLM's and prime-rl's
route and field) and POST /upload_weights (safetensors files streamed from a trainer on another
machine).

As for adapters, the supervisor is the one authority: these resources check the request (path
inside `--adapter-root`, upload size, safetensors framing) and ask it over the control socket;
the engine checks every name, shape and dtype; the version moves only when the update commits.
Auth (admin key, or loopback only) is the middleware's job.
"""

from __future__ import annotations

import os
from typing import Optional

from mlxsup.api.adapters import SupervisorAdapters, resolve_adapter_path
from mlxsup.api.common import send_json
from mlxsup.api.errors import ApiError, invalid
from mlxsup.api.media import read_json_object
from mlxsup.api.parsing import parse_body
from mlxsup.api.protocol import UpdateWeightsRequest
from mlxsup.api.uploads import (UploadStore, check_multipart_request, check_safetensors, check_swap_mode,
                                copy_part, multipart_form, read_mode_part)
from mlxsup.config import SWAP_TIMINGS

MAX_FILES = 1024  # safetensors shards in one upload
_ERRORS = {  # the supervisor's error type -> HTTP status
    "not_found": 404, "engine_unavailable": 503, "engine_restarted": 503, "busy": 503,
    "supervisor_unavailable": 503, "adapter_loaded": 409, "internal": 503,
}


def weights_answer(reply: dict, field: str = "weight_dir") -> dict:
    """The supervisor's reply as the route's answer, or the fitting ApiError."""
    if reply.get("ok"):
        return {
            "status": "success",
            "policy_version": reply.get("policy_version"),
            "message": reply.get("message") or "",
            "weight_dir": reply.get("weight_dir"),
            "num_tensors": reply.get("num_tensors"),
            "mode": reply.get("mode"),
            **{k: reply.get(k) for k in SWAP_TIMINGS},
        }
    error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    kind = str(error.get("type") or "invalid_weights")
    message = str(error.get("message") or "the weight update failed")
    err_field = field if error.get("field") in (None, "weight_dir") else error["field"]
    status = _ERRORS.get(kind, 422)
    if kind == "bad_request":
        kind = "validation_error"
    raise ApiError(status, kind, message, err_field, retry_after=2 if status == 503 else None)


class UpdateWeightsResource:
    """POST /update_weights {weight_dir, mode}."""

    def __init__(self, adapters: SupervisorAdapters, adapter_root: Optional[str]):
        self.adapters = adapters
        self.adapter_root = adapter_root

    async def on_post(self, req, resp):
        body = parse_body(UpdateWeightsRequest, await read_json_object(req))
        path = resolve_adapter_path(body.weight_dir, self.adapter_root, field="weight_dir")
        send_json(resp, weights_answer(await self.adapters.update_weights(path, body.mode)))


class UploadWeightsResource:
    """Multipart: one or more `weights` fields, each a safetensors file (a whole model, shards
    of one, or any subset of its parameters), and optionally `mode` (also a query parameter).
    The files go to a private directory in the run dir, which the supervisor takes over."""

    def __init__(self, adapters: SupervisorAdapters, store: UploadStore, max_upload_bytes: int):
        self.adapters = adapters
        self.store = store
        self.max_bytes = max_upload_bytes

    async def on_post(self, req, resp):
        check_multipart_request(req, self.max_bytes, "one or more weights files")
        tmp = self.store.new_dir()
        published = None
        try:
            mode, names = await self._receive(req, tmp, req.get_param("mode") or "drain")
            for name in names:
                check_safetensors(os.path.join(tmp, name), field="weights")
            published = self.store.publish(tmp)
            tmp = None
            reply = await self.adapters.update_weights(published, mode, move=True)
            answer = weights_answer(reply, field="weights")
        finally:
            self.store.discard(tmp)
            self.store.discard(published)  # the supervisor moved it, unless it refused early
        send_json(resp, answer)

    async def _receive(self, req, directory: str, mode: str) -> tuple[str, list[str]]:
        form = await multipart_form(req, "weights")
        names: list[str] = []
        total = 0
        seen_mode = False
        async for part in form:
            name = part.name or ""
            if name == "mode":
                if seen_mode:
                    raise invalid("mode", "multipart field 'mode' given twice")
                seen_mode = True
                mode = await read_mode_part(part)
                continue
            if name != "weights":
                raise invalid(name[:64], f"unexpected multipart field {name[:64]!r}; expected "
                                         "weights (one or more) and optionally mode")
            if len(names) >= MAX_FILES:
                raise invalid("weights", f"more than {MAX_FILES} weights files")
            # Stored under our own names, in the order sent (shards stay in order).
            fname = f"{len(names):05d}.safetensors"
            names.append(fname)
            with self.store.open_file(directory, fname) as out:
                total = await copy_part(part, out, total, self.max_bytes, "weights")
        if not names:
            raise invalid("weights", "missing multipart field 'weights' (a safetensors file)")
        return check_swap_mode(mode), names


__all__ = ["UpdateWeightsResource", "UploadWeightsResource", "weights_answer"]
