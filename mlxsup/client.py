"""Async Python client for an mlxsup server.

    async with InferenceClient("http://localhost:8000") as client:
        result = await client.generate(prompt="What is RL?", temperature=0.7, max_tokens=100,
                                       policy_version=1, step_id=100)
        print(result["text"])
        print((await client.load_adapter("/path/to/adapter"))["policy_version"])

One `httpx.AsyncClient` underneath, so connections are reused across calls. A 503 (server
overloaded or its engine restarting) is retried with exponential backoff that honours the
server's `Retry-After`, a bounded number of times; so is a refused connection. Every other
error status is raised at once as a typed `InferenceError` carrying the server's message and,
for a schema error, the offending field.

This module imports httpx and the standard library only, never mlx, gunicorn or falcon: a
trainer process that holds its own model on its own device can import it freely.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import httpx

__all__ = [
    "InferenceClient",
    "InferenceError",
    "BadRequestError",
    "ValidationError",
    "AuthError",
    "NotFoundError",
    "PayloadTooLargeError",
    "OverloadedError",
    "ServerError",
    "ServerUnavailableError",
    "as_results",
    "FleetClient",
    "FleetSwap",
    "FleetSwapError",
]


# ------------------------------------------------------------------------------ errors


class InferenceError(Exception):
    """Base of every error this client raises.

    `status` is the HTTP status (None when no response came back), `type` and `field` are the
    server's `{"error": {"type", "message", "field"}}` values, `body` the decoded response."""

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        type: Optional[str] = None,
        field: Optional[str] = None,
        body: Any = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.field = field
        self.body = body

    def __str__(self) -> str:
        parts = [self.message]
        if self.field:
            parts.append(f"(field: {self.field})")
        if self.status is not None:
            parts.append(f"[HTTP {self.status}]")
        return " ".join(parts)


class BadRequestError(InferenceError):
    """400: the body is not valid JSON or the request is malformed."""


class ValidationError(BadRequestError):
    """422: valid JSON that breaks the schema; `field` names the offending field."""


class AuthError(InferenceError):
    """401 or 403: a missing or wrong API key (or admin key for the adapter routes)."""


class NotFoundError(InferenceError):
    """404: unknown route, or an adapter path that does not exist."""


class PayloadTooLargeError(InferenceError):
    """413: the request (for example an uploaded adapter) exceeds the server's limit."""


class ServerError(InferenceError):
    """5xx other than 503: a failure inside the server."""


class OverloadedError(ServerError):
    """503 after every retry: the queue is full or the engine is restarting.

    `retry_after` is the server's last `Retry-After` in seconds (None if it sent none)."""

    def __init__(self, message: str, *, retry_after: Optional[float] = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerUnavailableError(InferenceError):
    """No HTTP response at all: connection refused or reset, or the request timed out."""


_STATUS_ERRORS = {
    400: BadRequestError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: ValidationError,
}


def _error_from_response(response: httpx.Response) -> InferenceError:
    body: Any
    try:
        body = response.json()
    except ValueError:
        body = response.text
    message, etype, field = None, None, None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message, etype, field = err.get("message"), err.get("type"), err.get("field")
    elif isinstance(body, dict):  # e.g. /health's {"status": "unavailable", "reason": ...}
        for key in ("message", "reason", "detail"):  # "detail": FastAPI-style servers
            if body.get(key):
                message = str(body[key])
                break
    if not message:
        text = body if isinstance(body, str) else json.dumps(body)
        message = text.strip()[:500] or response.reason_phrase or "error"
    status = response.status_code
    kw = dict(status=status, type=etype, field=field, body=body)
    if status == 503:
        return OverloadedError(message, retry_after=_retry_after_seconds(response), **kw)
    cls = _STATUS_ERRORS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else InferenceError
    return cls(message, **kw)


def _retry_after_seconds(response: httpx.Response) -> Optional[float]:
    """`Retry-After` as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def as_results(response: Mapping[str, Any]) -> list[dict]:
    """The list of results of a `/generate` response, whichever shape it has: one prompt with
    n=1 answers a bare result, anything else `{"results": [...]}` (prompt order, the n samples
    of a prompt next to each other)."""
    if "results" in response:
        return list(response["results"])
    return [dict(response)]


# ------------------------------------------------------------------------------ client


_Prompt = Union[str, Sequence[str]]


class InferenceClient:
    """Async client for one mlxsup server (or any server with the seed's `/generate` API).

    Args:
        base_url: e.g. "http://localhost:8000".
        api_key: sent as `Authorization: Bearer <api_key>` on every request.
        admin_key: sent instead of `api_key` on the adapter routes (`/load_adapter`,
            `/upload_adapter`) when the server protects them with a separate key.
        timeout: seconds for a whole request (generation included) unless a call gives its own.
        connect_timeout: seconds to establish a connection.
        max_retries: how many times a 503 or a refused connection is retried (0: never).
        backoff_base, backoff_max: the wait before retry k is min(backoff_max,
            backoff_base * 2**k) with jitter, or the server's `Retry-After` when it sent one
            (capped at `max_retry_after`).
        max_connections: size of the connection pool (concurrent requests beyond it wait).
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        api_key: Optional[str] = None,
        admin_key: Optional[str] = None,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        max_retries: int = 5,
        backoff_base: float = 0.25,
        backoff_max: float = 8.0,
        max_retry_after: float = 30.0,
        max_connections: int = 256,
        headers: Optional[Mapping[str, str]] = None,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ):
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_key = admin_key
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.num_retries = 0  # total retries made by this client (observability)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=dict(headers or {}),
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    # -------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> "InferenceClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -------------------------------------------------------------- routes

    async def generate(
        self,
        prompt: Optional[_Prompt] = None,
        *,
        prompt_ids: Optional[Union[Sequence[int], Sequence[Sequence[int]]]] = None,
        messages: Optional[Sequence[Any]] = None,
        n: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        repetition_context_size: Optional[int] = None,
        max_tokens: Optional[int] = None,
        logprobs: Optional[int] = None,
        logprobs_mode: Optional[str] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        seed: Optional[int] = None,
        policy_version: Optional[Union[int, str]] = None,
        step_id: Optional[int] = None,
        request_id: Optional[str] = None,
        min_policy_version: Optional[int] = None,
        timeout: Optional[float] = None,
        **fields: Any,
    ) -> dict:
        """POST /generate and return the server's JSON unchanged.

        Give exactly one of `prompt` (a string or a list of strings), `prompt_ids` (a list of
        token ids, or a list of such lists) or `messages` (chat messages; the server applies
        the model's chat template). Arguments left as None are not sent, so the server's
        defaults apply. One prompt with n=1 answers a bare result; anything else
        `{"results": [...]}` (`as_results` turns either into a list). Extra keyword arguments
        are sent as they are (the server rejects fields it does not know, with a
        ValidationError naming them)."""
        body = _drop_none(
            prompt=_listify(prompt),
            prompt_ids=prompt_ids,
            messages=messages,
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            repetition_context_size=repetition_context_size,
            max_tokens=max_tokens,
            logprobs=logprobs,
            logprobs_mode=logprobs_mode,
            stop=_listify(stop),
            seed=seed,
            policy_version=policy_version,
            step_id=step_id,
            request_id=request_id,
            min_policy_version=min_policy_version,
        )
        body.update(fields)
        return await self._request("POST", "/generate", json=body, timeout=timeout)

    async def generate_results(self, *args: Any, **kwargs: Any) -> list[dict]:
        """`generate`, always answered as a list of results (prompt order, samples of a
        prompt adjacent)."""
        return as_results(await self.generate(*args, **kwargs))

    async def score(
        self,
        prompt_ids: Sequence[int],
        completion_ids: Sequence[int],
        *,
        timeout: Optional[float] = None,
        **fields: Any,
    ) -> dict:
        """POST /score: the teacher-forced log-probability of each completion token under the
        server's current weights (and the version that computed them)."""
        body = {"prompt_ids": list(prompt_ids), "completion_ids": list(completion_ids), **fields}
        return await self._request("POST", "/score", json=body, timeout=timeout)

    async def load_adapter(
        self,
        adapter_path: Optional[str],
        *,
        mode: Optional[str] = None,
        timeout: Optional[float] = None,
        **fields: Any,
    ) -> dict:
        """POST /load_adapter: swap in the LoRA adapter in `adapter_path` (a directory with
        adapter_config.json and adapters.safetensors, on the server's file system; None goes
        back to the base model). `mode` is the commit mode ("drain", the server's default,
        "abort" or "inflight"). Answers `{status, policy_version, message}`; the version moves
        only when the swap commits."""
        body = {"adapter_path": adapter_path, **_drop_none(mode=mode), **fields}
        return await self._request(
            "POST", "/load_adapter", json=body, timeout=timeout, admin=True
        )

    async def prepare_adapter(
        self,
        adapter_path: Optional[str],
        *,
        ttl_s: Optional[float] = None,
        timeout: Optional[float] = None,
    ) -> dict:
        """POST /prepare_adapter: the first phase of a two-phase swap. The server reads, checks
        and readies the adapter without committing it; answers `{status: "prepared",
        prepared_id, policy_version, next_policy_version, expires_in_s, ...}`. Commit it with
        `commit_adapter` or drop it with `cancel_adapter` (it is dropped after `ttl_s`)."""
        body = {"adapter_path": adapter_path, **_drop_none(ttl_s=ttl_s)}
        return await self._request("POST", "/prepare_adapter", json=body, timeout=timeout, admin=True)

    async def commit_adapter(
        self,
        prepared_id: str,
        *,
        mode: Optional[str] = None,
        policy_version: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> dict:
        """POST /commit_adapter: commit a prepared swap in `mode`, as `policy_version` when
        given (at least the server's next version). Answers as `load_adapter`."""
        body = {"prepared_id": prepared_id, **_drop_none(mode=mode, policy_version=policy_version)}
        return await self._request("POST", "/commit_adapter", json=body, timeout=timeout, admin=True)

    async def cancel_adapter(self, prepared_id: str, *, timeout: Optional[float] = None) -> dict:
        """POST /cancel_adapter: drop a prepared swap; nothing else changes."""
        return await self._request("POST", "/cancel_adapter", json={"prepared_id": prepared_id},
                                   timeout=timeout, admin=True)

    async def upload_adapter(
        self,
        adapter_dir: Optional[str] = None,
        *,
        weights: Optional[Union[bytes, str]] = None,
        config: Optional[Union[bytes, str, Mapping[str, Any]]] = None,
        mode: Optional[str] = None,
        timeout: Optional[float] = None,
        **fields: Any,
    ) -> dict:
        """POST /upload_adapter (multipart): send an adapter from this machine's disk (or from
        memory) and swap it in. Give `adapter_dir` (holding adapters.safetensors and
        adapter_config.json), or `weights` and `config` as bytes, file paths, or (config only)
        a dict. `mode` and extra keyword arguments travel as form fields."""
        if mode is not None:
            fields["mode"] = mode
        if adapter_dir is not None:
            weights = weights or os.path.join(adapter_dir, "adapters.safetensors")
            config = config or os.path.join(adapter_dir, "adapter_config.json")
        if weights is None or config is None:
            raise ValueError("give adapter_dir, or both weights and config")
        weights_bytes = _read_bytes(weights)
        if isinstance(config, Mapping):
            config_bytes = json.dumps(dict(config)).encode()
        else:
            config_bytes = _read_bytes(config)
        files = {
            "adapter_weights": ("adapters.safetensors", weights_bytes, "application/octet-stream"),
            "adapter_config": ("adapter_config.json", config_bytes, "application/json"),
        }
        data = {k: str(v) for k, v in fields.items()}
        return await self._request(
            "POST", "/upload_adapter", files=files, data=data or None, timeout=timeout, admin=True
        )

    async def update_weights(
        self,
        weight_dir: str,
        *,
        mode: Optional[str] = None,
        timeout: Optional[float] = None,
        **fields: Any,
    ) -> dict:
        """POST /update_weights: replace the model's parameters held in the safetensors files of
        `weight_dir` (on the server's file system; all of them or any subset, under the names
        mlx_lm.load accepts). Answers `{status, policy_version, num_tensors, ...}`; the version
        moves only when the update commits (on the adapters' counter)."""
        body = {"weight_dir": weight_dir, **_drop_none(mode=mode), **fields}
        return await self._request("POST", "/update_weights", json=body, timeout=timeout, admin=True)

    async def upload_weights(
        self,
        weights: Union[str, bytes, Iterable[Union[str, bytes]]],
        *,
        mode: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> dict:
        """POST /upload_weights (multipart): send safetensors files from this machine and
        commit them. `weights` is a directory (its *.safetensors files, in name order), a file
        path, bytes, or a list of paths and bytes. Files are streamed from disk, not read
        into memory."""
        if isinstance(weights, (str, bytes, bytearray)):
            weights = [weights]
        sources: list = []
        for w in weights:
            if isinstance(w, str) and os.path.isdir(w):
                sources += [os.path.join(w, f) for f in sorted(os.listdir(w))
                            if f.endswith(".safetensors") and not f.startswith(".")]
            else:
                sources.append(w)
        if not sources:
            raise ValueError("no safetensors files to upload")
        opened = []
        try:
            files = []
            for i, src in enumerate(sources):
                if isinstance(src, (bytes, bytearray)):
                    body: Any = bytes(src)
                else:
                    body = open(src, "rb")
                    opened.append(body)
                files.append(("weights", (f"{i:05d}.safetensors", body, "application/octet-stream")))
            data = {"mode": mode} if mode is not None else None
            return await self._request("POST", "/upload_weights", files=files, data=data,
                                       timeout=timeout, admin=True)
        finally:
            for f in opened:
                f.close()

    async def health(self, *, timeout: Optional[float] = None) -> dict:
        """GET /health. Raises (OverloadedError after retries) while the server is not ready."""
        return await self._request("GET", "/health", timeout=timeout)

    async def metrics(self, *, format: str = "json", timeout: Optional[float] = None) -> Union[dict, str]:
        """GET /metrics: a dict (`format="json"`), or the Prometheus text (`"prometheus"`)."""
        accept = {"json": "application/json", "prometheus": "text/plain"}.get(format)
        if accept is None:
            raise ValueError("format must be 'json' or 'prometheus'")
        return await self._request("GET", "/metrics", timeout=timeout, headers={"Accept": accept})

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.2) -> dict:
        """Poll /health until the server answers healthy; return that answer.

        Raises `TimeoutError` (with the last error seen) when `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.base_url} not ready within {timeout:.1f} s: {last}")
            try:
                answer = await self._request(
                    "GET", "/health", timeout=max(0.1, min(remaining, 5.0)), retries=0
                )
                if not isinstance(answer, dict) or answer.get("status") in (None, "ok", "healthy"):
                    return answer
                last = answer
            except (ServerUnavailableError, ServerError) as e:
                last = e
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    # -------------------------------------------------------------- transport

    def _auth_headers(self, admin: bool) -> dict:
        key = (self.admin_key or self.api_key) if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        delay = min(self.backoff_max, self.backoff_base * (2**attempt))
        return delay * (0.5 + random.random() / 2)  # jitter: retries of many clients spread

    async def _request(
        self,
        method: str,
        path: str,
        *,
        timeout: Optional[float] = None,
        admin: bool = False,
        retries: Optional[int] = None,
        **kwargs: Any,
    ) -> Any:
        retries = self.max_retries if retries is None else retries
        headers = {**self._auth_headers(admin), **kwargs.pop("headers", {})}
        extra = {} if timeout is None else {"timeout": timeout}
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    method, path, headers=headers, **extra, **kwargs
                )
            except httpx.ConnectError as e:
                # Nothing reached the server: retrying is safe for every route.
                if attempt < retries:
                    await asyncio.sleep(self._backoff(attempt, None))
                    attempt += 1
                    self.num_retries += 1
                    continue
                raise ServerUnavailableError(
                    f"cannot connect to {self.base_url}: {e}"
                ) from e
            except httpx.TimeoutException as e:
                raise ServerUnavailableError(
                    f"{method} {path} timed out ({type(e).__name__})"
                ) from e
            except httpx.TransportError as e:
                raise ServerUnavailableError(f"{method} {path} failed: {e!r}") from e
            if response.status_code < 400:
                return _decode(response)
            error = _error_from_response(response)
            if isinstance(error, OverloadedError) and attempt < retries:
                await asyncio.sleep(self._backoff(attempt, error.retry_after))
                attempt += 1
                self.num_retries += 1
                continue
            raise error


def _decode(response: httpx.Response) -> Any:
    ctype = response.headers.get("content-type", "")
    if "json" in ctype or (not ctype and response.content[:1] in (b"{", b"[")):
        return response.json()
    return response.text


def _drop_none(**kw: Any) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _listify(value: Any) -> Any:
    """Tuples (and other non-str sequences) as lists, so JSON gets arrays."""
    if value is None or isinstance(value, (str, list)):
        return value
    if isinstance(value, Iterable):
        return list(value)
    return value


def _read_bytes(value: Union[bytes, str]) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    with open(value, "rb") as f:
        return f.read()


def __getattr__(name: str) -> Any:
    # The fleet (several servers swapped together) lives in mlxsup.fleet, which imports this
    # module; its names are importable from here too.
    if name in ("FleetClient", "FleetSwap", "FleetSwapError"):
        from mlxsup import fleet

        return getattr(fleet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
