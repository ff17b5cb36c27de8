"""Request bodies of vLLM's routes (`/inference/v1/generate`, `/tokenize`, `/detokenize`,
`/abort_requests`, `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), as pydantic models with
vLLM's field names and defaults (vllm/entrypoints/serve/disagg/protocol.py, sampling_params.py).

vLLM sampling parameters mlxsup does not implement are of two kinds: those whose value leaves
the result unchanged (`skip_special_tokens`, `detokenize`, ...: the route returns token ids)
are accepted and ignored (`IGNORED`); those that would change it (`presence_penalty`,
`logit_bias`, ...) are accepted only at their neutral value and refused with 422 otherwise
(`NEUTRAL`), so a trainer never gets samples from a distribution other than the one it asked
for. Anything else unknown is refused, naming the field. docs/api.md lists both.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlxsup.api.errors import invalid
from mlxsup.ipc.messages import LOGPROBS_PROCESSED, LOGPROBS_RAW, MAX_TOP_LOGPROBS

MAX_N = 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\])$", re.I)


def parse(model: type[BaseModel], body: dict, prefix: str = ""):
    """`body` as `model`, or the 422 ApiError naming the first offending field by its path."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        path = prefix
        for part in err["loc"]:  # list indices as `field[i]`, as the other routes name them
            if isinstance(part, str) and _UNION_TAG.match(part):
                continue  # (pydantic names the union member it tried: not a field)
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = f"unknown field {path!r}"
        elif err["type"] == "missing":
            message = f"missing required field {path!r}"
        raise invalid(path, f"{path}: {message}") from None


# vLLM's names for its log-prob modes, and mlxsup's.
LOGPROBS_MODE_NAMES = {"processed": LOGPROBS_PROCESSED, "processed_logprobs": LOGPROBS_PROCESSED,
                       "raw": LOGPROBS_RAW, "raw_logprobs": LOGPROBS_RAW}


class VllmSamplingParams(_Body):
    """vLLM's `SamplingParams` as JSON. The defaults are vLLM's (temperature 1.0, top_k off)."""

    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1: off")
    min_p: float = Field(0.0, ge=0, lt=1)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = Field(None, ge=1, description="default: the rest of the context")
    logprobs: Optional[int] = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description="the sampled token's log-prob and the `logprobs` most likely tokens'")
    prompt_logprobs: Optional[int] = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description="teacher-forced log-probs of the prompt tokens (raw: the model's "
                    "distribution at temperature 1), with this many most likely tokens")
    repetition_penalty: float = Field(1.0, gt=0)
    # mlxsup's extensions
    repetition_context_size: int = Field(20, ge=1)
    logprobs_mode: Literal["processed", "raw", "processed_logprobs", "raw_logprobs"] = Field(
        "processed", description="mlxsup extension: which distribution `logprobs` reports")
    # accepted and ignored: the result is the same whatever their value (IGNORED)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    include_stop_str_in_output: bool = False
    output_kind: Optional[Any] = None
    # accepted at their neutral value only (NEUTRAL)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logit_bias: Optional[dict[str, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    structured_outputs: Optional[dict] = None
    guided_decoding: Optional[dict] = None
    logits_processors: Optional[list] = None
    truncate_prompt_tokens: Optional[int] = None
    extra_args: Optional[dict] = None
    best_of: Optional[int] = None
    flat_logprobs: bool = False


IGNORED = ("skip_special_tokens", "spaces_between_special_tokens", "detokenize",
           "include_stop_str_in_output", "output_kind")


def _empty(value) -> bool:
    return not value


NEUTRAL = {
    "presence_penalty": lambda v, p: v == 0,
    "frequency_penalty": lambda v, p: v == 0,
    "min_tokens": lambda v, p: v == 0,
    "logit_bias": lambda v, p: _empty(v),
    "allowed_token_ids": lambda v, p: _empty(v),
    "bad_words": lambda v, p: _empty(v),
    "structured_outputs": lambda v, p: _empty(v),
    "guided_decoding": lambda v, p: _empty(v),
    "logits_processors": lambda v, p: _empty(v),
    "truncate_prompt_tokens": lambda v, p: v is None,
    "extra_args": lambda v, p: _empty(v),
    "best_of": lambda v, p: v is None or v == p.n,
    "flat_logprobs": lambda v, p: not v,
}


def check_neutral(params: VllmSamplingParams, prefix: str = "sampling_params") -> None:
    """422 for a vLLM parameter mlxsup does not implement, set to a value that changes output."""
    for name, is_neutral in NEUTRAL.items():
        value = getattr(params, name)
        if not is_neutral(value, params):
            raise invalid(f"{prefix}.{name}", f"{prefix}.{name}={value!r} is not supported by "
                          "mlxsup (it would change the samples); leave it at its default")


class GenerateTokensRequest(_Body):
    """POST /inference/v1/generate: tokens in, tokens out."""

    token_ids: list[int] = Field(min_length=1)
    sampling_params: VllmSamplingParams = Field(default_factory=VllmSamplingParams)
    model: Optional[str] = None
    request_id: Optional[str] = Field(None, max_length=256)
    cache_salt: Optional[str] = None
    priority: int = 0
    stream: bool = False
    stream_options: Optional[dict] = None
    kv_transfer_params: Optional[dict] = None
    features: Optional[dict] = None
    # mlxsup's extension
    min_policy_version: Optional[int] = Field(None, ge=0)


class TokenizeRequest(_Body):
    """POST /tokenize: `prompt` (text) or `messages` (through the chat template)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict]] = None
    tools: Optional[list[dict]] = None
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: Optional[dict] = None


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int]


class AbortRequestsRequest(_Body):
    """POST /abort_requests: the request ids given, or every request when none are."""

    request_ids: list[str] = Field(default_factory=list)


class LoadLoraRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False
    mode: Literal["drain", "abort", "inflight"] = Field(
        "drain", description="mlxsup extension: how the swap commits")


class UnloadLoraRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_int_id: Optional[int] = None
    mode: Literal["drain", "abort", "inflight"] = "drain"


# ---------------------------------------------------------------- responses (for the OpenAPI document)


class TopLogprob(BaseModel):
    token: str = Field(description='"token_id:<id>" on /inference/v1/generate')
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(
        description="the k most likely tokens, plus the sampled one when not among them")


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class GenerateTokensChoice(BaseModel):
    index: int
    token_ids: list[int]
    logprobs: Optional[ChoiceLogprobs]
    finish_reason: Literal["stop", "length", "abort"]
    generated_by_version: int = Field(description="mlxsup: the version of the first token")
    token_versions: list[int] = Field(description="mlxsup: the version of each token")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateTokensResponse(BaseModel):
    request_id: str
    model: str
    prompt_token_ids: list[int]
    choices: list[GenerateTokensChoice]
    prompt_logprobs: Optional[list[Optional[dict[str, dict]]]] = Field(
        description="null for the first token, then {token id: {logprob, rank, decoded_token}}")
    usage: Usage
    policy_version: int = Field(description="mlxsup: the version serving when it answered")


class PauseState(BaseModel):
    is_paused: bool
    mode: Optional[Literal["abort", "wait", "keep"]]
    status: Optional[str] = None
    num_aborted: Optional[int] = None
    policy_version: Optional[int] = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: Optional[int]
    tokens: list[int]
    token_strs: Optional[list[str]]


class DetokenizeResponse(BaseModel):
    prompt: str


class AbortRequestsResponse(BaseModel):
    status: Literal["cancelled"]
    cancelled_request_ids: list[str]
    num_aborted: Optional[int] = None


REF = "#/components/schemas/{model}"


def openapi(op, json_body) -> tuple[dict, dict]:
    """(paths, component schemas) of vLLM's routes, from the models above. `op` and
    `json_body` are mlxsup.api.spec's operation and content builders."""
    components: dict = {}

    def schema(model) -> dict:
        s = model.model_json_schema(ref_template=REF)
        components.update(s.pop("$defs", {}))
        components[model.__name__] = s
        return {"$ref": REF.format(model=model.__name__)}

    def ok(model, description="ok"):
        return {"description": description, **json_body(schema(model))}

    common = (400, 401, 403, 413, 422, 503)
    mode = {"name": "mode", "in": "query", "required": False,
            "schema": {"enum": ["abort", "wait", "keep"], "default": "abort"}}
    wait = {"name": "wait_for_inflight_requests", "in": "query", "required": False,
            "schema": {"type": "boolean", "default": False},
            "description": "older spelling of mode=wait (used when mode is absent)"}
    paths = {
        "/inference/v1/generate": {"post": op(
            "vLLM: tokens in, tokens out", ok(GenerateTokensResponse), *common,
            body=schema(GenerateTokensRequest))},
        "/tokenize": {"post": op("vLLM: tokenize a prompt or messages", ok(TokenizeResponse),
                                 400, 401, 403, 422, 503, body=schema(TokenizeRequest))},
        "/detokenize": {"post": op("vLLM: token ids to text", ok(DetokenizeResponse),
                                   400, 401, 403, 422, 503, body=schema(DetokenizeRequest))},
        "/pause": {"post": op("vLLM: pause generation (abort, wait or keep in-flight requests)",
                              ok(PauseState, "paused (mode=wait: once in-flight requests are done)"),
                              401, 403, 422, 503, admin=True, parameters=[mode, wait])},
        "/resume": {"post": op("vLLM: resume after a pause", ok(PauseState), 401, 403, 503,
                               admin=True)},
        "/is_paused": {"get": op("vLLM: the pause state", ok(PauseState), 401, 403, 503)},
        "/abort_requests": {"post": op("vLLM: abort the given requests (any worker), or all",
                                       ok(AbortRequestsResponse), 400, 401, 403, 422, 503,
                                       body=schema(AbortRequestsRequest), admin=True)},
        "/v1/load_lora_adapter": {"post": op(
            "vLLM: load a LoRA adapter (a versioned swap)",
            {"description": "committed", **json_body({"$ref": "#/components/schemas/SwapResult"})},
            400, 401, 403, 404, 422, 503, body=schema(LoadLoraRequest), admin=True)},
        "/v1/unload_lora_adapter": {"post": op(
            "vLLM: back to the base model (a versioned swap)",
            {"description": "committed", **json_body({"$ref": "#/components/schemas/SwapResult"})},
            400, 401, 403, 422, 503, body=schema(UnloadLoraRequest), admin=True)},
    }
    return paths, components
