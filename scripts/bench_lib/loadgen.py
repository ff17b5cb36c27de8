"""A closed-loop HTTP load generator (httpx, asyncio), against loopback only.

`concurrency` clients each send a request, wait for its answer, and send the next, until
`num_requests` were sent or `duration_s` passed; requests still open `grace_s` later are cut
(cancelled; the connection closes). Nothing is retried: a refused or reset connection, an
HTTP error and a timeout each count once.

A record per request: start, first token (streamed requests: the first chunk with text;
otherwise the server's own time to first token where it reports one), end, completion and
prompt tokens, the policy versions seen, ok / error / timeout / cut.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import httpx

try:
    import orjson

    def _loads(b):
        return orjson.loads(b)
except ImportError:  # pragma: no cover
    import json

    def _loads(b):
        return json.loads(b)


@dataclass
class Item:
    """One request: a prompt and how many samples of it."""

    text: str
    num_prompt_tokens: int
    n: int = 1
    max_tokens: Optional[int] = None  # None: the run's max_tokens


@dataclass
class Record:
    t_start: float
    t_first: Optional[float] = None
    t_end: Optional[float] = None
    ok: bool = False
    cut: bool = False
    timeout: bool = False
    error: Optional[str] = None
    status: Optional[int] = None
    tokens: int = 0
    prompt_tokens: int = 0
    n: int = 1
    ttft_source: str = ""  # "stream", "server", ""
    versions: list = field(default_factory=list)  # policy versions reported
    token_versions: Optional[list] = None  # version of each token (swap workload only)
    finish: dict = field(default_factory=dict)  # finish_reason -> count
    text: str = ""  # the completion's text (/v1/completions; not written to the records)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "text"}


class Protocol:
    """How to ask one kind of server for a completion and read the answer."""

    path = ""

    def __init__(self, max_tokens: int, temperature: float, eos_ids=(), ignore_eos: bool = True,
                 logprobs: bool = False):
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.eos_ids = list(eos_ids)
        self.ignore_eos = ignore_eos
        self.logprobs = logprobs

    async def send(self, client: httpx.AsyncClient, item: Item, rec: Record, t0: float,
                   on_chunk: Optional[Callable] = None) -> None:
        raise NotImplementedError


class MlxsupGenerate(Protocol):
    """mlxsup's native route: POST /generate (the seed's API), one answer, n samples."""

    path = "/generate"
    keep_token_versions = False

    def body(self, item: Item) -> dict:
        body = {"prompt": item.text, "max_tokens": item.max_tokens or self.max_tokens,
                "temperature": self.temperature}
        if item.n > 1:
            body["n"] = item.n
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.logprobs:
            body["logprobs"] = 1
        return body

    async def send(self, client, item, rec, t0, on_chunk=None):
        r = await client.post(self.path, json=self.body(item))
        now = time.perf_counter() - t0
        rec.status = r.status_code
        if r.status_code != 200:
            rec.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return
        data = _loads(r.content)
        results = data["results"] if "results" in data else [data]
        ttfts = []
        for res in results:
            rec.tokens += len(res.get("completion_ids") or ())
            rec.prompt_tokens = len(res.get("prompt_ids") or ()) or rec.prompt_tokens
            reason = res.get("finish_reason") or "?"
            rec.finish[reason] = rec.finish.get(reason, 0) + 1
            meta = res.get("metadata") or {}
            token_versions = res.get("token_versions")
            if token_versions:
                rec.versions.append(sorted(set(token_versions)))
                if self.keep_token_versions and rec.token_versions is None:
                    rec.token_versions = list(token_versions)
            elif "generated_by_version" in res:
                rec.versions.append([res["generated_by_version"]])
            if "ttft_ms" in meta and "latency_ms" in meta:
                # the engine's time from arrival to first token, placed on the client's clock
                ttfts.append(now - (meta["latency_ms"] - meta["ttft_ms"]) / 1000.0)
        if ttfts:
            rec.t_first = max(rec.t_start, min(ttfts))
            rec.ttft_source = "server"
        rec.t_end = now
        rec.ok = True


class OpenAICompletions(Protocol):
    """POST /v1/completions, streamed (server-sent events) or not. With `ignore_eos` every
    completion runs to max_tokens: mlxsup gets its `ignore_eos` field, mlx-lm's server (which
    has none) a logit bias of -1e9 on the EOS tokens."""

    path = "/v1/completions"

    def __init__(self, *a, stream: bool = True, is_mlx_lm: bool = True, **kw):
        super().__init__(*a, **kw)
        self.stream = stream
        self.is_mlx_lm = is_mlx_lm

    def body(self, item: Item) -> dict:
        body = {"model": "default_model", "prompt": item.text,
                "max_tokens": item.max_tokens or self.max_tokens,
                "temperature": self.temperature, "stream": self.stream}
        if item.n > 1:
            body["n"] = item.n
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos and self.is_mlx_lm and self.eos_ids:
            body["logit_bias"] = {str(t): -1e9 for t in self.eos_ids}
        elif self.ignore_eos and not self.is_mlx_lm:
            body["ignore_eos"] = True
        if self.logprobs:  # mlx-lm takes a boolean (chat style), mlxsup OpenAI's integer
            body["logprobs"] = True if self.is_mlx_lm else 1
        return body

    async def send(self, client, item, rec, t0, on_chunk=None):
        if not self.stream:
            r = await client.post(self.path, json=self.body(item))
            rec.status = r.status_code
            rec.t_end = time.perf_counter() - t0
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return
            data = _loads(r.content)
            self._read_final(data, rec)
            rec.ok = True
            return
        async with client.stream("POST", self.path, json=self.body(item)) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                rec.t_end = time.perf_counter() - t0
                rec.error = f"HTTP {r.status_code}: {text[:200]}"
                return
            chunks = 0
            usage_tokens = None
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # keep-alive comments, blank separators
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter() - t0
                data = _loads(payload)
                if data.get("error"):
                    rec.error = f"stream error: {str(data['error'])[:200]}"
                    rec.t_end = now
                    return
                for choice in data.get("choices") or ():
                    if choice.get("text"):
                        rec.text += choice["text"]
                        chunks += 1
                        if rec.t_first is None:
                            rec.t_first = now
                            rec.ttft_source = "stream"
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
                        rec.finish[reason] = rec.finish.get(reason, 0) + 1
                version = _version_of(data)
                if version is not None:
                    if not rec.versions or rec.versions[-1] != version:
                        rec.versions.append(version)
                    if on_chunk is not None:
                        on_chunk(now, version)
                usage = data.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    rec.prompt_tokens = usage.get("prompt_tokens") or rec.prompt_tokens
            rec.tokens = usage_tokens if usage_tokens is not None else chunks
            rec.t_end = time.perf_counter() - t0
            rec.ok = rec.error is None

    def _read_final(self, data: dict, rec: Record) -> None:
        usage = data.get("usage") or {}
        rec.tokens = usage.get("completion_tokens", 0)
        rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
        for choice in data.get("choices") or ():
            rec.text = rec.text or choice.get("text") or ""
            reason = choice.get("finish_reason") or "?"
            rec.finish[reason] = rec.finish.get(reason, 0) + 1
        version = _version_of(data)
        if version is not None:
            rec.versions.append(version)


def _version_of(data: dict):
    for key in ("policy_version", "mlxsup_policy_version"):
        if key in data:
            return data[key]
    for choice in data.get("choices") or ():
        for key in ("policy_version", "versions"):
            if key in choice:
                v = choice[key]
                return max(v) if isinstance(v, list) and v else v
    return None


def _describe(e: BaseException) -> str:
    """The exception and its causes: httpx's ReadError says nothing by itself; down the chain
    it is a reset connection or an unexpected close."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen and len(parts) < 5:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}({e})" if str(e) else type(e).__name__)
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)[:240]


async def closed_loop(base_url: str, protocol: Protocol, items: list[Item], concurrency: int,
                      num_requests: int, duration_s: float, grace_s: float,
                      request_timeout: float, on_chunk: Optional[Callable] = None,
                      t0: Optional[float] = None, client: str = "httpx") -> tuple[list[Record], float]:
    """Run one closed loop; returns the records and the elapsed seconds (first send to the
    last answer, or to the cut). `client` "raw": bench_lib/rawhttp.py's lean client (no
    streaming), whose own cost stays out of a burst's figures."""
    records: list[Record] = []
    counter = iter(range(num_requests))
    t0 = time.perf_counter() if t0 is None else t0
    if client == "raw":
        from bench_lib.rawhttp import RawClient

        session = RawClient(base_url, request_timeout)
    else:
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        timeout = httpx.Timeout(request_timeout, connect=min(30.0, request_timeout))
        session = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout)
    async with session as client:

        async def worker():
            for i in counter:
                now = time.perf_counter() - t0
                if now >= duration_s:
                    return
                item = items[i % len(items)]
                rec = Record(t_start=now, prompt_tokens=item.num_prompt_tokens, n=item.n)
                records.append(rec)
                try:
                    await protocol.send(client, item, rec, t0, on_chunk)
                except httpx.TimeoutException as e:
                    rec.timeout = True
                    rec.error = f"timeout: {type(e).__name__}"
                except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
                    rec.error = _describe(e)
                if rec.t_end is None and not rec.cut:
                    rec.t_end = time.perf_counter() - t0

        tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        remaining = max(0.0, duration_s + grace_s - (time.perf_counter() - t0))
        _, pending = await asyncio.wait(tasks, timeout=remaining)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - t0
        for rec in records:
            if not rec.ok and rec.error is None:
                rec.cut = True
                rec.t_end = None
    if records and not any(r.cut for r in records):
        ends = [r.t_end for r in records if r.t_end is not None]
        elapsed = max(ends) if ends else elapsed
    return records, elapsed
