"""Request schemas of every route, declared once: they validate requests and generate the
OpenAPI document (`mlxsup.api.spec`).

`/generate`, `/score` and the adapter routes refuse unknown fields, naming them (a typo such as
`max_token` must not fall back to a default in the middle of a training run). The OpenAI routes
accept the OpenAI parameters listed in `OPENAI_*_IGNORED` and ignore them; any other unknown
field is refused too.
"""

from __future__ import annotations

from mlxsup.api.errors import invalid
from mlxsup.api.validate import (
    AnyOf,
    Array,
    Boolean,
    Field,
    Integer,
    Null,
    Number,
    Object,
    String,
    TokenIds,
)
from mlxsup.config import SWAP_MODES, ServerConfig

MAX_PROMPT_CHARS = 4 << 20
MAX_N = 1024
MAX_STOP = 16
MAX_STOP_CHARS = 1024
MAX_MAX_TOKENS = 1 << 20
MAX_ID_CHARS = 256
INT64_MAX = 2**63 - 1

TEXT_PART = Object(
    {"type": Field(String(choices=("text",)), description="only text parts are supported"),
     "text": Field(String(max_length=MAX_PROMPT_CHARS))},
    name="TextPart",
)
MESSAGE = Object(
    {
        "role": Field(String(min_length=1, max_length=64)),
        "content": Field(
            AnyOf([String(max_length=MAX_PROMPT_CHARS), Array(TEXT_PART, max_items=4096), Null()],
                  describe="a string or an array of text parts"),
            default=None,
        ),
        "name": Field(String(max_length=256), default=None),
    },
    allow_unknown=True,  # tool_calls, tool_call_id, ...: handed to the chat template as given
    name="Message",
)
CONVERSATION = Array(MESSAGE, min_items=1, max_items=4096)

LOGPROBS_MODE = String(choices=("processed", "raw"))
STOP = AnyOf(
    [String(min_length=1, max_length=MAX_STOP_CHARS),
     Array(String(min_length=1, max_length=MAX_STOP_CHARS), max_items=MAX_STOP)],
    describe="a string or an array of strings",
)


CACHE_SALT = Field(String(max_length=MAX_ID_CHARS), "",
                   description="prefix-cache entries are shared only between requests with the same "
                               "salt (vLLM's name); the default \"\" shares them with every unsalted request")

# /generate and the OpenAI routes (not /score, which samples nothing).
IGNORE_EOS = Field(Boolean(), False,
                   description="keep generating past the tokenizer's EOS until max_tokens or a stop")


def _sampling_fields(temperature_default: float) -> dict:
    return {
        "temperature": Field(Number(minimum=0.0, maximum=1e4), temperature_default,
                             description="0 is greedy"),
        "top_p": Field(Number(minimum=0.0, maximum=1.0, exclusive_minimum=True), 1.0,
                       description="1 is off"),
        "top_k": Field(Integer(minimum=-1, maximum=2**31 - 1), 0,
                       description="0 (or -1) is off"),
        "min_p": Field(Number(minimum=0.0, maximum=1.0, exclusive_maximum=True), 0.0,
                       description="0 is off"),
        "repetition_penalty": Field(Number(minimum=0.0, maximum=1e4, exclusive_minimum=True), 1.0,
                                    description="1 is off"),
    }


def _one_of_inputs(names: tuple) -> callable:
    def check(out: dict, path: str) -> None:
        given = [k for k in names if out.get(k) is not None]
        if not given:
            raise invalid(names[0], f"give one of: {', '.join(names)}")
        if len(given) > 1:
            raise invalid(given[1], f"give only one of: {', '.join(names)} (got {' and '.join(given)})")
    return check


def generate_schema(config: ServerConfig) -> Object:
    return Object(
        {
            "prompt": Field(
                AnyOf([String(max_length=MAX_PROMPT_CHARS),
                       Array(String(max_length=MAX_PROMPT_CHARS), min_items=1, max_items=config.max_queue)],
                      describe="a string or an array of strings"),
                None, description="text prompt(s); the tokenizer adds its special tokens (BOS)"),
            "prompt_ids": Field(
                AnyOf([TokenIds(), Array(TokenIds(), min_items=1, max_items=config.max_queue)],
                      describe="an array of token ids or an array of such arrays"),
                None, description="token ids, used as given"),
            "messages": Field(
                AnyOf([CONVERSATION, Array(CONVERSATION, min_items=1, max_items=config.max_queue)],
                      describe="an array of messages or an array of conversations"),
                None, description="chat messages (or a list of conversations); the model's chat "
                                  "template is applied with add_generation_prompt"),
            "n": Field(Integer(minimum=1, maximum=MAX_N), 1, description="samples per prompt"),
            **_sampling_fields(0.0),
            "repetition_context_size": Field(Integer(minimum=1, maximum=1 << 20), 20),
            "ignore_eos": IGNORE_EOS,
            "max_tokens": Field(Integer(minimum=1, maximum=MAX_MAX_TOKENS), config.max_tokens,
                                description="default: the server's --max-tokens"),
            "logprobs": Field(Integer(minimum=0, maximum=2**31 - 1, accept_bool=True), 0,
                              description="0: none; >= 1: the sampled token's log-prob per position"),
            "logprobs_mode": Field(LOGPROBS_MODE, "processed",
                                   description="processed: after temperature/top-p/top-k/min-p; raw: "
                                               "log-softmax at temperature 1"),
            "stop": Field(STOP, None, description="stop strings (not part of the returned text)"),
            "seed": Field(Integer(minimum=0, maximum=INT64_MAX), None),
            "policy_version": Field(AnyOf([Integer(minimum=-INT64_MAX, maximum=INT64_MAX),
                                           String(max_length=MAX_ID_CHARS)],
                                          describe="an integer or a string"),
                                    None, description="echoed"),
            "step_id": Field(Integer(minimum=-INT64_MAX, maximum=INT64_MAX), None,
                             description="echoed"),
            "request_id": Field(String(min_length=1, max_length=MAX_ID_CHARS), None,
                                description="echoed; generated when absent; POST /abort takes it"),
            "min_policy_version": Field(Integer(minimum=0, maximum=INT64_MAX), None,
                                        description="wait (bounded) until the server reaches this version"),
            "cache_salt": CACHE_SALT,
        },
        check_all=_one_of_inputs(("prompt", "prompt_ids", "messages")),
        name="GenerateRequest",
    )


def score_schema(config: ServerConfig) -> Object:
    return Object(
        {
            "prompt_ids": Field(TokenIds(), None),
            "prompt": Field(String(max_length=MAX_PROMPT_CHARS), None,
                            description="text prompt, tokenized as /generate does"),
            "messages": Field(CONVERSATION, None, description="chat messages, templated as /generate does"),
            "completion_ids": Field(TokenIds(), description="the tokens to score"),
            "logprobs_mode": Field(LOGPROBS_MODE, "processed"),
            **_sampling_fields(0.0),
            "repetition_context_size": Field(Integer(minimum=1, maximum=1 << 20), 20),
            "request_id": Field(String(min_length=1, max_length=MAX_ID_CHARS), None),
            "cache_salt": CACHE_SALT,
        },
        check_all=_one_of_inputs(("prompt_ids", "prompt", "messages")),
        name="ScoreRequest",
    )


LOAD_ADAPTER = Object(
    {
        "adapter_path": Field(AnyOf([String(min_length=1, max_length=4096), Null()],
                                    describe="a path or null"),
                              description="directory with adapter_config.json and adapters.safetensors; "
                                          "null returns to the base model"),
        "mode": Field(String(choices=SWAP_MODES), "drain"),
    },
    name="LoadAdapterRequest",
)

ABORT = Object(
    {"request_id": Field(String(min_length=1, max_length=MAX_ID_CHARS))},
    name="AbortRequest",
)

# ---------------------------------------------------------------- OpenAI routes

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

STREAM_OPTIONS = Object(
    {"include_usage": Field(Boolean(), False)},
    ignored=frozenset({"include_obfuscation", "continuous_usage_stats"}),
    name="StreamOptions",
)

_MLXSUP_EXTRAS = {
    "logprobs_mode": Field(LOGPROBS_MODE, "processed",
                           description="mlxsup extension: which log-probs `logprobs` reports"),
    "min_policy_version": Field(Integer(minimum=0, maximum=INT64_MAX), None,
                                description="mlxsup extension: wait until the server reaches this version"),
    "repetition_context_size": Field(Integer(minimum=1, maximum=1 << 20), 20),
    "cache_salt": CACHE_SALT,
}


def completions_schema(config: ServerConfig) -> Object:
    return Object(
        {
            "model": Field(String(max_length=4096), None,
                           description="any name is accepted (one model is served)"),
            "prompt": Field(
                AnyOf([String(max_length=MAX_PROMPT_CHARS),
                       Array(String(max_length=MAX_PROMPT_CHARS), min_items=1, max_items=config.max_queue),
                       TokenIds(),
                       Array(TokenIds(), min_items=1, max_items=config.max_queue)],
                      describe="a string, an array of strings, an array of token ids or an array of such arrays"),
            ),
            "max_tokens": Field(Integer(minimum=1, maximum=MAX_MAX_TOKENS), 16,
                                description="OpenAI's default, 16"),
            **_sampling_fields(1.0),
            "ignore_eos": IGNORE_EOS,
            "n": Field(Integer(minimum=1, maximum=MAX_N), 1),
            "stream": Field(Boolean(), False),
            "stream_options": Field(STREAM_OPTIONS, None),
            "logprobs": Field(Integer(minimum=0, maximum=20), None,
                              description="any value >= 0 returns the sampled token's log-prob"),
            "echo": Field(Boolean(), False, description="prepend the prompt to the text"),
            "stop": Field(STOP, None),
            "seed": Field(Integer(minimum=0, maximum=INT64_MAX), None),
            **_MLXSUP_EXTRAS,
        },
        ignored=frozenset(OPENAI_COMPLETIONS_IGNORED),
        name="CompletionRequest",
    )


OPENAI_MESSAGE = Object(
    {
        "role": Field(String(choices=("system", "developer", "user", "assistant", "tool"))),
        "content": Field(
            AnyOf([String(max_length=MAX_PROMPT_CHARS), Array(TEXT_PART, max_items=4096), Null()],
                  describe="a string or an array of text parts"),
            default=None,
        ),
        "name": Field(String(max_length=256), None),
    },
    allow_unknown=True,
    name="ChatMessage",
)


def chat_schema(config: ServerConfig) -> Object:
    return Object(
        {
            "model": Field(String(max_length=4096), None,
                           description="any name is accepted (one model is served)"),
            "messages": Field(Array(OPENAI_MESSAGE, min_items=1, max_items=4096)),
            "max_tokens": Field(Integer(minimum=1, maximum=MAX_MAX_TOKENS), None,
                                description="default: the server's --max-tokens"),
            "max_completion_tokens": Field(Integer(minimum=1, maximum=MAX_MAX_TOKENS), None,
                                           description="wins over max_tokens when both are given"),
            **_sampling_fields(1.0),
            "ignore_eos": IGNORE_EOS,
            "n": Field(Integer(minimum=1, maximum=MAX_N), 1),
            "stream": Field(Boolean(), False),
            "stream_options": Field(STREAM_OPTIONS, None),
            "logprobs": Field(Boolean(), False),
            "top_logprobs": Field(Integer(minimum=0, maximum=20), None,
                                  description="accepted; only the sampled token is listed"),
            "stop": Field(STOP, None),
            "seed": Field(Integer(minimum=0, maximum=INT64_MAX), None),
            **_MLXSUP_EXTRAS,
        },
        ignored=frozenset(OPENAI_CHAT_IGNORED),
        name="ChatCompletionRequest",
    )


def stop_list(stop) -> tuple:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class Schemas:
    """The schemas of one server configuration (defaults such as max_tokens come from it)."""

    def __init__(self, config: ServerConfig):
        self.generate = generate_schema(config)
        self.score = score_schema(config)
        self.load_adapter = LOAD_ADAPTER
        self.abort = ABORT
        self.completions = completions_schema(config)
        self.chat = chat_schema(config)
