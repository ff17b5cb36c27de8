"""The batched sampler on synthetic logits: the processed distribution follows the documented
order (penalty, temperature, top-k, top-p, min-p), draws follow that distribution, and a
row's draws depend only on its own key."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from _engine_helpers import reference_logprob
from mlxsup.engine import sampling
from mlxsup.ipc.messages import SamplingParams

pytestmark = pytest.mark.timeout(60)

V = 64


def logits_rows(n, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    # Well-separated values: no truncation border falls within rounding.
    base = np.sort(rng.permutation(V).astype(np.float32) * (scale / V))
    return np.stack([rng.permutation(base) for _ in range(n)])


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(temperature=0.8, top_p=0.6),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.5),
    SamplingParams(temperature=0.9, min_p=0.3),
    SamplingParams(temperature=1.0, repetition_penalty=1.5, repetition_context_size=3),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=3.0, repetition_context_size=5),
]


def test_processed_logprobs_match_numpy_reference():
    x = logits_rows(len(CASES))
    x[6, 5] = -1.0  # a negative logit in the penalty window: multiplied, not divided
    history = [[5, 9, 9, 11, 3]] * len(CASES)
    rows = sampling.RowParams.build(CASES, V, modes=["processed"] * len(CASES))
    ctx = mx.array(sampling.context_rows(history, CASES, rows.context_size, V))
    for token in range(V):
        got = np.array(sampling.score(mx.array(x), mx.array([token] * len(CASES)), rows, ctx))
        for i, p in enumerate(CASES):
            want, _ = reference_logprob(x[i].astype(np.float64), token, p, history[i], "processed")
            if math.isinf(want):
                assert got[i] == -math.inf, (i, token)
            else:
                assert abs(got[i] - want) < 1e-5, (i, token, got[i], want)


def test_raw_mode_ignores_processing():
    x = logits_rows(len(CASES), seed=1)
    rows = sampling.RowParams.build(CASES, V, modes=["raw"] * len(CASES))
    got = np.array(sampling.score(mx.array(x), mx.array([3] * len(CASES)), rows, None))
    want = x[:, 3] - np.log(np.exp(x.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("params", [CASES[1], CASES[2], CASES[3], CASES[5]])
def test_draws_follow_the_processed_distribution(params):
    n = 20000
    x = np.repeat(logits_rows(1, seed=2), n, axis=0)
    rows = sampling.RowParams.build([params] * n, V)
    keys = sampling.keys_for([sampling.mix_seed(7, i) for i in range(n)])
    tokens, lps, _ = sampling.sample(mx.array(x), rows, keys, None)
    tokens, lps = np.array(tokens), np.array(lps)
    probs = np.exp([reference_logprob(x[0].astype(np.float64), t, params, [], "processed")[0]
                    for t in range(V)])
    freq = np.bincount(tokens, minlength=V) / n
    assert np.abs(freq - probs).max() < 0.015
    assert np.all(probs[tokens] > 0)  # never a truncated token
    np.testing.assert_allclose(lps, np.log(probs[tokens]), atol=1e-5)


def test_row_draws_depend_only_on_their_key():
    x = logits_rows(5, seed=3)
    params = [SamplingParams(temperature=1.0)] * 5
    seeds = [sampling.mix_seed(s, 0) for s in (1, 2, 3, 4, 5)]
    full, _, next_keys = sampling.sample(mx.array(x), sampling.RowParams.build(params, V),
                                         sampling.keys_for(seeds), None)
    for i in range(5):
        alone, _, k = sampling.sample(mx.array(x[i : i + 1]), sampling.RowParams.build(params[:1], V),
                                      sampling.keys_for(seeds[i : i + 1]), None)
        assert alone.item() == full[i].item()
        assert np.array_equal(np.array(k[0]), np.array(next_keys[i]))


def test_greedy_rows_take_the_argmax_with_logprob_zero():
    x = logits_rows(3, seed=4)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0)]
    tokens, lps, _ = sampling.sample(mx.array(x), sampling.RowParams.build(params, V),
                                     sampling.keys_for([1, 2, 3]), None)
    assert tokens[0].item() == int(np.argmax(x[0])) and tokens[2].item() == int(np.argmax(x[2]))
    assert lps[0].item() == 0.0 and lps[2].item() == 0.0 and lps[1].item() < 0


def test_push_context_keeps_each_rows_window():
    ctx = mx.array(sampling.context_rows([[1, 2, 3, 4], [5, 6]],
                                         [SamplingParams(repetition_penalty=1.2, repetition_context_size=3),
                                          SamplingParams(repetition_penalty=1.2, repetition_context_size=2)],
                                         3, V))
    assert ctx.tolist() == [[2, 3, 4], [V, 5, 6]]
    ctx = sampling.push_context(ctx, mx.array([7, 8]), mx.array([3, 2]), V)
    assert ctx.tolist() == [[3, 4, 7], [V, 6, 8]]


def test_mix_seed_gives_distinct_seeds():
    seeds = {sampling.mix_seed(42, i) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**64 for s in seeds)


@pytest.fixture
def compiled(request):
    """Run the sampler compiled (as on a GPU) or op by op, whatever the device."""
    sampling.COMPILE = request.param
    yield request.param
    sampling.COMPILE = None


@pytest.mark.parametrize("compiled", [True], indirect=True)
@pytest.mark.parametrize("modes", [["processed"] * len(CASES), ["raw"] * len(CASES),
                                   ["raw", "processed"] * 4 + ["raw"]])
def test_compiled_sampler_draws_what_the_op_by_op_one_draws(compiled, modes):
    """The GPU's compiled sampler is the same function: same tokens, same log-probs, same next
    keys for every mix of stages, over several steps of each row's key chain and batch sizes."""
    x = mx.array(logits_rows(len(CASES), seed=6))
    history = [[5, 9, 9, 11, 3]] * len(CASES)
    for rows_at in (slice(0, len(CASES)), slice(0, 1), slice(7, 9), slice(1, 6)):
        params, m = CASES[rows_at], modes[rows_at]
        rows = sampling.RowParams.build(params, V, modes=m)
        ctx_np = sampling.context_rows(history[rows_at], params, rows.context_size, V)
        ctx = mx.array(ctx_np) if ctx_np is not None else None
        seeds = [sampling.mix_seed(11, i) for i in range(len(params))]
        got, want = [], []
        for out, on in ((got, True), (want, False)):
            sampling.COMPILE = on
            keys = sampling.keys_for(seeds)
            for _ in range(4):
                tokens, lps, keys = sampling.sample(x[rows_at], rows, keys, ctx)
                out.append((np.array(tokens), np.array(lps), np.array(keys)))
        for (t1, l1, k1), (t2, l2, k2) in zip(got, want):
            assert np.array_equal(t1, t2)
            np.testing.assert_allclose(l1, l2, atol=1e-6)
            assert np.array_equal(k1, k2)


@pytest.mark.parametrize("compiled", [True], indirect=True)
def test_compiled_samplers_kept_are_bounded(compiled, monkeypatch):
    """Requests choose the mix of stages (and top-k) a batch compiles for; a stream of distinct
    mixes keeps at most `_MAX_COMPILED` compiled samplers (the oldest go, and draw the same when
    compiled again), and top-k rounds to powers of two."""
    monkeypatch.setattr(sampling, "_MAX_COMPILED", 4)
    x = mx.array(logits_rows(1, seed=8))
    keys = sampling.keys_for([1])
    for k in range(1, V):
        rows = sampling.RowParams.build([SamplingParams(temperature=0.9, top_k=k)], V)
        assert rows.max_top_k in (1, 2, 4, 8, 16, 32, 64)
        tokens, _, _ = sampling.sample(x, rows, keys, None)
        assert np.array(x)[0, tokens.item()] >= np.sort(np.array(x)[0])[-k]  # within the top k
    for temp, top_p, min_p in [(t, p, m) for t in (0.0, 0.5, 1.0) for p in (0.5, 1.0)
                               for m in (0.0, 0.2)] * 3:
        rows = sampling.RowParams.build([SamplingParams(temperature=temp, top_p=top_p, min_p=min_p)], V)
        sampling.sample(x, rows, keys, None)
        assert 0 < len(sampling._compiled) <= 4
    rows = sampling.RowParams.build([SamplingParams(temperature=0.7)] * 2, V)
    x2, keys2 = mx.array(logits_rows(2, seed=9)), sampling.keys_for([5, 6])
    first = np.array(sampling.sample(x2, rows, keys2, None)[0])
    for k in (3, 5, 9, 17, 33):  # evicts the T=0.7 sampler
        sampling.sample(x, sampling.RowParams.build([SamplingParams(top_k=k)], V), keys, None)
    assert np.array_equal(np.array(sampling.sample(x2, rows, keys2, None)[0]), first)


@pytest.mark.parametrize("compiled", [True], indirect=True)
def test_compiled_sampler_counts_a_trace_per_new_batch_shape(compiled, monkeypatch):
    """A compiled sampler traces again for inputs of a new shape (on CUDA: its fused kernels
    are JIT-compiled again); the count lets a slow engine step say whether it traced."""
    monkeypatch.setattr(sampling, "_seen_shapes", set())  # shapes earlier tests traced
    params = [SamplingParams(temperature=0.7)] * 3
    x = mx.array(logits_rows(3, seed=2))
    seen = sampling.traces
    for batch in (3, 2, 3, 2, 1):
        rows = sampling.RowParams.build(params[:batch], V)
        keys = sampling.keys_for([sampling.mix_seed(5, i) for i in range(batch)])
        mx.eval(sampling.sample(x[:batch], rows, keys, None))
    assert sampling.traces - seen == 3  # batches 3, 2 and 1, once each
    before = sampling.traces
    rows = sampling.RowParams.build(params[:2], V)
    mx.eval(sampling.sample(x[:2], rows, sampling.keys_for([1, 2]), None))
    assert sampling.traces == before  # a shape seen already: no trace
    rows = sampling.RowParams.build([SamplingParams(temperature=0.7)] * 4, V)
    mx.eval(sampling.sample(mx.array(logits_rows(4, seed=3)), rows, sampling.keys_for([1, 2, 3, 4]),
                            None))
    assert sampling.traces == before + 1  # a new batch size traces


@pytest.mark.parametrize("compiled", [True], indirect=True)
def test_rows_of_cheap_stages_share_one_compiled_sampler(compiled, monkeypatch):
    """Greedy rows, temperatures, min-p and raw log-probs mixed into a sampled batch run in the
    one compiled sampler of plain sampling (on CUDA a new one JIT-compiles for seconds while the
    batch waits); only top-k and top-p, which sort, have samplers of their own."""
    monkeypatch.setattr(sampling, "_compiled", {})
    x = mx.array(logits_rows(4, seed=12))
    keys = sampling.keys_for([1, 2, 3, 4])
    mixes = [
        [SamplingParams(temperature=1.0)] * 4,
        [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
         SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, min_p=0.1)],
        [SamplingParams(temperature=1.0, logprobs_mode="raw"), SamplingParams(temperature=0.0),
         SamplingParams(temperature=0.5, min_p=0.05), SamplingParams(temperature=1.0)],
    ]
    for params in mixes:
        mx.eval(sampling.sample(x, sampling.RowParams.build(params, V), keys, None))
    assert len(sampling._compiled) == 1
    greedy = sampling.RowParams.build([SamplingParams(temperature=0.0)] * 4, V)
    mx.eval(sampling.sample(x, greedy, keys, None))
    nucleus = sampling.RowParams.build([SamplingParams(temperature=1.0, top_p=0.8)] * 4, V)
    mx.eval(sampling.sample(x, nucleus, keys, None))
    assert len(sampling._compiled) == 3


@pytest.mark.parametrize("compiled", [True], indirect=True)
def test_warm_up_builds_the_common_samplers_before_any_request(compiled, monkeypatch):
    """An engine's start builds the samplers of greedy and plain sampling: batches of these
    mixes (any size, greedy rows, temperatures and min-p among sampled ones) build no new one."""
    monkeypatch.setattr(sampling, "_compiled", {})
    monkeypatch.setattr(sampling, "_seen_shapes", set())
    traces = sampling.warm_up(mx.array(logits_rows(1, seed=13)))
    assert traces == len(sampling.WARM_MIXES) * len(sampling.WARM_BATCHES)
    built = set(sampling._compiled)
    x = mx.array(logits_rows(6, seed=14))
    for params in ([SamplingParams(temperature=0.0)] * 6,
                   [SamplingParams(temperature=1.0)] * 3 + [SamplingParams(temperature=0.0)] * 3,
                   [SamplingParams(temperature=0.8, min_p=0.1)] * 6):
        rows = sampling.RowParams.build(params, V)
        mx.eval(sampling.sample(x, rows, sampling.keys_for(list(range(6))), None))
    assert set(sampling._compiled) == built


def test_warm_up_does_nothing_where_the_sampler_runs_op_by_op(monkeypatch):
    monkeypatch.setattr(sampling, "COMPILE", False)
    monkeypatch.setattr(sampling, "_compiled", {})
    assert sampling.warm_up(mx.array(logits_rows(1, seed=13))) == 0
    assert sampling._compiled == {}
