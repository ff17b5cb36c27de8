"""Middleware: start-up/shutdown of the worker's dependencies, and authentication.

Auth rules (docs/api.md, Authentication):
- `--api-key`: every route but /health needs `Authorization: Bearer <key>` (or `X-API-Key`);
- `--admin-key`: the adapter, prefix-cache and weight routes (/load_adapter, /upload_adapter,
  /prepare_adapter, /commit_adapter, /cancel_adapter, /reset_prefix_cache, /update_weights,
  /upload_weights) and vLLM's control routes need it
  (Bearer or `X-Admin-Key`); the admin
  key is accepted wherever the API key is;
- without an admin key the adapter routes accept loopback clients only (the TCP peer address,
  never a forwarded header);
- keys are compared in constant time (`hmac.compare_digest`); 401 when no key or a wrong key
  was sent (as OpenAI answers), 403 when a valid key is not enough (the API key on an adapter
  route guarded by an admin key, or a non-loopback client on an adapter route).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import Optional

from mlxsup.api.errors import ApiError

log = logging.getLogger("mlxsup.api")

OPEN_ROUTES = frozenset({"/health"})
ADMIN_ROUTES = frozenset({"/load_adapter", "/upload_adapter", "/reset_prefix_cache",
                          "/update_weights", "/upload_weights",
                          # a fleet's two-phase swap
                          "/prepare_adapter", "/commit_adapter", "/cancel_adapter",
                          # vLLM's control routes (api/vllm.py)
                          "/pause", "/resume", "/abort_requests", "/v1/load_lora_adapter",
                          "/v1/unload_lora_adapter"})


class LifespanMiddleware:
    """Loads the tokenizer and opens the engine link when the worker starts; closes the link
    when it stops. A missing tokenizer fails start-up (gunicorn then stops with the reason);
    an engine not there yet does not (the link keeps trying; the API answers 503)."""

    def __init__(self, codecs, link):
        self.codecs = codecs
        self.link = link

    async def process_startup(self, scope, event):
        if self.codecs.codec is None:
            await asyncio.get_running_loop().run_in_executor(None, self.codecs.load)
        await self.link.start()

    async def process_shutdown(self, scope, event):
        await self.link.close()


def is_loopback_peer(address: Optional[str]) -> bool:
    """Whether a request's peer address (`req.remote_addr`) is this machine (IPv4-mapped
    IPv6 included; no address is a Unix-socket peer)."""
    if not address:
        return True  # a Unix socket: its file permissions are the access control
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _presented(req) -> list[bytes]:
    keys = []
    auth = req.get_header("Authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            keys.append(value.strip().encode("utf-8", "surrogateescape"))
    for header in ("X-API-Key", "X-Admin-Key"):
        value = req.get_header(header)
        if value:
            keys.append(value.strip().encode("utf-8", "surrogateescape"))
    return keys


def _matches(presented: list[bytes], *secrets: Optional[bytes]) -> bool:
    found = False
    for key in presented:
        for secret in secrets:
            if secret is not None and hmac.compare_digest(key, secret):
                found = True  # no early exit: the time taken does not depend on which matched
    return found


class AuthMiddleware:
    def __init__(self, api_key: Optional[str], admin_key: Optional[str]):
        self.api_key = api_key.encode() if api_key else None
        self.admin_key = admin_key.encode() if admin_key else None

    async def process_request(self, req, resp):
        # The path as falcon's router matches it: the router ignores leading slashes, so
        # "//load_adapter" reaches /load_adapter and must meet the same checks.
        path = "/" + req.path.lstrip("/")
        if path in OPEN_ROUTES:
            return
        presented = _presented(req)
        if path in ADMIN_ROUTES:
            if self.admin_key is not None:
                if presented and not _matches(presented, self.admin_key) and _matches(presented, self.api_key):
                    raise ApiError(403, "forbidden", "the API key does not open adapter routes; send the admin key")
                self._require(presented, self.admin_key, what="the admin key")
                return
            if not is_loopback_peer(req.remote_addr):
                raise ApiError(403, "forbidden", "adapter routes accept loopback clients only when the "
                               "server has no --admin-key")
        if self.api_key is not None:
            self._require(presented, self.api_key, self.admin_key, what="the API key")

    @staticmethod
    def _require(presented, *secrets, what: str) -> None:
        if not presented:
            raise ApiError(401, "unauthorized", f"this route needs {what}: send Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": 'Bearer realm="mlxsup"'})
        if not _matches(presented, *secrets):
            raise ApiError(401, "unauthorized", f"wrong key; this route needs {what}",
                           headers={"WWW-Authenticate": 'Bearer realm="mlxsup", error="invalid_token"'})
