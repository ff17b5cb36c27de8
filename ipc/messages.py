"""Typed messages exchanged between API workers and the engine, defined in one place.

Requests travel worker -> engine on a slot's request ring; events travel engine -> worker on
the slot's response ring. `mlxsup.ipc.codec` turns each of these into bytes and back (token
ids and log-probs as packed arrays). Nothing here imports mlx.

Request ids are unsigned 64-bit integers chosen by the worker; they are unique per worker
(the worker mixes its slot generation into them), so a response for an id the worker does not
know (a request of a dead predecessor in the same slot) is simply dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

LOGPROBS_NONE = "none"
LOGPROBS_PROCESSED = "processed"
LOGPROBS_RAW = "raw"
LOGPROBS_MODES = (LOGPROBS_NONE, LOGPROBS_PROCESSED, LOGPROBS_RAW)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT)

# Error codes carried by ErrorEvent; the API maps them to HTTP statuses.
ERR_INVALID = "invalid"  # 422: the engine refused the request's values (e.g. prompt too long)
ERR_OVERLOADED = "overloaded"  # 503 + Retry-After: the engine's queue is full
ERR_TIMEOUT = "timeout"  # 503: min_policy_version not reached within its wait
ERR_INTERNAL = "internal"  # 500: a bug; the request failed, the engine lives on
ERROR_CODES = (ERR_INVALID, ERR_OVERLOADED, ERR_TIMEOUT, ERR_INTERNAL)

# The most alternatives a position's top log-probs list (vLLM's and OpenAI's limit for chat).
MAX_TOP_LOGPROBS = 20

# Engine-wide controls (EngineControl.op), vLLM's /pause, /resume, /is_paused, /abort_requests.
PAUSE_ABORT = "abort"  # end in-flight sequences (finish_reason "abort", tokens so far); admit none
PAUSE_WAIT = "wait"  # let in-flight sequences finish; admit none
PAUSE_KEEP = "keep"  # freeze running rows where they are; they continue on resume
PAUSE_MODES = (PAUSE_ABORT, PAUSE_WAIT, PAUSE_KEEP)
OP_PAUSE, OP_RESUME, OP_STATUS, OP_ABORT_ALL = "pause", "resume", "status", "abort_all"
CONTROL_OPS = (OP_PAUSE, OP_RESUME, OP_STATUS, OP_ABORT_ALL)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one sequence. Defaults are the seed's `/generate` defaults."""

    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # 1 means off
    top_k: int = 0  # 0 means off
    min_p: float = 0.0  # 0 means off
    repetition_penalty: float = 1.0  # 1 means off
    repetition_context_size: int = 20
    max_tokens: int = 128
    seed: Optional[int] = None  # a seeded sequence draws from its own stream
    logprobs_mode: str = LOGPROBS_NONE
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # True: the tokenizer's EOS does not end the sequence
    top_logprobs: int = 0  # the k most likely tokens per position, in logprobs_mode (0: none)

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError("temperature must be a finite number >= 0")
        if not (0 < self.top_p <= 1):
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not (0 <= self.min_p < 1):
            raise ValueError("min_p must be in [0, 1)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError("repetition_penalty must be a finite number > 0")
        if self.repetition_context_size < 1:
            raise ValueError("repetition_context_size must be >= 1")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError("seed must be in [0, 2**63)")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}")
        if not (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")


# ---------------------------------------------------------------- worker -> engine


@dataclass(frozen=True)
class Hello:
    """First message of a worker that claimed a slot. The engine aborts every sequence of an
    older generation in this slot and forgets any half-received message from it."""

    slot: int
    generation: int
    pid: int


@dataclass(frozen=True)
class GenerateRequest:
    """Generate `n` samples of one prompt; the samples share one prefill."""

    request_id: int
    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    stream: bool = False  # True: TokenChunk events as tokens come; False: all in SequenceDone
    min_policy_version: int = -1  # -1: none; else wait until the engine reaches it
    min_policy_wait_s: float = 0.0  # how long to wait for min_policy_version
    cache_salt: str = ""  # prefix-cache entries are shared only by requests with the same salt
    tag: str = ""  # the client's request_id; `AbortTagged` ends every request carrying it

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if len(self.prompt_ids) < 1:
            raise ValueError("prompt_ids must not be empty")


@dataclass(frozen=True)
class ScoreRequest:
    """Teacher-forced log-prob of every completion token given the prompt and the tokens
    before it, under the current weights. `params` only matters for mode `processed`."""

    request_id: int
    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    logprobs_mode: str = LOGPROBS_RAW
    params: SamplingParams = field(default_factory=SamplingParams)
    top_logprobs: int = 0  # also the k most likely tokens at each completion position
    cache_salt: str = ""
    tag: str = ""

    def __post_init__(self):
        if not (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")


@dataclass(frozen=True)
class EngineControl:
    """An engine-wide control: `op` one of CONTROL_OPS; `mode` (one of PAUSE_MODES) for a
    pause. Answered by one ControlResult; a `wait` pause answers once in-flight work is done."""

    request_id: int
    op: str
    mode: str = ""

    def __post_init__(self):
        if self.op not in CONTROL_OPS:
            raise ValueError(f"op must be one of {CONTROL_OPS}")
        if self.op == OP_PAUSE and self.mode not in PAUSE_MODES:
            raise ValueError(f"a pause's mode must be one of {PAUSE_MODES}")


@dataclass(frozen=True)
class AbortRequest:
    """The client went away: free the request's sequences at the next step."""

    request_id: int


@dataclass(frozen=True)
class AbortTagged:
    """`POST /abort` landed on a worker that does not hold the request: the engine ends every
    request tagged `tag`, whichever worker sent it; each owner gets its normal abort result."""

    tag: str

    def __post_init__(self):
        if not self.tag:
            raise ValueError("tag must not be empty")


Request = Union[Hello, GenerateRequest, ScoreRequest, AbortRequest, EngineControl, AbortTagged]

# ---------------------------------------------------------------- engine -> worker


@dataclass(frozen=True)
class TokenChunk:
    """New tokens of one sequence (streamed requests only)."""

    request_id: int
    seq_index: int
    token_ids: Sequence[int]
    logprobs: Sequence[float]  # empty when logprobs_mode is none
    versions: Sequence[int]  # policy version that produced each token
    # With params.top_logprobs = k: k (id, log-prob) pairs per token, most likely first, flat
    # (token i's are [i*k, (i+1)*k)); -inf for tokens the processed distribution truncated.
    top_ids: Sequence[int] = field(default_factory=list)
    top_logprobs: Sequence[float] = field(default_factory=list)


@dataclass(frozen=True)
class SequenceDone:
    """End of one sequence. For non-streamed requests it carries every token; for streamed
    ones only tokens not yet sent in a TokenChunk."""

    request_id: int
    seq_index: int
    finish_reason: str
    token_ids: Sequence[int]
    logprobs: Sequence[float]
    versions: Sequence[int]
    num_prompt_tokens: int
    batch_size: int  # largest running batch this sequence decoded in
    policy_version: int  # version of the first token (drain/abort modes: of every token)
    queue_ms: float = 0.0  # from arrival in the engine to admission
    ttft_ms: float = 0.0  # from arrival to the first token
    total_ms: float = 0.0  # from arrival to done
    top_ids: Sequence[int] = field(default_factory=list)  # as TokenChunk's
    top_logprobs: Sequence[float] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class ScoreResult:
    request_id: int
    logprobs: Sequence[float]  # one per completion token
    policy_version: int
    top_ids: Sequence[int] = field(default_factory=list)  # k per completion token, flat
    top_logprobs: Sequence[float] = field(default_factory=list)


@dataclass(frozen=True)
class ControlResult:
    """The answer to an EngineControl: the pause state after it, and the sequences it ended."""

    request_id: int
    is_paused: bool
    mode: str = ""  # the pause's mode while paused
    num_aborted: int = 0


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed; no further event follows for it."""

    request_id: int
    code: str
    message: str
    field: str = ""


Event = Union[TokenChunk, SequenceDone, ScoreResult, ErrorEvent, ControlResult]
