"""The prefix cache across requests (engine/prefix_cache.py and its use by the runner): a hit
gives what a cold run gives, entries never outlive the weights that computed them, cache_salt
isolates, and the batch plus the cache stay within one KV budget."""

from __future__ import annotations

import random

import numpy as np
import pytest

from _engine_helpers import check_fidelity, done_events, make_engine, run
from mlxsup.engine import RequestError
from mlxsup.engine.prefix_cache import PrefixCache
from mlxsup.ipc.messages import GenerateRequest, SamplingParams, ScoreRequest, ScoreResult
from test_adapters import make_adapter

pytestmark = pytest.mark.timeout(300)

_ids = iter(range(1, 10**9))


def req(prompt, n=1, salt="", **params):
    return GenerateRequest(next(_ids), list(prompt), SamplingParams(**params), n, cache_salt=salt)


def one(eng, r):
    [done] = done_events(run(eng, [r]), r.request_id)
    return done


def words(rng, n):
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.fixture(scope="module", params=[False, True], ids=["stepwise", "pipelined"])
def pair(request, tiny_model_dir):
    """(engine with the cache, the same engine's weights without it: the cold reference)."""
    kw = dict(pipeline=request.param)
    return make_engine(tiny_model_dir, **kw), make_engine(tiny_model_dir, prefix_cache=False, **kw)


PARAMS = [dict(temperature=0.0, logprobs_mode="raw"),
          dict(temperature=0.0, logprobs_mode="processed"),
          dict(temperature=0.9, top_p=0.9, seed=7, logprobs_mode="processed"),
          dict(temperature=1.0, seed=11, repetition_penalty=1.3, logprobs_mode="raw")]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy-raw", "greedy-proc", "seeded-proc",
                                                "seeded-penalty-raw"])
def test_a_hit_gives_the_cold_runs_tokens_and_logprobs_alone_and_in_a_mixed_batch(pair, params):
    eng, cold = pair
    rng = random.Random(3)
    system = words(rng, 70)
    salt = repr(params)  # (the cases share the engine)
    first = one(eng, req(system + words(rng, 5), salt=salt, max_tokens=8, **params))
    assert first.num_cached_tokens == 0
    follow = system + words(rng, 9)
    hit = one(eng, req(follow, salt=salt, max_tokens=12, **params))
    assert hit.num_cached_tokens >= len(system)
    want = one(cold, req(follow, max_tokens=12, **params))
    assert want.num_cached_tokens == 0
    assert hit.token_ids == want.token_ids
    np.testing.assert_allclose(hit.logprobs, want.logprobs, atol=1e-5)

    # Mixed: the hit prefills its remainder while fresh prompts prefill in their own pass
    # and rows already decode.
    busy = req(words(rng, 12), max_tokens=30, **params)
    eng.submit(busy)
    eng.step()
    batch = [req(system + words(rng, 4), salt=salt, max_tokens=10, **params),
             req(words(rng, 30), salt=salt, max_tokens=10, **params),
             req(system + words(rng, 20), n=3, salt=salt, max_tokens=10, **params)]
    events = run(eng, batch)
    while eng.has_work():
        eng.step()
    for r in batch:
        got = done_events(events, r.request_id)
        ref = cold_run(cold, r)
        assert [d.token_ids for d in got] == [d.token_ids for d in ref]
        for g, w in zip(got, ref):
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        if r.prompt_ids[:len(system)] == system:
            assert all(d.num_cached_tokens >= len(system) for d in got)
        check_fidelity(eng.model, r.prompt_ids, got[0].token_ids, got[0].logprobs, r.params,
                       r.params.logprobs_mode)


def cold_run(cold, r):
    ref = GenerateRequest(next(_ids), r.prompt_ids, r.params, r.n)
    return done_events(run(cold, [ref]), ref.request_id)


def test_the_next_turn_of_a_conversation_hits_the_finished_sequence(pair):
    eng, cold = pair
    rng = random.Random(5)
    prompt = words(rng, 40)
    turn1 = one(eng, req(prompt, salt="conv", max_tokens=16, temperature=0.0,
                         logprobs_mode="raw", ignore_eos=True))
    history = prompt + turn1.token_ids
    turn2 = req(history + words(rng, 6), salt="conv", max_tokens=10, temperature=0.0,
                logprobs_mode="raw")
    got = one(eng, turn2)
    # All of the history but, stepwise, the last token (its KV is computed by the step
    # after the one that sampled it).
    assert got.num_cached_tokens >= len(history) - 1
    [want] = cold_run(cold, turn2)
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_score_of_a_generated_completion_starts_from_its_cached_prompt(pair):
    eng, cold = pair
    rng = random.Random(6)
    prompt = words(rng, 50)
    done = one(eng, req(prompt, salt="score", max_tokens=12, temperature=1.0, seed=3,
                        logprobs_mode="raw", ignore_eos=True))
    hits = eng.stats()["prefix_cache_hits"]
    items = [ScoreRequest(next(_ids), prompt, done.token_ids, "raw", cache_salt="score"),
             ScoreRequest(next(_ids), prompt, done.token_ids, "raw", cache_salt="other")]
    got = [e for e in sum(run(eng, items).values(), []) if isinstance(e, ScoreResult)]
    assert eng.stats()["prefix_cache_hits"] == hits + 1  # the salted one only
    ref = ScoreRequest(next(_ids), prompt, done.token_ids, "raw")
    [want] = run(cold, [ref])[ref.request_id]
    for g in got:
        np.testing.assert_allclose(g.logprobs, want.logprobs, atol=1e-5)
    np.testing.assert_allclose(got[0].logprobs, done.logprobs, atol=1e-5)


def test_cache_salt_isolates(pair):
    eng, _ = pair
    prompt = words(random.Random(7), 30)
    one(eng, req(prompt, salt="alice", max_tokens=4))
    assert one(eng, req(prompt, salt="bob", max_tokens=4)).num_cached_tokens == 0
    assert one(eng, req(prompt, max_tokens=4)).num_cached_tokens == 0
    assert one(eng, req(prompt, salt="alice", max_tokens=4)).num_cached_tokens == len(prompt) - 1


def test_reset_drops_every_entry(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    prompt = words(random.Random(8), 30)
    one(eng, req(prompt, max_tokens=4))
    assert eng.stats()["prefix_cache_entries"] >= 1
    assert eng.reset_prefix_cache() >= 1
    s = eng.stats()
    assert s["prefix_cache_entries"] == 0 and s["prefix_cache_bytes"] == 0
    assert one(eng, req(prompt, max_tokens=4)).num_cached_tokens == 0


def test_a_short_common_prefix_is_not_reused(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    rng = random.Random(15)
    head = words(rng, 10)
    one(eng, req(head + words(rng, 30), max_tokens=4))
    assert one(eng, req(head + words(rng, 30), max_tokens=4)).num_cached_tokens == 0
    assert eng.stats()["prefix_cache_hits"] == 0


def test_no_prefix_cache_reuses_nothing(tiny_model_dir):
    eng = make_engine(tiny_model_dir, prefix_cache=False)
    prompt = words(random.Random(9), 30)
    one(eng, req(prompt, max_tokens=4))
    assert one(eng, req(prompt, max_tokens=4)).num_cached_tokens == 0
    assert eng.stats()["prefix_cache_entries"] == 0


def _old_entries(eng):
    keys = eng.runner.prefix_cache._store._trie._trie.keys()
    return [k for k in keys if k[0] != eng.policy_version]


@pytest.mark.parametrize("mode", ["drain", "abort", "inflight"])
def test_after_a_swap_the_same_prompt_is_computed_under_the_new_weights(tiny_model_dir, tmp_path,
                                                                      mode):
    eng = make_engine(tiny_model_dir, pipeline=False)
    rng = random.Random(10)
    prompt = words(rng, 60)
    params = dict(temperature=1.0, seed=5, logprobs_mode="raw", ignore_eos=True)
    before = one(eng, req(prompt, max_tokens=8, **params))
    assert one(eng, req(prompt, max_tokens=8, **params)).num_cached_tokens == len(prompt) - 1
    # A row running across the swap, whose prompt is the cached one.
    running = req(prompt + words(rng, 3), max_tokens=40, **params)
    eng.submit(running)
    for _ in range(3):
        eng.step()
    ticket = eng.request_swap(eng.prepare_adapter(make_adapter(eng, tmp_path / "a", rank=8)), mode)
    events = []
    while not ticket.done:
        events += eng.step()
    assert not _old_entries(eng)
    after = req(prompt, max_tokens=8, **params)
    got = one(eng, after)
    assert got.num_cached_tokens == 0 and got.versions == [1] * 8
    check_fidelity(eng.model, prompt, got.token_ids, got.logprobs, after.params, "raw", tol=1e-5)
    assert got.logprobs != before.logprobs
    # The row that ran across the commit (inflight: KV of both versions) is not stored.
    while eng.has_work():
        events += eng.step()
    assert not _old_entries(eng)
    if mode != "abort":
        [done] = [e for e in events if getattr(e, "request_id", None) == running.request_id
                  and hasattr(e, "finish_reason")]
        follow = req(list(running.prompt_ids) + done.token_ids + [5], max_tokens=4, **params)
        nxt = one(eng, follow)
        # Only the v1 entry of `prompt` (one token short of the running row's prompt) may serve.
        assert nxt.num_cached_tokens <= len(prompt)
        check_fidelity(eng.model, follow.prompt_ids, nxt.token_ids, nxt.logprobs, follow.params,
                       "raw", tol=1e-5)
    # The same again now hits, under the new weights.
    again = one(eng, req(prompt, max_tokens=8, **params))
    assert again.num_cached_tokens == len(prompt) - 1
    np.testing.assert_allclose(again.logprobs, got.logprobs, atol=1e-5)


def _budget_engine(tiny_model_dir, tokens, **kw):
    probe = make_engine(tiny_model_dir, prefix_cache=False)
    per_token = probe.runner.kv_bytes_per_token
    return make_engine(tiny_model_dir, kv_cache_gb=tokens * per_token / 2**30, **kw)


def _held_bytes(eng):
    batch = sum(c.nbytes for c in eng.runner.cache) if eng.runner.cache else 0
    return batch + eng.runner.prefix_cache.nbytes


def test_a_tiny_budget_evicts_and_stays_right(tiny_model_dir):
    eng = _budget_engine(tiny_model_dir, 3 * 300)
    cold = make_engine(tiny_model_dir, prefix_cache=False)
    rng = random.Random(12)
    prompts = [words(rng, 60) for _ in range(8)]
    params = dict(temperature=0.0, logprobs_mode="processed", max_tokens=6)
    for rnd in range(2):
        for p in prompts:
            r = req(p + [7 + rnd], **params)
            got = one(eng, r)
            [want] = cold_run(cold, r)
            assert got.token_ids == want.token_ids
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
            assert _held_bytes(eng) <= eng.kv_budget_bytes
    s = eng.stats()
    assert s["prefix_cache_evictions"] > 0 and s["prefix_cache_bytes"] <= eng.kv_budget_bytes
    # The last prompts are still there.
    assert one(eng, req(prompts[-1] + [9], **params)).num_cached_tokens >= 60


def test_a_burst_of_long_prompts_stays_within_the_budget(tiny_model_dir):
    rows = 3
    eng = _budget_engine(tiny_model_dir, rows * (200 + 256))
    rng = random.Random(13)
    burst = [req(words(rng, 150), max_tokens=50, temperature=1.0, seed=i, logprobs_mode="raw",
                 ignore_eos=True) for i in range(10)]
    for r in burst:
        eng.submit(r)
    events, most = [], 0
    while eng.has_work():
        events += eng.step()
        most = max(most, eng.runner.num_rows)
        assert eng.scheduler.reserved_kv_tokens() <= eng.kv_budget_tokens
        assert _held_bytes(eng) <= eng.kv_budget_bytes
    assert most == rows  # it ran as many as fit, and waited for the rest
    for r in burst:
        [done] = [e for e in events if getattr(e, "request_id", None) == r.request_id]
        assert len(done.token_ids) == 50
        check_fidelity(eng.model, r.prompt_ids, done.token_ids, done.logprobs, r.params, "raw")


def test_a_request_that_can_never_fit_is_refused_naming_the_limit(tiny_model_dir):
    eng = _budget_engine(tiny_model_dir, 1000)
    with pytest.raises(RequestError) as e:
        eng.submit(req(words(random.Random(1), 100), max_tokens=700))
    assert e.value.field == "max_tokens" and "--kv-cache-gb" in str(e.value)
    eng.submit(req(words(random.Random(1), 100), max_tokens=600))  # 100 + 600 + 256 fits


def test_prefix_cache_unit_lru_and_limit():
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    def entry(n):
        c = KVCache()
        c.update_and_fetch(mx.ones((1, 2, n, 4)), mx.ones((1, 2, n, 4)))
        c.keys, c.values = c.keys[..., :n, :], c.values[..., :n, :]
        return [c]

    per = entry(10)[0].nbytes
    pc = PrefixCache(3 * per)
    for i in range(4):
        pc.insert("k", [i] * 10, entry(10))
    assert pc.num_entries == 3 and pc.num_evictions == 1 and pc.nbytes == 3 * per
    assert pc.fetch("k", [0] * 10) == (None, 0)  # the oldest went
    cache, num = pc.fetch("k", [3] * 10 + [1])
    assert num == 10 and cache[0].offset == 10
    cache, num = pc.fetch("k", [3] * 6 + [2])  # a longer entry, trimmed back
    assert num == 6 and cache[0].offset == 6
    assert pc.fetch("other", [3] * 10) == (None, 0)
    pc.limit(per)
    assert pc.num_entries == 1 and pc.nbytes <= per
    assert pc.fetch("k", [3] * 10, limit=4)[1] == 4
    strict = PrefixCache(3 * per, min_tokens=8)
    strict.insert("k", [3] * 10, entry(10))
    assert strict.fetch("k", [3] * 6 + [2]) == (None, 0) and strict.num_hits == 0
    assert strict.fetch("k", [3] * 9 + [2])[1] == 9


def test_prompts_of_one_admission_prefill_their_shared_prefix_once(pair):
    eng, cold = pair
    rng = random.Random(14)
    system = words(rng, 64)
    burst = [req(system + words(rng, 5 + i), salt="burst", max_tokens=6, temperature=1.0, seed=i,
                 logprobs_mode="processed") for i in range(4)]
    burst.append(req(words(rng, 40), salt="burst", max_tokens=6))  # shares nothing
    before = eng.stats()["prefill_tokens"]
    events = run(eng, burst)
    prefilled = eng.stats()["prefill_tokens"] - before
    assert prefilled == sum(len(r.prompt_ids) for r in burst) - 3 * len(system)  # once, not 4x
    for r in burst:
        [got] = done_events(events, r.request_id)
        [want] = cold_run(cold, r)
        assert got.token_ids == want.token_ids
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    # The first of them computed the prefix; the others got it from the cache.
    assert sorted(done_events(events, r.request_id)[0].num_cached_tokens for r in burst) == \
        [0, 0] + [len(system)] * 3
