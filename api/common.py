"""Helpers the resources share: JSON responses, sampling parameters, prompt building, the
context rule.

Client disconnects: gunicorn's asgi worker cancels a request's task when its client goes away
(after `--asgi-disconnect-grace-period`); the cancellation reaches the engine link, whose
flights then send `AbortRequest`, so the batch slot is freed. Nothing here polls for it."""

from __future__ import annotations

import asyncio
import secrets
from typing import Optional, Sequence

import falcon
import orjson

from mlxsup.api.errors import invalid, unavailable
from mlxsup.api.parsing import Limits
from mlxsup.api.textcodec import TextCodec
from mlxsup.ipc.messages import LOGPROBS_NONE, SamplingParams


def send_json(resp, obj, status: int = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(obj)


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sampling_params(body, *, max_tokens: int, logprobs_mode: str, stops: Sequence[str]) -> SamplingParams:
    """The engine's SamplingParams from a validated request model (ranges already checked)."""
    top_k = body.top_k
    try:
        return SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=0 if top_k < 0 else top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            repetition_context_size=body.repetition_context_size,
            max_tokens=max_tokens,
            seed=getattr(body, "seed", None),
            logprobs_mode=logprobs_mode,
            stop_strings=tuple(stops),
            ignore_eos=getattr(body, "ignore_eos", False),
        )
    except ValueError as e:  # a range the schema let through; still the client's input
        raise invalid("", str(e)) from None


def stop_list(stop) -> tuple:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def limits_of(link, config) -> Limits:
    """The request limits now: --max-queue, and what the engine published when it got ready."""
    status = link.status()
    return Limits(max_queue=config.max_queue, vocab_size=status.vocab_size, context_length=status.context_length)


def logprobs_mode_for(wanted: bool, mode: str) -> str:
    return mode if wanted else LOGPROBS_NONE


class CodecRef:
    """The tokenizer, loaded at lifespan start-up (not at import: gunicorn imports the app
    before the worker's event loop runs)."""

    def __init__(self, codec: Optional[TextCodec] = None, loader=None):
        self.codec = codec
        self._loader = loader

    def load(self) -> None:
        if self.codec is None and self._loader is not None:
            self.codec = self._loader()

    def get(self) -> TextCodec:
        if self.codec is None:
            raise unavailable("the tokenizer is not loaded yet")
        return self.codec


def prompt_ids_from(codec: TextCodec, *, text=None, ids=None, messages=None,
                    names=("prompt", "prompt_ids", "messages"), tools=None) -> list[list[int]]:
    """One token-id list per prompt from whichever input form the request used (token ids were
    checked against the vocabulary by the request model); errors name the field (and the index
    within a list)."""
    text_name, ids_name, messages_name = names
    if text is not None:
        if isinstance(text, str):
            return [codec.encode(text, text_name)]
        return [codec.encode(t, f"{text_name}[{i}]") for i, t in enumerate(text)]
    if ids is not None:
        batch = ids if ids and isinstance(ids[0], list) else [ids]
        return [list(one) for one in batch]
    if messages is not None:
        if messages and isinstance(messages[0], list):
            return [codec.encode_chat(_dicts(conv), f"{messages_name}[{i}]", tools=tools)
                    for i, conv in enumerate(messages)]
        return [codec.encode_chat(_dicts(messages), messages_name, tools=tools)]
    raise invalid(text_name, f"give one of: {', '.join(names)}")


def _dicts(conversation) -> list[dict]:
    """Messages as the chat template takes them: declared fields and any others, as given."""
    return [m.model_dump(exclude_unset=False) for m in conversation]


def max_tokens_per_prompt(prompts: list[list[int]], explicit: Optional[int], default: int,
                          context_length: Optional[int], field: str,
                          max_tokens_field: str = "max_tokens") -> list[int]:
    """The context rule (docs/api.md, "Context length"), checked once per request: a prompt must
    leave room for one token; an explicit max_tokens must fit with the prompt (else 422 naming
    it); an absent one is `default` (the server's --max-tokens) or the room left, if less."""
    out = []
    for i, ids in enumerate(prompts):
        n = len(ids)
        if context_length is None:
            out.append(explicit if explicit is not None else default)
            continue
        name = field if len(prompts) == 1 else f"{field}[{i}]"
        if n >= context_length:
            raise invalid(name, f"{name} is {n} tokens; the model's context is {context_length}")
        room = context_length - n
        if explicit is None:
            out.append(min(default, room))
        elif explicit > room:
            raise invalid(max_tokens_field, f"{max_tokens_field} {explicit} does not fit: {name} is {n} tokens and "
                                            f"the model's context is {context_length} (at most {room})")
        else:
            out.append(explicit)
    return out


async def gather_or_cancel(coros) -> list:
    """Run engine calls together; the first failure cancels (and so aborts) the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def begin_sse(resp, events):
    """Make `resp` a server-sent-events answer of the async generator `events`, and return its
    first event (None when it has none). The first event is awaited before the response starts,
    so an early error (a refused request, an engine gone) keeps its HTTP status; `events` is
    closed when that wait fails."""
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
    return first
