"""Per-row sampling and log-probabilities, batched: every row of a batch has its own
temperature, truncation, repetition penalty, log-prob mode and random stream.

The processed distribution of a row, applied in this order to the model's logits `l`:

1. repetition penalty `r` on the tokens of the row's context window (the last
   `repetition_context_size` tokens of prompt + completion): `l*r` where `l < 0`, else `l/r`;
2. temperature: `z = l / T` (computed as `l * (1/T)`);
3. top-k: keep the tokens whose `z` is at least the k-th largest (ties at the border kept);
4. top-p: on `softmax(z)` over the survivors, drop the tokens whose more probable tokens
   already hold at least `top_p` of the mass;
5. min-p: keep the tokens with `p >= min_p * p_max`.

`processed` log-prob = log-softmax of the surviving `z` at the sampled token; `raw` log-prob =
log-softmax of `l` (no penalty, T=1, no truncation). Temperature 0 is greedy: the argmax of
the penalised logits, whose processed log-prob is 0 (the sampler's distribution is a point
mass); scoring a token that is not the argmax under T=0 gives -inf. Temperatures below
`GREEDY_BELOW` are greedy too: `l * (1/T)` would overflow float32 into inf and NaN.

Sampling draws one uniform `u` per row from the row's own key chain (threefry; the key is
split once per token), and picks the first token whose cumulative probability reaches `u`
(inverse CDF). The draw of a row depends only on its seed, its token index and its logits,
never on the other rows of the batch.

On a GPU the decode step is bound by building and launching kernels, not by the device, so
`sample` runs as one `mx.compile`d function per combination of the stages the batch uses
(its elementwise work fused into fewer kernels; a new batch size traces once). On the CPU,
where the step is bound by the model's matrix products, it runs op by op (`COMPILE`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from mlxsup.ipc.messages import LOGPROBS_RAW, SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, index: int) -> int:
    """A well-mixed 64-bit seed for sample `index` of a request seeded with `seed`
    (splitmix64), so the n samples of one seeded request draw from distinct streams."""
    z = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def keys_for(seeds: Sequence[int]) -> mx.array:
    """Threefry keys (rows of two uint32) for 64-bit seeds."""
    arr = np.array([[(s >> 32) & 0xFFFFFFFF, s & 0xFFFFFFFF] for s in seeds], dtype=np.uint32)
    return mx.array(arr.reshape(len(seeds), 2))


_split_keys = mx.vmap(lambda k: mx.random.split(k, 2))
_uniform_per_key = mx.vmap(lambda k: mx.random.uniform(key=k))


# Temperatures below this are greedy: 1/T times a logit would overflow float32 (inf - inf is
# NaN), which gave token 0 with NaN log-probs. Well above it, softmax(l/T) is already a point mass.
GREEDY_BELOW = 1e-30


@dataclass
class RowParams:
    """The sampling parameters of a batch's rows as arrays, plus flags that let a batch
    skip the stages none of its rows uses. Rebuilt whenever the batch's rows change."""

    inv_temp: mx.array  # (B,) 1/T; 1 for greedy rows
    greedy: mx.array  # (B,) bool
    top_k: mx.array  # (B,) int32, 0 = off
    top_p: mx.array  # (B,) float32, 1 = off
    log_min_p: mx.array  # (B,) float32, -inf = off
    penalty: mx.array  # (B,) float32, 1 = off
    want_raw: mx.array  # (B,) bool
    context_sizes: mx.array  # (B,) int32, each row's penalty window (0 without a penalty)
    context_size: int  # width of the repetition-penalty window (0: no row uses one)
    all_greedy: bool
    any_greedy: bool
    any_temp: bool
    max_top_k: int
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool
    raw_differs: bool  # a raw-mode row whose processed distribution is not the raw one

    # What a compiled sampler takes as inputs, and the flags it is traced with (chosen by
    # `_compile_flags`, see `sample`).
    ARRAYS = ("inv_temp", "greedy", "top_k", "top_p", "log_min_p", "penalty", "want_raw")
    FLAGS = ("all_greedy", "any_greedy", "any_temp", "max_top_k", "any_top_p",
             "any_min_p", "any_penalty", "raw_differs")

    def arrays(self) -> list:
        return [getattr(self, name) for name in self.ARRAYS]

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int, modes=None) -> "RowParams":
        """`modes` overrides each row's logprobs_mode (scoring carries its own)."""
        modes = modes if modes is not None else [p.logprobs_mode for p in params]
        greedy = [p.temperature < GREEDY_BELOW for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        penalised = [p.repetition_penalty != 1.0 for p in params]
        identity = [
            not g and p.temperature == 1.0 and k == 0 and p.top_p >= 1.0 and p.min_p == 0
            and not pen
            for p, g, k, pen in zip(params, greedy, top_k, penalised)
        ]
        return cls(
            inv_temp=mx.array([1.0 if g else 1.0 / p.temperature for p, g in zip(params, greedy)],
                              dtype=mx.float32),
            greedy=mx.array(greedy),
            top_k=mx.array(top_k, dtype=mx.int32),
            top_p=mx.array([p.top_p for p in params], dtype=mx.float32),
            log_min_p=mx.array(
                [math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params],
                dtype=mx.float32,
            ),
            penalty=mx.array([p.repetition_penalty for p in params], dtype=mx.float32),
            want_raw=mx.array([m == LOGPROBS_RAW for m in modes]),
            context_sizes=mx.array(
                [p.repetition_context_size if pen else 0 for p, pen in zip(params, penalised)],
                dtype=mx.int32,
            ),
            context_size=max(
                [p.repetition_context_size for p, pen in zip(params, penalised) if pen],
                default=0,
            ),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            any_temp=any(not g and p.temperature != 1.0 for p, g in zip(params, greedy)),
            # Rounded up to a power of two: fewer distinct samplers to compile, same threshold.
            max_top_k=min(1 << (max(top_k) - 1).bit_length(), vocab_size) if any(top_k) else 0,
            any_top_p=any(p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p > 0 for p in params),
            any_penalty=any(penalised),
            raw_differs=any(m == LOGPROBS_RAW and not i for m, i in zip(modes, identity)),
        )


def context_rows(histories: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 width: int, vocab_size: int) -> Optional[np.ndarray]:
    """Repetition-penalty windows, right-aligned, padded with `vocab_size` (no token): the
    last `repetition_context_size` tokens of each history for penalised rows."""
    if width == 0:
        return None
    out = np.full((len(histories), width), vocab_size, dtype=np.int32)
    for i, (h, p) in enumerate(zip(histories, params)):
        if p.repetition_penalty != 1.0 and len(h):
            tail = list(h)[-min(p.repetition_context_size, width):]
            out[i, width - len(tail):] = tail
    return out


def push_context(ctx: mx.array, tokens: mx.array, sizes: mx.array, vocab_size: int) -> mx.array:
    """Slide each row's window by one token; `sizes` (B,) is each row's own window (0 for
    rows without a penalty), so narrower windows keep padding on their left."""
    width = ctx.shape[1]
    ctx = mx.concatenate([ctx[:, 1:], tokens.astype(mx.int32)[:, None]], axis=1)
    keep = mx.arange(width)[None, :] >= (width - sizes)[:, None]
    return mx.where(keep, ctx, vocab_size)


def process_logits(logits: mx.array, rows: RowParams, ctx: Optional[mx.array]) -> mx.array:
    """The processed (unnormalised) scores `z` of every row; -inf where truncated. Greedy
    rows get their penalised logits (temperature 1, which truncation cannot change the
    argmax of)."""
    x = logits.astype(mx.float32)
    vocab = x.shape[-1]
    if rows.any_penalty and ctx is not None:
        hit = mx.zeros((x.shape[0], vocab + 1), dtype=mx.bool_)
        hit = mx.put_along_axis(hit, ctx, mx.array(True), axis=-1)[:, :vocab]
        r = rows.penalty[:, None]
        x = mx.where(hit, mx.where(x < 0, x * r, x / r), x)
    if rows.any_temp:
        x = x * rows.inv_temp[:, None]
    neg_inf = mx.array(-math.inf, dtype=mx.float32)
    if rows.max_top_k > 0:
        kmax = rows.max_top_k
        top = mx.sort(mx.topk(x, kmax, axis=-1), axis=-1)  # ascending, kmax largest
        pos = mx.maximum(kmax - rows.top_k, 0)[:, None]
        thr = mx.take_along_axis(top, pos, axis=-1)
        thr = mx.where((rows.top_k > 0)[:, None], thr, neg_inf)
        x = mx.where(x >= thr, x, neg_inf)
    if rows.any_top_p:
        s = mx.sort(x, axis=-1)
        probs = mx.exp(s - s[:, -1:])
        probs = probs / mx.sum(probs, axis=-1, keepdims=True)
        above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
        num_dropped = mx.sum(above >= rows.top_p[:, None], axis=-1, keepdims=True)
        thr = mx.take_along_axis(s, mx.minimum(num_dropped, vocab - 1), axis=-1)
        thr = mx.where((rows.top_p < 1.0)[:, None], thr, neg_inf)
        x = mx.where(x >= thr, x, neg_inf)
    if rows.any_min_p:
        thr = mx.max(x, axis=-1, keepdims=True) + rows.log_min_p[:, None]
        x = mx.where(x >= thr, x, neg_inf)
    return x


def _log_normaliser(z: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(max, exp(z - max), log-sum-exp) of each row, sharing the one exp pass."""
    m = mx.max(z, axis=-1, keepdims=True)
    p = mx.exp(z - m)
    return m, p, m + mx.log(mx.sum(p, axis=-1, keepdims=True))


def sample(logits: mx.array, rows: RowParams, keys: Optional[mx.array],
           ctx: Optional[mx.array]) -> tuple[mx.array, mx.array, Optional[mx.array]]:
    """Draw one token per row. Returns (tokens int32 (B,), log-prob of each token in its
    row's mode (B,), the rows' next keys)."""
    if not _compile_enabled() or (rows.any_penalty and ctx is not None):
        # A penalty window's width is the request's: compiling would trace every width.
        return _sample(rows, logits, keys, ctx)
    has_keys = keys is not None
    key = (_compile_flags(rows), has_keys, str(mx.default_stream(mx.default_device())))
    fn = _compiled_sampler(key)
    args = [logits, *rows.arrays()]
    if has_keys:
        args.append(keys)
    _count_trace(key + tuple(a.shape for a in args))
    tokens, lp, *next_keys = fn(*args)
    return tokens, lp, (next_keys[0] if has_keys else keys)


def _sample(rows: RowParams, logits: mx.array, keys: Optional[mx.array],
            ctx: Optional[mx.array]) -> tuple[mx.array, mx.array, Optional[mx.array]]:
    x = logits.astype(mx.float32)
    z = process_logits(x, rows, ctx)
    if rows.all_greedy:
        tokens = mx.argmax(z, axis=-1).astype(mx.int32)
        lp = mx.zeros(tokens.shape, dtype=mx.float32)
        next_keys = keys
    else:
        split = _split_keys(keys)
        next_keys = split[:, 0]
        u = 1.0 - _uniform_per_key(split[:, 1])  # in (0, 1]
        _, p, lse = _log_normaliser(z)
        cdf = mx.cumsum(p, axis=-1)
        drawn = mx.sum(cdf < u[:, None] * cdf[:, -1:], axis=-1)
        drawn = mx.minimum(drawn, z.shape[-1] - 1).astype(mx.int32)
        if rows.any_greedy:
            tokens = mx.where(rows.greedy, mx.argmax(z, axis=-1).astype(mx.int32), drawn)
        else:
            tokens = drawn
        lp = (mx.take_along_axis(z, tokens[:, None], axis=-1) - lse)[:, 0]
        if rows.any_greedy:
            lp = mx.where(rows.greedy, 0.0, lp)
    if rows.raw_differs:
        raw = mx.take_along_axis(x, tokens[:, None], axis=-1) - mx.logsumexp(
            x, axis=-1, keepdims=True
        )
        lp = mx.where(rows.want_raw, raw[:, 0], lp)
    return tokens, lp, next_keys


# None: compile on a GPU only; MLXSUP_COMPILE_SAMPLER=1/0 forces it on or off.
COMPILE: Optional[bool] = None
# Compiled samplers kept, most recently used last: one per mix of stages (and stream) a batch
# used; requests choose the mix, so the oldest go (MLX frees a dropped function's traces).
_MAX_COMPILED = 32
_compiled: dict = {}


def _compile_enabled() -> bool:
    if COMPILE is not None:
        return COMPILE
    return _compile_default(mx.default_device() == mx.gpu)


@lru_cache(maxsize=None)
def _compile_default(on_gpu: bool) -> bool:
    env = os.environ.get("MLXSUP_COMPILE_SAMPLER")
    if env is not None:
        return env not in ("0", "", "false", "no")
    return on_gpu


# The mixes whose compiled samplers an engine builds when it starts (on a GPU), at one row and
# at two: greedy and plain sampling. On CUDA a sampler JIT-compiles its kernels on first use, for
# seconds (MLX keeps them on disk afterwards, in MLX_PTX_CACHE_DIR; docs/engine.md, "Built at
# start", has the figures), and a batch of one row uses other kernels than a batch of two or
# more. The samplers of top-k and top-p mixes are built when a batch first uses them.
WARM_MIXES = (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0))
WARM_BATCHES = (1, 2)


def warm_up(logits: mx.array) -> int:
    """Build the compiled samplers of WARM_MIXES on `logits` (1, V) of the model's dtype, so
    that the first requests do not wait for their compilation. Returns the traces it ran (0
    where the sampler is not compiled)."""
    if not _compile_enabled():
        return 0
    before = traces
    for params in WARM_MIXES:
        for batch in WARM_BATCHES:
            rows = RowParams.build([params] * batch, logits.shape[-1])
            x = mx.broadcast_to(logits, (batch, logits.shape[-1]))
            mx.eval(*sample(x, rows, keys_for(list(range(batch))), None))
    return traces - before


def _compile_flags(rows: RowParams) -> tuple:
    """The flags a compiled sampler is specialised on: only the stages that cost a sort or a
    top-k (and whether every row is greedy). The elementwise stages (temperature, min-p, greedy
    rows among sampled ones, raw log-probs) always run in it and are identities for the rows that
    do not use them, so a batch's mix of such rows never compiles a new sampler: on CUDA each new
    compiled sampler JIT-compiles its kernels, seconds during which the whole batch waits."""
    if rows.all_greedy:  # argmax of the untruncated scores: truncation keeps the maximum
        flags = dict(all_greedy=True, any_greedy=True, any_temp=False, max_top_k=0,
                     any_top_p=False, any_min_p=False)
    else:
        flags = dict(all_greedy=False, any_greedy=True, any_temp=True, max_top_k=rows.max_top_k,
                     any_top_p=rows.any_top_p, any_min_p=True)
    flags.update(any_penalty=False, raw_differs=True)  # (a penalty with a window: op by op)
    return tuple(flags[name] for name in RowParams.FLAGS)


# Calls of a compiled sampler with inputs of a shape it has not seen trace it again (on CUDA
# that JIT-compiles its fused kernels): counted, so a slow step can say whether it traced.
traces = 0
_seen_shapes: set = set()


def _count_trace(key: tuple) -> None:
    global traces
    if key not in _seen_shapes:
        if len(_seen_shapes) >= 4096:
            _seen_shapes.clear()
        _seen_shapes.add(key)
        traces += 1


def _compiled_sampler(key: tuple):
    """The compiled sampler of `key` = (flags, has_keys, stream): a compiled graph keeps the
    stream it was traced on, so there is one per stream."""
    flags, has_keys, _ = key
    fn = _compiled.pop(key, None)
    if fn is None:
        fn = mx.compile(partial(_traced_sample, flags, has_keys))
        while len(_compiled) >= _MAX_COMPILED:
            _compiled.pop(next(iter(_compiled)))
    _compiled[key] = fn
    return fn


def _traced_sample(flags, has_keys, logits, *args):
    arrays, keys = args[:len(RowParams.ARRAYS)], (args[-1] if has_keys else None)
    rows = RowParams(**dict(zip(RowParams.ARRAYS, arrays)), context_sizes=None, context_size=0,
                     **dict(zip(RowParams.FLAGS, flags)))
    tokens, lp, next_keys = _sample(rows, logits, keys, None)
    return (tokens, lp, next_keys) if has_keys else (tokens, lp)


def score(logits: mx.array, targets: mx.array, rows: RowParams,
          ctx: Optional[mx.array]) -> mx.array:
    """Log-prob of `targets` (N,) under each row's distribution (teacher forcing)."""
    x = logits.astype(mx.float32)
    t = targets.astype(mx.int32)[:, None]
    raw = (mx.take_along_axis(x, t, axis=-1) - mx.logsumexp(x, axis=-1, keepdims=True))[:, 0]
    z = process_logits(x, rows, ctx)
    proc = (mx.take_along_axis(z, t, axis=-1) - mx.logsumexp(z, axis=-1, keepdims=True))[:, 0]
    if rows.any_greedy:
        is_argmax = mx.argmax(z, axis=-1).astype(mx.int32) == t[:, 0]
        proc = mx.where(rows.greedy, mx.where(is_argmax, 0.0, -math.inf), proc)
    return mx.where(rows.want_raw, raw, proc)


def top_logprobs(logits: mx.array, rows: RowParams, ctx: Optional[mx.array],
                 k: int, all_raw: bool = False) -> tuple[mx.array, mx.array]:
    """The `k` most likely tokens of each row and their log-probs under the row's mode
    (processed: the distribution the sampler draws from, -inf where truncated, a greedy row's
    argmax at 0; raw: log-softmax of the logits). Returns (ids int32 (B, k), log-probs (B, k)),
    most likely first. Run op by op beside the sampler, only for batches with a row that asks
    for top log-probs, so the compiled sampler's traces stay those of the common path.
    `all_raw` (every row in raw mode) skips the processed distribution; it is the caller's
    Python flag, not read from `rows` (reading an array back would wait for the queued step)."""
    x = logits.astype(mx.float32)
    lp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    if not all_raw:
        z = process_logits(x, rows, ctx)
        proc = z - mx.logsumexp(z, axis=-1, keepdims=True)
        if rows.any_greedy:
            point = mx.arange(x.shape[-1])[None, :] == mx.argmax(z, axis=-1)[:, None]
            point = mx.where(point, 0.0, -math.inf).astype(mx.float32)
            proc = mx.where(rows.greedy[:, None], point, proc)
        lp = mx.where(rows.want_raw[:, None], lp, proc)
    k = min(k, x.shape[-1])
    ids = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
    vals = mx.take_along_axis(lp, ids, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return (mx.take_along_axis(ids, order, axis=-1).astype(mx.int32),
            mx.take_along_axis(vals, order, axis=-1))
