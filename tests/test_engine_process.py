"""The engine as the supervisor runs it: a real `python -m mlxsup.engine` subprocess on real
shared-memory IPC and a control socketpair (the test plays supervisor and API worker)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time

import pytest

from mlxsup.config import ServerConfig
from mlxsup.demo import write_random_adapter
from mlxsup.ipc.channel import WorkerChannel
from mlxsup.ipc.layout import IpcLayout
from mlxsup.ipc.messages import (
    AbortRequest,
    ErrorEvent,
    GenerateRequest,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    SequenceDone,
)
from mlxsup.ipc.segments import create_ipc

pytestmark = pytest.mark.timeout(120)


class Control:
    """The supervisor's end of the control socketpair."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def send(self, msg):
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self, timeout=60.0):
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("engine closed the control socket")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def tiny_adapter(path, model_dir, rank=4):
    return write_random_adapter(path, model_dir, seed=0, rank=rank, scale=2.0, std=0.1)


@pytest.fixture
def engine_proc(tiny_model_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = ServerConfig(model=tiny_model_dir, run_dir=run_dir, max_batch=4, flush_interval_ms=1,
                       workers=1, max_queue=8)
    cfg.save()
    layout = IpcLayout(run_dir=run_dir, instance_id=secrets.token_hex(4), num_slots=2)
    resources = create_ipc(layout)
    ours, theirs = socket.socketpair()
    log = open(tmp_path / "engine.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxsup.engine", "--run-dir", run_dir,
         "--control-fd", str(theirs.fileno()), "--epoch", "3"],
        pass_fds=[theirs.fileno()], stdout=log, stderr=subprocess.STDOUT)
    theirs.close()
    try:
        yield proc, Control(ours), layout, resources
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        resources.destroy()
        ours.close()
        print((tmp_path / "engine.log").read_text()[-3000:])


async def collect(ch, requests, until_done=True, timeout=30.0):
    queues = {r.request_id: ch.register(r.request_id) for r in requests}
    for r in requests:
        await ch.send(r)
    out = {}
    for r in requests:
        need = r.n if isinstance(r, GenerateRequest) else 1
        events = []
        while need:
            ev = await asyncio.wait_for(queues[r.request_id].get(), timeout)
            events.append(ev)
            if isinstance(ev, SequenceDone):
                need -= 1
            elif isinstance(ev, (ScoreResult, ErrorEvent)):
                need = 0
        out[r.request_id] = events
    return out


def test_engine_process_end_to_end(engine_proc, tiny_model_dir, tmp_path):
    proc, control, layout, resources = engine_proc
    ready = control.recv()
    assert ready == {"op": "ready", "policy_version": 0, "adapter": None, "epoch": 3}
    snap = resources.control.read()
    assert snap.engine_epoch == 3 and snap.engine_pid == proc.pid and snap.engine_state == "ready"

    async def worker():
        ch = await WorkerChannel.open(layout)
        try:
            rid = ch.new_request_id
            gen = GenerateRequest(rid(), [5, 6, 7], SamplingParams(
                max_tokens=6, temperature=1.0, logprobs_mode="processed", ignore_eos=True), n=3)
            score = ScoreRequest(rid(), [5, 6, 7], [8, 9], "raw")
            bad = GenerateRequest(rid(), [5, 10**6], SamplingParams())
            out = await collect(ch, [gen, score, bad])
            dones = out[gen.request_id]
            assert len(dones) == 3 and all(len(d.token_ids) == 6 and d.versions == [0] * 6
                                           for d in dones)
            [res] = out[score.request_id]
            assert isinstance(res, ScoreResult) and len(res.logprobs) == 2
            [err] = out[bad.request_id]
            assert err.code == "invalid" and err.field == "prompt_ids"

            # Abort by id: the sequence ends with its tokens so far.
            long = GenerateRequest(rid(), [3], SamplingParams(max_tokens=4000))
            q = ch.register(long.request_id)
            await ch.send(long)
            await asyncio.sleep(0.3)
            await ch.send(AbortRequest(long.request_id))
            ev = await asyncio.wait_for(q.get(), 10)
            assert isinstance(ev, SequenceDone) and ev.finish_reason == "abort"

            # An adapter swap, then a refused one; versions follow.
            loop = asyncio.get_running_loop()
            control.send({"op": "swap", "id": 1, "path": tiny_adapter(tmp_path / "a", tiny_model_dir),
                          "mode": "drain", "version": 1})
            reply = await loop.run_in_executor(None, control.recv)
            assert reply["ok"] and reply["id"] == 1 and reply["policy_version"] == 1
            assert reply["commit_ms"] < 5
            control.send({"op": "swap", "id": 2, "path": str(tmp_path / "missing"),
                          "mode": "inflight", "version": 2})
            reply = await loop.run_in_executor(None, control.recv)
            assert not reply["ok"] and reply["error"]["type"] == "not_found"
            os.makedirs(tmp_path / "broken")
            control.send({"op": "swap", "id": 3, "path": str(tmp_path / "broken"),
                          "mode": "inflight", "version": 2})
            reply = await loop.run_in_executor(None, control.recv)
            assert not reply["ok"] and reply["error"]["type"] == "invalid_adapter"
            assert "adapter_config.json" in reply["error"]["message"]
            again = GenerateRequest(rid(), [5, 6, 7], SamplingParams(max_tokens=4))
            out = await collect(ch, [again])
            assert out[again.request_id][0].versions == [1] * 4
        finally:
            await ch.close()

    asyncio.run(worker())
    time.sleep(0.5)  # idle: heartbeats keep coming
    snap = resources.control.read()
    assert snap.heartbeat_age_s() < 0.4
    assert snap.policy_version == 1 and snap.adapter_id.endswith("/a") and snap.num_swaps == 1
    assert snap.tokens_generated >= 22 and snap.num_requests == 4  # the invalid one was refused

    control.send({"op": "stop", "drain": True})
    assert proc.wait(timeout=20) == 0
    assert resources.control.read().engine_state == "down"


def test_engine_process_restarts_on_committed_state_and_new_worker_aborts_old(
        engine_proc, tiny_model_dir, tmp_path):
    proc, control, layout, resources = engine_proc
    control.recv()
    control.send({"op": "stop", "drain": False})
    assert proc.wait(timeout=20) == 0

    # A restarted engine serves the committed adapter and version from adapter_state.json.
    path = tiny_adapter(tmp_path / "b", tiny_model_dir)
    with open(os.path.join(layout.run_dir, "adapter_state.json"), "w") as f:
        json.dump({"adapter_path": path, "policy_version": 4}, f)
    ours, theirs = socket.socketpair()
    proc2 = subprocess.Popen(
        [sys.executable, "-m", "mlxsup.engine", "--run-dir", layout.run_dir,
         "--control-fd", str(theirs.fileno()), "--epoch", "4"], pass_fds=[theirs.fileno()])
    theirs.close()
    ctl = Control(ours)
    try:
        assert ctl.recv() == {"op": "ready", "policy_version": 4, "adapter": path, "epoch": 4}

        async def workers():
            ch = await WorkerChannel.open(layout)
            long = GenerateRequest(ch.new_request_id(), [3], SamplingParams(max_tokens=4000))
            await ch.send(long)
            await asyncio.sleep(0.3)
            slot = ch.slot
            await ch.close()
            ch2 = await WorkerChannel.open(layout)  # same slot, next generation: Hello
            assert ch2.slot == slot
            await asyncio.sleep(0.3)
            snap = resources.control.read()
            assert snap.num_running == 0  # the dead worker's sequence was aborted
            r = GenerateRequest(ch2.new_request_id(), [4, 5], SamplingParams(max_tokens=3))
            out = await collect(ch2, [r])
            assert out[r.request_id][0].versions == [4, 4, 4]
            await ch2.close()

        asyncio.run(workers())
        proc2.send_signal(15)
        assert proc2.wait(timeout=20) == 0
    finally:
        if proc2.poll() is None:
            proc2.kill()
        ours.close()
