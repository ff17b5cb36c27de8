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

from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, Field

from mlxsup.api.errors import invalid
from mlxsup.api.protocol import (
    CACHE_SALT_DOC,
    MAX_ID_CHARS,
    MAX_TOKEN_ID,
    MAX_TOKEN_IDS,
    LogProb,
    RequestBody,
    ResponseBody,
    Stop,
    SwapResult,
    Text,
    TokenIds,
    _check_vocab,
)
from mlxsup.api.openai_protocol import PromptLogprobs, Usage
from mlxsup.config import MAX_N, SWAP_DRAIN, SWAP_MODES
from mlxsup.ipc.messages import LOGPROBS_PROCESSED, LOGPROBS_RAW, MAX_TOP_LOGPROBS, PAUSE_MODES


class _Body(RequestBody):
    """strict, unknown fields refused, null for an optional field = its default (as every body:
    `mlxsup.api.protocol.RequestBody`)."""


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
    stop: Optional[Stop] = None
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

    token_ids: TokenIds = Field(description="checked against the model's vocabulary")
    sampling_params: VllmSamplingParams = Field(default_factory=VllmSamplingParams)
    model: Optional[str] = None
    request_id: Optional[str] = Field(None, max_length=256)
    cache_salt: Text(MAX_ID_CHARS) = Field("", description=CACHE_SALT_DOC)
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
    tokens: Annotated[list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]], Field(max_length=MAX_TOKEN_IDS),
                      AfterValidator(_check_vocab)]


class AbortRequestsRequest(_Body):
    """POST /abort_requests: the request ids given, or every request when none are."""

    request_ids: list[str] = Field(default_factory=list)


class LoadLoraRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False
    mode: Literal[SWAP_MODES] = Field(  # type: ignore[valid-type]
        SWAP_DRAIN, description="mlxsup extension: how the swap commits")


class UnloadLoraRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_int_id: Optional[int] = None
    mode: Literal[SWAP_MODES] = SWAP_DRAIN  # type: ignore[valid-type]


# ---------------------------------------------------------------- responses (for the OpenAPI document)


class VllmTopLogprob(ResponseBody):
    token: str = Field(description='"token_id:<id>" on /inference/v1/generate')
    logprob: LogProb
    bytes: list[int]


class VllmTokenLogprob(VllmTopLogprob):
    top_logprobs: list[VllmTopLogprob] = Field(
        description="the k most likely tokens, plus the sampled one when not among them")


class VllmChoiceLogprobs(ResponseBody):
    content: list[VllmTokenLogprob]


class GenerateTokensChoice(ResponseBody):
    index: int
    token_ids: list[int]
    logprobs: Optional[VllmChoiceLogprobs]
    finish_reason: Literal["stop", "length", "abort"]
    generated_by_version: int = Field(description="mlxsup: the version of the first token")
    token_versions: list[int] = Field(description="mlxsup: the version of each token")





class GenerateTokensResponse(ResponseBody):
    request_id: str
    model: str
    prompt_token_ids: list[int]
    choices: list[GenerateTokensChoice]
    prompt_logprobs: Optional[PromptLogprobs] = Field(
        description="null for the first token, then {token id: {logprob, rank, decoded_token}}")
    usage: Usage
    policy_version: int = Field(description="mlxsup: the version serving when it answered")


class GenerateTokensChunkChoice(ResponseBody):
    index: int
    token_ids: list[int] = Field(description="the new tokens of this choice")
    logprobs: Optional[VllmChoiceLogprobs]
    finish_reason: Optional[Literal["stop", "length", "abort"]]
    token_versions: list[int]


class GenerateTokensChunk(ResponseBody):
    """One streamed event of /inference/v1/generate (`data: <chunk>`)."""

    request_id: str
    choices: list[GenerateTokensChunkChoice]
    usage: Optional[Usage] = Field(None, description="with stream_options.include_usage: in a last chunk "
                                                     "with no choices")


class PauseState(ResponseBody):
    is_paused: bool
    mode: Optional[Literal[PAUSE_MODES]]  # type: ignore[valid-type]
    status: Optional[str] = None
    num_aborted: Optional[int] = None
    policy_version: Optional[int] = None


class TokenizeResponse(ResponseBody):
    count: int
    max_model_len: Optional[int]
    tokens: list[int]
    token_strs: Optional[list[str]]


class DetokenizeResponse(ResponseBody):
    prompt: str


class AbortRequestsResponse(ResponseBody):
    status: Literal["cancelled"]
    cancelled_request_ids: list[str]
    num_aborted: Optional[int] = None




class LoraSwapResult(SwapResult):
    """/v1/load_lora_adapter and /v1/unload_lora_adapter: the swap's answer and the name given."""

    lora_name: str
