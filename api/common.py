"""Helpers the resources share: JSON responses, sampling parameters, prompt building.

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
from mlxsup.api.textcodec import TextCodec
from mlxsup.ipc.messages import LOGPROBS_NONE, SamplingParams


def send_json(resp, obj, status: int = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(obj)


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sampling_params(body: dict, *, max_tokens: int, logprobs_mode: str, stops: Sequence[str]) -> SamplingParams:
    """The engine's SamplingParams from validated request fields (ranges already checked)."""
    top_k = body["top_k"]
    try:
        return SamplingParams(
            temperature=body["temperature"],
            top_p=body["top_p"],
            top_k=0 if top_k < 0 else top_k,
            min_p=body["min_p"],
            repetition_penalty=body["repetition_penalty"],
            repetition_context_size=body["repetition_context_size"],
            max_tokens=max_tokens,
            seed=body.get("seed"),
            logprobs_mode=logprobs_mode,
            stop_strings=tuple(stops),
            ignore_eos=body.get("ignore_eos", False),
        )
    except ValueError as e:  # a range the schema let through; still the client's input
        raise invalid("", str(e)) from None


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
                    names=("prompt", "prompt_ids", "messages")) -> list[list[int]]:
    """One token-id list per prompt from whichever input form the request used; errors name
    the field (and the index within a list)."""
    text_name, ids_name, messages_name = names
    if text is not None:
        if isinstance(text, str):
            return [codec.encode(text, text_name)]
        return [codec.encode(t, f"{text_name}[{i}]") for i, t in enumerate(text)]
    if ids is not None:
        batch = ids if ids and isinstance(ids[0], list) else [ids]
        for i, one in enumerate(batch):
            check_token_ids(one, codec.vocab_size, f"{ids_name}[{i}]" if batch is ids else ids_name)
        return [list(one) for one in batch]
    if messages is not None:
        if messages and isinstance(messages[0], list):
            return [codec.encode_chat(conv, f"{messages_name}[{i}]") for i, conv in enumerate(messages)]
        return [codec.encode_chat(messages, messages_name)]
    raise invalid(text_name, f"give one of: {', '.join(names)}")


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> None:
    """Token ids must exist in the vocabulary (the engine would index out of range): one max()
    per list; the offending index is searched for only when there is one."""
    if ids and max(ids) >= vocab_size:
        i = next(i for i, t in enumerate(ids) if t >= vocab_size)
        raise invalid(f"{field}[{i}]", f"{field}[{i}] is not a token id of this model (vocabulary size {vocab_size})")


def check_lengths(codec: TextCodec, prompts: list[list[int]], max_tokens: int, field: str,
                  max_tokens_field: str = "max_tokens") -> None:
    for i, ids in enumerate(prompts):
        codec.check_length(len(ids), max_tokens, field if len(prompts) == 1 else f"{field}[{i}]", max_tokens_field)


async def gather_or_cancel(coros) -> list:
    """Run engine calls together; the first failure cancels (and so aborts) the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
