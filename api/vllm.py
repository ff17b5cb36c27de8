"""vLLM's routes, with vLLM's field names and shapes, plus mlxsup's version fields, so an RL
framework that speaks vLLM runs against mlxsup by changing its base URL (docs/rl-frameworks.md):

- `POST /inference/v1/generate`: token ids in, token ids out (verifiers / prime-rl);
- `POST /tokenize`, `POST /detokenize`;
- control routes (admin key, as the adapter routes): `POST /pause?mode=abort|wait|keep`,
  `POST /resume`, `GET /is_paused`, `POST /abort_requests`, `POST /v1/load_lora_adapter`,
  `POST /v1/unload_lora_adapter` (mapped onto the versioned swap: one served adapter, each
  load or unload moves the policy version by one).

Request bodies are the pydantic models of `vllm_protocol`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import orjson
from falcon.asgi import SSEvent

from mlxsup.api.adapters import resolve_adapter_path, swap_answer
from mlxsup.api.common import (begin_sse, gather_or_cancel, limits_of, max_tokens_per_prompt, new_request_id, send_json,
                               stop_list)
from mlxsup.api.errors import ApiError, invalid, unavailable
from mlxsup.api.media import read_json_object
from mlxsup.api.parsing import parse_body
from mlxsup.api.protocol import LOGPROB_FLOOR
from mlxsup.api.vllm_protocol import (
    LOGPROBS_MODE_NAMES,
    AbortRequestsRequest,
    DetokenizeRequest,
    GenerateTokensRequest,
    LoadLoraRequest,
    TokenizeRequest,
    UnloadLoraRequest,
    VllmSamplingParams,
    check_neutral,
)
from mlxsup.ipc.messages import (
    LOGPROBS_NONE,
    LOGPROBS_RAW,
    OP_ABORT_ALL,
    OP_PAUSE,
    OP_RESUME,
    OP_STATUS,
    PAUSE_ABORT,
    PAUSE_MODES,
    PAUSE_WAIT,
    SamplingParams,
)

def _lp(value: float) -> float:
    """A log-prob as JSON carries it (-inf: LOGPROB_FLOOR, as `protocol.json_logprobs`)."""
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


def logprob_content(codec, token_ids: Sequence[int], logprobs: Sequence[float],
                    top_ids: Sequence[int], top_lps: Sequence[float], k: int,
                    as_token_ids: bool) -> list[dict]:
    """OpenAI's `logprobs.content` entries (as vLLM writes them): per token its text (or
    "token_id:<id>"), log-prob and UTF-8 bytes, and under `top_logprobs` the `k` most likely
    tokens of that position (the truncated ones left out) plus the sampled token when it is
    not among them, as vLLM does."""
    out = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
        tops = [(a, b) for a, b in zip(top_ids[i * k:(i + 1) * k], top_lps[i * k:(i + 1) * k])
                if math.isfinite(b)]
        if all(a != t for a, _ in tops):
            tops.append((t, lp))
        entry = _token_entry(codec, t, lp, as_token_ids)
        entry["top_logprobs"] = [_token_entry(codec, a, b, as_token_ids) for a, b in tops]
        out.append(entry)
    return out


def _token_entry(codec, token_id: int, logprob: float, as_token_ids: bool) -> dict:
    text = codec.token_text(token_id)
    return {"token": f"token_id:{token_id}" if as_token_ids else text, "logprob": _lp(logprob),
            "bytes": list(text.encode("utf-8", "replace"))}


def prompt_logprobs_list(codec, prompt_ids: Sequence[int], result, k: int) -> list:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token a dict from
    token id (as a string) to {logprob, rank, decoded_token} holding the prompt token and the
    `k` most likely tokens of that position (rank: 1-based among those, null for the prompt
    token when it is not among them)."""
    out: list = [None]
    if result is None:
        return out
    for i, (t, lp) in enumerate(zip(prompt_ids[1:], result.logprobs)):
        entry = {}
        for rank, (a, b) in enumerate(zip(result.top_ids[i * k:(i + 1) * k],
                                          result.top_logprobs[i * k:(i + 1) * k]), start=1):
            entry[str(a)] = {"logprob": _lp(b), "rank": rank, "decoded_token": codec.token_text(a)}
        if str(t) not in entry:
            entry[str(t)] = {"logprob": _lp(lp), "rank": None, "decoded_token": codec.token_text(t)}
        out.append(entry)
    return out


def engine_params(sp: VllmSamplingParams, max_tokens: int) -> SamplingParams:
    """mlxsup's SamplingParams from vLLM's (already checked by `check_neutral`)."""
    mode = LOGPROBS_MODE_NAMES[sp.logprobs_mode] if sp.logprobs is not None else LOGPROBS_NONE
    try:
        return SamplingParams(
            temperature=sp.temperature, top_p=sp.top_p, top_k=max(0, sp.top_k), min_p=sp.min_p,
            repetition_penalty=sp.repetition_penalty,
            repetition_context_size=sp.repetition_context_size, max_tokens=max_tokens,
            seed=sp.seed, logprobs_mode=mode, stop_token_ids=tuple(sp.stop_token_ids or ()),
            stop_strings=tuple(stop_list(sp.stop)), ignore_eos=sp.ignore_eos,
            top_logprobs=sp.logprobs or 0,
        )
    except ValueError as e:
        raise invalid("sampling_params", str(e)) from None


async def score_prompt(link, prompt_ids: Sequence[int], k: int, tag: str, cache_salt: str = ""):
    """Teacher-forced raw log-probs of prompt tokens 1.. (the /score path), or None for a
    one-token prompt."""
    if len(prompt_ids) < 2:
        return None
    return await link.score(prompt_ids[:1], prompt_ids[1:], logprobs_mode=LOGPROBS_RAW,
                            params=SamplingParams(), tag=tag, top_logprobs=k, cache_salt=cache_salt)


class InferenceGenerateResource:
    """POST /inference/v1/generate (vLLM's tokens-in/tokens-out route)."""

    def __init__(self, link, codecs, config, model_name: str):
        self.link = link
        self.codecs = codecs
        self.config = config
        self.model_name = model_name

    async def on_post(self, req, resp):
        limits = limits_of(self.link, self.config)
        body = parse_body(GenerateTokensRequest, await read_json_object(req), limits)
        sp = body.sampling_params
        check_neutral(sp)
        for name in ("kv_transfer_params", "features"):
            if getattr(body, name):
                raise invalid(name, f"{name} is not supported by mlxsup")
        if body.stream and sp.prompt_logprobs is not None:
            raise invalid("sampling_params.prompt_logprobs", "prompt_logprobs needs stream false")
        if body.priority != 0:
            raise invalid("priority", "mlxsup schedules first come, first served: priority "
                          "must be 0")
        codec = self.codecs.get()
        ids = list(body.token_ids)
        # vLLM's default max_tokens is the rest of the context (the server's --max-tokens while
        # the context is not known)
        default = limits.context_length or self.config.max_tokens
        (max_tokens,) = max_tokens_per_prompt([ids], sp.max_tokens, default, limits.context_length,
                                              "token_ids", "sampling_params.max_tokens")
        params = engine_params(sp, max_tokens)
        request_id = body.request_id or new_request_id("generate-tokens")
        status = self.link.status()
        if not status.is_ready:
            raise unavailable(status.why_not_ready())
        min_version = -1 if body.min_policy_version is None else body.min_policy_version
        if body.stream:
            await self.start_stream(resp, codec, body, ids, params, request_id, min_version)
            return
        calls = [self.link.generate(ids, params, n=sp.n, min_policy_version=min_version,
                                    tag=request_id, cache_salt=body.cache_salt)]
        if sp.prompt_logprobs is not None:
            calls.append(score_prompt(self.link, ids, sp.prompt_logprobs, request_id, body.cache_salt))
        outcomes = await gather_or_cancel(calls)
        samples = outcomes[0]
        k = params.top_logprobs
        choices = []
        for done in samples:
            logprobs = None
            if sp.logprobs is not None:
                logprobs = {"content": logprob_content(codec, done.token_ids, done.logprobs,
                                                       done.top_ids, done.top_logprobs, k, True)}
            choices.append({
                "index": done.seq_index,
                "token_ids": list(done.token_ids),
                "logprobs": logprobs,
                "finish_reason": done.finish_reason,
                "generated_by_version": done.policy_version,
                "token_versions": list(done.versions),
            })
        completion_tokens = sum(len(d.token_ids) for d in samples)
        send_json(resp, {
            "request_id": request_id,
            "model": body.model or self.model_name,
            "prompt_token_ids": ids,
            "choices": choices,
            "prompt_logprobs": (prompt_logprobs_list(codec, ids, outcomes[1], sp.prompt_logprobs)
                                if sp.prompt_logprobs is not None else None),
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) + completion_tokens},
            "policy_version": self.link.status().policy_version,
        })


    async def start_stream(self, resp, codec, body, ids, params, request_id, min_version):
        """vLLM's streamed answer: one `data:` chunk per batch of new tokens of a choice
        (`token_ids` and `logprobs` of those tokens, `finish_reason` on its last), a usage chunk
        with `stream_options.include_usage`, then `data: [DONE]`. The first engine event is
        awaited before the response starts, so early errors keep their HTTP status."""
        events = self.link.stream(ids, params, n=body.sampling_params.n,
                                  min_policy_version=min_version, tag=request_id, cache_salt=body.cache_salt)
        first = await begin_sse(resp, events)
        resp.sse = self._sse(codec, body, ids, params, request_id, first, events)

    async def _sse(self, codec, body, ids, params, request_id, first, events):
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        wants_logprobs = body.sampling_params.logprobs is not None
        num_tokens = 0
        try:
            event = first
            while event is not None:
                num_tokens += len(event.token_ids)
                finish = getattr(event, "finish_reason", None)
                if event.token_ids or finish is not None:
                    logprobs = None
                    if wants_logprobs:
                        logprobs = {"content": logprob_content(
                            codec, event.token_ids, event.logprobs, event.top_ids,
                            event.top_logprobs, params.top_logprobs, True)}
                    yield SSEvent(data=orjson.dumps({"request_id": request_id, "choices": [{
                        "index": event.seq_index, "token_ids": list(event.token_ids),
                        "logprobs": logprobs, "finish_reason": finish,
                        "token_versions": list(event.versions)}]}))
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    event = None
            if include_usage:
                yield SSEvent(data=orjson.dumps({"request_id": request_id, "choices": [], "usage": {
                    "prompt_tokens": len(ids), "completion_tokens": num_tokens,
                    "total_tokens": len(ids) + num_tokens}}))
        except ApiError as e:
            yield SSEvent(data=orjson.dumps(e.body(openai=True)))
        finally:
            await events.aclose()
        yield SSEvent(data=b"[DONE]")


class TokenizeResource:
    """POST /tokenize: vLLM's shape, `prompt` or `messages` (with `tools`)."""

    def __init__(self, link, codecs):
        self.link = link
        self.codecs = codecs

    async def on_post(self, req, resp):
        body = parse_body(TokenizeRequest, await read_json_object(req))
        codec = self.codecs.get()
        if (body.prompt is None) == (body.messages is None):
            raise invalid("prompt", "give one of prompt and messages")
        if body.messages is not None:
            ids = codec.encode_chat(body.messages, "messages", tools=body.tools,
                                    add_generation_prompt=body.add_generation_prompt,
                                    continue_final_message=body.continue_final_message)
            if body.add_special_tokens:  # (the template writes the special tokens it wants)
                ids = _with_bos(codec, ids)
        else:
            ids = codec.encode(body.prompt, "prompt") if body.add_special_tokens in (None, True) \
                else list(codec.tokenizer.encode(body.prompt, add_special_tokens=False).ids)
        send_json(resp, {
            "count": len(ids), "max_model_len": self.link.status().context_length, "tokens": ids,
            "token_strs": [codec.token_text(t) for t in ids] if body.return_token_strs else None,
        })


def _with_bos(codec, ids: list[int]) -> list[int]:
    bos_text = codec.named_specials.get("bos_token")
    bos = codec.tokenizer.token_to_id(bos_text) if isinstance(bos_text, str) else None
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids


class DetokenizeResource:
    def __init__(self, link, codecs, config):
        self.link = link
        self.codecs = codecs
        self.config = config

    async def on_post(self, req, resp):
        body = parse_body(DetokenizeRequest, await read_json_object(req), limits_of(self.link, self.config))
        codec = self.codecs.get()
        send_json(resp, {"prompt": codec.tokenizer.decode(body.tokens, skip_special_tokens=False)})


# ---------------------------------------------------------------- control routes


def _pause_answer(result, **extra) -> dict:
    return {"is_paused": result.is_paused, "mode": result.mode or None, **extra}


class PauseResource:
    """POST /pause?mode=abort|wait|keep (vLLM's; `wait_for_inflight_requests=true` is the
    older spelling of mode=wait). Answers once the engine is paused: for `wait`, once the
    in-flight requests have finished."""

    def __init__(self, link):
        self.link = link

    async def on_post(self, req, resp):
        mode = req.get_param("mode")
        if mode is None:
            wait = (req.get_param("wait_for_inflight_requests") or "false").lower()
            if wait not in ("true", "false", "1", "0"):
                raise invalid("wait_for_inflight_requests", "wait_for_inflight_requests must be "
                              "true or false")
            mode = PAUSE_WAIT if wait in ("true", "1") else PAUSE_ABORT
        if mode not in PAUSE_MODES:
            raise invalid("mode", f"mode must be one of {', '.join(PAUSE_MODES)}")
        result = await self.link.control(OP_PAUSE, mode)
        send_json(resp, _pause_answer(result, status="paused", num_aborted=result.num_aborted,
                                      policy_version=self.link.status().policy_version))


class ResumeResource:
    def __init__(self, link):
        self.link = link

    async def on_post(self, req, resp):
        result = await self.link.control(OP_RESUME)
        send_json(resp, _pause_answer(result, status="resumed"))


class IsPausedResource:
    def __init__(self, link):
        self.link = link

    async def on_get(self, req, resp):
        send_json(resp, _pause_answer(await self.link.control(OP_STATUS)))


class AbortRequestsResource:
    """POST /abort_requests {request_ids}: those requests (in any worker), or every request
    in flight when the list is empty."""

    def __init__(self, link):
        self.link = link

    async def on_post(self, req, resp):
        raw = await read_json_object(req) if req.content_length else {}
        body = parse_body(AbortRequestsRequest, raw)
        if body.request_ids:
            for rid in body.request_ids:
                await self.link.abort(rid)
            send_json(resp, {"status": "cancelled", "cancelled_request_ids": body.request_ids})
            return
        result = await self.link.control(OP_ABORT_ALL)
        send_json(resp, {"status": "cancelled", "cancelled_request_ids": [],
                         "num_aborted": result.num_aborted})


class LoadLoraResource:
    """POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace}: a swap to that adapter
    (mlxsup serves one adapter: loading replaces the one served, in place or not)."""

    def __init__(self, adapters, adapter_root: Optional[str]):
        self.adapters = adapters
        self.adapter_root = adapter_root

    async def on_post(self, req, resp):
        body = parse_body(LoadLoraRequest, await read_json_object(req))
        try:
            path = resolve_adapter_path(body.lora_path, self.adapter_root)
        except ApiError as e:
            e.field = "lora_path" if e.field == "adapter_path" else e.field
            raise
        answer = swap_answer(await self.adapters.reload(path, body.mode), field="lora_path")
        answer["lora_name"] = body.lora_name
        answer["message"] = answer["message"] or f"Success: LoRA adapter '{body.lora_name}' added successfully."
        send_json(resp, answer)


class UnloadLoraResource:
    """POST /v1/unload_lora_adapter {lora_name}: back to the base model (a swap)."""

    def __init__(self, adapters):
        self.adapters = adapters

    async def on_post(self, req, resp):
        body = parse_body(UnloadLoraRequest, await read_json_object(req))
        answer = swap_answer(await self.adapters.reload(None, body.mode), field="lora_name")
        answer["lora_name"] = body.lora_name
        answer["message"] = answer["message"] or f"Success: LoRA adapter '{body.lora_name}' removed successfully."
        send_json(resp, answer)
