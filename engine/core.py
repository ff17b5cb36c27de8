"""`Engine`: the in-process API of the generation engine.

`step()` is schedule -> run -> postprocess: the scheduler picks this step's work, the runner
executes it on the model, and the postprocessor (postprocess.py) turns tokens into events
(stop checks, streaming chunks, finished sequences). Everything here runs on one thread, the
one that created the engine (MLX streams belong to their thread).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence as Seq, Union

import mlx.core as mx
import numpy as np

from mlxsup.config import MAX_N, SWAP_MODES
from mlxsup.ipc.messages import (
    ERR_INTERNAL,
    ERR_TIMEOUT,
    FINISH_ABORT,
    LOGPROBS_PROCESSED,
    LOGPROBS_RAW,
    PAUSE_ABORT,
    PAUSE_KEEP,
    PAUSE_MODES,
    ErrorEvent,
    Event,
    GenerateRequest,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    SequenceDone,
)

from . import sampling
from .adapter_files import AdapterFiles
from .adapters import AdapterManager, PreparedAdapter
from .config import EngineConfig
from .memory import HeapTrimmer
from .postprocess import Postprocessor, decoder_for
from .prefix_cache import PrefixCache, default_budget_bytes
from .runner import Admission, ModelRunner, ScoreItem, StepOutput, context_length
from .sampling import mix_seed
from .scheduler import QueueFull, Scheduler
from .sequence import RequestState, Sequence, SeqStatus
from .weights import PreparedWeights, WeightError, WeightFiles, WeightManager

log = logging.getLogger("mlxsup.engine")


# Cached prefixes shorter than this are not reused (PrefixCache.min_tokens).
MIN_REUSE_TOKENS = 16
# A step longer than this is logged (INFO) with its rows, admissions and sampler traces: on a
# GPU a decode step takes milliseconds, so a second means something was built or compiled.
SLOW_STEP_LOG_S = 1.0
# Freeing MLX's buffer cache returns every cached buffer to the driver; one slower than this is
# logged too (the commit of a swap clears it before the step that first uses the new version).
SLOW_CLEAR_LOG_S = 0.1


# MLX on CUDA runs prefill attention (more than one query position, bfloat16/float16) through
# cuDNN, whose graph is built anew, and cached, for every new combination of batch rows,
# query and key lengths; a build takes ~100 ms. Requests that arrive separately are admitted in
# groups of ever-different sizes, so a serving engine meets new shapes all the time (H200, 1B
# model, four admissions of 17-41 100-token prompts: 150-176 ms each at new sizes, 52-77 ms
# at sizes seen before; without cuDNN 59-74 ms either way, and decode steps 8-10 ms instead of
# 11-12: docs/benchmarks-gpu.md). MLX's own attention serves those shapes without a build, so
# the engine turns cuDNN's off unless the environment says otherwise (MLX reads the variable
# once, at its first attention). Without it a prefill pass materializes its attention scores
# (rows x heads x chunk x keys); set MLX_CUDA_USE_CUDNN_SDPA=1 for very long prompts.
CUDNN_SDPA_ENV = "MLX_CUDA_USE_CUDNN_SDPA"


def _choose_attention() -> None:
    os.environ.setdefault(CUDNN_SDPA_ENV, "0")


def _clear_cache(why: str) -> None:
    t0 = time.perf_counter()
    mx.clear_cache()
    spent = time.perf_counter() - t0
    if spent > SLOW_CLEAR_LOG_S:
        log.info("slow cache clear (%s): %.0f ms", why, spent * 1e3)


class RequestError(ValueError):
    """A request the engine refuses (HTTP 422); `field` names the offending field."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


@dataclass
class SwapTicket:
    """A requested swap. `done` turns True at the step boundary that commits it; then
    `policy_version`, `adapter_path` and `commit_ms` describe the result. `on_done`, if
    given, is called (on the engine thread, inside `step()`) right after the commit.

    `on_first_token`, if given, is called once, inside the `step()` whose output holds the
    first tokens computed with the new weights; `committed_at` and `first_token_at` are
    `time.perf_counter()` stamps and `running_at_commit` the rows decoding at the commit (0:
    the first token waited for a request to arrive)."""

    prepared: Union[PreparedAdapter, PreparedWeights]
    mode: str
    version: int
    on_done: Optional[Callable[["SwapTicket"], None]] = None
    on_first_token: Optional[Callable[["SwapTicket"], None]] = None
    done: bool = False
    commit_ms: float = 0.0
    policy_version: int = -1
    adapter_path: Optional[str] = None
    committed_at: float = 0.0
    first_token_at: float = 0.0
    running_at_commit: int = 0


def _weights_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def load_model(config: EngineConfig):
    """`mlx_lm.load` of a local directory or a hub id; returns (model, tokenizer)."""
    from mlx_lm import load

    tok_cfg = {"trust_remote_code": True} if config.trust_remote_code else None
    return load(config.model, tokenizer_config=tok_cfg,
                trust_remote_code=config.trust_remote_code)


class Engine:
    """Continuous-batching generation, scoring and adapter swaps on one MLX model.

    `model`/`tokenizer` may be given instead of loading `config.model` (tests build models
    from mlx-lm's `ModelArgs`). `policy_version` is the version the starting weights serve
    as (the supervisor passes the one in `adapter_state.json`).
    """

    def __init__(self, config: EngineConfig, policy_version: int = 0, *, model=None,
                 tokenizer=None):
        self.config = config
        _choose_attention()
        if model is None:
            model, tokenizer = load_model(config)
        self.model, self.tokenizer = model, tokenizer
        if config.cache_limit_mb is not None:
            mx.set_cache_limit(config.cache_limit_mb * 2**20)
        self.adapters = AdapterManager(model)  # before the runner's probe forward
        self.weights = WeightManager(model)  # the base model's parameter names
        for weight_dir in config.weight_dirs:  # committed updates, in order, before adapters
            self.weights.commit(self.weights.prepare(weight_dir))
        self.context_length = context_length(model)
        pipeline = config.pipeline
        if pipeline is None and mx.default_device() != mx.cpu:
            pipeline = True  # on the CPU None: the runner chooses by the length of a step
        self.runner = ModelRunner(model, prefill_step_size=config.prefill_step_size,
                                  max_window=self.context_length or 1 << 16, pipeline=pipeline,
                                  prefill_chunk=config.prefill_chunk_tokens)
        self.vocab_size = self.runner.vocab_size
        # One KV budget for the batch and the prefix cache (see Scheduler.kv_budget_tokens).
        self.kv_budget_bytes = int(config.kv_cache_gb * 2**30) if config.kv_cache_gb else \
            default_budget_bytes(_weights_bytes(model))
        self.kv_budget_tokens = self.kv_budget_bytes // self.runner.kv_bytes_per_token
        if config.prefix_cache:
            self.runner.prefix_cache = PrefixCache(self.kv_budget_bytes, MIN_REUSE_TOKENS)
        self.scheduler = Scheduler(
            max_batch=config.max_batch, max_queue=config.max_queue,
            flush_interval_s=config.flush_interval_ms / 1e3,
            max_prefill_tokens=config.max_prefill_tokens,
            max_score_tokens=config.max_score_tokens,
            kv_budget_tokens=self.kv_budget_tokens,
        )
        self.policy_version = policy_version
        self.adapter_path: Optional[str] = None
        if config.adapter_path:
            self.adapters.commit(self.prepare_adapter(config.adapter_path))
            self.adapter_path = config.adapter_path
        self.postprocessor = Postprocessor(
            decoder_for(tokenizer), getattr(tokenizer, "eos_token_ids", None) or ())
        self._rng = np.random.default_rng(config.seed)
        self._requests: dict[int, RequestState] = {}
        self._seqs: dict[int, Sequence] = {}
        self._next_seq_id = 0
        self._next_internal_id = 1 << 63
        self._outbox: list[Event] = []
        self._swap: Optional[SwapTicket] = None
        self._first_token_of: Optional[SwapTicket] = None  # committed, no new token yet
        self._trimmer = HeapTrimmer()
        # vLLM's pause: None while serving, else the mode of the pause (see `pause`).
        self.paused: Optional[str] = None
        self.counters = dict(tokens_generated=0, prefill_tokens=0, num_swaps=0,
                             num_requests=0, num_steps=0)
        # The last step's (runner seconds, postprocess seconds, admitted requests, their
        # prompt tokens), for the engine loop's trace (engine/steptrace.py).
        self.last_step = (0.0, 0.0, 0, 0)

    # ------------------------------------------------------------------ intake

    def submit(self, request: Union[GenerateRequest, ScoreRequest]) -> None:
        """Queue a request. Raises QueueFull when `max_queue` requests wait, RequestError
        (a ValueError with `.field`) when the request cannot run on this model."""
        rid = request.request_id
        if rid in self._requests:
            raise RequestError(f"request_id {rid} is already in flight", "request_id")
        if not request.prompt_ids:
            raise RequestError("prompt_ids must not be empty", "prompt_ids")
        self._guard_ids(request.prompt_ids, "prompt_ids")
        now = time.monotonic()
        if isinstance(request, ScoreRequest):
            self._guard_ids(request.completion_ids, "completion_ids")
            if request.logprobs_mode not in (LOGPROBS_RAW, LOGPROBS_PROCESSED):
                raise RequestError("logprobs_mode of a score request must be 'raw' or "
                                   "'processed'", "logprobs_mode")
            total = len(request.prompt_ids) + len(request.completion_ids)
            if self.context_length and total > self.context_length:
                raise RequestError(f"prompt + completion ({total} tokens) exceed the model's "
                                   f"context of {self.context_length}", "completion_ids")
            state = RequestState(request, now)
        elif isinstance(request, GenerateRequest):
            if request.n > MAX_N:
                raise RequestError(f"n must be at most {MAX_N}", "n")
            n_prompt = len(request.prompt_ids)
            max_tokens = request.params.max_tokens
            if self.context_length:  # (past it a model with learned positions reads out of range)
                if n_prompt >= self.context_length:
                    raise RequestError(f"prompt of {n_prompt} tokens does not fit the model's "
                                       f"context of {self.context_length}", "prompt_ids")
                if n_prompt + max_tokens > self.context_length:
                    raise RequestError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) "
                                       f"exceed the model's context of {self.context_length}",
                                       "max_tokens")
            if Scheduler.kv_tokens(1, n_prompt + max_tokens) > self.kv_budget_tokens:
                per_token = self.runner.kv_bytes_per_token
                need = Scheduler.kv_tokens(1, n_prompt + max_tokens)
                raise RequestError(
                    f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) need {need} KV "
                    f"positions ({need * per_token / 2**30:.3g} GiB with the cache's growth step), "
                    f"past the KV budget of {self.kv_budget_tokens} "
                    f"({self.kv_budget_bytes / 2**30:.3g} GiB, --kv-cache-gb)", "max_tokens")
            state = RequestState(request, now)
            wait = request.min_policy_wait_s if request.min_policy_wait_s > 0 else \
                self.config.min_policy_wait_s
            state.hold_deadline = now + min(wait, self.config.min_policy_wait_s)
            seed = request.params.seed
            for i in range(request.n):
                s = mix_seed(seed, i) if seed is not None else int(
                    self._rng.integers(0, 2**63)) * 2 + int(self._rng.integers(0, 2))
                state.seqs.append(Sequence(self._next_seq_id, state, i, max_tokens, s))
                self._next_seq_id += 1
        else:
            raise RequestError(f"not a request the engine runs: {type(request).__name__}")
        self.scheduler.add(state)  # raises QueueFull
        self._requests[rid] = state
        for seq in state.seqs:
            self._seqs[seq.seq_id] = seq
        self.counters["num_requests"] += 1

    def _guard_ids(self, ids: Seq[int], field: str) -> None:
        """The API checks ids against the vocabulary (with the index of a bad one); this guard
        only keeps the process alive: MLX's embedding lookup neither checks nor clamps (an id
        past the table reads out of bounds, a large one segfaults; a negative one wraps), so
        one bad id reaching the model would take every running request down with it. Two C
        loops (min, max) over the ids the IPC codec decoded as ints."""
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise RequestError(f"{field} holds ids outside this model's vocabulary "
                               f"(0 <= id < {self.vocab_size})", field)

    @property
    def eos_token_ids(self) -> frozenset:
        """Token ids that end a sequence unless it sets `ignore_eos` (the tokenizer's)."""
        return self.postprocessor.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        self.postprocessor.eos_token_ids = frozenset(ids)

    def abort(self, request_id: int) -> bool:
        """End a request now: its running sequences leave the batch before the next step
        and their SequenceDone (finish_reason "abort", tokens so far) comes out of the next
        `step()`. Returns False for an unknown (or finished) request."""
        state = self._requests.get(request_id)
        if state is None:
            return False
        self.scheduler.remove_waiting(state)
        self._end_request(state, FINISH_ABORT, self._outbox)
        return True

    def abort_all(self) -> int:
        """Abort every request; returns how many there were."""
        rids = list(self._requests)
        for rid in rids:
            self.abort(rid)
        return len(rids)

    # ------------------------------------------------------------------ pause

    def pause(self, mode: str) -> int:
        """Stop admitting work (vLLM's /pause). `abort`: in-flight requests end now with
        finish_reason "abort" (their tokens so far); `wait`: running sequences finish (and the
        waiting samples of a group already partly admitted: a request is never left half
        done); `keep`: running rows are frozen where they are, with their KV caches, and go
        on from the same position on `resume`. Requests that arrive while paused wait in the
        queue (their time counts toward the request timeout). A swap requested while paused
        commits at once in `keep` (the frozen rows continue under the new weights, as their
        per-token versions show) and as usual otherwise. Returns the requests aborted."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, not {mode!r}")
        num_aborted = self.abort_all() if mode == PAUSE_ABORT else 0
        self.paused = mode
        return num_aborted

    def resume(self) -> None:
        self.paused = None

    @property
    def is_drained(self) -> bool:
        """Nothing in flight: no running or prefilling row, no partly admitted request."""
        return (self.runner.num_rows == 0 and self.runner.num_prefilling == 0
                and self.scheduler.num_running == 0
                and not any(s.is_partially_admitted for s in self.scheduler.waiting))

    def _end_request(self, state: RequestState, reason: str, events: list[Event]) -> None:
        """Finish every unfinished sample of `state` with `reason` (abort paths)."""
        if state.is_score:  # nobody waits for its result any more
            self._requests.pop(state.request_id, None)
            return
        running = [s.seq_id for s in state.seqs if s.status == SeqStatus.RUNNING]
        self.runner.remove(running)
        for seq in state.seqs:
            if seq.status != SeqStatus.FINISHED:
                seq.finish_reason = reason
                self._finish(seq, events)

    # ------------------------------------------------------------------ adapters

    def prepare_adapter(self, source: Union[str, AdapterFiles, None]) -> PreparedAdapter:
        """Read, validate and load an adapter (a path, the result of
        `self.adapters.read(path)` made in another thread, or None for the base model).
        Raises AdapterError; nothing changes on failure."""
        return self.adapters.prepare(source)

    def request_swap(self, prepared: PreparedAdapter, mode: str = "drain",
                     version: Optional[int] = None,
                     on_done: Optional[Callable[[SwapTicket], None]] = None,
                     on_first_token: Optional[Callable[[SwapTicket], None]] = None
                     ) -> SwapTicket:
        """Commit `prepared` at a step boundary: `drain` once in-flight requests are done,
        `abort` ending them, `inflight` at the next boundary. `version` (default current+1)
        must exceed the current version. Returns the ticket that reports completion."""
        if mode not in SWAP_MODES:
            raise ValueError(f"mode must be one of {SWAP_MODES}, not {mode!r}")
        version = self.policy_version + 1 if version is None else version
        if version <= self.policy_version:
            raise ValueError(f"version {version} must exceed the current version "
                             f"{self.policy_version}")
        self.scheduler.request_swap(mode, version)
        self._swap = SwapTicket(prepared, mode, version, on_done, on_first_token)
        return self._swap

    def prepare_weights(self, source: Union[str, WeightFiles]) -> PreparedWeights:
        """Read, validate and load a weight update (a directory of safetensors files, or the
        result of `self.weights.read(path)` made in another thread). Refused while an adapter
        is loaded: it was trained on the weights it would no longer sit on. Raises WeightError;
        nothing changes on failure."""
        if self.adapter_path is not None or (self._swap is not None
                                             and isinstance(self._swap.prepared, PreparedAdapter)
                                             and self._swap.prepared.path is not None):
            raise WeightError(f"an adapter is loaded ({self.adapter_path}): go back to the base "
                              f"model first (load_adapter with adapter_path null), then update "
                              f"the weights and load an adapter trained on them")
        return self.weights.prepare(source)

    @property
    def pending_swap(self) -> Optional[SwapTicket]:
        """The swap requested and not committed yet, if any."""
        return self._swap

    def _commit_swap(self) -> None:
        ticket, self._swap = self._swap, None
        t0 = time.perf_counter()
        if isinstance(ticket.prepared, PreparedWeights):
            self.weights.commit(ticket.prepared)
        else:
            self.adapters.commit(ticket.prepared)
            self.adapter_path = ticket.prepared.path
        ticket.committed_at = time.perf_counter()
        ticket.commit_ms = (ticket.committed_at - t0) * 1e3
        ticket.running_at_commit = self.runner.num_rows
        self._first_token_of = ticket
        self.policy_version = ticket.policy_version = ticket.version
        ticket.adapter_path = self.adapter_path
        self.counters["num_swaps"] += 1
        ticket.done = True
        if self.runner.prefix_cache is not None:
            self.runner.prefix_cache.clear()  # KV of the old weights serves no new request
        _clear_cache("swap commit")
        if ticket.on_done is not None:
            ticket.on_done(ticket)

    # ------------------------------------------------------------------ the loop

    def has_work(self) -> bool:
        if self.paused is not None:
            return bool(self._outbox) or self._swap is not None or (
                self.paused != PAUSE_KEEP and not self.is_drained)
        return bool(self._outbox) or self.scheduler.has_work() or self.runner.num_rows > 0

    def wait_hint(self) -> Optional[float]:
        """Seconds until `step()` has something to do: 0 now, None when idle."""
        if self.paused is not None:
            return 0.0 if self.has_work() else None
        if self._outbox or self.runner.num_rows:
            return 0.0
        return self.scheduler.wait_hint(time.monotonic(), self.policy_version)

    def step(self) -> list[Event]:
        """One iteration: schedule, run the model, turn results into events."""
        events, self._outbox = self._outbox, []
        now = time.monotonic()
        if self.paused == PAUSE_KEEP:
            if self._swap is not None:  # (nothing runs: a swap cannot wait for a boundary)
                self.scheduler.cancel_swap()
                self._commit_swap()
            return events
        plan = self.scheduler.schedule(now, self.policy_version, hold=self.paused is not None)
        for state in plan.expired:
            self._forget(state)
            events.append(ErrorEvent(
                state.request_id, ERR_TIMEOUT,
                f"policy version {state.min_policy_version} not reached within the wait "
                f"(serving {self.policy_version})", "min_policy_version"))
        if plan.swap_aborted:
            self.runner.reset()
            for state in plan.swap_aborted:
                self._end_request(state, FINISH_ABORT, events)
        if plan.commit_swap:
            self._commit_swap()

        admissions = [self._admission(state, seqs) for state, seqs in plan.admit]
        runner_s = post_s = 0.0
        if admissions or self.runner.num_rows or self.runner.num_prefilling:
            self.counters["num_steps"] += 1
            t0, traces = time.perf_counter(), sampling.traces
            try:
                out, prefixes = self.runner.step(admissions, self.policy_version,
                                                 prefill=not plan.commit_swap)
            except Exception as e:  # a bug or a model failure: fail the batch, live on
                log.exception("engine step failed")
                self._fail_running(f"engine step failed: {e}", events)
                out, prefixes = None, []
            spent = runner_s = time.perf_counter() - t0
            if spent > SLOW_STEP_LOG_S:
                log.info("slow step: %.0f ms, %d rows, %d admitted (%d prompt tokens), "
                         "%d sampler traces, version %d", spent * 1e3, self.runner.num_rows,
                         len(admissions), sum(len(a.prompt_ids) for a in admissions),
                         sampling.traces - traces, self.policy_version)
            for (state, _), admission in zip(plan.admit, admissions):
                if admission.prefix is None or admission.cached_tokens:
                    state.num_cached_tokens = admission.cached_tokens
                    self.counters["prefill_tokens"] -= admission.cached_tokens  # (not prefilled)
                if state.num_unadmitted == 0:
                    state.prefix = None  # every sample admitted: nobody needs it
            for admission, prefix in prefixes:
                state = admission.owner
                if state.num_unadmitted > 0:  # (chunked: not re-prefilled meanwhile)
                    state.prefix, state.prefix_version = prefix, self.policy_version
            if out is not None:
                t0 = time.perf_counter()
                try:
                    self._postprocess(out, events)
                except Exception as e:  # a bug: fail the batch rather than the engine
                    log.exception("postprocessing failed")
                    self._fail_running(f"engine step failed: {e}", events)
                post_s = time.perf_counter() - t0
        self.last_step = (runner_s, post_s, len(admissions),
                          sum(len(a.prompt_ids) for a in admissions))
        if plan.scores:
            self._run_scores(plan.scores, events)
        if self.runner.prefix_cache is not None:  # the cache gets what the batch leaves
            self.runner.prefix_cache.limit(self.kv_budget_bytes - self.runner.kv_bytes_per_token
                                           * self.scheduler.reserved_kv_tokens())
        if not self.has_work():  # going idle: MLX's buffer cache, then the heap, back to the OS
            _clear_cache("idle")
            self._trimmer.trim()
        elif self.counters["num_steps"] % self.config.clear_cache_every == 0:
            _clear_cache("periodic")
        return events

    def _admission(self, state: RequestState, seqs: list[Sequence]) -> Admission:
        req = state.request
        prefix = state.prefix if state.prefix_version == self.policy_version else None
        if prefix is None:
            self.counters["prefill_tokens"] += len(req.prompt_ids)
        return Admission(
            prompt_ids=req.prompt_ids, params=req.params, seq_ids=[s.seq_id for s in seqs],
            seeds=[s.seed for s in seqs], prefix=prefix,
            save_prefix=state.num_unadmitted > 0, owner=state, cache_key=self._cache_key(req),
        )

    def _cache_key(self, req) -> tuple:
        """The prefix cache's key: the weights serving now, and the request's salt."""
        return (self.policy_version, self.adapter_path, req.cache_salt)

    def reset_prefix_cache(self) -> int:
        """Drop every prefix-cache entry (running rows keep their KV); the number dropped."""
        cache = self.runner.prefix_cache
        return cache.clear() if cache is not None else 0

    def _forget(self, state: RequestState) -> None:
        self._requests.pop(state.request_id, None)
        for seq in state.seqs:
            self._seqs.pop(seq.seq_id, None)
        state.prefix = None

    def _fail_running(self, message: str, events: list[Event]) -> None:
        self.runner.reset()
        for state in self.scheduler.running_requests():
            for seq in state.seqs:
                if seq.status != SeqStatus.FINISHED:
                    self.scheduler.finish(seq)
            self.scheduler.remove_waiting(state)
            self._forget(state)
            events.append(ErrorEvent(state.request_id, ERR_INTERNAL, message))

    def _postprocess(self, out: StepOutput, events: list[Event]) -> None:
        seqs = [self._seqs.get(seq_id) for seq_id in out.seq_ids]
        ended = self.postprocessor.accept(seqs, out.tokens, out.logprobs, out.version,
                                          time.monotonic(), events, out.top_ids, out.top_logprobs)
        self.counters["tokens_generated"] += len(out.tokens)
        if ended:  # a finished sequence's prompt + completion stays in the prefix cache
            store = {s.seq_id: list(s.request.request.prompt_ids) + s.token_ids for s in ended}
            self.runner.remove([seq.seq_id for seq in ended], store, self.policy_version)
            for seq in ended:
                self._release(seq)
        ticket = self._first_token_of
        if ticket is not None and out.version >= ticket.policy_version and out.tokens:
            self._first_token_of = None
            ticket.first_token_at = time.perf_counter()
            if ticket.on_first_token is not None:
                try:
                    ticket.on_first_token(ticket)
                except Exception:  # a report, never a reason to fail the batch
                    log.exception("swap first-token callback failed")

    def _finish(self, seq: Sequence, events: list[Event]) -> None:
        """End `seq` outside a step's tokens (its `finish_reason` set): its SequenceDone, then
        its records released."""
        events.append(self.postprocessor.done(seq, time.monotonic(), self.policy_version))
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if self.scheduler.finish(seq):  # its request's last sequence
            self._forget(seq.request)
        self._seqs.pop(seq.seq_id, None)

    def _run_scores(self, states: list[RequestState], events: list[Event]) -> None:
        items = [ScoreItem(s.request.prompt_ids, s.request.completion_ids, s.request.params,
                           s.request.logprobs_mode, s.request.top_logprobs,
                           self._cache_key(s.request)) for s in states]
        try:
            results = self.runner.score_top(items, self.config.max_score_tokens)
        except Exception as e:
            log.exception("scoring failed")
            results = [e] * len(states)
        for state, lp in zip(states, results):
            self._requests.pop(state.request_id, None)
            if isinstance(lp, Exception):
                events.append(ErrorEvent(state.request_id, ERR_INTERNAL, f"scoring failed: {lp}"))
            else:
                self.counters["prefill_tokens"] += len(state.request.prompt_ids) + len(
                    state.request.completion_ids)
                events.append(ScoreResult(state.request_id, lp.logprobs, self.policy_version,
                                          lp.top_ids, lp.top_logprobs))

    # ------------------------------------------------------------------ warm-up

    def warm_up(self) -> float:
        """Run the engine's own paths once on made-up requests before it serves, so that the
        first real ones do not wait for what a first use builds (on CUDA every kernel compiles
        the first time it runs: a 128-request burst's first round took 3x a warm one, H200,
        docs/benchmarks-gpu.md). Covered: a padded prefill of prompts of three lengths, rows
        joining a running batch, a group (n = 2) replicated from one prefill, greedy and
        sampled rows with raw and processed log-probs and top log-probs, rows finishing and
        leaving, a prefix-cache store and hit, and a solo row. Nothing of it stays: no events,
        no cache entries, no counters. Returns the seconds it took."""
        t0 = time.perf_counter()
        vocab = self.vocab_size
        ids = lambda n, k: [(3 + 7 * i + 13 * k) % vocab for i in range(n)]  # noqa: E731
        sampled = SamplingParams(max_tokens=6, temperature=1.0, logprobs_mode=LOGPROBS_PROCESSED,
                                 ignore_eos=True, seed=1)
        greedy = SamplingParams(max_tokens=3, temperature=0.0, logprobs_mode=LOGPROBS_RAW,
                                ignore_eos=True, seed=3)  # (seeded: the engine's rng untouched)
        top = SamplingParams(max_tokens=4, temperature=1.0, logprobs_mode=LOGPROBS_PROCESSED,
                             ignore_eos=True, top_logprobs=2, seed=2)
        first = [GenerateRequest(0, ids(40, 0), sampled), GenerateRequest(1, ids(23, 1), greedy),
                 GenerateRequest(2, ids(9, 2), sampled, n=2)]
        joining = [GenerateRequest(3, ids(31, 3), top), GenerateRequest(4, ids(17, 4), greedy)]
        again = [GenerateRequest(5, ids(40, 0) + ids(5, 5), greedy),  # a prefix-cache hit
                 ScoreRequest(7, ids(20, 7), ids(6, 8), LOGPROBS_RAW)]
        solo = [GenerateRequest(6, ids(12, 6), sampled)]
        base = 1 << 62  # (ids no client uses: the API's carry a slot in bits 32..55)
        flush, self.scheduler.flush_interval_s = self.scheduler.flush_interval_s, 0.0
        try:
            for wave in (first, joining, again, solo):
                for r in wave:
                    try:
                        self.submit(dataclasses.replace(r, request_id=base + r.request_id))
                    except (RequestError, QueueFull) as e:  # (a tiny context or KV budget)
                        log.info("warm-up request skipped: %s", e)
                for _ in range(2 if wave is first else 256):
                    self.step()
                    if wave is not first and not self.has_work():
                        break
        finally:
            self.scheduler.flush_interval_s = flush
        self._outbox.clear()
        if self.runner.prefix_cache is not None:
            self.runner.prefix_cache.clear()
            self.runner.prefix_cache.reset_stats()
        for k in self.counters:
            self.counters[k] = 0
        _clear_cache("warm-up")
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ conveniences

    def stats(self) -> dict:
        """Counters for the control block and status reports."""
        return dict(
            self.counters,
            queue_depth=self.scheduler.queue_depth,
            num_running=self.scheduler.num_running,
            policy_version=self.policy_version,
            adapter_path=self.adapter_path,
            swap_pending=self._swap is not None,
            paused=self.paused,
            active_memory=mx.get_active_memory(),
            cache_memory=mx.get_cache_memory(),
            peak_memory=mx.get_peak_memory(),
            kv_budget_bytes=self.kv_budget_bytes,
            kv_reserved_bytes=self.scheduler.reserved_kv_tokens() * self.runner.kv_bytes_per_token,
            **(self.runner.prefix_cache.stats() if self.runner.prefix_cache is not None
               else PrefixCache(0).stats()),
        )

    def generate(self, prompts: Iterable[Seq[int]], params: Optional[SamplingParams] = None,
                 n: int = 1) -> list[list[SequenceDone]]:
        """Generate for each prompt (n samples each) and wait; for tests and benchmarks.
        Other requests in flight keep running, but their events are dropped."""
        params = params or SamplingParams(max_tokens=self.config.max_tokens)
        todo = []
        for p in prompts:
            todo.append(GenerateRequest(self._next_internal_id, list(p), params, n))
            self._next_internal_id += 1
        results: dict[int, list[SequenceDone]] = {r.request_id: [] for r in todo}
        order = [r.request_id for r in todo]
        remaining = len(todo) * n
        queue = list(todo)
        while remaining:
            while queue:
                try:
                    self.submit(queue[0])
                except QueueFull:
                    break
                queue.pop(0)
            events = self.step()
            for ev in events:
                if isinstance(ev, ErrorEvent) and ev.request_id in results:
                    raise RuntimeError(f"request failed: {ev.code}: {ev.message}")
                if isinstance(ev, SequenceDone) and ev.request_id in results:
                    results[ev.request_id].append(ev)
                    remaining -= 1
            if not events:
                hint = self.wait_hint()
                if hint:
                    time.sleep(min(hint, 0.005))
        return [sorted(results[rid], key=lambda d: d.seq_index) for rid in order]
