"""POST /generate (the seed's route) and POST /abort.

One prompt (a string, one list of token ids, one conversation) with n=1 answers the seed's
result shape exactly; a list of prompts (even of one) or n > 1 answers `{"results": [...]}`
with one seed-shaped result per sample, prompt-major (all samples of prompt 0, then of
prompt 1, ...), each with `prompt_index` and `sample_index`.
"""

from __future__ import annotations

import time

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
from mlxsup.api.errors import unavailable
from mlxsup.api.media import read_json_object
from mlxsup.api.parsing import parse_body
from mlxsup.api.protocol import AbortRequest, GenerateRequest, json_logprobs
from mlxsup.api.textcodec import cut_at_stop


class GenerateResource:
    def __init__(self, link, codecs, config):
        self.link = link
        self.codecs = codecs
        self.config = config

    async def on_post(self, req, resp):
        started = time.perf_counter()
        limits = limits_of(self.link, self.config)
        body = parse_body(GenerateRequest, await read_json_object(req), limits)
        codec = self.codecs.get()
        prompts = prompt_ids_from(codec, text=body.prompt, ids=body.prompt_ids, messages=body.messages)
        input_field = next(k for k in GenerateRequest.INPUTS if getattr(body, k) is not None)
        given = getattr(body, input_field)
        # the answer's shape follows the input's: a list of prompts answers the envelope even
        # when it holds one, so a trainer's batch code never meets the bare shape by chance
        is_batch = isinstance(given, list) if input_field == "prompt" else isinstance(given[0], list)
        max_tokens = max_tokens_per_prompt(prompts, body.max_tokens, self.config.max_tokens,
                                           limits.context_length, input_field)
        stops = stop_list(body.stop)
        mode = logprobs_mode_for(body.logprobs > 0, body.logprobs_mode)
        params = [sampling_params(body, max_tokens=m, stops=stops, logprobs_mode=mode) for m in max_tokens]
        request_id = body.request_id or new_request_id()
        status = self.link.status()
        if not status.is_ready:
            raise unavailable(status.why_not_ready())
        min_version = body.min_policy_version
        n = body.n
        outcomes = await gather_or_cancel((
            self.link.generate(ids, p, n=n, min_policy_version=-1 if min_version is None else min_version,
                               tag=request_id, cache_salt=body.cache_salt)
            for ids, p in zip(prompts, params)
        ))
        latency_ms = round((time.perf_counter() - started) * 1000.0, 3)
        current = self.link.status().policy_version
        results = []
        for p, (ids, samples) in enumerate(zip(prompts, outcomes)):
            for s, done in enumerate(samples):
                result = {
                    "request_id": request_id,
                    "policy_version": body.policy_version,
                    "step_id": body.step_id,
                    "prompt_ids": ids,
                    "completion_ids": list(done.token_ids),
                    "text": cut_at_stop(codec.decode(done.token_ids), stops),
                    "logprobs": json_logprobs(done.logprobs) if body.logprobs > 0 else None,
                    "finish_reason": done.finish_reason,
                    "metadata": {
                        "batch_size": done.batch_size,
                        "latency_ms": latency_ms,
                        # the seed's trainers read this to find stale rollouts: it is the
                        # version that generated the tokens, not whatever serves now
                        "current_policy_version": done.policy_version,
                        "server_policy_version": current,
                        "queue_ms": round(done.queue_ms, 3),
                        "ttft_ms": round(done.ttft_ms, 3),
                        "cached_tokens": done.num_cached_tokens,  # prompt tokens from the prefix cache
                    },
                    "generated_by_version": done.policy_version,
                    "token_versions": list(done.versions),
                }
                if is_batch or n > 1:
                    result["prompt_index"] = p
                    result["sample_index"] = s
                results.append(result)
        send_json(resp, {"results": results} if is_batch or n > 1 else results[0])


class AbortResource:
    def __init__(self, link):
        self.link = link

    async def on_post(self, req, resp):
        body = parse_body(AbortRequest, await read_json_object(req))
        found = await self.link.abort(body.request_id)
        send_json(resp, {"request_id": body.request_id, "status": "abort_requested",
                         "found_in_this_worker": found})
