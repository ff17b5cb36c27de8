"""The OpenAI routes' bodies (POST /v1/completions, POST /v1/chat/completions, GET /v1/models),
requests and responses, streamed chunks included; built from `mlxsup.api.protocol`'s field types.

OpenAI parameters mlxsup does not implement are declared as accepted-and-ignored fields (any
JSON value; docs/api.md lists them), so the official SDK's requests pass; any other unknown
field is refused, as on the seed's routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, create_model

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
    "parallel_tool_calls", "functions", "function_call", "response_format",
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


class _VllmExtras(RequestBody):
    """vLLM's extensions of the OpenAI routes (api/vllm.py writes their answers)."""

    return_token_ids: bool = Field(False, description="vLLM extension: the prompt's and each choice's token ids")
    return_tokens_as_token_ids: bool = Field(False, description='vLLM extension: log-prob tokens as '
                                                                '"token_id:<id>"')
    prompt_logprobs: Optional[Int(0, 20)] = Field(
        None, description="vLLM extension: teacher-forced log-probs of the prompt tokens (raw), with this "
                          "many most likely tokens each")


class _CompletionRequest(_VllmExtras, _OpenAICommon):
    prompt: OneOf("a string, an array of strings, an array of token ids or an array of such arrays",
                  text=Text(), texts=Batch(Text(min_length=0)), ids=TokenIds, id_batch=Batch(TokenIds))
    max_tokens: Optional[Int(0, MAX_MAX_TOKENS)] = Field(
        None, description="OpenAI's default, 16 (or the room the context leaves when that is less); 0 "
                          "generates nothing (with echo: the prompt's log-probs only; not with stream)")
    logprobs: Optional[Int(0, 20)] = Field(None, description="the sampled token's log-prob and the `logprobs` "
                                                              "most likely tokens' at each position")
    echo: bool = Field(False, description="prepend the prompt to the text (with logprobs: and its "
                                          "teacher-forced log-probs)")


CompletionRequest = _with_ignored("CompletionRequest", _CompletionRequest, OPENAI_COMPLETIONS_IGNORED)


class ChatMessage(OpenRequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: Optional[Text(256)] = None


class FunctionDefinition(OpenRequestBody):
    """A tool's function (its JSON schema goes to the chat template as given)."""

    name: Text(256, 1)


class Tool(OpenRequestBody):
    type: Literal["function"] = "function"
    function: FunctionDefinition


def _tool_choice_kind(value) -> Optional[str]:
    return "~str" if isinstance(value, str) else "~object" if isinstance(value, dict) else None


ToolChoice = Annotated[
    Union[Annotated[Literal["none", "auto", "required"], Tag("~str")], Annotated[dict[str, Any], Tag("~object")]],
    Discriminator(_tool_choice_kind, custom_error_type="one_of",
                  custom_error_message='must be "none", "auto", "required" or an object'),
]


class _ChatCompletionRequest(_VllmExtras, _OpenAICommon):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    tools: Optional[Annotated[list[Tool], Field(max_length=1024)]] = Field(
        None, description="rendered by the chat template; calls in the output are parsed into "
                          "message.tool_calls where mlx-lm has a parser for the model")
    tool_choice: Optional[ToolChoice] = Field(
        None, description='"auto" (with tools) or "none"; "required" and a named function are refused '
                          "(they need constrained decoding)")
    max_tokens: Optional[Int(1, MAX_MAX_TOKENS)] = Field(None, description="default: the server's --max-tokens")
    max_completion_tokens: Optional[Int(1, MAX_MAX_TOKENS)] = Field(
        None, description="wins over max_tokens when both are given")
    logprobs: bool = False
    top_logprobs: Optional[Int(0, 20)] = Field(None, description="the most likely tokens at each position "
                                                                 "(with logprobs)")


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
    token_logprobs: list[Optional[LogProb]] = Field(description="with echo: null for the prompt's first token")
    top_logprobs: Optional[list[Optional[dict[str, LogProb]]]]
    text_offset: list[int]


FinishReason = Optional[Literal["stop", "length", "abort"]]
ChatFinishReason = Optional[Literal["stop", "length", "abort", "tool_calls"]]


class PromptLogprob(ResponseBody):
    logprob: LogProb
    rank: Optional[int] = Field(description="1-based among the most likely; null for the prompt token "
                                            "when it is not among them")
    decoded_token: str


PromptLogprobs = list[Optional[dict[str, PromptLogprob]]]
_PROMPT_LOGPROBS = "vLLM extension (prompt_logprobs): null for the first token, then {token id: " \
                   "{logprob, rank, decoded_token}}"


class CompletionChoice(ResponseBody):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: FinishReason
    prompt_logprobs: PromptLogprobs = Field(None, description=_PROMPT_LOGPROBS)
    prompt_token_ids: list[int] = Field(None, description="vLLM extension (return_token_ids)")
    token_ids: list[int] = Field(None, description="vLLM extension (return_token_ids): this choice's "
                                                   "(streamed: the chunk's) token ids")


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


class ToolCallFunction(ResponseBody):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCall(ResponseBody):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class StreamedToolCall(ToolCall):
    index: int


class AssistantMessage(ResponseBody):
    role: Literal["assistant"]
    content: Optional[str] = Field(description="null when the answer is only tool calls")
    refusal: None
    tool_calls: list[ToolCall] = Field(None, description="parsed from the output (with tools)")


class ChatChoice(ResponseBody):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: ChatFinishReason
    token_ids: list[int] = Field(None, description="vLLM extension (return_token_ids)")


class ChatCompletionResponse(ResponseBody):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage
    policy_version: int = Field(description="mlxsup extension: the version served when the answer was sent")
    prompt_token_ids: list[int] = Field(None, description="vLLM extension (return_token_ids)")
    prompt_logprobs: PromptLogprobs = Field(None, description=_PROMPT_LOGPROBS)


class ChatDelta(ResponseBody):
    role: Literal["assistant"] = None
    content: str = None
    tool_calls: list[StreamedToolCall] = None


class ChatChunkChoice(ResponseBody):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: ChatFinishReason
    token_ids: list[int] = Field(None, description="vLLM extension (return_token_ids): the chunk's token ids")


class ChatCompletionChunk(ResponseBody):
    """One streamed event of /v1/chat/completions (`data: <chunk>`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChunkChoice]
    prompt_token_ids: list[int] = Field(None, description="vLLM extension (return_token_ids): in the first "
                                                          "chunk")
    usage: Optional[Usage] = Field(None, description="with stream_options.include_usage: null, and the "
                                                     "totals in a last chunk with no choices")
