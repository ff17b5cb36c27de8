"""The only module that runs the model: the running batch's KV caches, prefill, the decode
step and teacher-forced scoring.

The batch is a set of rows (one per running sequence) held in mlx-lm's batch caches
(`BatchKVCache` and friends: rows are left-padded and can be filtered and extended).

Pipelined (a GPU's default), each `step` queues the next decode step (`mx.async_eval`) before
it reads back the tokens of the step queued last time, so Python's bookkeeping and the next
graph's kernel launches overlap the model's compute, as mlx-lm's generators do: a decode step
of a small batch is bound by the host there. A row that finished at step t is then computed
once more at t+1 and dropped, and whatever the caller changes between two steps (an adapter
swap) reaches the step after the one already queued. Stepwise, each `step` runs its decode
step to the end and returns its own tokens, so a swap's new weights reach the very next step.
Adaptive (the CPU's default) is stepwise while steps are long and pipelined while they are
short (see SLOW_STEP_S): on the CPU the host's Python competes with the compute threads for
the same cores, so the overlap buys nothing once a step is long (bench75m, 2 cores: stepwise
1.01-1.14x the pipelined tokens/s) and pays while it is short (tiny model, batch 8: 0.81x).

Prefill runs `prompt[:-1]` of the new requests in right-padded passes (on the CPU one per
group of similar lengths, on a GPU one in all; mlx-lm's prepare/finalize protocol rolls the
padding to the left); the last prompt token goes into the next decode step with the running
rows, so the vocabulary projection runs only there and joining costs no extra pass over the
weights. A request's `n` samples share the prefill: its cache row is replicated `n` times.
With `prefill_chunk`, the admissions of a step are a job prefilled over several steps (at most
that many prompt tokens a step while rows decode), joining the batch when its last pass is done.
With a prefix cache (engine/prefix_cache.py), a prompt starts from the KV of its longest cached
prefix and only the rest is prefilled; prompts of one step sharing a long prefix prefill it
once; prompts' and finished rows' KV go into the cache (docs/engine.md, "Prefix cache").

A batch of one row runs *solo*: its caches become mlx-lm's plain single-sequence caches
(`BatchKVCache.extract`), which need no attention mask, no per-row offsets and take the fused
attention kernel; they are merged back into batch caches when another row joins. On the H100
a 1B model decoded one sequence at 7.7 ms a token with the batch caches and at 5.1 ms solo
(mlx-lm's single-stream `generate_step`: 4.1 ms on that host).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from mlxsup.ipc.messages import LOGPROBS_RAW, MAX_TOP_LOGPROBS, SamplingParams

from . import sampling

log = logging.getLogger("mlxsup.engine")

# Adaptive step mode (the CPU's default): a run of decode steps longer than SLOW_STEP_S from
# step to step goes stepwise, one shorter than FAST_STEP_S pipelined: on the CPU the overlap
# pays for short steps only (docs/engine.md, step modes, has the measured table).
SLOW_STEP_S = 0.025
FAST_STEP_S = 0.015

# Logits of one scoring pass are tokens x vocab float32; keep them under this many bytes.
_SCORE_LOGITS_BYTES = 256 * 2**20


def _merge(caches: Sequence[list]) -> list:
    """Per-layer batch caches from per-request caches (mlx-lm's `merge` class methods)."""
    return [type(layer[0]).merge(list(layer)) for layer in zip(*caches)]


# Batch caches whose single row runs solo as a plain cache (extract, then merge back).
_SOLO_CACHES = (BatchKVCache,)

# On the CPU, prompts prefilled in one padded pass differ in length by at most this factor (or
# by _PREFILL_GAP tokens): a 1,000-token prompt admitted with thirty short ones would otherwise
# pad all of them to 1,000 tokens, and the CPU computes every padded token. On a GPU one padded
# pass stays: padding is nearly free there, while every extra pass costs launches and each new
# shape a kernel compile (docs/engine.md has the figures of both).
_PREFILL_SLACK = 1.25
_PREFILL_GAP = 32

# Prompts of one admission that share at least this many tokens prefill them once (a pass of
# one row), then each its remainder; below it the extra pass costs more than it saves.
MIN_SHARED_PREFIX = 32


def length_groups(lengths: Sequence[int], grouped: bool = True) -> list[range]:
    """Runs of `lengths` (sorted ascending) whose padding to their longest stays within
    `_PREFILL_SLACK` x the shortest or `_PREFILL_GAP` tokens; one run when not `grouped`."""
    if not grouped:
        return [range(len(lengths))] if lengths else []
    groups, start = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] > max(lengths[start] * _PREFILL_SLACK,
                                                 lengths[start] + _PREFILL_GAP):
            groups.append(range(start, i))
            start = i
    return groups


@dataclass
class GroupPrefix:
    """A request's prompt state kept for samples admitted later (a group larger than the
    free rows): one cache row per layer holding `prompt[:-1]`."""

    cache: list


@dataclass
class Admission:
    """New rows for one request: its samples `seq_ids` with their stream `seeds`."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    seq_ids: list[int]
    seeds: list[int]
    prefix: Optional[GroupPrefix] = None  # start from this instead of prefilling
    save_prefix: bool = False  # return the prompt state for the samples still waiting
    owner: object = None  # the caller's (returned with the prompt state, see `step`)
    # The weights' key of the prefix cache (None: neither looked up nor stored), and what the
    # runner found there: prompt tokens served from the cache, the KV they start from.
    cache_key: Optional[Hashable] = None
    cached_tokens: int = 0
    start: Optional[list] = None
    start_len: int = 0  # positions `start` holds
    shares: bool = False  # starts from a prefix this job prefills once for several prompts


@dataclass
class _Group:
    """One padded prefill pass in progress: `x` (rows, longest) through `cache`."""

    cache: list
    x: Optional[mx.array]
    longest: int
    padded: bool
    pos: int = 0  # positions prefilled so far
    seed: Optional[tuple] = None  # (key, tokens): a shared prefix, stored when done, no rows


@dataclass
class _PrefillJob:
    """The admissions of one step, prefilled group by group, chunk by chunk (see
    `prefill_chunk`), then joined to the batch together."""

    admissions: list
    order: list[int]  # fresh (by length) then reused, indices into `admissions`
    groups: list[list[int]]  # the fresh ones in padded passes
    version: int  # the weights' version when it started
    seq_ids: frozenset  # of all its samples
    caches: list = field(default_factory=list)  # of the passes done
    current: Optional[_Group] = None
    dropped: set = field(default_factory=set)  # seq ids removed before joining
    seeds: list = field(default_factory=list)  # (key, tokens) prefilled first (see _new_job)
    num_seeds_done: int = 0

    @property
    def done(self) -> bool:
        return self.num_seeds_done == len(self.seeds) and len(self.caches) == len(self.groups)


@dataclass
class StepOutput:
    """Tokens of one step: row i of `seq_ids` produced `tokens[i]` with `logprobs[i]`, and,
    when a row asked for top log-probs, `top_ids[i]`/`top_logprobs[i]` (MAX_TOP_LOGPROBS of
    each, most likely first; None when no row of the step asked)."""

    seq_ids: list[int]
    tokens: list[int]
    logprobs: list[float]
    version: int  # policy version of the weights the step ran under
    top_ids: Optional[list[list[int]]] = None
    top_logprobs: Optional[list[list[float]]] = None


@dataclass
class ScoreItem:
    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    params: SamplingParams
    mode: str
    top_logprobs: int = 0
    cache_key: Optional[Hashable] = None  # look the prompt up in the prefix cache


@dataclass
class ScoreOutput:
    """Teacher-forced log-probs of one item's completion tokens, and with `top_logprobs` k the
    k most likely tokens at each of those positions (flat, k per token)."""

    logprobs: list[float]
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


class ModelRunner:
    """Owns the model's execution: the batch's caches, keys and pending step."""

    def __init__(self, model: nn.Module, prefill_step_size: int = 2048, max_window: int = 1 << 16,
                 group_prefill: Optional[bool] = None, pipeline: Optional[bool] = True,
                 prefill_chunk: Optional[int] = None):
        self.model = model
        # Prompt tokens (padding included) prefilled per step at most, the rest in later steps
        # while the running rows keep decoding; None: every admission's whole prompt at once.
        self.prefill_chunk = prefill_chunk
        # Queue step t+1 before reading step t (see `step`); None: choose by the step's length.
        self.adaptive = pipeline is None
        self.pipeline = True if pipeline is None else pipeline
        self.step_s: Optional[float] = None  # moving average of the time from step to step
        self._last_step_at: Optional[float] = None
        # Prefill similar lengths together: on the CPU (see _PREFILL_SLACK) unless told.
        self.group_prefill = (mx.default_device() == mx.cpu if group_prefill is None
                              else group_prefill)
        self.prefill_step_size = prefill_step_size
        self.max_window = max_window  # widest repetition-penalty window kept per row
        self.stream = mx.new_stream(mx.default_device())
        with mx.stream(self.stream):
            probe = model(mx.array([[0]]))
            mx.eval(probe)
            t0 = time.perf_counter()
            if sampling.warm_up(probe[:, -1, :]):
                log.info("compiled sampler built in %.1f s", time.perf_counter() - t0)
        self.vocab_size = int(probe.shape[-1])
        try:
            _merge([make_prompt_cache(model), make_prompt_cache(model)])
        except Exception as e:  # a cache type mlx-lm cannot batch
            raise ValueError(f"this model's KV cache does not support batching: {e}") from e
        self.kv_bytes_per_token = _kv_bytes_per_token(model)
        # Set by the engine (engine/prefix_cache.py); None: no reuse across requests.
        self.prefix_cache = None
        self._jobs: list[_PrefillJob] = []  # admissions still prefilling, oldest first
        self._clear()

    def _clear(self) -> None:
        """Drop every row (the jobs still prefilling stay)."""
        self.seq_ids: list[int] = []
        self.params: list[SamplingParams] = []
        self.fresh: list[bool] = []  # rows whose pending token is their last prompt token
        self.cache: Optional[list] = None
        self.keys: Optional[mx.array] = None
        self.ctx: Optional[mx.array] = None
        self.rows: Optional[sampling.RowParams] = None
        self.pending: Optional[tuple[mx.array, mx.array]] = None  # (tokens, logprobs) (B,)
        # The pending step's top log-probs, (ids, log-probs) (B, MAX_TOP_LOGPROBS), while a row
        # asks for them (rows joined since carry zeros: their pending token is a prompt token).
        self.pending_top: Optional[tuple[mx.array, mx.array]] = None
        self.num_top = 0  # the most top log-probs a row asks for
        self.pending_version = 0
        self.solo = False  # the one row's caches are plain caches, not batch caches
        self.row_keys: list = []  # each row's prefix-cache key (None: not stored)
        self.kv_versions: list[int] = []  # the version all of a row's KV was computed under
        self._last_step_at = None  # no rows: the next step starts a new run of steps

    @property
    def num_rows(self) -> int:
        return len(self.seq_ids)

    @property
    def num_prefilling(self) -> int:
        """Sequences admitted whose prompts are still being prefilled (not rows yet)."""
        return sum(len(j.seq_ids) - len(j.dropped) for j in self._jobs)

    # ------------------------------------------------------------------ stepping

    def step(self, admissions: Sequence[Admission], version: int, prefill: bool = True
             ) -> tuple[Optional[StepOutput], list[tuple[Admission, GroupPrefix]]]:
        """Add `admissions` as new rows (their prompts prefilled), run the next decode step of
        every row, and return tokens (pipelined: those of the step queued last time, this
        one left computing; stepwise: this step's own), plus the prompt states saved for
        samples admitted later, with the admission each belongs to.

        With `prefill_chunk`, a step prefills at most that many prompt tokens (at least one
        position of one pass); admissions not done yet wait for later steps, and join the
        batch, all of one step's together, once their last pass is done. `prefill` False
        runs no prefill this step while rows run (a swap's commit step: the new weights'
        first tokens do not wait for it). Prompt states of a job that outlived a change of
        `version` are not returned (their KV holds two versions).

        The pending tokens are both the last step's output and the next step's input; a new
        row's pending token is its last prompt token, so its first sampled token comes out
        of the shared decode step (no forward pass of its own); pipelined, it is reported one
        step on. `fresh` marks the rows whose pending token is not to be reported (a prompt
        token, or, stepwise, a token already returned)."""
        with mx.stream(self.stream):
            if admissions:
                self._jobs.append(self._new_job(admissions, version))
            prefixes = self._prefill_jobs(version) if prefill or not self.seq_ids else []
            if self.pending is None:
                return None, prefixes
            if self.adaptive:
                self._adapt()
            seq_ids, fresh = list(self.seq_ids), self.fresh
            out, out_version, out_top = self.pending, self.pending_version, self.pending_top
            if not self.pipeline and not all(fresh):
                # Just turned stepwise with a step still queued: read it and queue nothing;
                # the next step decodes from its tokens.
                self.fresh = [True] * len(seq_ids)
            else:
                self._go_solo(len(seq_ids) == 1)
                self.pending = self._decode()
                self.pending_version = version
                if any(v != version for v in self.kv_versions):  # (KV of two versions: -1)
                    self.kv_versions = [v if v == version else -1 for v in self.kv_versions]
                self.fresh = [False] * len(seq_ids)
                top = self.pending_top or ()
                if self.pipeline:
                    mx.async_eval(*self.pending, self.keys, *top)
                else:  # this step's own tokens: nothing runs while the caller works
                    mx.eval(*self.pending, self.keys, *top)
                    out, out_version, fresh = self.pending, version, self.fresh
                    out_top = self.pending_top
                    self.fresh = [True] * len(seq_ids)  # read: not the next step's output
            mx.eval(*out, *(out_top or ()))
            tokens, logprobs = out[0].tolist(), out[1].tolist()
            top_ids, top_lps = (out_top[0].tolist(), out_top[1].tolist()) if out_top else (None, None)
        keep = [i for i, f in enumerate(fresh) if not f]
        if not keep:
            return None, prefixes
        if len(keep) < len(seq_ids):
            seq_ids = [seq_ids[i] for i in keep]
            tokens = [tokens[i] for i in keep]
            logprobs = [logprobs[i] for i in keep]
            if top_ids is not None:
                top_ids = [top_ids[i] for i in keep]
                top_lps = [top_lps[i] for i in keep]
        return StepOutput(seq_ids, tokens, logprobs, out_version, top_ids, top_lps), prefixes

    def _adapt(self) -> None:
        """Adaptive mode: stepwise while steps are long (the host's work is small beside the
        step, and a swap's new weights reach the next step), pipelined while they are short
        (the host's work is a large part of the step and the overlap pays)."""
        now = time.perf_counter()
        last, self._last_step_at = self._last_step_at, now
        if last is None:
            return
        dt = now - last
        self.step_s = dt if self.step_s is None else 0.8 * self.step_s + 0.2 * dt
        if self.pipeline and self.step_s > SLOW_STEP_S:
            self.pipeline = False
        elif not self.pipeline and self.step_s < FAST_STEP_S:
            self.pipeline = True

    def _go_solo(self, solo: bool) -> None:
        """Switch the caches between batch and plain single-sequence form."""
        if solo == self.solo or (solo and not all(
                isinstance(c, _SOLO_CACHES) and c.keys is not None for c in self.cache)):
            return
        self.cache = [c.extract(0) for c in self.cache] if solo else _merge([self.cache])
        self.solo = solo

    def _decode(self) -> tuple[mx.array, mx.array]:
        inputs = self.pending[0]
        logits = self.model(inputs[:, None], cache=self.cache)[:, -1, :]
        if self.ctx is not None:
            self.ctx = sampling.push_context(self.ctx, inputs, self.rows.context_sizes,
                                             self.vocab_size)
        tokens, logprobs, self.keys = sampling.sample(logits, self.rows, self.keys, self.ctx)
        self.pending_top = sampling.top_logprobs(
            logits, self.rows, self.ctx, MAX_TOP_LOGPROBS,
            all_raw=all(p.logprobs_mode == LOGPROBS_RAW for p in self.params)) \
            if self.num_top else None
        return tokens, logprobs

    def _new_job(self, admissions: Sequence[Admission], version: int) -> _PrefillJob:
        for a in admissions:
            if a.prefix is None and a.cache_key is not None and self.prefix_cache is not None:
                a.start, a.start_len = self.prefix_cache.fetch(
                    a.cache_key, a.prompt_ids, limit=len(a.prompt_ids) - 1)  # (prompt[:-1] at most)
                a.cached_tokens = a.start_len
                if a.start is not None and a.start_len == len(a.prompt_ids) - 1:  # all
                    a.prefix, a.start = GroupPrefix(a.start), None
        # Prompts of one admission that share a long prefix (one system prompt, a burst of
        # conversations' first turns) have it prefilled once, stored, and start from it.
        seeds = self._shared_prefixes(admissions) if self.prefix_cache is not None else []
        # Prompts of similar length are prefilled together (padding wastes compute).
        fresh = sorted((i for i, a in enumerate(admissions)
                        if a.prefix is None and a.start is None and not a.shares),
                       key=lambda i: len(admissions[i].prompt_ids))
        # Hits prefill their remainders together too, from their cached KV left-padded to the
        # longest (mlx-lm's BatchGenerator does the same with prompt caches).
        rest = lambda i: len(admissions[i].prompt_ids) - 1 - admissions[i].start_len  # noqa: E731
        hits = sorted((i for i, a in enumerate(admissions) if a.start is not None or a.shares),
                      key=rest)
        reused = [i for i, a in enumerate(admissions) if a.prefix is not None]
        groups = [[fresh[j] for j in group] for group in length_groups(
            [len(admissions[i].prompt_ids) for i in fresh], self.group_prefill)]
        groups += [[hits[j] for j in group] for group in length_groups(
            [rest(i) for i in hits], self.group_prefill)]
        return _PrefillJob(list(admissions), fresh + hits + reused, groups,
                           version, frozenset(s for a in admissions for s in a.seq_ids),
                           seeds=seeds)

    @staticmethod
    def _shared_prefixes(admissions: Sequence[Admission]) -> list[tuple]:
        """(key, tokens) of each run of this job's uncached prompts that share at least
        MIN_SHARED_PREFIX tokens (the run's common prefix, at most each one's prompt[:-1]);
        marks the prompts of a run `shares`, and counts the prefix as cached for all of them
        but the first (for which it is computed)."""
        todo = sorted((i for i, a in enumerate(admissions) if a.prefix is None and a.start is None
                       and a.cache_key is not None and len(a.prompt_ids) > MIN_SHARED_PREFIX),
                      key=lambda i: (repr(admissions[i].cache_key), list(admissions[i].prompt_ids)))
        seeds, run, common = [], [], 0
        for i in todo + [None]:
            if run and i is not None and admissions[i].cache_key == admissions[run[-1]].cache_key:
                a, b = admissions[run[-1]].prompt_ids, admissions[i].prompt_ids
                limit = min(len(a), len(b)) - 1
                n = next((k for k in range(limit) if a[k] != b[k]), limit)
                if min(common, n) >= MIN_SHARED_PREFIX:
                    run.append(i)
                    common = min(common, n)
                    continue
            if len(run) > 1:
                first = admissions[run[0]]
                seeds.append((first.cache_key, list(first.prompt_ids[:common])))
                for j in run:
                    admissions[j].shares = True
                    admissions[j].start_len = common  # (planned: fetched once the seed is done)
                    admissions[j].cached_tokens = common if j != run[0] else 0
            run, common = ([i], 1 << 62) if i is not None else ([], 0)
        return seeds

    def _prefill_jobs(self, version: int) -> list[tuple[Admission, GroupPrefix]]:
        """Run prefill passes, oldest job first, within this step's budget; join the jobs
        that are done. While no row decodes there is nobody to keep waiting short, so the
        oldest job is prefilled whole (an idle engine's burst, e.g. a GRPO round, at full
        speed); the chunk applies from the moment rows run."""
        chunked = self.prefill_chunk is not None and bool(self.seq_ids)
        budget = self.prefill_chunk if chunked else float("inf")
        prefixes = []
        while self._jobs:
            job = self._jobs[0]
            budget = self._advance(job, budget, version)
            if not job.done:
                break
            self._jobs.pop(0)
            prefixes += self._finish(job, version)
            if budget <= 0 or (self.prefill_chunk is not None and not chunked):
                break  # (rows run now: the next jobs wait for the chunks of later steps)
        return prefixes

    def _advance(self, job: _PrefillJob, budget: float, version: int) -> float:
        """Prefill `job` for up to `budget` tokens (at least one position); the rest left."""
        first = True
        while not job.done and (budget > 0 or first):
            first = False
            if job.current is None and job.num_seeds_done < len(job.seeds):
                key, tokens = job.seeds[job.num_seeds_done]
                job.current = _Group(_merge([make_prompt_cache(self.model)]),
                                     mx.array([tokens], dtype=mx.int32), len(tokens), padded=False,
                                     seed=(key, tokens))
            elif job.current is None:
                job.current = self._start_group([job.admissions[i] for i in
                                                 job.groups[len(job.caches)]])
            g = job.current
            if g.pos < g.longest:
                rows = g.x.shape[0]
                n = min(g.longest - g.pos, self.prefill_step_size)
                if budget != float("inf"):  # (inf // rows is nan)
                    n = min(n, max(1, int(budget) // rows))
                self.model(g.x[:, g.pos : g.pos + n], cache=g.cache)
                g.pos += n
                budget -= n * rows
                if g.pos < g.longest:
                    mx.eval([c.state for c in g.cache])  # bound the graph of long prompts
            if g.pos >= g.longest and g.seed is not None:
                job.num_seeds_done += 1
                job.current = None
                if job.version == version:  # (its sharers prefill whole otherwise)
                    self._store(g.seed[0], g.seed[1], [c.extract(0) for c in g.cache])
            elif g.pos >= g.longest:
                if g.padded:
                    for c in g.cache:
                        c.finalize()
                job.caches.append(g.cache)
                job.current = None
        return budget

    def _start_group(self, admissions: Sequence[Admission]) -> _Group:
        """Batch caches to hold `prompt[:-1]` of each admission, one row each, and the
        right-padded tokens to run through them (for prefix-cache hits: `_start_hits`)."""
        if any(a.start is not None or a.shares for a in admissions):  # (all of them are hits)
            return self._start_hits(admissions)
        cache = _merge([make_prompt_cache(self.model) for _ in admissions])
        heads = [list(a.prompt_ids[:-1]) for a in admissions]
        lengths = [len(h) for h in heads]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        x = None
        if longest > 0:
            x = mx.array([h + [0] * (longest - len(h)) for h in heads], dtype=mx.int32)
            if max(padding) > 0:
                for c in cache:
                    c.prepare(lengths=lengths, right_padding=padding)
        return _Group(cache, x, longest, padded=longest > 0 and max(padding) > 0)

    def _start_hits(self, admissions: Sequence[Admission]) -> _Group:
        """Batch caches holding each admission's cached KV (left-padded to the longest) and the
        right-padded remainders of `prompt[:-1]` to run through them."""
        starts = []
        for a in admissions:
            if a.shares and a.start is None:  # its shared prefix is done: in the cache now
                a.start, a.start_len = self.prefix_cache.fetch(
                    a.cache_key, a.prompt_ids, limit=len(a.prompt_ids) - 1, new_lookup=False)
            if a.start is None:  # (evicted meanwhile, or a seed that spanned a commit)
                a.start, a.start_len = make_prompt_cache(self.model), 0
            starts.append(a.start)
            a.start = None  # (merged: a copy; the fetched KV is freed)
        cache = _merge(starts)
        rests = [list(a.prompt_ids[a.start_len:-1]) for a in admissions]
        longest = max(len(r) for r in rests)
        padding = [longest - len(r) for r in rests]
        x = None
        if longest > 0:
            x = mx.array([r + [0] * (longest - len(r)) for r in rests], dtype=mx.int32)
            if max(padding) > 0:
                for c in cache:
                    c.prepare(lengths=[len(r) for r in rests], right_padding=padding)
        return _Group(cache, x, longest, padded=longest > 0 and max(padding) > 0)

    def _finish(self, job: _PrefillJob, version: int) -> list[tuple[Admission, GroupPrefix]]:
        """Join a prefilled job's samples to the batch; the prompt states to keep."""
        admissions, order = job.admissions, job.order
        parts = list(job.caches)
        reused = [i for i in order if admissions[i].prefix is not None]
        if reused:
            parts.append(_merge([admissions[i].prefix.cache for i in reused]))
        cache = parts[0]
        for part in parts[1:]:
            for c, p in zip(cache, part):
                c.extend(p)

        prefixes, stores = [], []
        if job.version == version:  # (KV of one version only)
            for row, i in enumerate(order):
                a = admissions[i]
                if len(a.prompt_ids) <= 1:
                    continue
                if a.save_prefix:
                    prefixes.append((a, GroupPrefix([c.extract(row) for c in cache])))
                if a.cache_key is not None and a.prefix is None and self.prefix_cache is not None:
                    stores.append((a.cache_key, a.prompt_ids[:-1], [c.extract(row) for c in cache]))
            self._store_rows(stores)

        # One row per sample (each request's cache row replicated), less those removed while
        # the job prefilled.
        samples = [(row, admissions[i], s) for row, i in enumerate(order)
                   for s in range(len(admissions[i].seq_ids))
                   if admissions[i].seq_ids[s] not in job.dropped]
        if not samples:
            return prefixes
        rows = [row for row, _, _ in samples]
        if rows != list(range(len(order))):
            for c in cache:
                c.filter(rows)
        seq_ids = [a.seq_ids[s] for _, a, s in samples]
        seeds = [a.seeds[s] for _, a, s in samples]
        row_keys = [a.cache_key for _, a, _ in samples]
        kv_version = job.version if job.version == version else -1
        params = [a.params for _, a, _ in samples]
        heads = [a.prompt_ids[:-1] for _, a, _ in samples]
        width = min(self.max_window, max(
            (p.repetition_context_size for p in params if p.repetition_penalty != 1.0), default=0))
        ctx = sampling.context_rows(heads, params, width, self.vocab_size)
        pending = (mx.array([a.prompt_ids[-1] for _, a, _ in samples], dtype=mx.int32),
                   mx.zeros((len(samples),), dtype=mx.float32))
        self._go_solo(False)
        self._join(seq_ids, params, cache, sampling.keys_for(seeds),
                   mx.array(ctx) if ctx is not None else None, pending)
        self.row_keys += row_keys
        self.kv_versions += [kv_version] * len(seq_ids)
        return prefixes

    def _store(self, key: Hashable, tokens: Sequence[int], cache: list) -> None:
        """Keep one row's plain caches in the prefix cache as the KV of `tokens`."""
        self._store_rows([(key, tokens, cache)])

    def _store_rows(self, rows: list) -> None:
        """Keep each (key, tokens, caches) row in the prefix cache as the KV of its tokens (cut
        to the positions the caches hold; skipped when they hold more or cannot say). One
        evaluation for all the rows, queued (`async_eval`): one per row was a device sync per
        finished sequence, a third of a 256-request burst's engine time on the CPU, and one
        waiting for them stalled the pipelined step already queued (H200: 40-55 ms in the step
        where 40 rows finish)."""
        keep = []
        for key, tokens, cache in rows:
            held = next((c.offset for c in cache if isinstance(getattr(c, "offset", None), int)), None)
            if held is not None and 0 < held <= len(tokens):
                keep.append((key, tokens[:held], cache))
        if not keep:
            return
        mx.async_eval([c.state for _, _, cache in keep for c in cache])  # (their own arrays)
        for key, tokens, cache in keep:
            self.prefix_cache.insert(key, tokens, cache)

    def _join(self, seq_ids, params, cache, keys, ctx, pending) -> None:
        if not self.seq_ids:
            self.seq_ids, self.params = list(seq_ids), list(params)
            self.cache, self.keys, self.ctx, self.pending = cache, keys, ctx, pending
            self.fresh = [True] * len(seq_ids)
        else:
            for c, n in zip(self.cache, cache):
                c.extend(n)
            self.keys = mx.concatenate([self.keys, keys])
            self.ctx = self._concat_ctx(self.ctx, ctx, len(self.seq_ids), len(seq_ids))
            self.pending = tuple(mx.concatenate([a, b]) for a, b in zip(self.pending, pending))
            if self.pending_top is not None:
                pad = mx.zeros((len(seq_ids), MAX_TOP_LOGPROBS), dtype=mx.int32)
                self.pending_top = (mx.concatenate([self.pending_top[0], pad]),
                                    mx.concatenate([self.pending_top[1], pad.astype(mx.float32)]))
            self.seq_ids += seq_ids
            self.params += params
            self.fresh += [True] * len(seq_ids)
        self._rebuild_rows()

    def _rebuild_rows(self) -> None:
        self.rows = sampling.RowParams.build(self.params, self.vocab_size)
        self.num_top = max((p.top_logprobs for p in self.params), default=0)

    def _concat_ctx(self, a, b, rows_a, rows_b):
        if a is None and b is None:
            return None
        width = max(x.shape[1] for x in (a, b) if x is not None)

        def widen(x, rows):
            if x is None:
                return mx.full((rows, width), self.vocab_size, dtype=mx.int32)
            if x.shape[1] < width:
                pad = mx.full((rows, width - x.shape[1]), self.vocab_size, dtype=mx.int32)
                return mx.concatenate([pad, x], axis=1)
            return x

        return mx.concatenate([widen(a, rows_a), widen(b, rows_b)])

    # ------------------------------------------------------------------ rows

    def remove(self, seq_ids, store: Optional[dict] = None, version: int = -1) -> None:
        """Drop the rows of `seq_ids` (finished or aborted) from the batch, and those still
        prefilling from their job. `store` maps a finished row's seq id to its prompt +
        completion: its KV goes into the prefix cache when all of it was computed under
        `version` (the weights serving now)."""
        drop = set(seq_ids)
        if store and self.prefix_cache is not None:
            with mx.stream(self.stream):
                keep = [(self.row_keys[row], store[s], self._row_cache(row))
                        for row, s in enumerate(self.seq_ids)
                        if s in store and self.row_keys[row] is not None
                        and self.kv_versions[row] == version]
                self._store_rows(keep)
        for job in self._jobs:
            job.dropped |= drop & job.seq_ids
        self._jobs = [j for j in self._jobs if j.dropped != j.seq_ids]  # (none would join)
        keep = [i for i, s in enumerate(self.seq_ids) if s not in drop]
        if len(keep) == len(self.seq_ids):
            return
        if not keep:
            self._clear()
            return
        with mx.stream(self.stream):
            for c in self.cache:
                c.filter(keep)
            idx = mx.array(keep)
            self.keys = self.keys[idx]
            if self.ctx is not None:
                self.ctx = self.ctx[idx]
            self.pending = tuple(a[idx] for a in self.pending)
            if self.pending_top is not None:
                self.pending_top = tuple(a[idx] for a in self.pending_top)
        self.seq_ids = [self.seq_ids[i] for i in keep]
        self.params = [self.params[i] for i in keep]
        self.fresh = [self.fresh[i] for i in keep]
        self.row_keys = [self.row_keys[i] for i in keep]
        self.kv_versions = [self.kv_versions[i] for i in keep]
        self._rebuild_rows()

    def _row_cache(self, row: int) -> list:
        """Plain single-sequence caches of one row (copies, not views of the batch's)."""
        if not self.solo:
            return [c.extract(row) for c in self.cache]
        out = []
        for c in self.cache:
            if isinstance(c, KVCache) and c.keys is not None:
                copy = KVCache()
                copy.keys = mx.contiguous(c.keys[..., : c.offset, :])
                copy.values = mx.contiguous(c.values[..., : c.offset, :])
                copy.offset = c.offset
                out.append(copy)
            else:
                return []  # (solo is only taken by KVCache rows)
        return out

    def reset(self) -> None:
        """Drop every row, the step in flight and the jobs still prefilling."""
        if self.pending is not None:
            mx.eval(*self.pending)  # let the queued step finish before its buffers go
        self._clear()
        self._jobs = []

    # ------------------------------------------------------------------ scoring

    def score(self, items: Sequence[ScoreItem], max_tokens: int) -> list[list[float]]:
        """Teacher-forced log-probs of each item's completion tokens, in batches of at most
        `max_tokens` padded tokens (and logits under 256 MiB)."""
        return [out.logprobs for out in self.score_top(items, max_tokens)]

    def score_top(self, items: Sequence[ScoreItem], max_tokens: int) -> list[ScoreOutput]:
        """`score`, plus each item's `top_logprobs` most likely tokens per position."""
        budget = max(1, min(max_tokens, _SCORE_LOGITS_BYTES // (4 * self.vocab_size)))
        results: list[Optional[ScoreOutput]] = [None] * len(items)
        batch: list[int] = []
        longest = 0
        todo = []
        for i, it in enumerate(items):
            if not it.completion_ids:
                results[i] = ScoreOutput([])
                continue
            cache, num = None, 0
            if it.cache_key is not None and self.prefix_cache is not None:
                # (at most prompt[:-1]: the last prompt position's logits score the first token)
                cache, num = self.prefix_cache.fetch(it.cache_key, it.prompt_ids,
                                                     limit=len(it.prompt_ids) - 1)
            if cache is None:
                todo.append(i)
            else:
                self._score_batch(items, [i], results, start=(cache, num))
        for i in todo:
            n = len(items[i].prompt_ids) + len(items[i].completion_ids) - 1
            if batch and (len(batch) + 1) * max(longest, n) > budget:
                self._score_batch(items, batch, results)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, n)
        if batch:
            self._score_batch(items, batch, results)
        return results

    def _score_batch(self, items, batch, results, start=None) -> None:
        """Score `batch` in one pass; `start` (caches, positions): one item whose first
        positions' KV came from the prefix cache, so only the rest runs."""
        seqs = [list(items[i].prompt_ids) + list(items[i].completion_ids) for i in batch]
        longest = max(len(s) - 1 for s in seqs)
        cache, skip = start if start is not None else (None, 0)
        # Right padding: a real position never attends to the padding after it.
        x = mx.array([s[skip:-1] + [0] * (longest - len(s) + 1) for s in seqs], dtype=mx.int32)
        b_idx, pos, targets, params, modes, histories, spans = [], [], [], [], [], [], []
        for b, (i, s) in enumerate(zip(batch, seqs)):
            p = len(items[i].prompt_ids)
            start = len(b_idx)
            # Each position's history is only its penalty window (none without a penalty):
            # the whole prefix at each position would be O(L^2) for an L-token sequence.
            ip = items[i].params
            window = ip.repetition_context_size if ip.repetition_penalty != 1.0 else 0
            for t in range(p, len(s)):
                b_idx.append(b)
                pos.append(t - 1 - skip)
                targets.append(s[t])
                params.append(ip)
                modes.append(items[i].mode)
                histories.append(s[max(0, t - window):t] if window else ())
            spans.append((i, start, len(b_idx)))
        with mx.stream(self.stream):
            logits = self.model(x, cache=cache)
            rows_logits = logits[mx.array(b_idx), mx.array(pos)]
            rows = sampling.RowParams.build(params, self.vocab_size, modes=modes)
            width = min(rows.context_size, max(len(h) for h in histories))
            ctx = sampling.context_rows(histories, params, width, self.vocab_size)
            ctx = mx.array(ctx) if ctx is not None else None
            lp = sampling.score(rows_logits, mx.array(targets), rows, ctx).tolist()
            k = max(items[i].top_logprobs for i in batch)
            top_ids = top_lps = None
            if k:
                ids, vals = sampling.top_logprobs(rows_logits, rows, ctx, k,
                                                  all_raw=all(m == LOGPROBS_RAW for m in modes))
                top_ids, top_lps = ids.tolist(), vals.tolist()
        for i, start, end in spans:
            out = results[i] = ScoreOutput(lp[start:end])
            want = items[i].top_logprobs
            if want:
                for row in range(start, end):
                    out.top_ids += top_ids[row][:want]
                    out.top_logprobs += top_lps[row][:want]


# Config fields naming a model's context window (GPT-2's `n_positions` sizes a table of learned
# positions that a longer sequence would read past).
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                   "max_seq_len")


def _kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of KV one token adds to one row (the layers whose KV grows with the sequence)."""
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    total = 0.0
    for c in cache:
        keys = getattr(c, "keys", None)
        if isinstance(keys, mx.array):
            total += c.nbytes / keys.shape[2]
    return max(1, int(round(total)))


def context_length(model: nn.Module) -> Optional[int]:
    """The model's context window when its config states one."""
    args = getattr(model, "args", None)
    for name in _CONTEXT_FIELDS:
        n = getattr(args, name, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None
