"""The engine's side of the vLLM surface: real top log-probs (generated and teacher-forced)
and pause / resume in its three modes, on the tiny demo model."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from _engine_helpers import done_events, make_engine as _make_engine, run, teacher_forced_logits
from mlxsup.ipc.messages import (
    FINISH_ABORT,
    MAX_TOP_LOGPROBS,
    GenerateRequest,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    SequenceDone,
)

pytestmark = pytest.mark.timeout(180)

_ids = iter(range(1, 10**9))


make_engine = functools.partial(_make_engine, max_batch=8)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


def req(prompt, n=1, **params):
    return GenerateRequest(next(_ids), prompt, SamplingParams(**params), n)


def per_token(flat, k):
    return [flat[i:i + k] for i in range(0, len(flat), k)]


def reference_top(row, k, temperature, top_k, mode):
    """float64 top-k of one position's distribution (raw, or processed with T and top-k)."""
    row = np.asarray(row, dtype=np.float64)
    if mode == "processed":
        z = row / temperature
        if top_k:
            z[z < np.sort(z)[::-1][top_k - 1]] = -np.inf
    else:
        z = row
    fin = z[np.isfinite(z)]
    lp = z - (fin.max() + np.log(np.exp(fin - fin.max()).sum()))
    order = np.argsort(-lp, kind="stable")[:k]
    return order, lp[order]


@pytest.mark.parametrize("mode,temperature,top_k", [("raw", 1.0, 0), ("processed", 0.8, 5),
                                                    ("processed", 1.3, 0)])
def test_top_logprobs_are_the_k_most_likely_of_the_distribution(engine, mode, temperature,
                                                                top_k):
    prompt = [5, 9, 14, 200, 31]
    k = 6
    r = req(prompt, n=3, temperature=temperature, top_k=top_k, max_tokens=12, seed=7,
            logprobs_mode=mode, top_logprobs=k)
    # a row without top log-probs shares the batch: its output carries none
    plain = req([7, 8, 9], temperature=1.0, max_tokens=12, logprobs_mode=mode)
    events = run(engine, [r, plain])
    assert not done_events(events, plain.request_id)[0].top_ids
    for done in done_events(events, r.request_id):
        assert len(done.top_ids) == len(done.top_logprobs) == k * len(done.token_ids)
        logits = teacher_forced_logits(engine.model, prompt, done.token_ids)
        for t, (tok, lp, ids, lps) in enumerate(zip(done.token_ids, done.logprobs,
                                                    per_token(done.top_ids, k),
                                                    per_token(done.top_logprobs, k))):
            want_ids, want_lps = reference_top(logits[t], k, temperature, top_k, mode)
            finite = [i for i, v in enumerate(want_lps) if np.isfinite(v)]
            assert list(ids[:len(finite)]) == list(want_ids[:len(finite)])
            np.testing.assert_allclose(lps[:len(finite)], want_lps[:len(finite)], atol=1e-4)
            assert all(v == -math.inf for v in lps[len(finite):])
            assert sum(math.exp(v) for v in lps) <= 1 + 1e-4
            assert lps == sorted(lps, reverse=True)
            if tok in ids:  # the sampled token's entry is its reported log-prob
                assert abs(lps[ids.index(tok)] - lp) < 1e-4
            else:
                assert lp <= lps[-1] + 1e-4


def test_greedy_processed_top_is_the_point_mass(engine):
    r = req([4, 5, 6], temperature=0.0, max_tokens=5, logprobs_mode="processed", top_logprobs=3)
    done = done_events(run(engine, [r]), r.request_id)[0]
    for tok, ids, lps in zip(done.token_ids, per_token(done.top_ids, 3),
                             per_token(done.top_logprobs, 3)):
        assert ids[0] == tok and lps[0] == 0.0 and lps[1:] == [-math.inf, -math.inf]


def test_score_top_logprobs_match_the_forward_pass(engine):
    prompt, completion = [3, 17, 42], [8, 99, 150, 7]
    s = ScoreRequest(next(_ids), prompt, completion, "raw", top_logprobs=MAX_TOP_LOGPROBS)
    result = next(e for e in run(engine, [s])[s.request_id] if isinstance(e, ScoreResult))
    k = MAX_TOP_LOGPROBS
    logits = teacher_forced_logits(engine.model, prompt, completion)
    for t, (ids, lps) in enumerate(zip(per_token(result.top_ids, k),
                                       per_token(result.top_logprobs, k))):
        want_ids, want_lps = reference_top(logits[t], k, 1.0, 0, "raw")
        assert list(ids) == list(want_ids)
        np.testing.assert_allclose(lps, want_lps, atol=1e-4)
        tok = completion[t]
        if tok in ids:
            assert abs(lps[ids.index(tok)] - result.logprobs[t]) < 1e-4


def _step_until(engine, cond, events, max_steps=10000):
    for _ in range(max_steps):
        if cond():
            return
        events += engine.step()
    raise AssertionError("condition not reached")


def test_pause_keep_freezes_rows_and_resume_gives_the_same_sequences(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    params = dict(temperature=1.0, max_tokens=24, seed=11, logprobs_mode="raw")
    reference = done_events(run(eng, [r := req([5, 6, 7], n=3, **params)]), r.request_id)
    r2 = req([5, 6, 7], n=3, **params)
    eng.submit(r2)
    events: list = []
    before = eng.counters["tokens_generated"]
    _step_until(eng, lambda: eng.counters["tokens_generated"] >= before + 15, events)
    eng.pause("keep")
    late = req([9, 9, 9], max_tokens=4)
    eng.submit(late)  # arrives while paused: waits
    frozen = eng.counters["tokens_generated"]
    assert not eng.has_work() and eng.wait_hint() is None
    for _ in range(5):
        events += eng.step()
    assert eng.counters["tokens_generated"] == frozen
    assert eng.runner.num_rows == 3  # the rows and their caches are still there
    eng.resume()
    pending = {r2.request_id: 3, late.request_id: 1}
    while any(pending.values()):
        for ev in eng.step():
            events.append(ev)
            if isinstance(ev, SequenceDone) and ev.request_id in pending:
                pending[ev.request_id] -= 1
    got = sorted((e for e in events if isinstance(e, SequenceDone) and e.request_id == r2.request_id),
                 key=lambda e: e.seq_index)
    assert [d.token_ids for d in got] == [d.token_ids for d in reference]
    np.testing.assert_allclose([x for d in got for x in d.logprobs],
                               [x for d in reference for x in d.logprobs], atol=1e-5)


def test_pause_wait_finishes_in_flight_and_admits_nothing(tiny_model_dir):
    eng = make_engine(tiny_model_dir, max_batch=2)
    running = req([5, 6, 7], n=3, temperature=1.0, max_tokens=10)  # n > max_batch: partly admitted
    eng.submit(running)
    events = eng.step()
    eng.pause("wait")
    later = req([1, 2, 3], max_tokens=3)
    score = ScoreRequest(next(_ids), [1, 2], [3])
    eng.submit(later)
    eng.submit(score)
    _step_until(eng, lambda: eng.is_drained, events)
    done = [e for e in events if isinstance(e, SequenceDone)]
    assert sorted(e.seq_index for e in done if e.request_id == running.request_id) == [0, 1, 2]
    assert all(e.finish_reason != FINISH_ABORT for e in done)
    assert not any(e.request_id in (later.request_id, score.request_id) for e in events)
    assert not eng.has_work()
    eng.resume()  # the queued ones run now
    events = []
    _step_until(eng, lambda: not eng.has_work(), events)
    assert any(isinstance(e, SequenceDone) and e.request_id == later.request_id for e in events)
    assert any(isinstance(e, ScoreResult) and e.request_id == score.request_id for e in events)


def test_pause_abort_ends_in_flight_with_their_tokens(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    r = req([5, 6, 7], n=2, temperature=1.0, max_tokens=50)
    eng.submit(r)
    events: list = []
    _step_until(eng, lambda: eng.counters["tokens_generated"] >= 6, events)
    assert eng.pause("abort") == 1
    events += eng.step()
    done = [e for e in events if isinstance(e, SequenceDone)]
    assert len(done) == 2 and all(e.finish_reason == FINISH_ABORT for e in done)
    assert all(len(e.token_ids) >= 1 for e in done)
    assert eng.is_drained and eng.paused == "abort"


def test_top_logprobs_build_no_compiled_sampler_and_leave_the_tokens_unchanged(
        tiny_model_dir, monkeypatch):
    """Where the sampler is compiled, rows asking for top log-probs build no sampler of their
    own and trace none (the top-k runs beside it), and every row's tokens are the ones it gets
    without top log-probs."""
    from mlxsup.engine import sampling

    monkeypatch.setattr(sampling, "COMPILE", True)
    monkeypatch.setattr(sampling, "_compiled", {})
    eng = make_engine(tiny_model_dir)
    built = set(sampling._compiled)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]

    def batch(top):
        reqs = [req(p, temperature=t, max_tokens=10, seed=i, logprobs_mode="raw",
                    top_logprobs=top if i != 1 else 0)
                for i, (p, t) in enumerate(zip(prompts, (1.0, 0.0, 1.0)))]
        events = run(eng, reqs)
        return [done_events(events, r.request_id)[0] for r in reqs]

    plain = batch(0)
    traces = sampling.traces
    with_top = batch(5)
    assert sampling.traces == traces and set(sampling._compiled) == built
    assert [d.token_ids for d in with_top] == [d.token_ids for d in plain]
    assert with_top[0].top_ids and not with_top[1].top_ids
