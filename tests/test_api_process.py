"""The API worker as a process: it never imports mlx (nor transformers or torch), and under gunicorn's asgi worker (uvloop)
it serves real HTTP over the real shared-memory IPC, with this test playing the engine (no
model): seed shapes, the openai SDK streaming over SSE, 503 before the engine is ready, and a
client that hangs up getting its request aborted in the engine."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mlxsup.config import ServerConfig
from mlxsup.supervisor.launcher import free_port

pytestmark = pytest.mark.timeout(120)

NO_MLX = r"""
import os, sys
from falcon import testing
from mlxsup.api.app import create_app
from mlxsup.api.testing import FakeEngineLink
from mlxsup.api.textcodec import TextCodec
import mlxsup.api.asgi  # the gunicorn entry point builds the real app (IpcEngineLink)
codec = TextCodec.load(sys.argv[1])
app = create_app(mlxsup.api.asgi.config_from_env(), engine_link=FakeEngineLink(), codec=codec)
client = testing.TestClient(app)
assert client.simulate_post("/generate", json={"prompt": "hi", "logprobs": 1}).status_code == 200
assert client.simulate_post("/generate", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
assert client.simulate_post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "logprobs": True}).status_code == 200
assert client.simulate_post("/v1/completions", json={"prompt": "hi", "logprobs": 2}).status_code == 200
assert testing.TestClient(mlxsup.api.asgi.app).simulate_get("/health").status_code == 503  # no engine
loaded = sorted(m for m in sys.modules if m == "mlx" or m.startswith(("mlx.", "mlx_lm")))
assert not loaded, loaded
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "torch"))
assert not heavy, heavy  # tokenizers and jinja2 do the worker's text work
print("ok", len(sys.modules))
"""


def write_config(run_dir, model, port=0, **kw) -> ServerConfig:
    config = ServerConfig(model=model, run_dir=str(run_dir), port=port, host="127.0.0.1", **kw)
    config.save()
    return config


def test_api_worker_never_imports_mlx(tiny_model_dir, tmp_path):
    write_config(tmp_path / "run", tiny_model_dir)
    env = {**os.environ, "MLXSUP_RUN_DIR": str(tmp_path / "run")}
    out = subprocess.run([sys.executable, "-c", NO_MLX, tiny_model_dir], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


def test_asgi_entry_point_needs_the_run_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLXSUP_RUN_DIR"}
    out = subprocess.run([sys.executable, "-c", "import mlxsup.api.asgi"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode != 0 and "MLXSUP_RUN_DIR" in out.stderr


# ---------------------------------------------------------------------- under gunicorn


class HandEngine(threading.Thread):
    """Plays the engine on the real IPC: answers GenerateRequest with fixed tokens (streamed as
    chunks when asked), keeps the heartbeat, records AbortRequests. `hold` keeps requests
    unanswered."""

    def __init__(self, layout, control):
        super().__init__(daemon=True)
        from mlxsup.ipc.channel import EngineChannel

        self.channel = EngineChannel(layout)
        self.control = control
        self.hold = False
        self.requests = []
        self.aborts = []
        self.stop = threading.Event()

    def run(self):
        from mlxsup.ipc.messages import (AbortRequest, GenerateRequest, ScoreRequest, ScoreResult, SequenceDone,
                                         TokenChunk)

        while not self.stop.is_set():
            self.channel.wait(0.05)
            self.control.write(engine_state="ready", queue_depth=0)  # heartbeat
            for slot, msg in self.channel.poll():
                if isinstance(msg, AbortRequest):
                    self.aborts.append(msg.request_id)
                    continue
                if not isinstance(msg, (GenerateRequest, ScoreRequest)):
                    continue
                self.requests.append(msg)
                if self.hold:
                    continue
                if isinstance(msg, ScoreRequest):
                    self.channel.send(slot, ScoreResult(msg.request_id, [-0.5] * len(msg.completion_ids), 3))
                    continue
                ids = [40 + i for i in range(min(5, msg.params.max_tokens))]
                lps = [-0.25] * len(ids) if msg.params.logprobs_mode != "none" else []
                for seq in range(msg.n):
                    if msg.stream:
                        for i, t in enumerate(ids):
                            self.channel.send(slot, TokenChunk(msg.request_id, seq, [t], lps[i:i + 1], [3]))
                    sent = [] if msg.stream else ids
                    self.channel.send(slot, SequenceDone(
                        msg.request_id, seq, "length", sent, lps if not msg.stream else [], [3] * len(sent),
                        num_prompt_tokens=len(msg.prompt_ids), batch_size=msg.n, policy_version=3))
            self.channel.flush()
        self.channel.close()


@pytest.fixture
def served(tiny_model_dir, tmp_path):
    from mlxsup.ipc.layout import IpcLayout
    from mlxsup.ipc.segments import create_ipc

    run_dir = tmp_path / "run"
    port = free_port()
    write_config(run_dir, tiny_model_dir, port=port, workers=1)
    layout = IpcLayout(run_dir=str(run_dir), instance_id=secrets.token_hex(4), num_slots=2,
                       request_ring_bytes=1 << 16, response_ring_bytes=1 << 16)
    resources = create_ipc(layout)
    log = open(tmp_path / "api.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--worker-class", "asgi", "--asgi-loop", "uvloop", "--workers", "1",
         "--bind", f"127.0.0.1:{port}", "--no-control-socket", "--asgi-disconnect-grace-period", "0",
         "--graceful-timeout", "5", "mlxsup.api.asgi:app"],
        env={**os.environ, "MLXSUP_RUN_DIR": str(run_dir)}, stdout=log, stderr=subprocess.STDOUT,
    )
    engine = None
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "api.log").read_text()
                time.sleep(0.1)
        assert r.status_code == 503 and r.headers["retry-after"]  # the engine is not up yet
        r = httpx.post(f"{url}/generate", json={"prompt": "hi"})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["type"] == "engine_unavailable"
        resources.control.write(engine_epoch=1, engine_state="ready", policy_version=3)
        engine = HandEngine(layout, resources.control)
        engine.start()
        yield url, engine
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if engine is not None:
            engine.stop.set()
            engine.join(5)
        resources.destroy()
        log.close()


def test_under_gunicorn_over_real_ipc(served):
    url, engine = served
    with httpx.Client(base_url=url, timeout=30) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/health").json() == {"status": "healthy", "model_loaded": True}
        body = c.post("/generate", json={"prompt": "What is RL?", "logprobs": 1, "policy_version": 42,
                                         "step_id": 1, "request_id": "r1"}).json()
        assert list(body)[:9] == ["request_id", "policy_version", "step_id", "prompt_ids", "completion_ids", "text",
                                  "logprobs", "finish_reason", "metadata"]
        assert body["completion_ids"] == [40, 41, 42, 43, 44] and body["logprobs"] == [-0.25] * 5
        assert body["metadata"]["current_policy_version"] == 3 and body["generated_by_version"] == 3
        body = c.post("/generate", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 2}).json()
        assert [(r["prompt_index"], r["sample_index"]) for r in body["results"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert c.post("/score", json={"prompt_ids": [1, 2], "completion_ids": [3, 4]}).json()["logprobs"] == [-0.5, -0.5]
        assert c.post("/generate", json={"prompt": "x", "max_token": 1}).status_code == 422
        m = c.get("/metrics").json()
        assert m["engine_epoch"] == 1 and m["worker"]["link_open"] and m["worker"]["slot"] in (0, 1)
        assert c.get("/metrics", headers={"Accept": "text/plain"}).text.startswith("# HELP")

    import openai

    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    done = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       logprobs=True)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True) if ch.choices)
    assert streamed == done.choices[0].message.content and len(done.choices[0].logprobs.content) == 5
    assert engine.requests[-1].stream is True


def test_client_that_hangs_up_gets_its_request_aborted(served):
    url, engine = served
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    engine.hold = True
    num = len(engine.requests)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/generate", json={"prompt": "never answered"}, timeout=1.0)
    rid = engine.requests[num].request_id
    deadline = time.monotonic() + 10
    while rid not in engine.aborts:
        assert time.monotonic() < deadline, "no AbortRequest after the client hung up"
        time.sleep(0.05)


def api_worker() -> "psutil.Process":
    """The one gunicorn worker `served` started (the master is this test's child)."""
    import psutil

    (master,) = [c for c in psutil.Process().children() if "gunicorn" in " ".join(c.cmdline())]
    (worker,) = master.children()
    return worker


def peak_rss(proc) -> int:
    """The process's high-water RSS in bytes (Linux: VmHWM), else its RSS now."""
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))
    except OSError:
        return proc.memory_info().rss


def test_a_32_mib_deeply_nested_body_is_refused_and_the_worker_lives_on_bounded_memory(served):
    url, engine = served
    from mlxsup.api.media import MAX_JSON_BYTES

    worker = api_worker()
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/generate", json={"prompt": "warm up"}).status_code in (200, 503)
        rss_before, peak_before = worker.memory_info().rss, peak_rss(worker)
        depth = (MAX_JSON_BYTES - 64) // 2
        body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
        assert MAX_JSON_BYTES - 64 < len(body) <= MAX_JSON_BYTES  # under the size cap: it is parsed
        r = c.post("/generate", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error"
        assert "more than 1024 deep" in r.json()["error"]["message"]
        r = c.post("/generate", content=b"[" * (MAX_JSON_BYTES + 1))
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
        # the same worker answers on, and held the body a few times over at most (a pre-scan
        # of it with numpy arrays took ~40 bytes per byte: over 1 GiB)
        assert api_worker().pid == worker.pid
        assert c.post("/generate", json={"prompt": "still here"}).status_code in (200, 503)
        growth = max(worker.memory_info().rss - rss_before, peak_rss(worker) - peak_before)
    print(f"growth {growth >> 20} MiB")
    assert growth < 8 * MAX_JSON_BYTES, f"the worker grew by {growth >> 20} MiB"
