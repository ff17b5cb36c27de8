"""A sharded engine served end to end: `mlxsup start --ranks 2` (two mx.distributed ranks over
the ring backend on loopback, CPU), real gunicorn workers, real HTTP. Greedy generation and
/score equal a one-rank server's; a swap commits on every rank in each mode; a follower rank
SIGKILLed under load restarts the whole group and every request ends with a result or the
retryable 503 of an engine crash. Run under `flock /tmp/mlxsup-heavy.lock` (it starts servers)."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest
from e2e_support import free_port, load_until, make_adapter, mlxsup, running_server, wait_for

from mlxsup.supervisor.children import orphans
from mlxsup.supervisor.rundir import is_owned

from mlxsup.supervisor.ranks import RANK_FILES

pytestmark = pytest.mark.timeout(300)

PROMPTS = [[5, 6, 7, 8], [9, 10], list(range(3, 30))]
GREEDY = {"prompt_ids": PROMPTS, "max_tokens": 12, "temperature": 0.0, "logprobs": 1,
          "logprobs_mode": "raw", "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("sharded"), tiny_model_dir, "--ranks", "2",
                        "--max-tokens", "32", workers=2) as srv:  # fmt: skip
        yield srv
    assert not [n for n in RANK_FILES if os.path.exists(os.path.join(srv.run_dir, n))]


def _ranks(server) -> list[dict]:
    return server.status()["engine"]["ranks"]


def _generate_and_score(url: str) -> tuple[list, list]:
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/generate", json=GREEDY)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        scores = []
        for prompt, res in zip(PROMPTS, results):
            s = c.post("/score", json={"prompt_ids": prompt, "completion_ids": res["completion_ids"],
                                       "logprobs_mode": "raw"})
            assert s.status_code == 200, s.text
            scores.append(s.json()["logprobs"])
    return results, scores


def test_status_lists_every_rank(server):
    st = server.status()
    engine = st["engine"]
    assert engine["num_ranks"] == 2 and engine["distributed_backend"] == "ring"
    rows = engine["ranks"]
    assert [r["rank"] for r in rows] == [0, 1] and all(r["alive"] for r in rows)
    assert rows[0]["pid"] == engine["pid"] == server.pids("engine")[0]
    assert server.pids("rank-1") == [rows[1]["pid"]]
    follower = psutil.Process(rows[1]["pid"]).cmdline()
    assert "--follower" in follower and "ring" in follower
    text = mlxsup("status", "--run-dir", server.run_dir, check=True).stdout
    assert f"ranks:          2 over ring: 0 127.0.0.1 pid {rows[0]['pid']} alive, " \
           f"1 127.0.0.1 pid {rows[1]['pid']} alive" in text


def _swap(url: str, adapter) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/load_adapter", json={"adapter_path": adapter, "mode": "drain"})
        assert r.status_code == 200, r.text


def test_greedy_generation_and_score_equal_one_rank(server, tiny_model_dir, tmp_path):
    """On the base weights and after a LoRA adapter swap (prepared on both ranks)."""
    adapter = make_adapter(tmp_path / "adapter", tiny_model_dir, seed=3)
    two = [_generate_and_score(server.url)]
    _swap(server.url, adapter)
    two.append(_generate_and_score(server.url))
    _swap(server.url, None)
    with running_server(tmp_path / "one", tiny_model_dir, "--max-tokens", "32", workers=1) as single:
        assert single.status()["engine"]["num_ranks"] == 1
        one = [_generate_and_score(single.url)]
        _swap(single.url, adapter)
        one.append(_generate_and_score(single.url))
    assert [x["completion_ids"] for x in one[0][0]] != [x["completion_ids"] for x in one[1][0]]
    for (one_res, one_scores), (two_res, two_scores) in zip(one, two):
        for a, b, sa, sb in zip(one_res, two_res, one_scores, two_scores):
            assert a["completion_ids"] == b["completion_ids"] and len(a["completion_ids"]) == 12
            assert max(abs(p - q) for p, q in zip(a["logprobs"], b["logprobs"])) <= 1e-4
            assert max(abs(p - q) for p, q in zip(sa, sb)) <= 1e-4
            assert max(abs(p - q) for p, q in zip(sb, b["logprobs"])) <= 1e-4  # /score = generation


def test_a_swap_in_each_mode_commits_on_every_rank(server):
    before, _ = _generate_and_score(server.url)
    version = server.version()
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for mode in ("drain", "abort", "inflight"):
            answer = {}

            def long_request():  # in flight while the swap commits
                answer["r"] = c.post("/generate", json={"prompt_ids": [4, 5, 6], "max_tokens": 400,
                                                        "ignore_eos": True, "logprobs": 1})

            t = threading.Thread(target=long_request)
            t.start()
            wait_for(lambda: server.status()["engine"].get("running", 0) > 0 or not t.is_alive(),
                     timeout=60, what="a running row")
            r = c.post("/load_adapter", json={"adapter_path": None, "mode": mode})
            assert r.status_code == 200, r.text
            version += 1
            assert r.json()["policy_version"] == version
            t.join(timeout=120)
            res = answer["r"]
            assert res.status_code == 200, res.text
            body = res.json()
            if mode == "drain":  # finished under the old version
                assert body["finish_reason"] == "length" and set(body["token_versions"]) == {version - 1}
            elif mode == "abort":  # ended at the swap (unless it was done before)
                assert body["finish_reason"] == "abort" or set(body["token_versions"]) == {version - 1}
            else:
                assert body["token_versions"] == sorted(body["token_versions"])
    st = server.status()
    assert st["policy_version"] == st["engine"]["policy_version"] == version
    after, _ = _generate_and_score(server.url)  # the ranks are still in step, on the same weights
    assert [x["completion_ids"] for x in after] == [x["completion_ids"] for x in before]
    assert all(x["metadata"]["current_policy_version"] == version for x in after)


def test_a_follower_sigkilled_under_load_restarts_the_group(server):
    before = server.status()["engine"]
    old = {r["rank"]: r["pid"] for r in before["ranks"]}
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=load_until, args=(server, stop, results, k, 24, 90.0)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 4, timeout=60, what="load to start")
        os.kill(old[1], signal.SIGKILL)
        killed_at = len(results)
        wait_for(lambda: (e := server.status()["engine"])["epoch"] == before["epoch"] + 1 and e["ready"],
                 timeout=120, what="the group to restart")  # fmt: skip
        wait_for(lambda: len(results) >= killed_at + 8, timeout=90, what="requests after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request hangs"
    failures = [r for r in results if r[0] not in (200, 503)]
    assert not failures, failures[:3]
    for status_code, headers, body in results:
        if status_code == 503:  # an engine crash's answer to a request already under way
            assert "retry-after" in {k.lower() for k in headers}, body
        else:
            assert body["completion_ids"] and len(body["logprobs"]) == len(body["completion_ids"])
    num_ok = sum(1 for r in results if r[0] == 200)
    print(f"{num_ok} answered, {len(results) - num_ok} retryable 503s across the follower kill")
    assert num_ok > 8
    engine = server.status()["engine"]
    assert engine["restarts"] == before["restarts"] + 1
    new = {r["rank"]: r["pid"] for r in engine["ranks"]}
    assert all(r["alive"] for r in engine["ranks"]) and not set(new.values()) & set(old.values())
    assert not psutil.pid_exists(old[0]) or psutil.Process(old[0]).status() == psutil.STATUS_ZOMBIE
    time.sleep(0.5)
    with server.client() as c:  # the new group serves
        r = c.post("/generate", json={"prompt": "after the restart", "max_tokens": 8})
        assert r.status_code == 200, r.text


def test_a_group_that_cannot_join_is_a_boot_failure(tiny_model_dir, tmp_path):
    """No CUDA here, so NCCL cannot initialize: `start` says so and exits 3, nothing is left."""
    run_dir = str(tmp_path / "run")
    out = mlxsup("start", "--model", tiny_model_dir, "--host", "127.0.0.1", "--port", str(free_port()),
                 "--run-dir", run_dir, "--workers", "1", "--ranks", "2", "--distributed-backend", "nccl",
                 timeout=200)  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "the engine failed to start" in out.stderr and "nccl" in out.stderr
    assert not is_owned(run_dir) and orphans(run_dir) == []
    assert not [n for n in RANK_FILES if os.path.exists(os.path.join(run_dir, n))]
