"""POST /score: teacher-forced log-probabilities of given completion tokens.

With the same sampling fields and `logprobs_mode` as a /generate call, the numbers are the ones
/generate reported for those tokens (under the same weights), so a trainer can check or
recompute behaviour-policy log-probs.
"""

from __future__ import annotations

import time

from mlxsup.api.common import limits_of, new_request_id, prompt_ids_from, sampling_params, send_json
from mlxsup.api.errors import invalid, unavailable
from mlxsup.api.media import read_json_object
from mlxsup.api.parsing import parse_body
from mlxsup.api.protocol import ScoreRequest, json_logprobs


class ScoreResource:
    def __init__(self, link, codecs, config):
        self.link = link
        self.codecs = codecs
        self.config = config

    async def on_post(self, req, resp):
        started = time.perf_counter()
        limits = limits_of(self.link, self.config)
        body = parse_body(ScoreRequest, await read_json_object(req), limits)
        codec = self.codecs.get()
        (prompt_ids,) = prompt_ids_from(codec, text=body.prompt, ids=body.prompt_ids, messages=body.messages)
        completion_ids = body.completion_ids
        total = len(prompt_ids) + len(completion_ids)
        ctx = limits.context_length
        if ctx is not None and total > ctx:
            raise invalid("completion_ids", f"prompt and completion are {total} tokens; the model's context "
                                            f"is {ctx}")
        params = sampling_params(body, max_tokens=max(1, len(completion_ids)), stops=(),
                                 logprobs_mode=body.logprobs_mode)
        request_id = body.request_id or new_request_id("score")
        status = self.link.status()
        if not status.is_ready:
            raise unavailable(status.why_not_ready())
        result = await self.link.score(prompt_ids, completion_ids, logprobs_mode=body.logprobs_mode,
                                       params=params, tag=request_id, cache_salt=body.cache_salt)
        send_json(resp, {
            "request_id": request_id,
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": json_logprobs(result.logprobs),
            "logprobs_mode": body.logprobs_mode,
            "policy_version": result.policy_version,
            "metadata": {
                "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
                "current_policy_version": self.link.status().policy_version,
            },
        })
