"""Which work runs at the next step: admission, the flush interval, the queue bound, version
holds and when an adapter swap commits. Policy only: no mlx, no model, no clock of its own
(callers pass `now`), so every rule here is unit-tested without a model."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from mlxsup.config import SWAP_ABORT, SWAP_DRAIN, SWAP_INFLIGHT, SWAP_MODES

from .sequence import RequestState, Sequence, SeqStatus


# mlx-lm's KV caches grow their buffers by this many positions at a time (KVCache.step).
KV_STEP = 256


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests already (HTTP 503 + Retry-After)."""


@dataclass
class Plan:
    """What one step does, in this order: expire held requests, end sequences a swap in
    mode abort cuts, commit the swap, admit new samples (prefill), run queued scores."""

    expired: list[RequestState] = field(default_factory=list)
    swap_aborted: list[RequestState] = field(default_factory=list)
    commit_swap: bool = False
    admit: list[tuple[RequestState, list[Sequence]]] = field(default_factory=list)
    scores: list[RequestState] = field(default_factory=list)


@dataclass
class PendingSwap:
    mode: str
    version: int


class Scheduler:
    """Owns the waiting queue and the set of running sequences.

    max_batch: running sequences at most (each sample counts).
    max_queue: requests waiting for admission at most.
    flush_interval_s: an idle engine waits this long after the oldest arrival, or until
        `max_batch` samples wait, before it admits, so arrivals are prefilled together.
    max_prefill_tokens: prompt tokens admitted per step (the first request always passes).
    max_score_tokens: tokens of score requests run per step (the first always passes).
    kv_budget_tokens: KV positions the running batch may hold (None: no bound). The batch's
        caches hold every row left-padded to the longest and grow in steps of `KV_STEP`
        positions, so a batch of `rows` sequences whose longest may reach `longest` tokens
        (prompt + max_tokens) holds at most `rows * (longest + KV_STEP)` (`kv_tokens`). A
        request that would pass the bound waits, and so do those behind it; one that cannot
        fit alone is refused by the engine at submit.
    """

    def __init__(
        self,
        max_batch: int,
        max_queue: int,
        flush_interval_s: float,
        max_prefill_tokens: int = 4096,
        max_score_tokens: int = 8192,
        kv_budget_tokens: Optional[int] = None,
    ):
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.flush_interval_s = flush_interval_s
        self.max_prefill_tokens = max_prefill_tokens
        self.max_score_tokens = max_score_tokens
        self.kv_budget_tokens = kv_budget_tokens
        self.waiting: deque[RequestState] = deque()
        self.running: dict[int, Sequence] = {}
        self.pending_swap: Optional[PendingSwap] = None

    # ------------------------------------------------------------------ queue

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def add(self, state: RequestState) -> None:
        """Queue a request; raises QueueFull when `max_queue` requests wait already."""
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the engine's queue is full ({self.max_queue} requests wait)")
        self.waiting.append(state)

    def remove_waiting(self, state: RequestState) -> None:
        try:
            self.waiting.remove(state)
        except ValueError:
            pass

    def finish(self, seq: Sequence) -> bool:
        """Mark `seq` finished; True when it was its request's last unfinished sequence."""
        self.running.pop(seq.seq_id, None)
        seq.status = SeqStatus.FINISHED
        state = seq.request
        state.num_finished += 1
        return state.num_finished == state.num_samples

    @staticmethod
    def kv_tokens(rows: int, longest: int) -> int:
        """KV positions a batch of `rows` holds at most when its longest row reaches `longest`."""
        return rows * (longest + KV_STEP) if rows else 0

    def reserved_kv_tokens(self) -> int:
        """What the running batch may grow to (see `kv_budget_tokens`)."""
        if not self.running:
            return 0
        return self.kv_tokens(len(self.running), max(_kv_end(s) for s in self.running.values()))

    def running_requests(self) -> list[RequestState]:
        """Requests with a sequence in the batch, in admission order, each once."""
        seen: dict[int, RequestState] = {}
        for seq in self.running.values():
            seen.setdefault(id(seq.request), seq.request)
        return list(seen.values())

    # ------------------------------------------------------------------ swaps

    def request_swap(self, mode: str, version: int) -> None:
        if mode not in SWAP_MODES:
            raise ValueError(f"swap mode must be one of {SWAP_MODES}, not {mode!r}")
        if self.pending_swap is not None:
            raise RuntimeError("a swap is already pending; the supervisor serialises swaps")
        self.pending_swap = PendingSwap(mode, version)

    def cancel_swap(self) -> None:
        """Drop the pending swap (a keep pause commits it at once: nothing runs to wait for)."""
        self.pending_swap = None

    def _swap_can_commit(self) -> bool:
        swap = self.pending_swap
        if swap is None:
            return False
        if swap.mode != SWAP_DRAIN:
            return True
        # drain: in-flight requests, including samples of a group not admitted yet, finish
        # under the old version first.
        return not self.running and not any(s.is_partially_admitted for s in self.waiting)

    # ------------------------------------------------------------------ schedule

    def _eligible(self, state: RequestState, version: int) -> bool:
        return state.min_policy_version <= version

    def _should_wait_for_more(self, now: float, version: int) -> bool:
        """The flush interval: an idle engine lets arrivals gather for a moment."""
        if self.running or self.flush_interval_s <= 0:
            return False
        eligible = [s for s in self.waiting if self._eligible(s, version)]
        if not eligible:
            return False
        if sum(s.num_unadmitted for s in eligible) >= self.max_batch:
            return False
        return now - min(s.arrival for s in eligible) < self.flush_interval_s

    def schedule(self, now: float, version: int, hold: bool = False) -> Plan:
        """Decide this step's work. `version` is the policy version serving now. `hold`
        (the engine is paused) admits only the waiting samples of requests already partly
        admitted, and no score."""
        plan = Plan()
        # Requests waiting for a version that a pending swap will reach are not expired
        # while that swap is pending: it commits at a step boundary soon.
        target = self.pending_swap.version if self.pending_swap else version
        for state in list(self.waiting):
            if state.min_policy_version > target and now >= state.hold_deadline:
                self.waiting.remove(state)
                plan.expired.append(state)

        if self.pending_swap is not None and self.pending_swap.mode == SWAP_ABORT:
            # The caller ends every unfinished sample of these requests with "abort".
            plan.swap_aborted = self.running_requests()
            plan.swap_aborted += [s for s in self.waiting
                                  if s.is_partially_admitted and s not in plan.swap_aborted]
            for state in plan.swap_aborted:
                self.remove_waiting(state)
            self.running.clear()

        if self._swap_can_commit():
            plan.commit_swap = True
            version = self.pending_swap.version
            inflight = self.pending_swap.mode == SWAP_INFLIGHT
            self.pending_swap = None
            if inflight and self.running:
                # The committing step decodes the running rows alone, so the new weights'
                # first tokens come one decode step after the commit instead of after the
                # prefill of prompts admitted with it (on the CPU a prompt's prefill can take
                # several decode steps: docs/benchmarks.md). Those start a step later.
                return plan
        draining = self.pending_swap is not None or hold  # (only a drain can still be pending)

        if not hold and self._should_wait_for_more(now, version):
            return plan

        free = self.max_batch - len(self.running)
        rows = len(self.running)
        longest = max((_kv_end(s) for s in self.running.values()), default=0)
        budget = self.max_prefill_tokens
        score_budget = self.max_score_tokens
        admitted_any = False
        for state in list(self.waiting):
            if not self._eligible(state, version):
                continue
            if state.is_score:
                if hold:
                    continue
                size = len(state.request.prompt_ids) + len(state.request.completion_ids)
                if plan.scores and size > score_budget:
                    continue
                score_budget -= size
                plan.scores.append(state)
                self.waiting.remove(state)
                continue
            if free <= 0:
                continue
            if draining and not state.is_partially_admitted:
                continue
            needs_prefill = state.num_admitted == 0
            if needs_prefill:
                if admitted_any and state.num_prompt_tokens > budget:
                    continue
                budget -= state.num_prompt_tokens
            take = min(free, state.num_unadmitted)
            if self.kv_budget_tokens is not None:
                end = max(longest, _kv_end(state.seqs[state.num_admitted]))
                while take and self.kv_tokens(rows + take, end) > self.kv_budget_tokens:
                    take -= 1
                if not take:  # does not fit now: waits for rows to finish, and so do the
                    free = 0  # requests behind it (a long prompt is not starved by short ones)
                    continue
                rows, longest = rows + take, end
            seqs = state.seqs[state.num_admitted : state.num_admitted + take]
            state.num_admitted += take
            free -= take
            for seq in seqs:
                seq.status = SeqStatus.RUNNING
                seq.admitted_at = now
                self.running[seq.seq_id] = seq
            plan.admit.append((state, seqs))
            admitted_any = True
            if state.num_unadmitted == 0:
                self.waiting.remove(state)
        return plan

    # ------------------------------------------------------------------ idleness

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.pending_swap)

    def wait_hint(self, now: float, version: int) -> Optional[float]:
        """Seconds until `schedule` can do something (0: now), None when there is nothing."""
        if self.running or self.pending_swap is not None:
            return 0.0
        if not self.waiting:
            return None
        eligible = [s for s in self.waiting if self._eligible(s, version)]
        if eligible:
            if not self._should_wait_for_more(now, version):
                return 0.0
            oldest = min(s.arrival for s in eligible)
            return max(0.0, oldest + self.flush_interval_s - now)
        return max(0.0, min(s.hold_deadline for s in self.waiting) - now)


def _kv_end(seq: Sequence) -> int:
    """The most KV positions `seq` may hold: its prompt and all of its max_tokens."""
    return seq.request.num_prompt_tokens + seq.max_tokens
