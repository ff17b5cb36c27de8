"""The OpenAI routes' bodies (POST /v1/completions, POST /v1/chat/completions, GET /v1/models),
requests and responses, streamed chunks included; built from `mlxsup.api.protocol`'s field types.

OpenAI parameters mlxsup does not implement are declared as accepted-and-ignored fields (any
JSON value; docs/api.md lists them), so the official SDK's requests pass; any other unknown
field is refused, as on the seed's routes.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, create_model

from mlxsup.api.protocol import (
    CACHE_SALT_DOC,
    MAX_MAX_TOKENS,
    MAX_N,
    Batch,
    Content,
    Int,
    LogProb,
    LogprobsMode,
    Num,
    OneOf,
    OpenRequestBody,
    RequestBody,
    ResponseBody,
    Sampling,
    Seed,
    Stop,
    Text,
    TokenIds,
)

OPENAI_COMMON_IGNORED = frozenset({
    "frequency_penalty", "presence_penalty", "logit_bias", "user", "service_tier", "store",
    "metadata",
})
OPENAI_COMPLETIONS_IGNORED = OPENAI_COMMON_IGNORED | {"best_of", "suffix"}
OPENAI_CHAT_IGNORED = OPENAI_COMMON_IGNORED | {
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format",
    "modalities", "audio", "prediction", "reasoning_effort", "web_search_options", "verbosity",
    "prompt_cache_key", "safety_identifier",
}
_IGNORED = "accepted and ignored (not implemented)"


def _with_ignored(name: str, base: type, ignored) -> type:
    """`base` plus one accepted-and-ignored field (any JSON value) per name in `ignored`."""
    fields = {k: (Any, Field(None, description=_IGNORED)) for k in sorted(ignored)}
    return create_model(name, __base__=base, __module__=__name__, **fields)


class _StreamOptions(RequestBody):
    include_usage: bool = False


StreamOptions = _with_ignored("StreamOptions", _StreamOptions, {"include_obfuscation", "continuous_usage_stats"})


class _OpenAICommon(Sampling):
    model: Optional[Text(4096)] = Field(None, description="any name is accepted (one model is served)")
    temperature: Num(ge=0.0, le=1e4) = Field(1.0, description="0 is greedy")
    ignore_eos: bool = Field(False, description="keep generating past the tokenizer's EOS until max_tokens "
                                                "or a stop")
    n: Int(1, MAX_N) = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Stop] = None
    seed: Seed = None
    logprobs_mode: LogprobsMode = Field("processed", description="mlxsup extension: which log-probs "
                                                                 "`logprobs` reports")
    min_policy_version: Optional[Int(0, 2**63 - 1)] = Field(
        None, description="mlxsup extension: wait until the server reaches this version")
    cache_salt: Text(256) = Field("", description="mlxsup extension (vLLM's name): " + CACHE_SALT_DOC)


class _CompletionRequest(_OpenAICommon):
    prompt: OneOf("a string, an array of strings, an array of token ids or an array of such arrays",
                  text=Text(), texts=Batch(Text(min_length=0)), ids=TokenIds, id_batch=Batch(TokenIds))
    max_tokens: Optional[Int(1, MAX_MAX_TOKENS)] = Field(
        None, description="OpenAI's default, 16 (or the room the context leaves when that is less)")
    logprobs: Optional[Int(0, 20)] = Field(None, description="any value >= 0 returns the sampled token's log-prob")
    echo: bool = Field(False, description="prepend the prompt to the text")


CompletionRequest = _with_ignored("CompletionRequest", _CompletionRequest, OPENAI_COMPLETIONS_IGNORED)


class ChatMessage(OpenRequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: Optional[Text(256)] = None


class _ChatCompletionRequest(_OpenAICommon):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: Optional[Int(1, MAX_MAX_TOKENS)] = Field(None, description="default: the server's --max-tokens")
    max_completion_tokens: Optional[Int(1, MAX_MAX_TOKENS)] = Field(
        None, description="wins over max_tokens when both are given")
    logprobs: bool = False
    top_logprobs: Optional[Int(0, 20)] = Field(None, description="accepted; only the sampled token is listed")


ChatCompletionRequest = _with_ignored("ChatCompletionRequest", _ChatCompletionRequest, OPENAI_CHAT_IGNORED)


# ---------------------------------------------------------------- responses


class ModelCard(ResponseBody):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: Optional[int] = Field(description="the engine's context length (null while not known)")


class ModelList(ResponseBody):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(ResponseBody):
    cached_tokens: int = Field(0, description="prompt tokens served from the prefix cache")


class Usage(ResponseBody):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(ResponseBody):
    tokens: list[str]
    token_logprobs: list[LogProb]
    top_logprobs: Optional[list[dict[str, LogProb]]]
    text_offset: list[int]


FinishReason = Optional[Literal["stop", "length", "abort"]]


class CompletionChoice(ResponseBody):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: FinishReason


class CompletionResponse(ResponseBody):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]
    usage: Usage
    policy_version: int = Field(description="mlxsup extension: the version served when the answer was sent")


class CompletionChunk(ResponseBody):
    """One streamed event of /v1/completions (`data: <chunk>`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]
    usage: Optional[Usage] = Field(None, description="with stream_options.include_usage: null, and the "
                                                     "totals in a last chunk with no choices")


class TopLogprob(ResponseBody):
    token: str
    logprob: LogProb
    bytes: list[int]


class ChatLogprobEntry(ResponseBody):
    token: str
    logprob: LogProb
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(ResponseBody):
    content: list[ChatLogprobEntry]
    refusal: None


class AssistantMessage(ResponseBody):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(ResponseBody):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: FinishReason


class ChatCompletionResponse(ResponseBody):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage
    policy_version: int = Field(description="mlxsup extension: the version served when the answer was sent")


class ChatDelta(ResponseBody):
    role: Literal["assistant"] = None
    content: str = None


class ChatChunkChoice(ResponseBody):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: FinishReason


class ChatCompletionChunk(ResponseBody):
    """One streamed event of /v1/chat/completions (`data: <chunk>`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = Field(None, description="with stream_options.include_usage: null, and the "
                                                     "totals in a last chunk with no choices")
