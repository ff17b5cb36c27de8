"""Adapters received by POST /upload_adapter: checked, stored privately, cleaned up.

Each upload is written to `<run_dir>/uploads/.tmp-<id>/` (directories 0700, files 0600), checked
(safetensors framing only: nothing is unpickled, and pickle/zip checkpoints are refused by their
magic bytes), then renamed to `uploads/<id>/` and handed to the supervisor. Uploads are
serialised across workers by a `flock` on `uploads/.lock`, held from the rename to the clean-up,
so deleting the uploads the new one replaced never races with another upload's swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import shutil
import time
from typing import Optional

import falcon

from mlxsup.api.errors import ApiError, invalid, too_large
from mlxsup.api.media import loads
from mlxsup.config import SWAP_MODES
from mlxsup.safetensors_header import CONFIG_NAME, WEIGHTS_NAME, HeaderError, read_header  # noqa: F401 - names for api/adapters.py

MAX_CONFIG_BYTES = 1 << 20
_CHUNK = 1 << 20  # bytes read from a multipart part at a time


# ---------------------------------------------------------------- multipart bodies (the upload routes)


def check_multipart_request(req, max_bytes: int, expected: str) -> None:
    """415 unless the body is multipart/form-data (`expected` says what it should carry);
    413 when its declared length is already past `max_bytes`."""
    if not (req.content_type or "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", f"send multipart/form-data with {expected}")
    length = req.content_length
    if length is not None and length > max_bytes:
        raise too_large(f"upload of {length} bytes exceeds --max-upload-mb ({max_bytes >> 20} MiB)")


async def multipart_form(req, field: str):
    """The request's multipart form; 422 naming `field` when the body is empty."""
    try:
        return await req.get_media()
    except falcon.MediaNotFoundError:
        raise invalid(field, "the multipart body is empty") from None


async def read_mode_part(part) -> str:
    """The value of a multipart `mode` field (checked later by `check_swap_mode`)."""
    return (await part.stream.read(64)).decode("utf-8", "replace").strip()


def check_swap_mode(mode: str) -> str:
    if mode not in SWAP_MODES:
        raise invalid("mode", f"mode must be one of {', '.join(SWAP_MODES)}")
    return mode


async def copy_part(part, out, total: int, max_bytes: int, field: str) -> int:
    """Stream one multipart part into the file `out`; returns the bytes of the whole upload so
    far (`total` before this part), 413 naming `field` once they pass `max_bytes`."""
    while True:
        chunk = await part.stream.read(_CHUNK)
        if not chunk:
            return total
        total += len(chunk)
        if total > max_bytes:
            raise too_large(f"upload exceeds --max-upload-mb ({max_bytes >> 20} MiB)", field)
        out.write(chunk)
STALE_TMP_S = 3600.0
LOCK_WAIT_S = 600.0


def check_safetensors(path: str, field: str = "adapter_weights") -> int:
    """Validate the framing of a safetensors file; return its number of tensors."""
    with open(path, "rb") as f:
        try:
            entries, _ = read_header(f, os.fstat(f.fileno()).st_size)
        except HeaderError as e:
            raise invalid(field, f"{field} {e}") from None
    return len(entries)


def check_adapter_config(path: str, field: str = "adapter_config") -> None:
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise invalid(field, f"{field} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = loads(data, what=field)
    except ApiError as e:
        raise invalid(field, e.message) from None
    if not isinstance(config, dict):
        raise invalid(field, f"{field} must be a JSON object")


class UploadStore:
    def __init__(self, run_dir: str):
        self.root = os.path.join(run_dir, "uploads")

    def new_dir(self) -> str:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        name = f".tmp-{time.time_ns():020d}-{secrets.token_hex(4)}"
        path = os.path.join(self.root, name)
        os.mkdir(path, 0o700)
        return path

    def open_file(self, directory: str, name: str):
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return os.fdopen(fd, "wb")

    def publish(self, tmp_dir: str) -> str:
        final = os.path.join(self.root, os.path.basename(tmp_dir)[len(".tmp-"):])
        os.rename(tmp_dir, final)
        return final

    def discard(self, path: Optional[str]) -> None:
        if path:
            shutil.rmtree(path, ignore_errors=True)

    def remove_replaced(self, keep: str) -> list[str]:
        """After `keep` was committed: delete every other finished upload, and temporary
        directories left by killed workers."""
        removed = []
        now = time.time()
        for name in os.listdir(self.root):
            full = os.path.join(self.root, name)
            if full == keep or name == ".lock" or not os.path.isdir(full):
                continue
            if name.startswith(".tmp-"):
                try:
                    if now - os.stat(full).st_mtime < STALE_TMP_S:
                        continue
                except FileNotFoundError:
                    continue
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
        return removed

    @contextlib.asynccontextmanager
    async def lock(self, wait_s: float = LOCK_WAIT_S):
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ApiError(503, "busy", "another adapter upload is in progress",
                                       retry_after=5) from None
                    await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the lock
