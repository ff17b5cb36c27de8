"""The only module that runs the model: the running batch's KV caches, prefill, the decode
step and teacher-forced scoring.

The batch is a set of rows (one per running sequence) held in mlx-lm's batch caches
(`BatchKVCache` and friends: rows are left-padded and can be filtered and extended). Each
`step` queues the next decode step (`mx.async_eval`) before it reads back the tokens of the
step queued last time, so Python's bookkeeping overlaps the model's compute, as mlx-lm's
generators do. A row that finished at step t is therefore computed once more at t+1 and
dropped.

Prefill runs `prompt[:-1]` of every new request in one right-padded pass (mlx-lm's
prepare/finalize protocol rolls the padding to the left), then the last prompt token alone,
so the vocabulary projection runs for one position per request. A request's `n` samples
share that work: its cache row and logits are replicated `n` times before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from mlxsup.ipc.messages import SamplingParams

from . import sampling

# Logits of one scoring pass are tokens x vocab float32; keep them under this many bytes.
_SCORE_LOGITS_BYTES = 256 * 2**20


def _merge(caches: Sequence[list]) -> list:
    """Per-layer batch caches from per-request caches (mlx-lm's `merge` class methods)."""
    return [type(layer[0]).merge(list(layer)) for layer in zip(*caches)]


@dataclass
class GroupPrefix:
    """A request's prompt state kept for samples admitted later (a group larger than the
    free rows): one cache row holding the whole prompt and the logits after it."""

    cache: list
    logits: mx.array  # (1, vocab)


@dataclass
class Admission:
    """New rows for one request: its samples `seq_ids` with their stream `seeds`."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    seq_ids: list[int]
    seeds: list[int]
    prefix: Optional[GroupPrefix] = None  # start from this instead of prefilling
    save_prefix: bool = False  # return the prompt state for the samples still waiting


@dataclass
class StepOutput:
    """Tokens of one step: row i of `seq_ids` produced `tokens[i]` with `logprobs[i]`."""

    seq_ids: list[int]
    tokens: list[int]
    logprobs: list[float]
    version: int  # policy version of the weights the step ran under


@dataclass
class ScoreItem:
    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    params: SamplingParams
    mode: str


class ModelRunner:
    """Owns the model's execution: the batch's caches, keys and pending step."""

    def __init__(self, model: nn.Module, prefill_step_size: int = 2048):
        self.model = model
        self.prefill_step_size = prefill_step_size
        self.stream = mx.new_stream(mx.default_device())
        with mx.stream(self.stream):
            probe = model(mx.array([[0]]))
            mx.eval(probe)
        self.vocab_size = int(probe.shape[-1])
        try:
            _merge([make_prompt_cache(model), make_prompt_cache(model)])
        except Exception as e:  # a cache type mlx-lm cannot batch
            raise ValueError(f"this model's KV cache does not support batching: {e}") from e
        self._clear()

    def _clear(self) -> None:
        self.seq_ids: list[int] = []
        self.params: list[SamplingParams] = []
        self.cache: Optional[list] = None
        self.keys: Optional[mx.array] = None
        self.ctx: Optional[mx.array] = None
        self.rows: Optional[sampling.RowParams] = None
        self.pending: Optional[tuple[mx.array, mx.array]] = None
        self.pending_version = 0

    @property
    def num_rows(self) -> int:
        return len(self.seq_ids)

    # ------------------------------------------------------------------ stepping

    def step(self, admissions: Sequence[Admission], version: int
             ) -> tuple[Optional[StepOutput], dict[int, GroupPrefix]]:
        """Queue the next decode step of the current rows, add `admissions` as new rows
        (prefill and first token), and return the tokens of the step queued last time, plus
        the saved prefixes (by index into `admissions`)."""
        with mx.stream(self.stream):
            prev = None
            if self.pending is not None:
                prev = (list(self.seq_ids), self.pending, self.pending_version)
                self.pending = self._decode()
                self.pending_version = version
                mx.async_eval(*self.pending, self.keys)
            prefixes: dict[int, GroupPrefix] = {}
            if admissions:
                prefixes = self._admit(admissions, version)
            out = None
            if prev is not None:
                seq_ids, (tokens, logprobs), prev_version = prev
                mx.eval(tokens, logprobs)
                out = StepOutput(seq_ids, tokens.tolist(), logprobs.tolist(), prev_version)
        return out, prefixes

    def _decode(self) -> tuple[mx.array, mx.array]:
        inputs = self.pending[0]
        logits = self.model(inputs[:, None], cache=self.cache)[:, -1, :]
        if self.ctx is not None:
            self.ctx = sampling.push_context(self.ctx, inputs, self.rows.context_sizes,
                                             self.vocab_size)
        tokens, logprobs, self.keys = sampling.sample(logits, self.rows, self.keys, self.ctx)
        return tokens, logprobs

    def _prefill(self, admissions: Sequence[Admission]) -> tuple[list, mx.array]:
        """Caches holding each prompt and the logits after its last token, one row each."""
        model = self.model
        cache = _merge([make_prompt_cache(model) for _ in admissions])
        heads = [list(a.prompt_ids[:-1]) for a in admissions]
        lengths = [len(h) for h in heads]
        longest = max(lengths)
        if longest > 0:
            padding = [longest - n for n in lengths]
            x = mx.array([h + [0] * (longest - len(h)) for h in heads], dtype=mx.int32)
            if max(padding) > 0:
                for c in cache:
                    c.prepare(lengths=lengths, right_padding=padding)
            for start in range(0, longest, self.prefill_step_size):
                model(x[:, start : start + self.prefill_step_size], cache=cache)
                if start + self.prefill_step_size < longest:
                    mx.eval([c.state for c in cache])  # bound the graph of long prompts
            if max(padding) > 0:
                for c in cache:
                    c.finalize()
        last = mx.array([[a.prompt_ids[-1]] for a in admissions], dtype=mx.int32)
        logits = model(last, cache=cache)[:, -1, :]
        return cache, logits

    def _admit(self, admissions: Sequence[Admission], version: int) -> dict[int, GroupPrefix]:
        fresh = [i for i, a in enumerate(admissions) if a.prefix is None]
        reused = [i for i, a in enumerate(admissions) if a.prefix is not None]
        order = fresh + reused
        cache, logits = None, []
        if fresh:
            cache, fresh_logits = self._prefill([admissions[i] for i in fresh])
            logits.append(fresh_logits)
        if reused:
            prefix_cache = _merge([admissions[i].prefix.cache for i in reused])
            logits += [admissions[i].prefix.logits for i in reused]
            if cache is None:
                cache = prefix_cache
            else:
                for c, p in zip(cache, prefix_cache):
                    c.extend(p)
        logits = mx.concatenate(logits, axis=0) if len(logits) > 1 else logits[0]

        prefixes = {}
        for row, i in enumerate(order):
            if admissions[i].save_prefix:
                prefixes[i] = GroupPrefix([c.extract(row) for c in cache], logits[row : row + 1])

        # One row per sample: replicate each request's cache row and logits.
        rows = [row for row, i in enumerate(order) for _ in admissions[i].seq_ids]
        seq_ids = [s for i in order for s in admissions[i].seq_ids]
        seeds = [s for i in order for s in admissions[i].seeds]
        params = [admissions[i].params for i in order for _ in admissions[i].seq_ids]
        prompts = [admissions[i].prompt_ids for i in order for _ in admissions[i].seq_ids]
        if rows != list(range(len(order))):
            for c in cache:
                c.filter(rows)
            logits = logits[mx.array(rows)]

        new_rows = sampling.RowParams.build(params, self.vocab_size)
        ctx = sampling.context_rows(prompts, params, new_rows.context_size, self.vocab_size)
        ctx = mx.array(ctx) if ctx is not None else None
        keys = sampling.keys_for(seeds)
        tokens, logprobs, keys = sampling.sample(logits, new_rows, keys, ctx)
        mx.async_eval(tokens, logprobs, keys)
        self._join(seq_ids, params, cache, keys, ctx, (tokens, logprobs), version)
        return prefixes

    def _join(self, seq_ids, params, cache, keys, ctx, pending, version) -> None:
        if not self.seq_ids:
            self.seq_ids, self.params = list(seq_ids), list(params)
            self.cache, self.keys, self.ctx, self.pending = cache, keys, ctx, pending
            self.pending_version = version
        else:
            for c, n in zip(self.cache, cache):
                c.extend(n)
            self.keys = mx.concatenate([self.keys, keys])
            self.ctx = self._concat_ctx(self.ctx, ctx, len(self.seq_ids), len(seq_ids))
            self.pending = tuple(mx.concatenate([a, b]) for a, b in zip(self.pending, pending))
            self.seq_ids += seq_ids
            self.params += params
        self.rows = sampling.RowParams.build(self.params, self.vocab_size)

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

    def remove(self, seq_ids) -> None:
        """Drop the rows of `seq_ids` (finished or aborted) from the batch."""
        drop = set(seq_ids)
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
        self.seq_ids = [self.seq_ids[i] for i in keep]
        self.params = [self.params[i] for i in keep]
        self.rows = sampling.RowParams.build(self.params, self.vocab_size)

    def reset(self) -> None:
        """Drop every row (and the step in flight)."""
        if self.pending is not None:
            mx.eval(*self.pending)  # let the queued step finish before its buffers go
        self._clear()

    # ------------------------------------------------------------------ scoring

    def score(self, items: Sequence[ScoreItem], max_tokens: int) -> list[list[float]]:
        """Teacher-forced log-probs of each item's completion tokens, in batches of at most
        `max_tokens` padded tokens (and logits under 256 MiB)."""
        budget = max(1, min(max_tokens, _SCORE_LOGITS_BYTES // (4 * self.vocab_size)))
        results: list[Optional[list[float]]] = [None] * len(items)
        batch: list[int] = []
        longest = 0
        todo = [i for i, it in enumerate(items) if it.completion_ids]
        for i, it in enumerate(items):
            if not it.completion_ids:
                results[i] = []
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

    def _score_batch(self, items, batch, results) -> None:
        seqs = [list(items[i].prompt_ids) + list(items[i].completion_ids) for i in batch]
        longest = max(len(s) - 1 for s in seqs)
        # Right padding: a real position never attends to the padding after it.
        x = mx.array([s[:-1] + [0] * (longest - len(s) + 1) for s in seqs], dtype=mx.int32)
        b_idx, pos, targets, params, modes, histories, spans = [], [], [], [], [], [], []
        for b, (i, s) in enumerate(zip(batch, seqs)):
            p = len(items[i].prompt_ids)
            start = len(b_idx)
            for t in range(p, len(s)):
                b_idx.append(b)
                pos.append(t - 1)
                targets.append(s[t])
                params.append(items[i].params)
                modes.append(items[i].mode)
                histories.append(s[:t])
            spans.append((i, start, len(b_idx)))
        with mx.stream(self.stream):
            logits = self.model(x)
            rows_logits = logits[mx.array(b_idx), mx.array(pos)]
            rows = sampling.RowParams.build(params, self.vocab_size, modes=modes)
            ctx = sampling.context_rows(histories, params, rows.context_size, self.vocab_size)
            ctx = mx.array(ctx) if ctx is not None else None
            lp = sampling.score(rows_logits, mx.array(targets), rows, ctx).tolist()
        for i, start, end in spans:
            results[i] = lp[start:end]


def context_length(model: nn.Module) -> Optional[int]:
    """The model's context window when its config states one."""
    args = getattr(model, "args", None)
    n = getattr(args, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None
