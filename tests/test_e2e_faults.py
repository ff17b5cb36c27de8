"""Faults end to end: SIGKILL of the engine under load (every request ends with a result or a
retryable 503, none hangs, the server comes back on the same version) and SIGKILL of an API
worker (gunicorn replaces it and the new worker reuses its IPC slot)."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from e2e_support import load_until, make_adapter, running_server, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def start_adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("start-adapter") / "a", tiny_model_dir, seed=21)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, start_adapter):
    with running_server(tmp_path_factory.mktemp("e2e-faults"), tiny_model_dir, "--max-tokens", "64",
                        "--adapter-path", start_adapter, workers=2) as srv:  # fmt: skip
        yield srv


def test_started_on_the_adapter_path_as_version_0(server, start_adapter):
    st = server.status()
    assert st["policy_version"] == 0 and st["adapter"] == start_adapter
    assert st["engine"]["adapter_id"] == start_adapter
    with server.client() as c:
        assert c.get("/adapter").json()["policy_version"] == 0


def test_engine_sigkill_under_load(server, tiny_model_dir, tmp_path):
    with server.client() as c:
        adapter = make_adapter(tmp_path / "adapter", tiny_model_dir, seed=4)
        r = c.post("/load_adapter", json={"adapter_path": adapter})
        assert r.status_code == 200, r.text
        version = r.json()["policy_version"]
    before = server.status()["engine"]
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=load_until, args=(server, stop, results, k, 48, 60.0)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 6, timeout=60, what="load to start")
        os.kill(server.pids("engine")[0], signal.SIGKILL)
        killed_at = len(results)
        time.sleep(1.0)
        wait_for(lambda: server.status()["engine"]["epoch"] == before["epoch"] + 1 and server.status()["engine"]["ready"],
                 timeout=90, what="engine restart")  # fmt: skip
        wait_for(lambda: len(results) >= killed_at + 12, timeout=60, what="requests after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hangs"
    failures = [r for r in results if r[0] not in (200, 503)]
    assert not failures, failures[:3]
    for status_code, headers, body in results:
        if status_code == 503:
            assert "retry-after" in {k.lower() for k in headers}, body
            assert body["error"]["type"] and body["error"]["message"]
        else:
            assert body["completion_ids"] and len(body["logprobs"]) == len(body["completion_ids"])
    num_ok = sum(1 for r in results if r[0] == 200)
    print(f"{num_ok} answered, {len(results) - num_ok} retryable 503s across the engine kill")
    assert num_ok > 12

    st = server.status()
    assert st["engine"]["restarts"] == before["restarts"] + 1
    assert st["policy_version"] == version and st["engine"]["policy_version"] == version
    with server.client() as c:
        wait_for(lambda: c.get("/health").status_code == 200, timeout=30, what="healthy")
        r = c.post("/generate", json={"prompt": "after the restart", "max_tokens": 8})
        assert r.status_code == 200 and r.json()["metadata"]["current_policy_version"] == version
        m = c.get("/metrics").json()
        assert m["engine_restarts"] == before["restarts"] + 1 and m["current_policy_version"] == version


def _worker_slots(server, tries: int = 80) -> dict:
    """pid -> IPC slot of each API worker, from /metrics on fresh connections."""
    seen = {}
    for _ in range(tries):
        with httpx.Client(base_url=server.url, timeout=10) as c:
            worker = c.get("/metrics").json()["worker"]
        if worker["slot"] is not None:
            seen[worker["pid"]] = worker["slot"]
        if set(seen) >= set(server.pids("api-worker")):
            break
    return seen


def test_api_worker_sigkill_is_replaced_and_its_slot_reused(server):
    workers = server.pids("api-worker")
    assert len(workers) == 2
    slots = _worker_slots(server)
    assert set(slots) == set(workers), slots
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    new = wait_for(lambda: (w := set(server.pids("api-worker"))) and len(w) == 2 and victim not in w and w - set(workers),
                   timeout=60, what="gunicorn to replace the worker")  # fmt: skip
    (new_pid,) = new
    after = wait_for(lambda: (s := _worker_slots(server)) and new_pid in s and s, timeout=60, what="the new worker's slot")
    assert after[new_pid] == slots[victim]  # the dead worker's slot is claimed again
    with server.client() as c:
        for i in range(6):
            r = c.post("/generate", json={"prompt": f"still fine {i}", "max_tokens": 8})
            assert r.status_code == 200, r.text
    assert server.status()["engine"]["restarts"] <= 1  # the engine did not notice


def test_sighup_reloads_the_workers(server):
    workers = set(server.pids("api-worker"))
    os.kill(server.status()["supervisor_pid"], signal.SIGHUP)
    wait_for(lambda: (w := set(server.pids("api-worker"))) and len(w) == 2 and not (w & workers),
             timeout=60, what="new workers after SIGHUP")  # fmt: skip
    with server.client() as c:
        wait_for(lambda: c.post("/generate", json={"prompt": "after HUP", "max_tokens": 4}).status_code == 200,
                 timeout=30, what="requests after SIGHUP")  # fmt: skip


def test_killed_gunicorn_master_is_restarted(server):
    before = server.status()
    (master,) = server.pids("api-master")
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: server.status()["api_restarts"] == before["api_restarts"] + 1, timeout=60, what="API restart")
    with server.client() as c:
        wait_for(lambda: c.post("/generate", json={"prompt": "new master", "max_tokens": 4}).status_code == 200,
                 timeout=60, what="requests through the new master")  # fmt: skip
    after = server.status()
    assert after["engine"]["epoch"] == before["engine"]["epoch"]  # the engine was not touched
    assert server.pids("api-master") != [master] and len(server.pids("api-worker")) == 2
