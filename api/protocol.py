"""Every body of the seed's routes, declared once as pydantic models (as vLLM's protocol.py):
requests (validated by `mlxsup.api.parsing.parse_body`) and responses; the OpenAPI document
(`mlxsup.api.spec`) is generated from them. The OpenAI routes' bodies are in
`mlxsup.api.openai_protocol`, built from the field types here.

Rules every request model follows (docs/api.md, "Validation"):
- unknown fields are refused (`extra="forbid"`, additionalProperties false), naming them;
- types are strict (no "7" for 7, no true for 1), except that an integral float (2.0) is an
  integer and `/generate`'s `logprobs` takes a boolean (seed clients send `true`);
- an optional field given as null takes its default;
- a field that takes several shapes (a string or an array of strings, ...) picks the shape by
  the value's JSON type (a `Discriminator`), so an error names the innermost bad item.

Limits that depend on the running model (vocabulary size, context length) or the server's
configuration (--max-queue) are not in the document: they come in the validation context
(`parsing.Limits`) and are checked once, here and in `common.build_prompts`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mlxsup.config import MAX_N, SWAP_DRAIN, SWAP_MODES

MAX_PROMPT_CHARS = 4 << 20
MAX_STOP = 16
MAX_STOP_CHARS = 1024
MAX_MAX_TOKENS = 1 << 20
MAX_ID_CHARS = 256
MAX_BATCH = 1 << 16  # prompts per request in the schema; --max-queue is the real bound
MAX_TOKEN_IDS = 1 << 20
MAX_TOKEN_ID = 2**31 - 1
INT64_MAX = 2**63 - 1
# -inf log-probs (a token the processed distribution excludes) as JSON carries them; vLLM's
# choice. Every route reports max(logprob, LOGPROB_FLOOR).
LOGPROB_FLOOR = -9999.0

# Union branch tags: they appear in pydantic's error locations and are removed from the field
# path (parsing.py); their names say which shape the value was read as.
TAGS = frozenset({"~text", "~texts", "~ids", "~id_batch", "~conversation", "~conversations",
                  "~int", "~str", "~parts", "~object"})
TOKEN_ID_TAGS = frozenset({"~ids", "~id_batch"})
TOKEN_ID_FIELDS = frozenset({"prompt_ids", "completion_ids"})


def _integral(value):
    """2.0 is the integer 2 (JSON has one number type); 2.5 stays a float and is refused."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def _bool_as_int(value):
    return int(value) if isinstance(value, bool) else _integral(value)


def Int(ge: int, le: int, **kw):
    # the validator goes last: it runs first, on the raw value, and the schema stays plain
    return Annotated[int, Field(ge=ge, le=le, **kw), BeforeValidator(_integral)]


def Num(**kw):
    return Annotated[float, Field(allow_inf_nan=False, **kw)]


def Text(max_length: int = MAX_PROMPT_CHARS, min_length: int = 0):
    return Annotated[str, Field(min_length=min_length, max_length=max_length)]


def _check_vocab(ids: list, info: ValidationInfo) -> list:
    """The one check of token ids against the model's vocabulary (the engine publishes its
    size when it reports ready; `parsing.Limits`)."""
    vocab = (info.context or {}).get("vocab_size") if info is not None else None
    if vocab and ids and max(ids) >= vocab:
        index = next(i for i, t in enumerate(ids) if t >= vocab)
        raise PydanticCustomError("token_not_in_vocab", "not a token id of this model",
                                  {"index": index, "vocab_size": vocab})
    return ids


TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]],
    Field(min_length=1, max_length=MAX_TOKEN_IDS),
    AfterValidator(_check_vocab),
]


def _check_batch(items: list, info: ValidationInfo) -> list:
    """At most --max-queue prompts in one request."""
    limit = (info.context or {}).get("max_queue") if info is not None else None
    if limit and len(items) > limit:
        raise PydanticCustomError("too_long", "too many prompts", {"max_length": limit})
    return items


def Batch(item):
    return Annotated[list[item], Field(min_length=1, max_length=MAX_BATCH), AfterValidator(_check_batch)]


def _json_kind(value) -> Optional[str]:
    """The branch of a tagged union that a JSON value is read as (None: no branch fits)."""
    if isinstance(value, str):
        return "~text"
    if isinstance(value, list):
        first = value[0] if value else None
        if isinstance(first, list):
            return "~id_batch"
        if isinstance(first, dict):
            return "~conversation"
        if isinstance(first, int) and not isinstance(first, bool):
            return "~ids"
        return "~texts"
    return None


def _kind_of(*tags: str):
    """A discriminator over `tags` (in declared order) from the value's JSON type: a list whose
    items fit no branch is read as the first list branch, so the error names its bad item."""
    allowed = frozenset(tags)
    first_list = next((t for t in tags if t != "~text"), None)

    def pick(value):
        tag = _json_kind(value)
        if tag == "~id_batch" and "~conversations" in allowed:
            tag = "~conversations"
        if tag in allowed:
            return tag
        return first_list if isinstance(value, list) else None

    return pick


def OneOf(describe: str, **branches):
    """A union whose branch is picked by the value's JSON type; branches are keyword tags
    (text=..., texts=..., ids=..., ...)."""
    tags = ["~" + name for name in branches]
    members = tuple(Annotated[t, Tag("~" + name)] for name, t in branches.items())
    return Annotated[Union[members], Discriminator(
        _kind_of(*tags), custom_error_type="one_of", custom_error_message=f"must be {describe}")]


def _scalar_kind(value) -> Optional[str]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return "~int"
    if isinstance(value, str):
        return "~str"
    return None


PolicyVersion = Annotated[
    Union[Annotated[Int(-INT64_MAX, INT64_MAX), Tag("~int")], Annotated[Text(MAX_ID_CHARS), Tag("~str")]],
    Discriminator(_scalar_kind, custom_error_type="one_of", custom_error_message="must be an integer or a string"),
]


class RequestBody(BaseModel):
    """A request body: strict types, unknown fields refused, null for an optional field = its
    default."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)
    _optional: ClassVar[frozenset] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kw):
        super().__pydantic_init_subclass__(**kw)
        cls._optional = frozenset(name for name, f in cls.model_fields.items() if not f.is_required())

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict) and None in data.values():
            optional = cls._optional
            return {k: v for k, v in data.items() if v is not None or k not in optional}
        return data


class OpenRequestBody(RequestBody):
    """A request body that keeps fields it does not declare (chat messages: `tool_calls`,
    `tool_call_id`, ... go to the chat template as given)."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(RequestBody):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: Text()


Content = Optional[OneOf("a string or an array of text parts", text=Text(), texts=list[TextPart])]


class Message(OpenRequestBody):
    role: Text(64, 1)
    content: Content = None
    name: Optional[Text(256)] = None


Conversation = Annotated[list[Message], Field(min_length=1, max_length=4096)]
LogprobsMode = Literal["processed", "raw"]
Stop = OneOf("a string or an array of strings", text=Text(MAX_STOP_CHARS, 1),
             texts=Annotated[list[Text(MAX_STOP_CHARS, 1)], Field(max_length=MAX_STOP)])
Seed = Optional[Int(0, INT64_MAX)]
RequestId = Optional[Text(MAX_ID_CHARS, 1)]
CACHE_SALT_DOC = ("prefix-cache entries are shared only between requests with the same salt "
                  "(vLLM's name); the default \"\" shares them with every unsalted request")


class Sampling(RequestBody):
    """The sampling fields /generate, /score and the OpenAI routes share."""

    temperature: Num(ge=0.0, le=1e4) = Field(0.0, description="0 is greedy")
    top_p: Num(gt=0.0, le=1.0) = Field(1.0, description="1 is off")
    top_k: Int(-1, MAX_TOKEN_ID) = Field(0, description="0 (or -1) is off")
    min_p: Num(ge=0.0, lt=1.0) = Field(0.0, description="0 is off")
    repetition_penalty: Num(gt=0.0, le=1e4) = Field(1.0, description="1 is off")
    repetition_context_size: Int(1, 1 << 20) = 20


def exactly_one_of(body: BaseModel, names: tuple) -> None:
    given = [k for k in names if getattr(body, k) is not None]
    if not given:
        raise PydanticCustomError("one_of_inputs", "give one of: {names}",
                                  {"names": ", ".join(names), "field": names[0]})
    if len(given) > 1:
        raise PydanticCustomError("one_of_inputs", "give only one of: {names} (got {got})",
                                  {"names": ", ".join(names), "got": " and ".join(given), "field": given[1]})


# JSON Schema for "exactly one of these fields is present and not null".
def _one_of_schema(*names: str) -> dict:
    present = [{"required": [n], "properties": {n: {"not": {"type": "null"}}}} for n in names]
    return {"oneOf": [
        {"allOf": [p, *({"not": q} for q in present if q is not p)]} for p in present
    ]}


class GenerateRequest(Sampling):
    """POST /generate: exactly one of prompt, prompt_ids, messages."""

    model_config = ConfigDict(json_schema_extra=_one_of_schema("prompt", "prompt_ids", "messages"))
    INPUTS: ClassVar[tuple] = ("prompt", "prompt_ids", "messages")

    prompt: Optional[OneOf("a string or an array of strings", text=Text(), texts=Batch(Text()))] = Field(
        None, description="text prompt(s); the tokenizer adds its special tokens (BOS)")
    prompt_ids: Optional[OneOf("an array of token ids or an array of such arrays",
                               ids=TokenIds, id_batch=Batch(TokenIds))] = Field(
        None, description="token ids, used as given")
    messages: Optional[OneOf("an array of messages or an array of conversations",
                             conversation=Conversation, conversations=Batch(Conversation))] = Field(
        None, description="chat messages (or a list of conversations); the model's chat template is applied "
                          "with add_generation_prompt")
    n: Int(1, MAX_N) = Field(1, description="samples per prompt")
    ignore_eos: bool = Field(False, description="keep generating past the tokenizer's EOS until max_tokens "
                                                "or a stop")
    max_tokens: Optional[Int(1, MAX_MAX_TOKENS)] = Field(
        None, description="default: the server's --max-tokens, or the room the context leaves when that is "
                          "less; given explicitly, prompt + max_tokens must fit the context")
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOKEN_ID), BeforeValidator(_bool_as_int), WithJsonSchema(
        {"oneOf": [{"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}, {"type": "boolean"}]})] = Field(
        0, description="0: none; >= 1 (or true): the sampled token's log-prob per position")
    logprobs_mode: LogprobsMode = Field("processed", description="processed: after temperature/top-p/top-k/"
                                                                 "min-p; raw: log-softmax at temperature 1")
    stop: Optional[Stop] = Field(None, description="stop strings (not part of the returned text)")
    seed: Seed = None
    policy_version: Optional[PolicyVersion] = Field(None, description="echoed")
    step_id: Optional[Int(-INT64_MAX, INT64_MAX)] = Field(None, description="echoed")
    request_id: RequestId = Field(None, description="echoed; generated when absent; POST /abort takes it")
    min_policy_version: Optional[Int(0, INT64_MAX)] = Field(
        None, description="wait (bounded) until the server reaches this version")
    cache_salt: Text(MAX_ID_CHARS) = Field("", description=CACHE_SALT_DOC)

    @model_validator(mode="after")
    def _one_input(self):
        exactly_one_of(self, self.INPUTS)
        return self


class ScoreRequest(Sampling):
    """POST /score: exactly one of prompt_ids, prompt, messages; and completion_ids."""

    model_config = ConfigDict(json_schema_extra=_one_of_schema("prompt_ids", "prompt", "messages"))
    INPUTS: ClassVar[tuple] = ("prompt_ids", "prompt", "messages")

    prompt_ids: Optional[TokenIds] = None
    prompt: Optional[Text()] = Field(None, description="text prompt, tokenized as /generate does")
    messages: Optional[Conversation] = Field(None, description="chat messages, templated as /generate does")
    completion_ids: TokenIds = Field(description="the tokens to score")
    logprobs_mode: LogprobsMode = "processed"
    request_id: RequestId = None
    cache_salt: Text(MAX_ID_CHARS) = Field("", description=CACHE_SALT_DOC)

    @model_validator(mode="after")
    def _one_input(self):
        exactly_one_of(self, self.INPUTS)
        return self


class LoadAdapterRequest(RequestBody):
    adapter_path: Optional[Text(4096, 1)] = Field(
        description="directory with adapter_config.json and adapters.safetensors; null returns to the base model")
    mode: Literal[SWAP_MODES] = SWAP_DRAIN  # type: ignore[valid-type]


PreparedId = Text(64, 1)


class PrepareAdapterRequest(RequestBody):
    adapter_path: Optional[Text(4096, 1)] = Field(
        description="directory with adapter_config.json and adapters.safetensors; null prepares the base model")
    ttl_s: Num(gt=0.0, le=3600.0) = Field(300.0, description="seconds the server holds the prepared swap "
                                                            "before it drops it uncommitted")


class CommitAdapterRequest(RequestBody):
    prepared_id: PreparedId = Field(description="from /prepare_adapter")
    mode: Literal[SWAP_MODES] = "drain"  # type: ignore[valid-type]
    policy_version: Optional[Int(1, INT64_MAX)] = Field(
        None, description="commit as this version (a fleet names one for all replicas); at least the "
                          "server's next version; default: the next version")


class CancelAdapterRequest(RequestBody):
    prepared_id: PreparedId = Field(description="from /prepare_adapter")


class UpdateWeightsRequest(RequestBody):
    weight_dir: Text(4096, 1) = Field(  # type: ignore[valid-type]
        description="directory of safetensors files holding any subset of the model's parameters "
                    "(vLLM's and prime-rl's field)")
    mode: Literal[SWAP_MODES] = SWAP_DRAIN  # type: ignore[valid-type]


class AbortRequest(RequestBody):
    request_id: Text(MAX_ID_CHARS, 1)


# ---------------------------------------------------------------- responses


class ResponseBody(BaseModel):
    """A response body: exactly these fields (additionalProperties false)."""

    model_config = ConfigDict(extra="forbid")


LogProb = Annotated[float, Field(ge=LOGPROB_FLOOR, le=0.0, description=f"-inf is reported as {LOGPROB_FLOOR}")]


class GenerateMetadata(ResponseBody):
    batch_size: int
    latency_ms: float
    current_policy_version: int = Field(description="the version that generated the tokens")
    server_policy_version: int = Field(description="the version served when the answer was sent")
    queue_ms: float
    ttft_ms: float
    cached_tokens: int = Field(0, description="prompt tokens whose KV came from the prefix cache")


class GenerateResult(ResponseBody):
    request_id: str
    policy_version: Union[int, str, None] = Field(description="the request's, echoed")
    step_id: Optional[int] = Field(description="the request's, echoed")
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str = Field(description="detokenized completion, cut before any stop string")
    logprobs: Optional[list[LogProb]] = Field(description="one per completion token; null when logprobs is 0")
    finish_reason: Literal["stop", "length", "abort"]
    metadata: GenerateMetadata
    generated_by_version: int = Field(description="version of the first token")
    token_versions: list[int] = Field(description="version of each token")
    prompt_index: int = Field(None, description="only in {results: [...]}")
    sample_index: int = Field(None, description="only in {results: [...]}")


class GenerateResults(ResponseBody):
    results: list[GenerateResult]


class ScoreMetadata(ResponseBody):
    latency_ms: float
    current_policy_version: int


class ScoreResult(ResponseBody):
    request_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[LogProb]
    logprobs_mode: LogprobsMode
    policy_version: int = Field(description="version whose weights scored")
    metadata: ScoreMetadata


class AbortResult(ResponseBody):
    request_id: str
    status: Literal["abort_requested"]
    found_in_this_worker: int


class SwapResult(ResponseBody):
    status: Literal["success"]
    policy_version: int
    message: str
    adapter_path: Optional[str]
    mode: Optional[str]
    read_ms: Optional[float] = Field(description="reading and validating the adapter files")
    prepare_ms: Optional[float] = Field(description="from the engine's receipt of the swap until it could "
                                                    "commit (read included)")
    wait_ms: Optional[float] = Field(description="waiting for the step boundary (drain: for in-flight sequences)")
    commit_ms: Optional[float] = Field(description="the commit itself")


class PreparedResult(ResponseBody):
    status: Literal["prepared"]
    prepared_id: str = Field(description="commit it with /commit_adapter, or drop it with /cancel_adapter")
    adapter_path: Optional[str]
    policy_version: int = Field(description="the version served now (unchanged)")
    next_policy_version: int = Field(description="the lowest version a commit may take")
    expires_in_s: float
    read_ms: Optional[float] = Field(description="reading and validating the adapter files")
    prepare_ms: Optional[float] = Field(description="from the engine's receipt until the adapter was ready "
                                                    "(read included)")


class CommitResult(SwapResult):
    prepared_id: str


class CancelResult(ResponseBody):
    status: Literal["cancelled"]
    prepared_id: str
    policy_version: int = Field(description="the version served now (unchanged)")


class WeightsResult(ResponseBody):
    status: Literal["success"]
    policy_version: int
    message: str
    weight_dir: Optional[str] = Field(description="the directory given (upload: the server's copy)")
    num_tensors: int = Field(description="parameters replaced")
    mode: Optional[str]
    read_ms: Optional[float] = Field(description="reading and checking the files (framing, finite values)")
    prepare_ms: Optional[float] = Field(description="from the engine's receipt of the update until it could "
                                                    "commit (read, name/shape/dtype checks, MLX arrays)")
    wait_ms: Optional[float] = Field(description="waiting for the step boundary (drain: for in-flight sequences)")
    commit_ms: Optional[float] = Field(description="the commit itself")


class AdapterState(ResponseBody):
    policy_version: int
    adapter_path: Optional[str]
    adapter_id: Optional[str]
    loaded_at: Optional[str] = Field(json_schema_extra={"format": "date-time"})
    committed_version: Optional[int]
    num_swaps: int


class Health(ResponseBody):
    status: Literal["healthy"]
    model_loaded: Literal[True]


class Unhealthy(ResponseBody):
    status: Literal["unavailable"]
    model_loaded: Literal[False]
    engine_state: str
    reason: str


class WorkerMetrics(ResponseBody):
    pid: int
    slot: Optional[int]
    inflight: int
    link_open: bool


class PrefixCacheMetrics(ResponseBody):
    lookups: int
    hits: int = Field(description="prompts that found a cached prefix")
    lookup_tokens: int
    hit_tokens: int = Field(description="prompt tokens served from the cache")
    hit_rate: float = Field(description="hit_tokens / lookup_tokens")
    entries: int
    bytes: int
    kv_budget_bytes: int = Field(description="the budget of the running batch and the cache (--kv-cache-gb)")


class ResetPrefixCacheResult(ResponseBody):
    status: Literal["success"]
    entries_dropped: int


class Metrics(ResponseBody):
    current_policy_version: int
    queue_depth: int
    max_batch_size: int
    flush_interval_ms: float
    tokens_per_s: float
    num_running: int
    engine_epoch: int
    engine_restarts: int
    num_swaps: int
    engine_state: str
    supervisor_state: str
    adapter_id: Optional[str]
    tokens_generated: int
    prefill_tokens: int
    num_requests: int
    heartbeat_age_s: Optional[float]
    max_queue: int
    prefix_cache: PrefixCacheMetrics
    worker: WorkerMetrics


class ErrorDetail(ResponseBody):
    type: str
    message: str
    field: Optional[str] = Field(description="the offending request field, by its path (prompt_ids[3])")
    param: Optional[str] = Field(None, description="OpenAI routes only (= field)")
    code: Optional[str] = Field(None, description="OpenAI routes only (= type)")


class ErrorBody(ResponseBody):
    error: ErrorDetail


def json_logprobs(values) -> list:
    """Log-probs as JSON carries them: -inf (and anything below) is LOGPROB_FLOOR."""
    floor = LOGPROB_FLOOR
    return [v if v > floor else floor for v in values]
