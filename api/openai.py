"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Shapes follow the OpenAI API so the official `openai` SDK works unchanged, streaming (SSE,
`data: [DONE]` at the end) included. OpenAI parameters we do not implement are accepted and
ignored (listed in `openai_protocol.OPENAI_*_IGNORED` and docs/api.md); other unknown fields are refused.
Log-probs: the sampled token's and, under `top_logprobs`, the k most likely tokens' of each
position in the request's logprobs mode (plus the sampled token when it is not among them, as
vLLM does). vLLM's extensions are served too: `return_token_ids`, `return_tokens_as_token_ids`,
`prompt_logprobs`, and `echo` with the prompt's teacher-forced log-probs (the /score path; raw,
as vLLM's prompt log-probs), `max_tokens: 0` included. Log-probs of -inf are -9999.0
(`protocol.LOGPROB_FLOOR`).
A streamed request's first engine event is awaited before the response starts, so errors that
come before any token (overloaded, invalid) still answer with their HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Optional

import orjson
from falcon.asgi import SSEvent

from mlxsup.api.common import (
    begin_sse,
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
from mlxsup.api.errors import ApiError, invalid, unavailable
from mlxsup.api.media import read_json_object
from mlxsup.api.openai_protocol import ChatCompletionRequest, CompletionRequest
from mlxsup.api.parsing import parse_body
from mlxsup.api.textcodec import TextStream, cut_at_stop
from mlxsup.api.tools import ToolParser, ToolSplitter
from mlxsup.api.vllm import logprob_content, prompt_logprobs_list, score_prompt
from mlxsup.ipc.messages import FINISH_LENGTH, SequenceDone

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
                 generates=True, prompt_top=None, cache_salt=""):
        self.generates = generates  # False: max_tokens 0 (echo and prompt log-probs only)
        self.prompt_top = prompt_top  # top log-probs per prompt position; None: no prompt scoring
        self.prompt_results: list = [None] * len(prompts)  # the prompts' ScoreResults
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
            if job.prompt_top is not None:
                job.prompt_results = await gather_or_cancel(
                    score_prompt(self.link, ids, job.prompt_top, job.tag, job.cache_salt) for ids in job.prompts)
            await self.start_stream(req, resp, codec, body, job)
            return
        outcomes = await gather_or_cancel(self.run_prompt(job, p) for p in range(len(job.prompts)))
        choices = []
        completion_tokens = cached_tokens = 0
        for p, samples in enumerate(outcomes):
            cached_tokens += samples[0].num_cached_tokens if samples else 0
            for done in samples:
                completion_tokens += len(done.token_ids)
                choices.append(self.choice(codec, body, job, p, done))
        prompt_tokens = sum(len(ids) for ids in job.prompts)
        answer = {
            "id": job.tag,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": job.created,
            "model": job.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens, cached_tokens),
            "policy_version": self.link.status().policy_version,
        }
        if self.chat:  # (completions: per choice, one prompt each)
            if body.return_token_ids:
                answer["prompt_token_ids"] = job.prompts[0]
            if body.prompt_logprobs is not None:
                answer["prompt_logprobs"] = prompt_logprobs_list(
                    codec, job.prompts[0], job.prompt_results[0], body.prompt_logprobs)
        send_json(resp, answer)

    async def run_prompt(self, job: _Job, p: int) -> list[SequenceDone]:
        """The samples of prompt `p`, and (kept on the job) its prompt log-probs."""
        ids = job.prompts[p]
        calls = []
        if job.generates:
            calls.append(self.link.generate(ids, job.params[p], n=job.n, min_policy_version=job.min_version,
                                            tag=job.tag, cache_salt=job.cache_salt))
        if job.prompt_top is not None:
            calls.append(score_prompt(self.link, ids, job.prompt_top, job.tag, job.cache_salt))
        results = await gather_or_cancel(calls)
        if job.prompt_top is not None:
            job.prompt_results[p] = results[-1]
        if job.generates:
            return results[0]
        version = self.link.status().policy_version
        return [SequenceDone(0, i, FINISH_LENGTH, [], [], [], len(ids), 0, version)
                for i in range(job.n)]

    # ------------------------------------------------------------------ streaming

    async def start_stream(self, req, resp, codec, body, job):
        events = _merged_streams(self.link, job)
        first = await begin_sse(resp, events)
        resp.sse = self._sse(codec, body, job, first, events)

    async def _sse(self, codec, body, job, first, events):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        states: dict[int, _ChoiceState] = {}
        completion_tokens = 0
        cached: dict[int, int] = {}  # prompt index -> its prompt tokens from the prefix cache

        def chunk(choices, usage=False, **extra):
            obj = {
                "id": job.tag,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": job.created,
                "model": job.model,
                "system_fingerprint": None,
                "choices": choices,
                **extra,
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
                    state.splitter = self.splitter(codec, body)
                    if self.chat:
                        first_choice = {"index": index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}
                        extra = {"prompt_token_ids": job.prompts[p]} if body.return_token_ids else {}
                        yield chunk([first_choice], **extra)
                    elif getattr(body, "echo", False) or body.return_token_ids or job.prompt_top is not None:
                        yield chunk([self.first_choice(codec, body, job, p, index, state)])
                completion_tokens += len(event.token_ids)
                text = state.stream.push(event.token_ids)
                finish = None
                if isinstance(event, SequenceDone):
                    cached[p] = event.num_cached_tokens  # (the same for every sample of a prompt)
                    text += state.stream.finish()
                    finish = event.finish_reason
                calls = []
                if state.splitter is not None:
                    text, calls = self.stream_tool_calls(body, state, text, finish is not None)
                    if finish == "stop" and state.splitter.made_call:
                        finish = "tool_calls"
                logprobs = self.stream_logprobs(codec, body, state, event)
                ids_due = body.return_token_ids and event.token_ids
                if text or calls or ids_due or logprobs is not None or finish is not None:
                    choice = self.stream_choice(index, text, logprobs, finish)
                    if calls:
                        choice["delta"]["tool_calls"] = calls
                    if body.return_token_ids:
                        choice["token_ids"] = list(event.token_ids)
                    yield chunk([choice])
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
        self.splitter: Optional[ToolSplitter] = None  # chat with tools and a parser
        self.num_calls = 0


class CompletionsResource(_OpenAIResource):
    chat = False
    model = CompletionRequest

    def splitter(self, codec, body):
        return None

    def build(self, codec, body, context_length) -> _Job:
        prompt = body.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            prompts = prompt_ids_from(codec, text=prompt)
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
        else:
            prompts = prompt_ids_from(codec, ids=prompt, names=("prompt", "prompt", "prompt"))
            texts = [codec.decode(ids) for ids in prompts] if body.echo else [""] * len(prompts)
        if body.max_tokens == 0 and body.stream:
            raise invalid("max_tokens", "max_tokens 0 needs stream false")
        max_tokens = max_tokens_per_prompt(prompts, body.max_tokens, OPENAI_DEFAULT_MAX_TOKENS, context_length,
                                           "prompt")
        k = body.logprobs
        prompt_top = None
        if body.echo and k is not None:
            prompt_top = k
        if body.prompt_logprobs is not None:
            prompt_top = max(prompt_top or 0, body.prompt_logprobs)
        return _job(body, prompts, texts, max_tokens, k is not None, served_model_name(self.config),
                    top=k or 0, prompt_top=prompt_top)

    def choice(self, codec, body, job, p, done):
        text = cut_at_stop(codec.decode(done.token_ids), job.stops)
        prefix = job.prompt_texts[p] if body.echo else ""
        logprobs = self.legacy_logprobs(codec, body, done.token_ids, done.logprobs, done.top_ids,
                                        done.top_logprobs, len(prefix))
        if logprobs is not None and body.echo:
            logprobs = _join_legacy(self.prompt_legacy_logprobs(codec, body, job, p), logprobs)
        out = {
            "index": p * job.n + done.seq_index,
            "text": prefix + text,
            "logprobs": logprobs,
            "finish_reason": done.finish_reason,
        }
        self.add_vllm_fields(codec, body, job, p, out, done.token_ids)
        return out

    def add_vllm_fields(self, codec, body, job, p, out, token_ids) -> None:
        if body.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs_list(codec, job.prompts[p], job.prompt_results[p],
                                                          job.prompt_top)
        if body.return_token_ids:
            out["prompt_token_ids"] = job.prompts[p]
            out["token_ids"] = list(token_ids)

    def first_choice(self, codec, body, job, p, index, state) -> dict:
        """A streamed choice's first chunk: the echoed prompt (with its log-probs), the prompt's
        ids and log-probs as asked."""
        text = job.prompt_texts[p] if body.echo else ""
        logprobs = None
        if body.echo and body.logprobs is not None:
            logprobs = self.prompt_legacy_logprobs(codec, body, job, p)
        state.text_offset = len(text)
        out = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}
        self.add_vllm_fields(codec, body, job, p, out, [])
        return out

    def prompt_legacy_logprobs(self, codec, body, job, p) -> dict:
        """The legacy log-probs of the echoed prompt: null for its first token, then the
        teacher-forced log-probs (and top tokens) of the others."""
        ids, result = job.prompts[p], job.prompt_results[p]
        k = job.prompt_top or 0
        if result is None:  # a one-token prompt
            lps, top_ids, top_lps = [], [], []
        else:
            lps, top_ids, top_lps = result.logprobs, result.top_ids, result.top_logprobs
        rest = self.legacy_logprobs(codec, body, ids[1:], lps, top_ids, top_lps, 0, k=k) or {}
        first = codec.token_text(ids[0]) if not body.return_tokens_as_token_ids else f"token_id:{ids[0]}"
        offsets = [0] + [o + len(codec.token_text(ids[0])) for o in rest.get("text_offset", [])]
        return {
            "tokens": [first] + rest.get("tokens", []),
            "token_logprobs": [None] + rest.get("token_logprobs", []),
            "top_logprobs": [None] + (rest.get("top_logprobs") or []) if body.logprobs else None,
            "text_offset": offsets,
        }

    def legacy_logprobs(self, codec, body, token_ids, logprobs, top_ids, top_lps, offset,
                        k=None) -> Optional[dict]:
        if body.logprobs is None or (token_ids and not logprobs):
            return None
        k = body.logprobs if k is None else k
        as_ids = body.return_tokens_as_token_ids
        content = logprob_content(codec, token_ids, logprobs, top_ids, top_lps, k, as_ids)
        tokens = [e["token"] for e in content]
        offsets = []
        for t in token_ids:
            offsets.append(offset)
            offset += len(codec.token_text(t))
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in content],
            "top_logprobs": ([{x["token"]: x["logprob"] for x in e["top_logprobs"]} for e in content]
                             if body.logprobs > 0 else None),
            "text_offset": offsets,
        }

    def stream_logprobs(self, codec, body, state, event):
        if body.logprobs is None or not event.token_ids or not event.logprobs:
            return None
        out = self.legacy_logprobs(codec, body, event.token_ids, event.logprobs, event.top_ids,
                                   event.top_logprobs, state.text_offset)
        state.text_offset = out["text_offset"][-1] + len(out["tokens"][-1]) if out["tokens"] else state.text_offset
        return out

    def stream_choice(self, index, text, logprobs, finish):
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


class ChatCompletionsResource(_OpenAIResource):
    chat = True
    model = ChatCompletionRequest
    _parsers: dict = {}  # id(codec) -> ToolParser or None (mlx-lm's, see api/tools.py)

    def parser(self, codec) -> Optional[ToolParser]:
        key = id(codec)
        if key not in self._parsers:
            self._parsers[key] = ToolParser.for_codec(codec)
        return self._parsers[key]

    def splitter(self, codec, body) -> Optional[ToolSplitter]:
        """Tool calls are parsed when the request gives tools (tool_choice not "none") and
        mlx-lm has a parser for the model; otherwise the text is returned as is."""
        if not body.tools or body.tool_choice == "none":
            return None
        parser = self.parser(codec)
        return None if parser is None else ToolSplitter(parser)

    def build(self, codec, body, context_length) -> _Job:
        choice = body.tool_choice
        if choice is not None and choice not in ("auto", "none"):
            raise invalid("tool_choice", 'tool_choice must be "auto" or "none": forcing a call '
                          "needs constrained decoding, which mlxsup does not do")
        if choice == "auto" and not body.tools:
            raise invalid("tool_choice", 'tool_choice "auto" needs tools')
        (prompt,) = prompt_ids_from(codec, messages=body.messages, names=("messages",) * 3, tools=_tools(body))
        # max_completion_tokens wins over max_tokens; an error names the field the client gave
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = max_tokens_per_prompt([prompt], body.max_completion_tokens or body.max_tokens,
                                           self.config.max_tokens, context_length, "messages", field)
        k = (body.top_logprobs or 0) if body.logprobs else 0
        return _job(body, [prompt], [""], max_tokens, bool(body.logprobs), served_model_name(self.config),
                    top=k, prompt_top=body.prompt_logprobs)

    def entries(self, codec, body, token_ids, logprobs, top_ids, top_lps) -> list:
        k = body.top_logprobs or 0
        out = logprob_content(codec, token_ids, logprobs, top_ids, top_lps, k,
                              body.return_tokens_as_token_ids)
        if not k:  # (OpenAI: top_logprobs 0 or absent lists no alternatives)
            for entry in out:
                entry["top_logprobs"] = []
        return out

    def choice(self, codec, body, job, p, done):
        text = cut_at_stop(codec.decode(done.token_ids), job.stops)
        logprobs = None
        if body.logprobs and (done.logprobs or not done.token_ids):
            logprobs = {"content": self.entries(codec, body, done.token_ids, done.logprobs,
                                                done.top_ids, done.top_logprobs), "refusal": None}
        message = {"role": "assistant", "content": text, "refusal": None}
        finish = done.finish_reason
        splitter = self.splitter(codec, body)
        if splitter is not None:
            content, texts = splitter.push(text)
            rest, more = splitter.finish()
            calls = splitter.parser.calls(texts + more, _tools(body))
            if calls:
                message["content"] = (content + rest) or None
                message["tool_calls"] = calls
                if finish == "stop":
                    finish = "tool_calls"
        out = {
            "index": p * job.n + done.seq_index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        if body.return_token_ids:
            out["token_ids"] = list(done.token_ids)
        return out

    def stream_tool_calls(self, body, state, text, final) -> tuple[str, list]:
        """A streamed delta's content, and the tool calls completed in it (with their index)."""
        content, texts = state.splitter.push(text)
        if final:
            rest, more = state.splitter.finish()
            content, texts = content + rest, texts + more
        calls = state.splitter.parser.calls(texts, _tools(body))
        for call in calls:
            call["index"] = state.num_calls
            state.num_calls += 1
        return content, calls

    def stream_logprobs(self, codec, body, state, event):
        if not body.logprobs or not event.token_ids or not event.logprobs:
            return None
        return {"content": self.entries(codec, body, event.token_ids, event.logprobs, event.top_ids,
                                        event.top_logprobs), "refusal": None}

    def stream_choice(self, index, text, logprobs, finish):
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _tools(body) -> Optional[list]:
    """The request's tools as JSON (the chat template and mlx-lm's parsers take dicts)."""
    return None if body.tools is None else [t.model_dump() for t in body.tools]


def _job(body, prompts, texts, max_tokens: list, wants_logprobs, model_name, *, top=0,
         prompt_top=None) -> _Job:
    stops = stop_list(body.stop)
    mode = logprobs_mode_for(wants_logprobs, body.logprobs_mode)
    # (max_tokens 0, /v1/completions only: nothing is generated, the prompt is scored)
    params = [dataclasses.replace(sampling_params(body, max_tokens=max(1, m), stops=stops, logprobs_mode=mode),
                                  top_logprobs=top) for m in max_tokens]
    prefix = "chatcmpl" if isinstance(body, ChatCompletionRequest) else "cmpl"
    return _Job(prompts=prompts, prompt_texts=texts, params=params, n=body.n,
                min_version=body.min_policy_version, model=body.model or model_name,
                stops=stops, tag=new_request_id(prefix), generates=any(m > 0 for m in max_tokens),
                prompt_top=prompt_top, cache_salt=body.cache_salt)


def _join_legacy(first: dict, second: dict) -> dict:
    """Legacy log-probs of the echoed prompt followed by the completion's."""
    tops = None
    if first["top_logprobs"] is not None or second["top_logprobs"] is not None:
        tops = (first["top_logprobs"] or [None] * len(first["tokens"])) + (
            second["top_logprobs"] or [])
    return {"tokens": first["tokens"] + second["tokens"],
            "token_logprobs": first["token_logprobs"] + second["token_logprobs"],
            "top_logprobs": tops, "text_offset": first["text_offset"] + second["text_offset"]}


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

