"""Engine generation on the tiny demo model: greedy parity with mlx-lm, exact log-probs
under batching, GRPO groups, seeds, stops, streaming, aborts, the queue bound, scoring and
a second architecture."""

from __future__ import annotations

import functools
import random
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate as mlx_generate
from mlx_lm.generate import generate_step

from _engine_helpers import check_fidelity, chunks, done_events, make_engine as _make_engine, run, write_model
from mlxsup.engine import EngineConfig, QueueFull, RequestError
from mlxsup.ipc.messages import (
    ErrorEvent,
    GenerateRequest,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    SequenceDone,
    TokenChunk,
)

pytestmark = pytest.mark.timeout(180)

_ids = iter(range(1, 10**9))


make_engine = functools.partial(_make_engine, max_batch=32)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)  # the CPU's default: the step mode chosen by step length


@pytest.fixture(scope="module")
def stepwise_engine(tiny_model_dir):
    return make_engine(tiny_model_dir, pipeline=False)


@pytest.fixture(scope="module")
def pipelined_engine(tiny_model_dir):
    return make_engine(tiny_model_dir, pipeline=True)  # a GPU's default


@pytest.fixture(params=["stepwise", "pipelined"])
def either_engine(request):
    """The engine in both step modes: the tokens it reports must not depend on the mode."""
    return request.getfixturevalue(f"{request.param}_engine")


def prompts_of(n, rng, lo=1, hi=40, vocab=500):
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi + 1))] for _ in range(n)]


def req(prompt, n=1, **params):
    return GenerateRequest(next(_ids), prompt, SamplingParams(**params), n)


# ------------------------------------------------------------------ parity and fidelity


def test_greedy_identical_to_mlx_lm(engine):
    tok = engine.tokenizer
    texts = ["The cat sat on the mat.", "12 + 30 =", "a"]
    for text in texts:
        prompt = tok.encode(text)
        ref_ids = []
        for t, _ in generate_step(mx.array(prompt), engine.model, max_tokens=24):
            if int(t) in tok.eos_token_ids:
                break
            ref_ids.append(int(t))
        [[done]] = engine.generate([prompt], SamplingParams(max_tokens=24))
        got = [t for t in done.token_ids if t not in tok.eos_token_ids]
        assert got == ref_ids
        ref_text = mlx_generate(engine.model, tok, prompt, max_tokens=24)
        # mlx-lm's streaming detokenizer drops the completion's leading space.
        assert tok.decode(got).lstrip(" ") == ref_text.lstrip(" ")


def test_compiled_sampler_engine_builds_its_samplers_before_the_first_request(
        engine, tiny_model_dir, monkeypatch):
    """Where the sampler is compiled (a GPU's default), an engine builds the greedy and plain
    samplers at start: a batch mixing greedy, sampled and min-p rows then builds none while
    requests wait (on CUDA each build JIT-compiles for seconds), and its greedy rows give the
    tokens of the op-by-op engine."""
    from mlxsup.engine import sampling

    monkeypatch.setattr(sampling, "COMPILE", True)
    monkeypatch.setattr(sampling, "_compiled", {})
    compiled = make_engine(tiny_model_dir)
    built = set(sampling._compiled)
    assert len(built) == len(sampling.WARM_MIXES)
    rng = random.Random(3)
    prompts = prompts_of(6, rng)
    mix = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, min_p=0.05),
           dict(temperature=0.0), dict(temperature=1.2), dict(temperature=0.0)]
    reqs = [req(p, max_tokens=12, seed=i, **m) for i, (p, m) in enumerate(zip(prompts, mix))]
    events = run(compiled, reqs)
    assert set(sampling._compiled) == built
    monkeypatch.setattr(sampling, "COMPILE", False)
    for r, m in zip(reqs, mix):
        [done] = done_events(events, r.request_id)
        assert len(done.token_ids) > 0
        if m["temperature"] == 0.0:
            [[ref]] = engine.generate([r.prompt_ids], SamplingParams(max_tokens=12))
            assert done.token_ids == ref.token_ids


def test_warm_up_runs_the_serving_paths_and_leaves_nothing(tiny_model_dir, monkeypatch):
    """`Engine.warm_up` (run before ready on a GPU) goes through a padded prefill, rows joining
    a running batch, a group, a prefix-cache hit, a score and a solo row; afterwards the engine
    holds nothing of it (no requests, rows, cache entries, counters) and serves what an engine
    that never warmed up serves, to the token and log-prob, unseeded requests included (the
    warm-up draws nothing from the engine's seed stream)."""
    from mlxsup.engine.prefix_cache import PrefixCache
    from mlxsup.engine.runner import ModelRunner

    warm, cold = make_engine(tiny_model_dir, seed=5), make_engine(tiny_model_dir, seed=5)
    hits, widest, scores = [], [0], []
    fetch, step, score = PrefixCache.fetch, ModelRunner.step, ModelRunner.score_top

    def spy_fetch(self, *a, **kw):
        found = fetch(self, *a, **kw)
        hits.append(found[1])
        return found

    def spy_step(self, *a, **kw):
        out = step(self, *a, **kw)
        widest[0] = max(widest[0], self.num_rows)
        return out

    def spy_score(self, items, *a, **kw):
        scores.append(len(items))
        return score(self, items, *a, **kw)

    monkeypatch.setattr(PrefixCache, "fetch", spy_fetch)
    monkeypatch.setattr(ModelRunner, "step", spy_step)
    monkeypatch.setattr(ModelRunner, "score_top", spy_score)
    assert warm.warm_up() > 0
    monkeypatch.undo()
    assert max(hits) >= 16 and widest[0] >= 5 and scores == [1]
    stats = warm.stats()
    assert stats["prefix_cache_entries"] == 0 and stats["prefix_cache_lookups"] == 0
    assert all(warm.counters[k] == 0 for k in warm.counters)
    assert not warm.has_work() and not warm._requests and warm.runner.num_rows == 0
    rng = random.Random(11)
    prompts = prompts_of(4, rng)
    mix = [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.8, seed=4),
           dict(temperature=1.0)]
    reqs = [GenerateRequest(10**6 + i, p, SamplingParams(max_tokens=10, logprobs_mode="processed", **m))
            for i, (p, m) in enumerate(zip(prompts, mix))]
    outs = {}
    for name, eng in (("warm", warm), ("cold", cold)):  # the same requests, ids and all
        events = run(eng, reqs)
        outs[name] = [done for r in reqs for done in done_events(events, r.request_id)]
    assert [d.token_ids for d in outs["warm"]] == [d.token_ids for d in outs["cold"]]
    assert np.allclose([lp for d in outs["warm"] for lp in d.logprobs],
                       [lp for d in outs["cold"] for lp in d.logprobs], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 5, 32])
@pytest.mark.parametrize("mode", ["raw", "processed"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing(either_engine, batch, mode, temperature):
    engine = either_engine
    rng = random.Random(batch * 7 + int(temperature * 10))
    prompts = prompts_of(batch, rng)
    reqs = [req(p, temperature=temperature, logprobs_mode=mode,
                max_tokens=rng.randrange(4, 24)) for p in prompts]
    # Staggered arrivals: sequences join a batch that is already decoding.
    events = run(engine, reqs, stagger=max(1, batch // 4))
    for r in reqs:
        [done] = done_events(events, r.request_id)
        check_fidelity(engine.model, r.prompt_ids, done.token_ids, done.logprobs, r.params, mode)


def test_logprobs_with_truncation_and_penalty_in_mixed_batch(engine):
    rng = random.Random(5)
    settings = [
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.0, top_k=20),
        dict(temperature=0.8, min_p=0.2),
        dict(temperature=1.0, top_k=50, top_p=0.8),
        dict(temperature=0.9, repetition_penalty=1.3, repetition_context_size=8),
        dict(temperature=0.0),
        dict(temperature=1.0),
    ]
    reqs = []
    for i, p in enumerate(prompts_of(32, rng)):
        s = settings[i % len(settings)]
        mode = "processed" if i % 3 else "raw"
        reqs.append(req(p, logprobs_mode=mode, max_tokens=16, **s))
    events = run(engine, reqs, stagger=6)
    skipped = total = 0
    for r in reqs:
        [done] = done_events(events, r.request_id)
        _, s = check_fidelity(engine.model, r.prompt_ids, done.token_ids, done.logprobs,
                              r.params, r.params.logprobs_mode)
        skipped += s
        total += len(done.token_ids)
        if r.params.top_k and r.params.logprobs_mode == "processed":
            assert all(lp > -np.log(r.params.top_k) - 8 for lp in done.logprobs)
    assert skipped <= total * 0.02


def test_score_equals_generation_logprobs(engine):
    rng = random.Random(11)
    gen_reqs = [req(p, temperature=0.7, top_k=30, logprobs_mode="processed", max_tokens=12)
                for p in prompts_of(6, rng)]
    events = run(engine, gen_reqs)
    scores = []
    for r in gen_reqs:
        [done] = done_events(events, r.request_id)
        for mode in ("processed", "raw"):
            scores.append((ScoreRequest(next(_ids), r.prompt_ids, done.token_ids, mode, r.params),
                           done))
    sevents = run(engine, [s for s, _ in scores])
    for s, done in scores:
        [res] = sevents[s.request_id]
        assert isinstance(res, ScoreResult) and res.policy_version == engine.policy_version
        assert len(res.logprobs) == len(done.token_ids)
        if s.logprobs_mode == "processed":
            np.testing.assert_allclose(res.logprobs, done.logprobs, atol=1e-4)
        else:
            check_fidelity(engine.model, s.prompt_ids, s.completion_ids, res.logprobs,
                           s.params, "raw")


def test_score_with_repetition_penalties_in_one_batch(engine):
    # Each position's penalty window comes from its own item's prompt + completion so far,
    # whatever the other items of the batch use (none, a narrower one, a longer sequence).
    rng = random.Random(5)
    kinds = [dict(repetition_penalty=1.5, repetition_context_size=4),
             dict(repetition_penalty=1.3, repetition_context_size=30),
             dict(repetition_penalty=1.0)]
    gen_reqs = [req(p, temperature=0.8, logprobs_mode="processed", max_tokens=m, seed=3, **k)
                for p, k, m in zip(prompts_of(3, rng, lo=2, hi=12), kinds, (40, 25, 60))]
    events = run(engine, gen_reqs)
    dones = [done_events(events, r.request_id)[0] for r in gen_reqs]
    scores = [ScoreRequest(next(_ids), r.prompt_ids, d.token_ids, "processed", r.params)
              for r, d in zip(gen_reqs, dones)]
    sevents = run(engine, scores)
    for s, r, d in zip(scores, gen_reqs, dones):
        [res] = sevents[s.request_id]
        np.testing.assert_allclose(res.logprobs, d.logprobs, atol=1e-4)
        check_fidelity(engine.model, r.prompt_ids, d.token_ids, res.logprobs, r.params,
                       "processed")


def test_score_of_empty_completion_and_greedy_processed(engine):
    prompt = [5, 6, 7]
    [[done]] = engine.generate([prompt], SamplingParams(max_tokens=5))
    empty = ScoreRequest(next(_ids), prompt, [], "raw")
    greedy = ScoreRequest(next(_ids), prompt, done.token_ids, "processed", SamplingParams())
    events = run(engine, [empty, greedy])
    assert events[empty.request_id][0].logprobs == []
    assert events[greedy.request_id][0].logprobs == [0.0] * len(done.token_ids)


# ------------------------------------------------------------------ groups and seeds


def test_n8_prefills_once_and_samples_differ(engine):
    prompt = list(range(10, 40))
    before = engine.stats()["prefill_tokens"]
    r = req(prompt, n=8, temperature=1.0, max_tokens=12, logprobs_mode="processed")
    events = run(engine, [r])
    assert engine.stats()["prefill_tokens"] - before == len(prompt)
    dones = done_events(events, r.request_id)
    assert [d.seq_index for d in dones] == list(range(8))
    assert len({tuple(d.token_ids) for d in dones}) == 8
    for d in dones:
        check_fidelity(engine.model, prompt, d.token_ids, d.logprobs, r.params, "processed")


def test_group_larger_than_batch_reuses_its_prefill(tiny_model_dir):
    eng = make_engine(tiny_model_dir, max_batch=3)
    prompt = list(range(50, 70))
    r = req(prompt, n=8, temperature=1.0, max_tokens=6, logprobs_mode="raw")
    events = run(eng, [r])
    assert eng.stats()["prefill_tokens"] == len(prompt)
    dones = done_events(events, r.request_id)
    assert len(dones) == 8 and all(d.batch_size <= 3 for d in dones)
    for d in dones:
        check_fidelity(eng.model, prompt, d.token_ids, d.logprobs, r.params, "raw")


def test_seeded_request_same_tokens_whatever_the_batch(engine):
    prompt = [9, 8, 7, 6, 5, 4]
    params = dict(temperature=1.0, top_p=0.95, seed=1234, max_tokens=20, logprobs_mode="processed")
    r1 = req(prompt, **params)
    alone = done_events(run(engine, [r1]), r1.request_id)[0]
    rng = random.Random(3)
    company = [req(p, temperature=1.0, max_tokens=rng.randrange(3, 30)) for p in prompts_of(20, rng)]
    r2 = req(prompt, **params)
    events = run(engine, company[:10] + [r2] + company[10:], stagger=4)
    crowded = done_events(events, r2.request_id)[0]
    assert crowded.token_ids == alone.token_ids
    np.testing.assert_allclose(crowded.logprobs, alone.logprobs, atol=1e-5)
    # n samples of one seeded request differ from each other but repeat exactly.
    g1 = done_events(run(engine, [r3 := req(prompt, n=3, **params)]), r3.request_id)
    g2 = done_events(run(engine, [r4 := req(prompt, n=3, **params)]), r4.request_id)
    assert [d.token_ids for d in g1] == [d.token_ids for d in g2]
    assert len({tuple(d.token_ids) for d in g1}) == 3
    assert g1[0].token_ids == alone.token_ids


def test_seeded_tokens_do_not_depend_on_the_step_mode(stepwise_engine, pipelined_engine):
    rng = random.Random(11)
    prompts = prompts_of(6, rng)
    lengths = [rng.randrange(4, 20) for _ in prompts]
    params = dict(temperature=1.0, top_k=50, logprobs_mode="processed", ignore_eos=True)
    a, b = ([req(p, seed=100 + i, max_tokens=m, **params)
             for i, (p, m) in enumerate(zip(prompts, lengths))] for _ in range(2))
    ev_a, ev_b = run(stepwise_engine, a, stagger=2), run(pipelined_engine, b, stagger=2)
    for ra, rb in zip(a, b):
        [da], [db] = done_events(ev_a, ra.request_id), done_events(ev_b, rb.request_id)
        assert da.token_ids == db.token_ids and len(da.token_ids) == ra.params.max_tokens
        np.testing.assert_allclose(da.logprobs, db.logprobs, atol=1e-5)


def test_adaptive_mode_switches_by_step_length_without_changing_tokens(tiny_model_dir,
                                                                       pipelined_engine,
                                                                       monkeypatch):
    """The CPU's default: steps longer than SLOW_STEP_S run stepwise, shorter than FAST_STEP_S
    pipelined. Forced to switch every few steps, every token is the one a fixed mode gives."""
    from mlxsup.engine import runner as runner_mod

    eng = make_engine(tiny_model_dir)
    assert eng.runner.adaptive and eng.runner.pipeline  # starts pipelined
    rng = random.Random(21)
    prompts = prompts_of(5, rng)
    lengths = [rng.randrange(10, 30) for _ in prompts]
    params = dict(temperature=1.0, logprobs_mode="processed", ignore_eos=True)
    a, b = ([req(p, seed=300 + i, max_tokens=m, **params)
             for i, (p, m) in enumerate(zip(prompts, lengths))] for _ in range(2))
    events, modes, todo = {r.request_id: [] for r in a}, [], list(a)
    for i in range(400):
        # Every 3 steps the thresholds say "long" or "short": stepwise, then pipelined again.
        slow = (i // 3) % 2 == 0
        monkeypatch.setattr(runner_mod, "SLOW_STEP_S", -1.0 if slow else 1e9)
        monkeypatch.setattr(runner_mod, "FAST_STEP_S", -1.0 if slow else 1e9)
        if todo and i % 2 == 0:
            eng.submit(todo.pop(0))
        for ev in eng.step():
            events[ev.request_id].append(ev)
        modes.append(eng.runner.pipeline)
        if not todo and all(any(isinstance(e, SequenceDone) for e in evs) for evs in events.values()):
            break
    assert True in modes and False in modes
    assert sum(1 for x, y in zip(modes, modes[1:]) if x != y) >= 4  # switched both ways, often
    ref = run(pipelined_engine, b, stagger=1)
    for ra, rb in zip(a, b):
        [da], [db] = done_events(events, ra.request_id), done_events(ref, rb.request_id)
        assert da.token_ids == db.token_ids and len(da.token_ids) == ra.params.max_tokens
        np.testing.assert_allclose(da.logprobs, db.logprobs, atol=1e-5)
        check_fidelity(eng.model, ra.prompt_ids, da.token_ids, da.logprobs, ra.params, "processed")


def test_a_lone_sequence_runs_solo_and_rejoins_the_batch(either_engine):
    """One row decodes on plain caches (solo); a row joining merges them back into batch
    caches, and when it leaves the survivor goes solo again, with exact log-probs and the
    same tokens as a run alone throughout."""
    engine = either_engine
    params = dict(temperature=1.0, seed=77, max_tokens=30, logprobs_mode="processed")
    prompt = [5, 17, 33, 2, 41, 8, 9]
    ref = done_events(run(engine, [r0 := req(prompt, **params)]), r0.request_id)[0]
    a, b = req(prompt, **params), req([3, 4, 5, 6], temperature=1.0, max_tokens=6,
                                    logprobs_mode="processed")
    engine.submit(a)
    events, modes = [], []
    for i in range(200):
        if i == 8:
            engine.submit(b)
        events += engine.step()
        modes.append((engine.runner.num_rows, engine.runner.solo))
        if any(isinstance(e, SequenceDone) and e.request_id == a.request_id for e in events):
            break
    assert (1, True) in modes[:8]  # alone: solo
    joined = modes.index((2, False))
    assert (1, True) in modes[joined:]  # b finished: solo again
    done_a = [e for e in events if isinstance(e, SequenceDone) and e.request_id == a.request_id][0]
    done_b = [e for e in events if isinstance(e, SequenceDone) and e.request_id == b.request_id][0]
    assert done_a.token_ids == ref.token_ids
    np.testing.assert_allclose(done_a.logprobs, ref.logprobs, atol=1e-5)
    check_fidelity(engine.model, a.prompt_ids, done_a.token_ids, done_a.logprobs, a.params,
                   "processed")
    check_fidelity(engine.model, b.prompt_ids, done_b.token_ids, done_b.logprobs, b.params,
                   "processed")


# ------------------------------------------------------------------ stopping


def test_stop_token_id_ends_with_that_token(engine):
    prompt = [20, 21, 22]
    [[free]] = engine.generate([prompt], SamplingParams(max_tokens=16))
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    [[done]] = engine.generate([prompt], SamplingParams(max_tokens=16, stop_token_ids=(stop,)))
    assert done.finish_reason == "stop"
    assert done.token_ids == free.token_ids[: first + 1]


def test_ignore_eos_runs_past_the_eos_token(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    prompt = [7, 8, 9, 10]
    first = done_events(run(eng, [r := req(prompt, max_tokens=1)]), r.request_id)[0].token_ids[0]
    eng.eos_token_ids = frozenset({first})  # greedy: the first token is now an EOS
    stopped = done_events(run(eng, [r := req(prompt, max_tokens=8)]), r.request_id)[0]
    assert (stopped.token_ids, stopped.finish_reason) == ([first], "stop")
    ran = done_events(run(eng, [r := req(prompt, max_tokens=8, ignore_eos=True)]), r.request_id)[0]
    assert (len(ran.token_ids), ran.finish_reason) == (8, "length")
    assert ran.token_ids[0] == first
    # an explicit stop token still stops
    cut = done_events(run(eng, [r := req(prompt, max_tokens=8, ignore_eos=True,
                                         stop_token_ids=(first,))]), r.request_id)[0]
    assert (cut.token_ids, cut.finish_reason) == ([first], "stop")


def test_eos_ids_come_from_the_tokenizer(engine):
    assert set(engine.tokenizer.eos_token_ids) <= engine.eos_token_ids
    assert engine.tokenizer.eos_token_id in engine.eos_token_ids


def test_stop_string_exact_on_decoded_text(engine):
    tok = engine.tokenizer
    prompt = tok.encode("Once upon a time")
    [[free]] = engine.generate([prompt], SamplingParams(max_tokens=30))
    text = tok.decode(free.token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop
    [[done]] = engine.generate([prompt], SamplingParams(max_tokens=30, stop_strings=(stop,)))
    assert done.finish_reason == "stop"
    assert stop in tok.decode(done.token_ids)
    assert stop not in tok.decode(done.token_ids[:-1])
    assert done.token_ids == free.token_ids[: len(done.token_ids)]


def test_max_tokens_and_context_limit(engine):
    [[done]] = engine.generate([[3, 4]], SamplingParams(max_tokens=7))
    assert done.finish_reason == "length" and len(done.token_ids) == 7
    ctx = engine.context_length
    with pytest.raises(RequestError) as e:
        engine.submit(req([5] * ctx))
    assert e.value.field == "prompt_ids"
    # The API's rule: prompt + max_tokens within the context; past it refused, never clamped.
    [[done]] = engine.generate([[5] * (ctx - 3)], SamplingParams(max_tokens=3))
    assert done.finish_reason == "length" and len(done.token_ids) == 3
    with pytest.raises(RequestError) as e:
        engine.submit(req([5] * (ctx - 3), max_tokens=4))
    assert e.value.field == "max_tokens"
    with pytest.raises(RequestError) as e:
        engine.submit(ScoreRequest(next(_ids), [5] * (ctx - 1), [6, 7], "raw"))
    assert e.value.field == "completion_ids"


def test_out_of_range_token_ids_are_refused_and_the_engine_lives_on(engine):
    # MLX's embedding lookup reads out of bounds for them (a large id segfaults the process).
    for bad in (engine.vocab_size, 2**31 - 1, -1, -(2**31)):
        with pytest.raises(RequestError) as e:
            engine.submit(req([1, bad]))
        assert e.value.field == "prompt_ids"
    with pytest.raises(RequestError) as e:
        engine.submit(ScoreRequest(next(_ids), [1], [2, -1], "raw"))
    assert e.value.field == "completion_ids"
    with pytest.raises(RequestError) as e:
        engine.submit(ScoreRequest(next(_ids), [1], [2, engine.vocab_size], "raw"))
    assert e.value.field == "completion_ids"
    [[done]] = engine.generate([[1, engine.vocab_size - 1]], SamplingParams(max_tokens=3))
    assert len(done.token_ids) == 3


def test_a_request_id_in_flight_is_refused(engine):
    r = req([1, 2])
    engine.submit(r)
    with pytest.raises(RequestError) as e:
        engine.submit(r)
    assert e.value.field == "request_id"
    engine.abort(r.request_id)
    engine.step()


# ------------------------------------------------------------------ streaming, abort, queue


def test_streaming_chunks_then_done(engine):
    r = GenerateRequest(next(_ids), [7, 7, 7], SamplingParams(max_tokens=9, temperature=1.0,
                                                               logprobs_mode="raw"), n=2,
                        stream=True)
    events = run(engine, [r])
    for idx in range(2):
        cs = [c for c in chunks(events, r.request_id) if c.seq_index == idx]
        [done] = [d for d in done_events(events, r.request_id) if d.seq_index == idx]
        ids = [t for c in cs for t in c.token_ids] + list(done.token_ids)
        lps = [x for c in cs for x in c.logprobs] + list(done.logprobs)
        assert len(ids) == 9 and len(lps) == 9
        assert all(v == 0 for c in cs for v in c.versions)
        check_fidelity(engine.model, r.prompt_ids, ids, lps, r.params, "raw")


def test_abort_frees_the_slot(tiny_model_dir):
    eng = make_engine(tiny_model_dir, max_batch=2)
    long = [req([3, 4, 5], max_tokens=4000) for _ in range(2)]
    for r in long:
        eng.submit(r)
    for _ in range(5):
        eng.step()
    assert eng.stats()["num_running"] == 2
    assert eng.abort(long[0].request_id)
    assert eng.stats()["num_running"] == 1
    events = eng.step()
    [done] = [e for e in events if isinstance(e, SequenceDone)]
    assert done.request_id == long[0].request_id and done.finish_reason == "abort"
    assert 3 <= len(done.token_ids) <= 5
    short = req([6, 7], max_tokens=4)
    events = run(eng, [short])
    assert done_events(events, short.request_id)[0].finish_reason == "length"
    eng.abort(long[1].request_id)
    eng.step()
    assert not eng.has_work() and eng.runner.num_rows == 0
    assert eng.abort(12345678) is False


def test_queue_bound_holds(tiny_model_dir):
    eng = make_engine(tiny_model_dir, max_batch=1, max_queue=3)
    reqs = [req([3], max_tokens=2) for _ in range(4)]
    for r in reqs[:3]:
        eng.submit(r)
    with pytest.raises(QueueFull):
        eng.submit(reqs[3])
    with pytest.raises(QueueFull):
        eng.submit(ScoreRequest(next(_ids), [1], [2], "raw"))
    eng.step()  # admits one: room for one more
    eng.submit(reqs[3])
    assert eng.stats()["queue_depth"] == 3
    while eng.has_work():
        eng.step()
    assert eng.stats()["queue_depth"] == 0


def test_flush_interval_gathers_arrivals(tiny_model_dir):
    eng = make_engine(tiny_model_dir, max_batch=4, flush_interval_ms=200)
    eng.submit(req([3, 4], max_tokens=3))
    assert eng.step() == [] and eng.stats()["num_running"] == 0
    assert 0 < eng.wait_hint() <= 0.2
    for _ in range(3):
        eng.submit(req([5], max_tokens=3))
    eng.step()  # max_batch samples wait: starts without the rest of the interval
    assert eng.stats()["num_running"] == 4


def test_min_policy_version_waits_then_times_out(tiny_model_dir):
    eng = make_engine(tiny_model_dir, min_policy_wait_s=0.2)
    held = GenerateRequest(next(_ids), [3], SamplingParams(max_tokens=2), min_policy_version=1,
                           min_policy_wait_s=5.0)
    timed = GenerateRequest(next(_ids), [3], SamplingParams(max_tokens=2), min_policy_version=9,
                            min_policy_wait_s=0.05)
    eng.submit(held)
    eng.submit(timed)
    assert eng.step() == []
    eng.request_swap(eng.prepare_adapter(None), "drain", 1)
    events = []
    deadline = time.monotonic() + 5
    while eng.has_work() and time.monotonic() < deadline:
        events += eng.step()
        time.sleep(0.01)
    [err] = [e for e in events if isinstance(e, ErrorEvent)]
    assert err.request_id == timed.request_id and err.code == "timeout"
    [done] = [e for e in events if isinstance(e, SequenceDone)]
    assert done.request_id == held.request_id and done.versions == [1, 1]


# ------------------------------------------------------------------ another architecture


def test_qwen2_model_generates_with_exact_logprobs(tiny_model_dir, tmp_path):
    path = write_model(str(tmp_path / "qwen2"), tiny_model_dir, "qwen2", dict(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=520, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=False))
    eng = make_engine(path, max_batch=8)
    assert type(eng.model).__module__.endswith("qwen2")
    prompt = [10, 11, 12, 13]
    ref = [int(t) for t, _ in zip((y for y, _ in generate_step(mx.array(prompt), eng.model,
                                                                max_tokens=10)), range(10))]
    [[done]] = eng.generate([prompt], SamplingParams(max_tokens=10))
    assert done.token_ids == ref[: len(done.token_ids)]
    rng = random.Random(1)
    reqs = [req(p, temperature=0.7, logprobs_mode="processed", max_tokens=10)
            for p in prompts_of(8, rng)]
    events = run(eng, reqs, stagger=3)
    for r in reqs:
        [d] = done_events(events, r.request_id)
        check_fidelity(eng.model, r.prompt_ids, d.token_ids, d.logprobs, r.params, "processed")


def test_a_failing_step_fails_its_requests_and_the_engine_lives_on(tiny_model_dir, monkeypatch):
    eng = make_engine(tiny_model_dir, max_batch=4)
    victims = [req([3, 4], max_tokens=50) for _ in range(2)]
    for r in victims:
        eng.submit(r)
    eng.step()
    real_step = eng.runner.step

    def broken(*a, **k):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(eng.runner, "step", broken)
    events = eng.step()
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert {e.request_id for e in errors} == {r.request_id for r in victims}
    assert all(e.code == "internal" and "simulated" in e.message for e in errors)
    monkeypatch.setattr(eng.runner, "step", real_step)
    assert not eng.has_work() and eng.runner.num_rows == 0
    [[done]] = eng.generate([[5, 6]], SamplingParams(max_tokens=3))
    assert done.finish_reason == "length"


def test_prompts_of_very_different_lengths_prefill_in_separate_passes(tiny_model_dir, monkeypatch):
    from mlxsup.engine import runner as runner_mod

    assert [list(g) for g in runner_mod.length_groups([3, 3, 20, 30, 33, 200, 230, 800])] == \
        [[0, 1, 2, 3, 4], [5, 6], [7]]  # 33 <= 3 + 32; 230 <= 1.25 x 200
    eng = make_engine(tiny_model_dir, prefix_cache=False)  # (the same prompts run twice)
    passes = []
    real = runner_mod.ModelRunner._start_group
    monkeypatch.setattr(runner_mod.ModelRunner, "_start_group",
                        lambda self, adm: passes.append(sorted(len(a.prompt_ids) for a in adm))
                        or real(self, adm))
    rng = random.Random(11)
    lengths = [5, 300, 7, 6, 280, 120]
    reqs = [req([rng.randrange(3, 500) for _ in range(n)], temperature=1.0, max_tokens=5,
                logprobs_mode="processed") for n in lengths]
    events = run(eng, reqs)  # admitted in one step
    assert sorted(passes) == [[5, 6, 7], [120], [280, 300]]
    for r in reqs:
        [done] = done_events(events, r.request_id)
        check_fidelity(eng.model, r.prompt_ids, done.token_ids, done.logprobs, r.params, "processed")
    # On a GPU (or when told) one padded pass takes them all.
    eng.runner.group_prefill, passes[:] = False, []
    again = [req(r.prompt_ids, temperature=1.0, max_tokens=5) for r in reqs]
    run(eng, again)
    assert passes == [[5, 6, 7, 120, 280, 300]]


def test_a_slow_step_is_logged_with_its_batch_and_admissions(engine, monkeypatch, caplog):
    """A step over `SLOW_STEP_LOG_S` (a second; on a GPU steps take milliseconds) is logged
    with its rows, admissions, prompt tokens and sampler traces, so a stall can be told
    apart: a prefill, a trace, or neither. Threshold 0 here: every step is slow."""
    import logging

    from mlxsup.engine import core

    monkeypatch.setattr(core, "SLOW_STEP_LOG_S", 0.0)
    reqs = [GenerateRequest(next(_ids), [5, 6, 7], SamplingParams(max_tokens=3), n=2),
            GenerateRequest(next(_ids), [8, 9], SamplingParams(max_tokens=3))]
    with caplog.at_level(logging.INFO, logger="mlxsup.engine"):
        run(engine, reqs)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow step")]
    assert lines, "no step was logged"
    assert any("3 rows, 2 admitted (5 prompt tokens)" in line for line in lines), lines[:3]
    assert all("sampler traces, version 0" in line for line in lines)


# ------------------------------------------------------------------ chunked prefill


@pytest.fixture(scope="module")
def chunked_engine(tiny_model_dir):
    return make_engine(tiny_model_dir, prefill_chunk_tokens=16)


def test_chunked_prefill_gives_the_tokens_of_whole_prompt_prefill(engine, chunked_engine):
    """Prompts prefilled 16 tokens a step while others decode (groups of lengths, n samples,
    a prompt of one token) decode to the same tokens with the same log-probs as prefilled
    whole."""
    rng = random.Random(5)
    prompts = prompts_of(6, rng, lo=1, hi=90) + [[7]]
    results = []
    for eng in (engine, chunked_engine):
        reqs = [req(p, n=2 if i % 3 == 0 else 1, temperature=1.0, seed=100 + i, max_tokens=8,
                    logprobs_mode="processed") for i, p in enumerate(prompts)]
        events = run(eng, reqs, stagger=1)  # later prompts prefill while earlier ones run
        results.append([[(d.token_ids, d.logprobs) for d in done_events(events, r.request_id)]
                        for r in reqs])
        assert not eng.has_work() and eng.runner.num_rows == 0
    for whole, chunked in zip(*results):
        for (t1, l1), (t2, l2) in zip(whole, chunked):
            assert t1 == t2
            np.testing.assert_allclose(l1, l2, atol=1e-4)
    for r, dones in zip(reqs, results[1]):
        for tokens, lps in dones:
            check_fidelity(chunked_engine.model, r.prompt_ids, tokens, lps, r.params, "processed")


def test_running_rows_keep_decoding_while_a_long_prompt_prefills(chunked_engine):
    """With a 16-token chunk, a 200-token prompt takes 13 steps to prefill, and the running
    request gets a token in every one of them instead of waiting for the whole prefill."""
    eng = chunked_engine
    running = GenerateRequest(next(_ids), [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=40),
                              stream=True)
    eng.submit(running)
    def got(events, rid):
        return sum(len(e.token_ids) for e in events
                   if isinstance(e, (TokenChunk, SequenceDone)) and e.request_id == rid)

    for _ in range(3):
        eng.step()
    long = GenerateRequest(next(_ids), list(range(10, 210)),
                           SamplingParams(temperature=0.0, max_tokens=2), stream=True)
    eng.submit(long)
    steps_before_first, running_tokens = 0, 0
    while True:
        events = eng.step()
        if got(events, long.request_id):
            break
        steps_before_first += 1
        running_tokens += got(events, running.request_id)
        assert steps_before_first < 50
    assert steps_before_first >= 199 // 16  # prefilled over that many steps
    assert running_tokens >= steps_before_first - 1  # a token each step meanwhile
    while eng.has_work():
        eng.step()


def test_a_request_aborted_while_its_prompt_prefills_leaves_nothing(chunked_engine):
    eng = chunked_engine
    busy = req([5, 6, 7], temperature=0.0, max_tokens=30)  # rows run: prefill is chunked
    eng.submit(busy)
    eng.step()
    long = req(list(range(10, 150)), temperature=1.0, max_tokens=5, n=3)
    other = req(list(range(20, 60)), temperature=0.0, max_tokens=5)
    eng.submit(long)
    eng.submit(other)
    eng.step()
    eng.step()
    assert eng.runner.num_prefilling == 4
    assert eng.abort(long.request_id)
    events = []
    while eng.has_work():
        events += eng.step()
    mine = [e for e in events if getattr(e, "request_id", None) == long.request_id]
    assert all(isinstance(e, SequenceDone) and e.finish_reason == "abort" for e in mine)
    [done] = [e for e in events if isinstance(e, SequenceDone) and e.request_id == other.request_id]
    assert done.finish_reason == "length" and len(done.token_ids) == 5
    assert eng.runner.num_rows == 0 and eng.runner.num_prefilling == 0


def test_chunked_group_larger_than_batch_reuses_its_prefill(tiny_model_dir):
    eng = make_engine(tiny_model_dir, max_batch=3, prefill_chunk_tokens=8)
    prompt = list(range(50, 90))
    r = req(prompt, n=8, temperature=1.0, max_tokens=6, logprobs_mode="raw")
    events = run(eng, [r])
    assert eng.stats()["prefill_tokens"] == len(prompt)  # the later samples reused it
    dones = done_events(events, r.request_id)
    assert len(dones) == 8 and all(d.batch_size <= 3 for d in dones)
    for d in dones:
        check_fidelity(eng.model, prompt, d.token_ids, d.logprobs, r.params, "raw")


def test_prefill_chunk_must_be_positive(tiny_model_dir):
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        EngineConfig(model=tiny_model_dir, prefill_chunk_tokens=0)


class _CountingModel:
    """The model, recording the input shape of each forward pass."""

    def __init__(self, model):
        self._model, self.shapes = model, []

    def __call__(self, x, *args, **kwargs):
        self.shapes.append(tuple(x.shape))
        return self._model(x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.mark.parametrize("chunk,passes", [(None, 1), (16, 13), (64, 4)])
def test_a_long_prompt_is_prefilled_in_as_few_passes_as_the_chunk_allows(tiny_model_dir, chunk,
                                                                         passes):
    """While a row decodes, a 200-token prompt goes through the model in one pass (up to
    prefill_step_size), or chunked in ceil(199 / chunk): never a pass a token. With no row
    decoding there is nobody to keep waiting short, and even a chunked engine prefills it
    whole."""
    eng = make_engine(tiny_model_dir, prefill_chunk_tokens=chunk, pipeline=False,
                      prefix_cache=False)  # (the same prompt runs twice)
    counting = _CountingModel(eng.runner.model)
    eng.runner.model = counting
    prefill_passes = lambda: sum(1 for shape in counting.shapes if shape[1] > 1)
    busy = req([5, 6, 7], temperature=0.0, max_tokens=40)
    eng.submit(busy)
    eng.step()
    assert prefill_passes() == 1  # the busy request's own two tokens
    r = req(list(range(10, 210)), temperature=0.0, max_tokens=1)
    events = run(eng, [r])
    [done] = done_events(events, r.request_id)
    assert len(done.token_ids) == 1
    assert prefill_passes() == 1 + passes
    while eng.has_work():  # the busy one ends: nothing decodes
        eng.step()
    lone = req(list(range(10, 210)), temperature=0.0, max_tokens=1)
    run(eng, [lone])
    assert prefill_passes() == 2 + passes
