"""An API worker's link to the engine: submit requests, collect their events, survive restarts.

`EngineLink` is what the resources see (a protocol: tests give them a fake). `IpcEngineLink`
implements it on the shared-memory `WorkerChannel` of `mlxsup.ipc.channel`:

- the channel is opened at ASGI lifespan start-up; while it cannot be (the supervisor has not
  created the segments yet, every slot is taken) the link keeps trying in the background and
  the API answers 503 with Retry-After;
- each request is a *flight*: an engine request id, its event queue, and the engine epoch it
  was sent under. A watcher task reads the control block every tick; when the epoch moves (a
  new engine started), every flight sent under an older epoch is orphaned. An orphaned flight
  that has returned nothing to its client is sent again, once, to the new engine; one that
  has (a stream already under way) fails with a retryable 503; one orphaned a second time is
  refused (422) so that a request that kills the engine cannot loop;
- a flight abandoned by its caller (client disconnect, timeout, `POST /abort`) sends an
  `AbortRequest`, so its batch slot is freed;
- `POST /abort` for a request_id this worker does not hold goes to the engine as `AbortTagged`
  (every request carries its client's request_id as its tag): the engine ends the requests of
  any worker with that tag, and their owners see the usual abort result.

Errors reach the resources as `ApiError`s: the engine's error codes map to HTTP statuses
(invalid -> 422, overloaded -> 503 + Retry-After, timeout -> 503, internal -> 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Protocol, Sequence, Union

from mlxsup.ipc.control import PREFIX_CACHE_FIELDS
from mlxsup.api.errors import (
    RETRY_AFTER_OVERLOADED,
    RETRY_AFTER_UNAVAILABLE,
    ApiError,
    invalid,
    overloaded,
    unavailable,
)
from mlxsup.config import ENGINE_HEARTBEAT_TIMEOUT_S
from mlxsup.ipc.control import TokenRate
from mlxsup.ipc.messages import (
    ERR_INTERNAL,
    ERR_INVALID,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    AbortRequest,
    ControlResult,
    EngineControl,
    AbortTagged,
    ErrorEvent,
    GenerateRequest,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    SequenceDone,
    TokenChunk,
)

log = logging.getLogger("mlxsup.api")

READY_STATES = ("ready", "draining", "paused")  # (paused: requests queue until /resume)
TICK_BUSY_S = 0.05
TICK_IDLE_S = 0.25
RATE_WINDOW_S = 10.0

StreamEvent = Union[TokenChunk, SequenceDone]


@dataclass(frozen=True)
class EngineStatus:
    """What the API knows about the engine: a control-block reading plus link facts."""

    link_open: bool = False
    slot: Optional[int] = None
    engine_epoch: int = 0
    engine_state: str = "down"
    supervisor_state: str = ""
    policy_version: int = 0
    adapter_id: str = ""
    heartbeat_age_s: Optional[float] = None
    queue_depth: int = 0
    num_running: int = 0
    tokens_generated: int = 0
    prefill_tokens: int = 0
    num_swaps: int = 0
    num_requests: int = 0
    prefix_cache_lookups: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_lookup_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_entries: int = 0
    prefix_cache_bytes: int = 0
    kv_budget_bytes: int = 0
    engine_restarts: int = 0
    tokens_per_s: float = 0.0
    num_inflight: int = 0  # this worker's requests in the engine
    vocab_size: Optional[int] = None  # published by the engine when it got ready
    context_length: Optional[int] = None  # None: not known yet, or the model states none

    @property
    def is_ready(self) -> bool:
        """Whether a new request can be sent now."""
        if not self.link_open or self.engine_state not in READY_STATES:
            return False
        if self.supervisor_state in ("restarting", "stopping"):
            return False
        return self.heartbeat_age_s is None or self.heartbeat_age_s < ENGINE_HEARTBEAT_TIMEOUT_S

    def why_not_ready(self) -> str:
        if not self.link_open:
            return "this API worker is not connected to the engine yet"
        if self.supervisor_state == "stopping" or self.engine_state == "stopping":
            return "the server is stopping"
        if self.engine_state == "starting" or self.supervisor_state == "restarting":
            return "the engine is starting (or restarting); retry shortly"
        if self.engine_state == "down":
            return "the engine is down; the supervisor is restarting it"
        return "the engine has not sent a heartbeat recently; it is being restarted"


class EngineLink(Protocol):
    """The engine as the resources see it."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def status(self) -> EngineStatus: ...

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *, n: int = 1,
                       min_policy_version: int = -1, tag: Optional[str] = None,
                       cache_salt: str = "") -> list[SequenceDone]:
        """All `n` samples of one prompt, in seq_index order."""
        ...

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, *, n: int = 1,
               min_policy_version: int = -1, tag: Optional[str] = None,
               cache_salt: str = "") -> AsyncIterator[StreamEvent]:
        """TokenChunk and SequenceDone events as the engine produces them, until all n are done."""
        ...

    async def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], *,
                    logprobs_mode: str, params: SamplingParams, tag: Optional[str] = None,
                    top_logprobs: int = 0, cache_salt: str = "") -> ScoreResult: ...

    async def control(self, op: str, mode: str = "") -> ControlResult:
        """An engine-wide control: pause (`mode` abort/wait/keep), resume, status, abort_all."""
        ...

    async def abort(self, tag: str) -> int:
        """Abort every request tagged `tag` (in this worker and, through the engine, in the
        others); return how many were found in this worker."""
        ...


def error_from_event(event: ErrorEvent) -> ApiError:
    """The engine's error codes as HTTP errors."""
    message = event.message or event.code
    if event.code == ERR_INVALID:
        return invalid(event.field or "", message)
    if event.code == ERR_OVERLOADED:
        return overloaded(message)
    if event.code == ERR_TIMEOUT:
        return ApiError(503, "timeout", message, event.field or "", retry_after=RETRY_AFTER_OVERLOADED)
    if event.code == ERR_INTERNAL:
        return ApiError(500, "engine_error", message)
    return ApiError(500, "engine_error", f"{event.code}: {message}")


class _Orphaned:
    """Put in a flight's queue by the watcher when the engine it was sent to is gone."""


_ORPHANED = _Orphaned()


@dataclass(eq=False)
class _Flight:
    tag: Optional[str]
    make: Callable[[int], object]
    rid: Optional[int] = None
    queue: Optional[asyncio.Queue] = None
    epoch: Optional[int] = None
    sent_at: float = 0.0
    is_orphan_signalled: bool = False
    num_orphaned: int = 0
    is_delivered: bool = False  # something went back to the client
    is_finished: bool = False
    is_aborted: bool = False


class IpcEngineLink:
    """`EngineLink` over the worker's shared-memory channel."""

    def __init__(
        self,
        run_dir: str,
        *,
        request_timeout_s: float = 600.0,
        min_policy_wait_s: float = 60.0,
        restart_wait_s: float = 120.0,
        open_channel: Optional[Callable] = None,
    ):
        self.run_dir = run_dir
        self.request_timeout_s = request_timeout_s
        self.min_policy_wait_s = min_policy_wait_s
        self.restart_wait_s = restart_wait_s
        self._open_channel = open_channel or _open_worker_channel
        self.channel = None
        self._flights: set[_Flight] = set()
        self._tasks: set[asyncio.Task] = set()
        self._opener: Optional[asyncio.Task] = None
        self._watcher: Optional[asyncio.Task] = None
        self._rate = TokenRate(RATE_WINDOW_S)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        try:
            await self._open()
        except Exception as e:  # segments not there yet, no free slot, ...
            log.warning("engine link: cannot open the IPC channel yet (%s); retrying", e)
            self._opener = asyncio.ensure_future(self._keep_opening())
        self._watcher = asyncio.ensure_future(self._watch())

    async def _open(self) -> None:
        self.channel = await self._open_channel(self.run_dir)
        log.info("engine link: slot %s (generation %s)", getattr(self.channel, "slot", "?"),
                 getattr(self.channel, "generation", "?"))

    async def _keep_opening(self) -> None:
        delay = 0.2
        while self.channel is None:
            await asyncio.sleep(delay)
            try:
                await self._open()
            except Exception as e:
                delay = min(delay * 1.5, 2.0)
                log.debug("engine link: open failed again (%s)", e)

    async def close(self) -> None:
        for task in (self._opener, self._watcher, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._opener, self._watcher, *self._tasks):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        self._opener = self._watcher = None
        self._tasks.clear()
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()

    # ---------------------------------------------------------------- status

    def status(self) -> EngineStatus:
        channel = self.channel
        if channel is None:
            return EngineStatus(link_open=False)
        snap = channel.control.read()
        age = None
        if snap.heartbeat_ns:
            age = max(0.0, (time.time_ns() - snap.heartbeat_ns) / 1e9)
        return EngineStatus(
            link_open=True,
            slot=getattr(channel, "slot", None),
            engine_epoch=snap.engine_epoch,
            engine_state=snap.engine_state,
            supervisor_state=getattr(snap, "supervisor_state", ""),
            policy_version=snap.policy_version,
            adapter_id=snap.adapter_id,
            heartbeat_age_s=age,
            queue_depth=snap.queue_depth,
            num_running=snap.num_running,
            tokens_generated=snap.tokens_generated,
            prefill_tokens=snap.prefill_tokens,
            num_swaps=snap.num_swaps,
            num_requests=snap.num_requests,
            **{k: getattr(snap, k) for k in PREFIX_CACHE_FIELDS},
            engine_restarts=snap.engine_restarts,
            tokens_per_s=self._rate.tokens_per_s,
            num_inflight=len(self._flights),
            vocab_size=snap.vocab_size or None,
            context_length=snap.context_length or None,
        )

    # ---------------------------------------------------------------- requests

    async def generate(self, prompt_ids, params, *, n=1, min_policy_version=-1, tag=None, cache_salt=""):
        def make(rid):
            return GenerateRequest(rid, list(prompt_ids), params, n=n, stream=False,
                                   min_policy_version=min_policy_version,
                                   min_policy_wait_s=self.min_policy_wait_s if min_policy_version >= 0 else 0.0,
                                   cache_salt=cache_salt, tag=tag or "")

        done: dict[int, SequenceDone] = {}
        async with contextlib.aclosing(self._fly(make, tag, expect=n, stream=False)) as events:
            async for event in events:
                if isinstance(event, SequenceDone):
                    done[event.seq_index] = event
        return [done[i] for i in sorted(done)]

    async def stream(self, prompt_ids, params, *, n=1, min_policy_version=-1, tag=None, cache_salt=""):
        def make(rid):
            return GenerateRequest(rid, list(prompt_ids), params, n=n, stream=True,
                                   min_policy_version=min_policy_version,
                                   min_policy_wait_s=self.min_policy_wait_s if min_policy_version >= 0 else 0.0,
                                   cache_salt=cache_salt, tag=tag or "")

        async with contextlib.aclosing(self._fly(make, tag, expect=n, stream=True)) as events:
            async for event in events:
                yield event

    async def score(self, prompt_ids, completion_ids, *, logprobs_mode, params, tag=None,
                    top_logprobs=0, cache_salt=""):
        def make(rid):
            return ScoreRequest(rid, list(prompt_ids), list(completion_ids), logprobs_mode, params,
                                top_logprobs, cache_salt=cache_salt, tag=tag or "")

        result = None
        async with contextlib.aclosing(self._fly(make, tag, expect=1, stream=False)) as events:
            async for event in events:
                result = event
        return result

    async def control(self, op: str, mode: str = "") -> ControlResult:
        """An engine-wide control (pause, resume, status, abort_all); its ControlResult."""
        result = None
        async with contextlib.aclosing(self._fly(lambda rid: EngineControl(rid, op, mode), None,
                                                 expect=1, stream=False)) as events:
            async for event in events:
                result = event
        return result

    async def abort(self, tag: str) -> int:
        found = [f for f in self._flights if f.tag == tag and not f.is_finished]
        for flight in found:
            self._abort_flight(flight)
        if tag and self.channel is not None:  # other workers may hold requests with this tag
            try:
                await self.channel.send(AbortTagged(tag))
            except Exception as e:
                log.warning("engine link: could not send the abort of %r: %s", tag, e)
        return len(found)

    # ---------------------------------------------------------------- flights

    async def _fly(self, make, tag, *, expect: int, stream: bool):
        """Events of one request until `expect` sequences (or one score) are done. Non-streamed
        requests yield only once everything is there, so a re-send never duplicates output."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        flight = _Flight(tag=tag, make=make)
        self._flights.add(flight)
        buffered: list = []
        try:
            await self._send(flight, first=True)
            num_done = 0
            while num_done < expect:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ApiError(503, "timeout", f"no answer from the engine within "
                                   f"{self.request_timeout_s:.0f} s", retry_after=RETRY_AFTER_OVERLOADED)
                try:
                    event = await asyncio.wait_for(flight.queue.get(), remaining)
                except asyncio.TimeoutError:
                    continue
                if event is _ORPHANED:
                    self._on_orphaned(flight)
                    # a restarted engine may still serve requests left in the ring: the old id
                    # is aborted so that only the re-sent copy runs
                    self._send_abort(flight.rid)
                    await self._wait_for_new_engine(flight.epoch, deadline)
                    buffered.clear()
                    num_done = 0
                    await self._send(flight, first=False)
                    continue
                if isinstance(event, ErrorEvent):
                    flight.is_finished = True
                    raise error_from_event(event)
                if isinstance(event, (SequenceDone, ScoreResult, ControlResult)):
                    num_done += 1
                if stream:
                    flight.is_delivered = True
                    yield event
                else:
                    buffered.append(event)
            flight.is_finished = True
            for event in buffered:
                yield event
        finally:
            self._flights.discard(flight)
            if not flight.is_finished and flight.rid is not None:
                self._abort_flight(flight)
            self._unregister(flight)

    def _on_orphaned(self, flight: _Flight) -> None:
        if flight.is_aborted:
            raise ApiError(409, "aborted", "the request was aborted and the engine restarted")
        if flight.is_delivered:
            raise ApiError(503, "engine_restarted", "the engine restarted while this response was "
                           "streaming; retry the request", retry_after=RETRY_AFTER_UNAVAILABLE)
        if flight.num_orphaned >= 1:
            raise ApiError(422, "request_refused", "the engine died twice while this request was "
                           "in flight; it is refused so that a request that crashes the engine "
                           "cannot loop (retry it only if it is not the cause)")
        flight.num_orphaned += 1
        log.warning("engine link: request %s lost in an engine restart; sending it again", flight.rid)

    async def _wait_for_new_engine(self, old_epoch: Optional[int], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        give_up = min(deadline, loop.time() + self.restart_wait_s)
        while True:
            status = self.status()
            if status.is_ready and status.engine_epoch != old_epoch:
                return
            if loop.time() >= give_up:
                raise unavailable("the engine restarted and is not back yet; retry shortly")
            await asyncio.sleep(TICK_BUSY_S)

    async def _send(self, flight: _Flight, *, first: bool) -> None:
        status = self.status()
        if not status.is_ready:
            raise unavailable(status.why_not_ready())
        channel = self.channel
        self._unregister(flight)
        rid = channel.new_request_id()
        flight.rid = rid
        flight.queue = channel.register(rid)
        flight.epoch = status.engine_epoch
        flight.sent_at = time.time()
        flight.is_orphan_signalled = False
        try:
            await channel.send(flight.make(rid))
        except ApiError:
            raise
        except Exception as e:
            log.exception("engine link: send failed")
            raise ApiError(503, "engine_unavailable", f"could not hand the request to the engine: {e}",
                           retry_after=RETRY_AFTER_UNAVAILABLE) from None
        self._ensure_watcher()

    def _unregister(self, flight: _Flight) -> None:
        if flight.rid is not None and self.channel is not None:
            with contextlib.suppress(Exception):
                self.channel.unregister(flight.rid)

    def _abort_flight(self, flight: _Flight) -> None:
        flight.is_aborted = True
        self._send_abort(flight.rid)

    def _send_abort(self, rid: Optional[int]) -> None:
        if rid is not None and self.channel is not None:
            self._background(self.channel.send(AbortRequest(rid)))

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("engine link: background send failed: %s", task.exception())

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())

    # ---------------------------------------------------------------- watcher

    async def _watch(self) -> None:
        """Orphan flights of dead engines, sample the token rate."""
        while True:
            try:
                self._tick()
            except Exception:
                log.exception("engine link: watcher tick failed")
            await asyncio.sleep(TICK_BUSY_S if self._flights else TICK_IDLE_S)

    def _tick(self) -> None:
        if self.channel is None:
            return
        status = self.status()
        now = time.monotonic()
        self._rate.sample(now, status.engine_epoch, status.tokens_generated)
        for flight in list(self._flights):
            if (flight.epoch is not None and flight.epoch != status.engine_epoch
                    and not flight.is_orphan_signalled and flight.queue is not None):
                flight.is_orphan_signalled = True
                flight.queue.put_nowait(_ORPHANED)

async def _open_worker_channel(run_dir: str):
    from mlxsup.ipc.channel import WorkerChannel
    from mlxsup.ipc.layout import IpcLayout

    return await WorkerChannel.open(IpcLayout.load(run_dir))
