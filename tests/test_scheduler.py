"""The scheduler's policy, without a model: admission, flush interval, queue bound, version
holds, partial admission of large groups and when swaps commit."""

from __future__ import annotations

import sys

import pytest

from mlxsup.engine.scheduler import Scheduler, QueueFull
from mlxsup.engine.sequence import RequestState, Sequence, SeqStatus
from mlxsup.ipc.messages import GenerateRequest, SamplingParams, ScoreRequest

pytestmark = pytest.mark.timeout(30)

_ids = iter(range(10**6))


def gen(n=1, prompt_len=4, arrival=0.0, min_version=-1, deadline=1e9) -> RequestState:
    rid = next(_ids)
    state = RequestState(
        GenerateRequest(rid, [1] * prompt_len, SamplingParams(), n, min_policy_version=min_version),
        arrival,
    )
    state.hold_deadline = deadline
    state.seqs = [Sequence(rid * 100 + i, state, i, 16, 0) for i in range(n)]
    return state


def score(arrival=0.0, n_tokens=4) -> RequestState:
    return RequestState(ScoreRequest(next(_ids), [1] * n_tokens, [2] * n_tokens), arrival)


def admitted(plan):
    return [(s.request_id, len(seqs)) for s, seqs in plan.admit]


def test_scheduler_never_imports_mlx():
    assert "mlx.core" not in vars(sys.modules["mlxsup.engine.scheduler"])
    src = open(sys.modules["mlxsup.engine.scheduler"].__file__).read()
    assert "import mlx" not in src


def test_idle_engine_waits_for_flush_interval_then_admits():
    s = Scheduler(max_batch=4, max_queue=8, flush_interval_s=0.010)
    a = gen(arrival=0.0)
    s.add(a)
    assert s.schedule(0.005, 0).admit == []
    assert s.wait_hint(0.005, 0) == pytest.approx(0.005)
    plan = s.schedule(0.011, 0)
    assert admitted(plan) == [(a.request_id, 1)]
    assert s.num_running == 1


def test_full_batch_of_waiting_samples_starts_at_once():
    s = Scheduler(max_batch=4, max_queue=8, flush_interval_s=10.0)
    reqs = [gen(n=2, arrival=0.0), gen(n=2, arrival=0.0)]
    for r in reqs:
        s.add(r)
    assert len(s.schedule(0.0, 0).admit) == 2


def test_busy_engine_admits_at_next_step_without_waiting():
    s = Scheduler(max_batch=4, max_queue=8, flush_interval_s=10.0)
    s.add(gen(arrival=0.0))
    s.schedule(100.0, 0)
    late = gen(arrival=100.0)
    s.add(late)
    assert admitted(s.schedule(100.0, 0)) == [(late.request_id, 1)]


def test_max_batch_counts_every_sample_and_big_groups_split():
    s = Scheduler(max_batch=5, max_queue=8, flush_interval_s=0)
    g = gen(n=8)
    s.add(g)
    plan = s.schedule(0.0, 0)
    assert admitted(plan) == [(g.request_id, 5)]
    assert g.is_partially_admitted and s.queue_depth == 1
    for seq in g.seqs[:2]:
        s.finish(seq)
    plan = s.schedule(0.0, 0)
    assert admitted(plan) == [(g.request_id, 2)]
    assert s.num_running == 5 and g.num_unadmitted == 1


def test_queue_bound_holds():
    s = Scheduler(max_batch=1, max_queue=3, flush_interval_s=0)
    for _ in range(3):
        s.add(gen())
    with pytest.raises(QueueFull):
        s.add(gen())
    s.schedule(0.0, 0)  # one admitted: room for one more
    s.add(gen())
    with pytest.raises(QueueFull):
        s.add(score())


def test_prefill_budget_limits_admissions_per_step():
    s = Scheduler(max_batch=8, max_queue=8, flush_interval_s=0, max_prefill_tokens=10)
    reqs = [gen(prompt_len=8), gen(prompt_len=8), gen(prompt_len=1)]
    for r in reqs:
        s.add(r)
    plan = s.schedule(0.0, 0)
    # The first always passes; the second would exceed the budget; the third fits.
    assert admitted(plan) == [(reqs[0].request_id, 1), (reqs[2].request_id, 1)]
    assert admitted(s.schedule(0.0, 0)) == [(reqs[1].request_id, 1)]


def test_min_policy_version_holds_without_blocking_others_then_expires():
    s = Scheduler(max_batch=4, max_queue=8, flush_interval_s=0)
    held = gen(min_version=3, deadline=5.0)
    free = gen()
    s.add(held)
    s.add(free)
    plan = s.schedule(1.0, 2)
    assert admitted(plan) == [(free.request_id, 1)]
    assert s.schedule(4.0, 2).expired == []
    assert s.schedule(5.0, 2).expired == [held]
    assert s.queue_depth == 0


def test_held_request_runs_once_version_reached():
    s = Scheduler(max_batch=4, max_queue=8, flush_interval_s=0)
    held = gen(min_version=1, deadline=5.0)
    s.add(held)
    assert s.schedule(1.0, 0).admit == []
    s.request_swap("inflight", 1)
    plan = s.schedule(6.0, 0)  # past the deadline, but the pending swap reaches version 1
    assert plan.commit_swap and plan.expired == []
    assert admitted(plan) == [(held.request_id, 1)]


def test_drain_waits_for_running_and_partial_groups_and_admits_nothing_new():
    s = Scheduler(max_batch=2, max_queue=8, flush_interval_s=0)
    g = gen(n=3)
    s.add(g)
    s.schedule(0.0, 0)
    s.request_swap("drain", 1)
    newcomer = gen()
    s.add(newcomer)
    for seq in g.seqs[:2]:
        s.finish(seq)
    plan = s.schedule(0.0, 0)
    assert not plan.commit_swap
    assert admitted(plan) == [(g.request_id, 1)]  # the group's last sample, not newcomer
    s.finish(g.seqs[2])
    plan = s.schedule(0.0, 0)
    assert plan.commit_swap
    assert admitted(plan) == [(newcomer.request_id, 1)]


def test_abort_mode_hands_back_running_requests_and_commits_at_once():
    s = Scheduler(max_batch=2, max_queue=8, flush_interval_s=0)
    g = gen(n=3)
    other = gen()
    s.add(g)
    s.schedule(0.0, 0)
    s.add(other)
    s.request_swap("abort", 1)
    plan = s.schedule(0.0, 0)
    assert plan.commit_swap and plan.swap_aborted == [g]
    assert s.num_running == 1 and admitted(plan) == [(other.request_id, 1)]


def test_inflight_commits_at_next_boundary_and_only_one_swap_pending():
    s = Scheduler(max_batch=2, max_queue=8, flush_interval_s=0)
    s.add(gen())
    s.schedule(0.0, 0)
    s.request_swap("inflight", 1)
    with pytest.raises(RuntimeError):
        s.request_swap("drain", 2)
    plan = s.schedule(0.0, 0)
    assert plan.commit_swap and plan.swap_aborted == [] and s.num_running == 1


def test_inflight_commit_step_decodes_the_running_rows_alone():
    s = Scheduler(max_batch=8, max_queue=8, flush_interval_s=0)
    s.add(gen())
    s.schedule(0.0, 0)
    s.request_swap("inflight", 1)
    waiting_for_it = gen(min_version=1, prompt_len=100)
    newcomer, sc = gen(prompt_len=100), score()
    for r in (waiting_for_it, newcomer, sc):
        s.add(r)
    plan = s.schedule(0.0, 0)
    assert plan.commit_swap and plan.admit == [] and plan.scores == [] and s.num_running == 1
    plan = s.schedule(0.0, 1)  # the next step admits them all
    assert sorted(admitted(plan)) == sorted([(waiting_for_it.request_id, 1), (newcomer.request_id, 1)])
    assert plan.scores == [sc]
    # Nothing running: nothing to keep waiting, the commit step admits at once.
    idle = Scheduler(max_batch=8, max_queue=8, flush_interval_s=0)
    idle.request_swap("inflight", 1)
    probe = gen(min_version=1)
    idle.add(probe)
    plan = idle.schedule(0.0, 0)
    assert plan.commit_swap and admitted(plan) == [(probe.request_id, 1)]


def test_scores_batched_within_token_budget():
    s = Scheduler(max_batch=1, max_queue=8, flush_interval_s=0, max_score_tokens=20)
    reqs = [score(n_tokens=4), score(n_tokens=4), score(n_tokens=20)]
    for r in reqs:
        s.add(r)
    assert s.schedule(0.0, 0).scores == reqs[:2]
    assert s.schedule(0.0, 0).scores == reqs[2:]


def test_finish_reports_last_sequence_of_request():
    s = Scheduler(max_batch=4, max_queue=8, flush_interval_s=0)
    g = gen(n=2)
    s.add(g)
    s.schedule(0.0, 0)
    assert s.finish(g.seqs[0]) is False
    assert s.finish(g.seqs[1]) is True
    assert g.seqs[1].status == SeqStatus.FINISHED and not s.has_work()


# ------------------------------------------------------------------ KV budget


def test_kv_budget_admits_what_fits_and_the_rest_waits_in_order():
    from mlxsup.engine.scheduler import KV_STEP

    # Each sequence may reach 4 + 16 = 20 positions: a row reserves 20 + KV_STEP.
    row = 20 + KV_STEP
    s = Scheduler(max_batch=16, max_queue=16, flush_interval_s=0, kv_budget_tokens=3 * row)
    group, single, late = gen(n=2), gen(), gen()
    for st in (group, single, late):
        s.add(st)
    plan = s.schedule(0.0, 0)
    assert admitted(plan) == [(group.request_id, 2), (single.request_id, 1)]
    assert s.reserved_kv_tokens() == 3 * row <= s.kv_budget_tokens
    assert admitted(s.schedule(0.0, 0)) == []  # full: `late` waits
    s.finish(group.seqs[0])
    assert admitted(s.schedule(0.0, 0)) == [(late.request_id, 1)]


def test_kv_budget_counts_rows_padded_to_the_longest():
    from mlxsup.engine.scheduler import KV_STEP

    long = gen(prompt_len=200)  # may reach 216 positions
    s = Scheduler(max_batch=16, max_queue=16, flush_interval_s=0,
                  kv_budget_tokens=2 * (216 + KV_STEP) + 10)
    short1, short2 = gen(), gen()
    for st in (long, short1, short2):
        s.add(st)
    # Two rows padded to 216 fit, a third does not, however short its own prompt.
    assert admitted(s.schedule(0.0, 0)) == [(long.request_id, 1), (short1.request_id, 1)]
    assert s.reserved_kv_tokens() == 2 * (216 + KV_STEP)


def test_a_request_that_does_not_fit_holds_back_those_behind_it():
    from mlxsup.engine.scheduler import KV_STEP

    s = Scheduler(max_batch=16, max_queue=16, flush_interval_s=0, kv_budget_tokens=2 * (220 + KV_STEP))
    first, big, small = gen(prompt_len=200), gen(n=2, prompt_len=200), gen()
    for st in (first, big, small):
        s.add(st)
    # `big` gets one row now (a group is admitted in parts); `small` waits behind its rest.
    assert admitted(s.schedule(0.0, 0)) == [(first.request_id, 1), (big.request_id, 1)]
    assert admitted(s.schedule(0.0, 0)) == []
    s.finish(first.seqs[0])
    assert admitted(s.schedule(0.0, 0)) == [(big.request_id, 1)]
