"""Plain records of the engine's work: a request and its sequences. No mlx, no behaviour
beyond small derived properties; the scheduler and the engine core mutate them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from mlxsup.ipc.messages import GenerateRequest, ScoreRequest


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet
    RUNNING = "running"  # in the runner's batch
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a generate request: what it produced so far, and its bookkeeping."""

    seq_id: int  # unique within the engine; the runner's row key
    request: "RequestState"
    index: int  # the sample's index within its request (SequenceDone.seq_index)
    max_tokens: int  # the request's max_tokens
    seed: int  # 64-bit seed of this sample's sampling stream
    status: SeqStatus = SeqStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)  # params.top_logprobs per token, flat
    top_logprobs: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    num_sent: int = 0  # tokens already sent in TokenChunk events (streamed requests)
    max_batch_size: int = 0  # largest running batch this sequence decoded in
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    stop_check: Any = None  # the postprocessor's stop-string state (engine/postprocess.py)

    @property
    def params(self):
        return self.request.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(eq=False)
class RequestState:
    """A request the engine accepted, from arrival to its last event."""

    request: Union[GenerateRequest, ScoreRequest]
    arrival: float  # time.monotonic() when submitted
    seqs: list[Sequence] = field(default_factory=list)  # empty for score requests
    num_admitted: int = 0  # samples handed to the runner so far
    num_finished: int = 0
    # The runner's saved prompt state for samples admitted later than the first (a group
    # larger than the free batch rows), and the policy version it was computed under.
    prefix: Any = None
    prefix_version: int = -1
    hold_deadline: float = 0.0  # when a min_policy_version wait gives up
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served at its first admission

    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def is_score(self) -> bool:
        return isinstance(self.request, ScoreRequest)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_samples(self) -> int:
        return 1 if self.is_score else self.request.n

    @property
    def num_unadmitted(self) -> int:
        return self.num_samples - self.num_admitted

    @property
    def is_partially_admitted(self) -> bool:
        return 0 < self.num_admitted < self.num_samples

    @property
    def min_policy_version(self) -> int:
        return -1 if self.is_score else self.request.min_policy_version
