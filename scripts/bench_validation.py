"""Cost of the typed HTTP edge per /generate request body: pydantic v2 against msgspec.

Each library parses the raw JSON bytes of a typical /generate body (a prompt or prompt_ids,
sampling fields, stop strings, echoed ids), validates it against the same constraints
(ranges, lengths, unknown fields refused) and dumps the typed object back to a dict, as the
API does once per request. Run it under the heavy lock; the ratio is what matters:

    flock /tmp/mlxsup-heavy.lock .venv/bin/python scripts/bench_validation.py

Measured on the 2-core CI box (one run, shared machine), microseconds per body, best of 5:

    body          pydantic   msgspec   ratio
    text prompt        5.1       2.3     2.3
    2k token ids     137.4      61.6     2.2

Picked: pydantic. msgspec is ~2x faster, but both stay well under one millisecond, and a
/generate request spends milliseconds in the tokenizer and the engine, so the difference is a
small part of a request. What decides is what the edge must express: msgspec refuses a union
of two array types (`prompt_ids`: a list of ids or a list of lists), has no per-field
validators for the "exactly one of prompt / prompt_ids / messages" rule and reports one error
as a sentence without a machine-readable path; pydantic (as vLLM's protocol.py) gives typed
error locations, validators with context (the engine's vocabulary size) and OpenAPI 3.1
schemas from the same models.
"""

from __future__ import annotations

import timeit
from typing import Annotated, Literal, Optional, Union

import msgspec
import orjson
import pydantic
from pydantic import BaseModel, ConfigDict, Field

TEXT_BODY = orjson.dumps({
    "prompt": "Write a haiku about reinforcement learning with verifiable rewards. " * 4,
    "max_tokens": 256, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "n": 8, "logprobs": 1,
    "stop": ["\n\n", "</answer>"], "seed": 1234, "policy_version": 17, "step_id": 3,
    "request_id": "rollout-17-3-42",
})
IDS_BODY = orjson.dumps({
    "prompt_ids": [(i * 7919) % 150_000 for i in range(2048)],
    "max_tokens": 512, "temperature": 0.7, "logprobs": 1, "n": 4, "policy_version": "v17",
})


class PydGenerate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: Optional[Union[Annotated[str, Field(max_length=4 << 20)], list[str]]] = None
    prompt_ids: Optional[Union[list[Annotated[int, Field(ge=0, lt=2**31)]],
                               list[list[Annotated[int, Field(ge=0, lt=2**31)]]]]] = None
    n: Annotated[int, Field(ge=1, le=4096)] = 1
    temperature: Annotated[float, Field(ge=0, le=1e4)] = 0.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0
    max_tokens: Optional[Annotated[int, Field(ge=1, le=1 << 20)]] = None
    logprobs: Annotated[int, Field(ge=0)] = 0
    logprobs_mode: Literal["processed", "raw"] = "processed"
    stop: Optional[Union[str, Annotated[list[str], Field(max_length=16)]]] = None
    seed: Optional[Annotated[int, Field(ge=0, le=2**63 - 1)]] = None
    policy_version: Optional[Union[int, str]] = None
    step_id: Optional[int] = None
    request_id: Optional[Annotated[str, Field(min_length=1, max_length=256)]] = None


TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]


class MsgGenerate(msgspec.Struct, forbid_unknown_fields=True):
    prompt: Union[Annotated[str, msgspec.Meta(max_length=4 << 20)], list[str], None] = None
    prompt_ids: Optional[list[TokenId]] = None  # a union with list[list[int]] is refused by msgspec
    n: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1e4)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1)] = 0
    max_tokens: Optional[Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]] = None
    logprobs: Annotated[int, msgspec.Meta(ge=0)] = 0
    logprobs_mode: Literal["processed", "raw"] = "processed"
    stop: Union[str, Annotated[list[str], msgspec.Meta(max_length=16)], None] = None
    seed: Optional[Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]] = None
    policy_version: Union[int, str, None] = None
    step_id: Optional[int] = None
    request_id: Optional[Annotated[str, msgspec.Meta(min_length=1, max_length=256)]] = None


def per_body_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    msg_decoder = msgspec.json.Decoder(MsgGenerate)
    print(f"pydantic {pydantic.VERSION}, msgspec {msgspec.__version__}; microseconds per body (best of 5)")
    print(f"{'body':14}{'pydantic':>10}{'msgspec':>10}{'ratio':>8}")
    for name, body in (("text prompt", TEXT_BODY), ("2k token ids", IDS_BODY)):
        number = 2000 if name == "text prompt" else 300
        pyd = per_body_us(lambda: PydGenerate.model_validate_json(body).model_dump(), number)
        msg = per_body_us(lambda: msgspec.to_builtins(msg_decoder.decode(body)), number)
        print(f"{name:14}{pyd:10.1f}{msg:10.1f}{pyd / msg:8.1f}")


if __name__ == "__main__":
    main()
