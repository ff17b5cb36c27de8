"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Shapes follow the OpenAI API so the official `openai` SDK works unchanged, streaming (SSE,
`data: [DONE]` at the end) included. OpenAI parameters we do not implement are accepted and
ignored (listed in `openai_protocol.OPENAI_*_IGNORED` and docs/api.md); other unknown fields are refused.
Log-probs: only the sampled token's is known, so `top_logprobs` lists that one token.
A streamed request's first engine event is awaited before the response starts, so errors that
come before any token (overloaded, invalid) still answer with their HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Optional

import orjson
from falcon.asgi import SSEvent

from mlxsup.api.common import (
    gather_or_cancel,
    limits_of,
    logprobs_mode_for,
    max_tokens_per_prompt,
    new_request_id,
    prompt_ids_from,
    sampling_params,
    send_json,
    stop_list,
)
from mlxsup.api.errors import ApiError, unavailable
from mlxsup.api.media import read_json_object
from mlxsup.api.openai_protocol import ChatCompletionRequest, CompletionRequest
from mlxsup.api.parsing import parse_body
from mlxsup.api.protocol import json_logprobs
from mlxsup.api.textcodec import TextStream, cut_at_stop
from mlxsup.ipc.messages import SequenceDone

CREATED_AT = int(time.time())
OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI


def served_model_name(config) -> str:
    """The one model id this server lists: `--model` as given, or "mlxsup-demo"."""
    return config.model if config.model is not None else "mlxsup-demo"


class ModelsResource:
    def __init__(self, link, config):
        self.link = link
        self.name = served_model_name(config)

    async def on_get(self, req, resp):
        send_json(resp, {"object": "list", "data": [
            {"id": self.name, "object": "model", "created": CREATED_AT, "owned_by": "mlxsup",
             "max_model_len": self.link.status().context_length},
        ]})


class _Job:
    """One validated OpenAI request, ready for the engine."""

    def __init__(self, *, prompts, prompt_texts, params, n, min_version, model, stops, tag,
                 cache_salt=""):
        self.cache_salt = cache_salt
        self.prompts = prompts
        self.prompt_texts = prompt_texts
        self.params = params  # one SamplingParams per prompt (max_tokens may differ)
        self.n = n
        self.min_version = -1 if min_version is None else min_version
        self.model = model
        self.stops = stops
        self.tag = tag
        self.created = int(time.time())


class _OpenAIResource:
    chat: bool = False
    model = None  # the request body's model class

    def __init__(self, link, codecs, config):
        self.link = link
        self.codecs = codecs
        self.config = config

    async def on_post(self, req, resp):
        limits = limits_of(self.link, self.config)
        body = parse_body(self.model, await read_json_object(req), limits)
        codec = self.codecs.get()
        job = self.build(codec, body, limits.context_length)
        status = self.link.status()
        if not status.is_ready:
            raise unavailable(status.why_not_ready())
        if body.stream:
            await self.start_stream(req, resp, codec, body, job)
            return
        outcomes = await gather_or_cancel((
            self.link.generate(ids, params, n=job.n, min_policy_version=job.min_version, tag=job.tag,
                               cache_salt=job.cache_salt)
            for ids, params in zip(job.prompts, job.params)
        ))
        choices = []
        completion_tokens = cached_tokens = 0
        for p, samples in enumerate(outcomes):
            cached_tokens += samples[0].num_cached_tokens if samples else 0
            for done in samples:
                completion_tokens += len(done.token_ids)
                choices.append(self.choice(codec, body, job, p, done))
        prompt_tokens = sum(len(ids) for ids in job.prompts)
        send_json(resp, {
            "id": job.tag,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": job.created,
            "model": job.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens, cached_tokens),
            "policy_version": self.link.status().policy_version,
        })

    # ------------------------------------------------------------------ streaming

    async def start_stream(self, req, resp, codec, body, job):
        events = _merged_streams(self.link, job)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await events.aclose()
            raise
        resp.content_type = "text/event-stream"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")
        resp.sse = self._sse(codec, body, job, first, events)

    async def _sse(self, codec, body, job, first, events):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        states: dict[int, _ChoiceState] = {}
        completion_tokens = 0
        cached: dict[int, int] = {}  # prompt index -> its prompt tokens from the prefix cache

        def chunk(choices, usage=False):
            obj = {
                "id": job.tag,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": job.created,
                "model": job.model,
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                obj["usage"] = None
            return SSEvent(data=orjson.dumps(obj))

        try:
            pending = [] if first is None else [first]
            while True:
                if pending:
                    p, event = pending.pop()
                else:
                    try:
                        p, event = await events.__anext__()
                    except StopAsyncIteration:
                        break
                index = p * job.n + event.seq_index
                state = states.get(index)
                if state is None:
                    state = states[index] = _ChoiceState(codec.text_stream(job.stops))
                    if self.chat:
                        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                    elif getattr(body, "echo", False):
                        yield chunk([{"index": index, "text": job.prompt_texts[p], "logprobs": None,
                                      "finish_reason": None}])
                completion_tokens += len(event.token_ids)
                text = state.stream.push(event.token_ids)
                finish = None
                if isinstance(event, SequenceDone):
                    cached[p] = event.num_cached_tokens  # (the same for every sample of a prompt)
                    text += state.stream.finish()
                    finish = event.finish_reason
                logprobs = self.stream_logprobs(codec, body, state, event)
                if text or logprobs is not None or finish is not None:
                    yield chunk([self.stream_choice(index, text, logprobs, finish)])
            if include_usage:
                prompt_tokens = sum(len(ids) for ids in job.prompts)
                obj = {"id": job.tag, "object": "chat.completion.chunk" if self.chat else "text_completion",
                       "created": job.created, "model": job.model, "system_fingerprint": None,
                       "choices": [], "usage": _usage(prompt_tokens, completion_tokens,
                                                      sum(cached.values()))}
                yield SSEvent(data=orjson.dumps(obj))
        except ApiError as e:
            yield SSEvent(data=orjson.dumps(e.body(openai=True)))
        finally:
            await events.aclose()
        yield SSEvent(data=b"[DONE]")


class _ChoiceState:
    def __init__(self, stream: TextStream):
        self.stream = stream
        self.text_offset = 0


class CompletionsResource(_OpenAIResource):
    chat = False
    model = CompletionRequest

    def build(self, codec, body, context_length) -> _Job:
        prompt = body.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            prompts = prompt_ids_from(codec, text=prompt)
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
        else:
            prompts = prompt_ids_from(codec, ids=prompt, names=("prompt", "prompt", "prompt"))
            texts = [codec.decode(ids) for ids in prompts] if body.echo else [""] * len(prompts)
        max_tokens = max_tokens_per_prompt(prompts, body.max_tokens, OPENAI_DEFAULT_MAX_TOKENS, context_length,
                                           "prompt")
        return _job(body, prompts, texts, max_tokens, body.logprobs is not None, served_model_name(self.config))

    def choice(self, codec, body, job, p, done):
        text = cut_at_stop(codec.decode(done.token_ids), job.stops)
        prefix = job.prompt_texts[p] if body.echo else ""
        return {
            "index": p * job.n + done.seq_index,
            "text": prefix + text,
            "logprobs": self.legacy_logprobs(codec, body, done.token_ids, done.logprobs, len(prefix)),
            "finish_reason": done.finish_reason,
        }

    def legacy_logprobs(self, codec, body, token_ids, logprobs, offset) -> Optional[dict]:
        if body.logprobs is None or (token_ids and not logprobs):
            return None
        tokens = [codec.token_text(t) for t in token_ids]
        logprobs = json_logprobs(logprobs)
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": logprobs,
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs)] if body.logprobs > 0 else None,
            "text_offset": offsets,
        }

    def stream_logprobs(self, codec, body, state, event):
        if body.logprobs is None or not event.token_ids or not event.logprobs:
            return None
        out = self.legacy_logprobs(codec, body, event.token_ids, event.logprobs, state.text_offset)
        state.text_offset = out["text_offset"][-1] + len(out["tokens"][-1]) if out["tokens"] else state.text_offset
        return out

    def stream_choice(self, index, text, logprobs, finish):
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


class ChatCompletionsResource(_OpenAIResource):
    chat = True
    model = ChatCompletionRequest

    def build(self, codec, body, context_length) -> _Job:
        (prompt,) = prompt_ids_from(codec, messages=body.messages, names=("messages",) * 3)
        # max_completion_tokens wins over max_tokens; an error names the field the client gave
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = max_tokens_per_prompt([prompt], body.max_completion_tokens or body.max_tokens,
                                           self.config.max_tokens, context_length, "messages", field)
        return _job(body, [prompt], [""], max_tokens, body.logprobs, served_model_name(self.config))

    def entries(self, codec, body, token_ids, logprobs) -> list:
        top = body.top_logprobs or 0
        out = []
        for t, lp in zip(token_ids, json_logprobs(logprobs)):
            text = codec.token_text(t)
            raw = list(text.encode("utf-8", "replace"))
            entry = {"token": text, "logprob": lp, "bytes": raw,
                     "top_logprobs": [{"token": text, "logprob": lp, "bytes": raw}] if top else []}
            out.append(entry)
        return out

    def choice(self, codec, body, job, p, done):
        text = cut_at_stop(codec.decode(done.token_ids), job.stops)
        logprobs = None
        if body.logprobs and (done.logprobs or not done.token_ids):
            logprobs = {"content": self.entries(codec, body, done.token_ids, done.logprobs), "refusal": None}
        return {
            "index": p * job.n + done.seq_index,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs,
            "finish_reason": done.finish_reason,
        }

    def stream_logprobs(self, codec, body, state, event):
        if not body.logprobs or not event.token_ids or not event.logprobs:
            return None
        return {"content": self.entries(codec, body, event.token_ids, event.logprobs), "refusal": None}

    def stream_choice(self, index, text, logprobs, finish):
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _job(body, prompts, texts, max_tokens: list, wants_logprobs, model_name) -> _Job:
    stops = stop_list(body.stop)
    mode = logprobs_mode_for(wants_logprobs, body.logprobs_mode)
    params = [sampling_params(body, max_tokens=m, stops=stops, logprobs_mode=mode) for m in max_tokens]
    prefix = "chatcmpl" if isinstance(body, ChatCompletionRequest) else "cmpl"
    return _Job(prompts=prompts, prompt_texts=texts, params=params, n=body.n,
                min_version=body.min_policy_version, model=body.model or model_name,
                stops=stops, tag=new_request_id(prefix), cache_salt=body.cache_salt)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


async def _merged_streams(link, job: _Job):
    """(prompt index, event) from every prompt's stream, as they come."""
    if len(job.prompts) == 1:
        async with contextlib.aclosing(link.stream(job.prompts[0], job.params[0], n=job.n,
                                                   min_policy_version=job.min_version, tag=job.tag,
                               cache_salt=job.cache_salt)) as events:
            async for event in events:
                yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(p, ids):
        try:
            async with contextlib.aclosing(link.stream(ids, job.params[p], n=job.n,
                                                       min_policy_version=job.min_version, tag=job.tag,
                               cache_salt=job.cache_salt)) as events:
                async for event in events:
                    await queue.put((p, event))
            await queue.put((p, end))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            await queue.put((p, e))

    tasks = [asyncio.ensure_future(pump(p, ids)) for p, ids in enumerate(job.prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            p, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield p, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

