"""mlxsup.client: error mapping, retries and wire format against a tiny local HTTP server (real
sockets, no mocks of httpx); then the same client against a real `mlxsup start` server."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import email.utils
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from mlxsup.client import (
    AuthError,
    BadRequestError,
    InferenceClient,
    InferenceError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServerError,
    ServerUnavailableError,
    ValidationError,
    as_results,
)

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ a scripted HTTP server


class Script:
    """What the local server answers: a queue of (status, headers, body) per path; the last
    entry repeats. Every request is recorded."""

    def __init__(self):
        self.routes: dict[str, list] = {}
        self.requests: list[dict] = []
        self.delay = 0.0
        self.lock = threading.Lock()

    def on(self, path, *answers):
        self.routes[path] = list(answers)

    def next(self, path):
        with self.lock:
            answers = self.routes.get(path)
            if not answers:
                return 404, {}, {"error": {"type": "not_found", "message": f"no route {path}", "field": None}}
            return answers.pop(0) if len(answers) > 1 else answers[0]


def _handler(script: Script):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable

        def log_message(self, *args):
            pass

        def _serve(self):
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            with script.lock:
                script.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": raw,
                        "client": self.client_address,
                    }
                )
            if script.delay:
                time.sleep(script.delay)
            status, headers, body = script.next(self.path)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            ctype = "text/plain" if isinstance(body, bytes) else "application/json"
            self.send_header("Content-Type", headers.pop("Content-Type", ctype))
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

    return Handler


@pytest.fixture
def local():
    script = Script()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield script
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run(coro):
    return asyncio.run(coro)


def err(status, etype, message, field=None, headers=None):
    return status, dict(headers or {}), {"error": {"type": etype, "message": message, "field": field}}


SEED_RESULT = {
    "request_id": "r1",
    "policy_version": 42,
    "step_id": 1000,
    "prompt_ids": [1, 2, 3],
    "completion_ids": [4, 5],
    "text": "hi",
    "logprobs": [-0.1, -0.2],
    "finish_reason": "stop",
    "metadata": {"batch_size": 1, "latency_ms": 1.0, "current_policy_version": 0},
}


# ------------------------------------------------------------------ import isolation


def test_import_does_not_pull_mlx_gunicorn_falcon():
    code = (
        "import sys, mlxsup.client\n"
        "bad = [m for m in ('mlx', 'mlx_lm', 'gunicorn', 'falcon') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ wire format


def test_generate_sends_only_given_fields_and_returns_seed_shape(local):
    local.on("/generate", (200, {}, SEED_RESULT))

    async def main():
        async with InferenceClient(local.url) as client:
            result = await client.generate(
                prompt="What is RL?", temperature=0.7, max_tokens=100, policy_version=1, step_id=100,
                stop=("a", "b"), logprobs=1,
            )
            assert result == SEED_RESULT
            assert as_results(result) == [SEED_RESULT]

    run(main())
    body = json.loads(local.requests[0]["body"])
    assert body == {
        "prompt": "What is RL?", "temperature": 0.7, "max_tokens": 100, "policy_version": 1,
        "step_id": 100, "stop": ["a", "b"], "logprobs": 1,
    }
    assert local.requests[0]["headers"]["content-type"] == "application/json"
    assert "authorization" not in local.requests[0]["headers"]


def test_generate_many_prompts_and_extra_fields(local):
    local.on("/generate", (200, {}, {"results": [SEED_RESULT, SEED_RESULT]}))

    async def main():
        async with InferenceClient(local.url) as client:
            results = await client.generate_results(
                prompt_ids=[[1, 2], [3]], n=1, min_policy_version=3, logprobs_mode="raw", future_field=7
            )
            assert len(results) == 2

    run(main())
    body = json.loads(local.requests[0]["body"])
    assert body == {"prompt_ids": [[1, 2], [3]], "n": 1, "min_policy_version": 3,
                    "logprobs_mode": "raw", "future_field": 7}


def test_api_key_and_admin_key_headers(local):
    local.on("/generate", (200, {}, SEED_RESULT))
    local.on("/load_adapter", (200, {}, {"status": "success", "policy_version": 1, "message": "ok"}))

    async def main():
        async with InferenceClient(local.url, api_key="user", admin_key="root") as client:
            await client.generate(prompt="x")
            assert (await client.load_adapter("/a"))["policy_version"] == 1
        async with InferenceClient(local.url, api_key="user") as client:
            await client.load_adapter("/a")

    run(main())
    auth = [r["headers"].get("authorization") for r in local.requests]
    assert auth == ["Bearer user", "Bearer root", "Bearer user"]
    assert json.loads(local.requests[1]["body"]) == {"adapter_path": "/a"}


def test_upload_adapter_sends_both_multipart_fields(local, tmp_path):
    (tmp_path / "adapters.safetensors").write_bytes(b"\x00weights\xff")
    (tmp_path / "adapter_config.json").write_text('{"num_layers": 2}')
    local.on("/upload_adapter", (200, {}, {"status": "success", "policy_version": 5, "message": "ok"}))

    async def main():
        async with InferenceClient(local.url) as client:
            return await client.upload_adapter(str(tmp_path))

    assert run(main())["policy_version"] == 5
    req = local.requests[0]
    raw = b"Content-Type: " + req["headers"]["content-type"].encode() + b"\r\n\r\n" + req["body"]
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True) for p in msg.iter_parts()}
    assert parts == {"adapter_weights": b"\x00weights\xff", "adapter_config": b'{"num_layers": 2}'}


def test_metrics_json_or_text_and_score(local):
    local.on("/metrics", (200, {"Content-Type": "text/plain; version=0.0.4"}, b"mlxsup_requests_total 3\n"))
    local.on("/score", (200, {}, {"logprobs": [-1.0]}))

    async def main():
        async with InferenceClient(local.url) as client:
            assert (await client.metrics(format="prometheus")) == "mlxsup_requests_total 3\n"
            assert (await client.score([1, 2], [3]))["logprobs"] == [-1.0]

    run(main())
    assert local.requests[0]["headers"]["accept"] == "text/plain"
    assert json.loads(local.requests[1]["body"]) == {"prompt_ids": [1, 2], "completion_ids": [3]}


def test_connection_is_reused(local):
    local.on("/health", (200, {}, {"status": "ok"}))

    async def main():
        async with InferenceClient(local.url) as client:
            for _ in range(5):
                await client.health()

    run(main())
    assert len({r["client"] for r in local.requests}) == 1


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "status,cls",
    [
        (400, BadRequestError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (413, PayloadTooLargeError),
        (422, ValidationError),
        (500, ServerError),
        (418, InferenceError),
    ],
)
def test_error_statuses_map_to_typed_exceptions(local, status, cls):
    local.on("/generate", err(status, "some_type", f"message {status}", field="max_token"))

    async def main():
        async with InferenceClient(local.url) as client:
            await client.generate(prompt="x", max_token=3)

    with pytest.raises(cls) as info:
        run(main())
    e = info.value
    assert type(e) is cls
    assert (e.status, e.type, e.message, e.field) == (status, "some_type", f"message {status}", "max_token")
    assert "max_token" in str(e) and f"message {status}" in str(e)
    assert len(local.requests) == 1  # no retry except on 503


def test_non_json_error_body_still_carries_the_text(local):
    local.on("/health", (502, {}, b"<html>Bad Gateway</html>"))

    async def main():
        async with InferenceClient(local.url) as client:
            await client.health()

    with pytest.raises(ServerError, match="Bad Gateway"):
        run(main())


def test_503_is_retried_honouring_retry_after(local):
    local.on(
        "/generate",
        err(503, "overloaded", "queue full", headers={"Retry-After": "0.3"}),
        err(503, "overloaded", "queue full", headers={"Retry-After": "0.3"}),
        (200, {}, SEED_RESULT),
    )

    async def main():
        async with InferenceClient(local.url, backoff_base=0.001) as client:
            t0 = time.monotonic()
            result = await client.generate(prompt="x")
            return result, time.monotonic() - t0, client.num_retries

    result, elapsed, retries = run(main())
    assert result == SEED_RESULT
    assert retries == 2
    assert elapsed >= 0.55  # two waits of Retry-After 0.3 s, not the 1 ms backoff


def test_retry_after_http_date_is_understood(local):
    when = email.utils.formatdate(time.time() + 1.2, usegmt=True)  # whole seconds: 0.2..1.2 s
    local.on("/generate", err(503, "overloaded", "busy", headers={"Retry-After": when}), (200, {}, SEED_RESULT))

    async def main():
        async with InferenceClient(local.url, backoff_base=0.001) as client:
            t0 = time.monotonic()
            await client.generate(prompt="x")
            return time.monotonic() - t0

    assert run(main()) >= 0.1


def test_503_gives_up_after_bounded_attempts(local):
    local.on("/generate", err(503, "overloaded", "engine restarting", headers={"Retry-After": "0"}))

    async def main():
        async with InferenceClient(local.url, max_retries=3) as client:
            await client.generate(prompt="x")

    with pytest.raises(OverloadedError) as info:
        run(main())
    assert info.value.retry_after == 0.0
    assert info.value.message == "engine restarting"
    assert len(local.requests) == 4


def test_backoff_without_retry_after_grows(local):
    local.on("/generate", err(503, "overloaded", "busy"))

    async def main():
        async with InferenceClient(local.url, max_retries=3, backoff_base=0.05) as client:
            t0 = time.monotonic()
            with pytest.raises(OverloadedError) as info:
                await client.generate(prompt="x")
            assert info.value.retry_after is None
            return time.monotonic() - t0

    # waits 0.05, 0.1, 0.2 each with jitter in [50%, 100%]: at least 0.175 s in total
    assert run(main()) >= 0.17


def test_connection_refused_is_retried_then_raised():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there

    async def main():
        async with InferenceClient(f"http://127.0.0.1:{port}", max_retries=2, backoff_base=0.01) as client:
            try:
                await client.health()
            finally:
                assert client.num_retries == 2

    with pytest.raises(ServerUnavailableError, match="cannot connect"):
        run(main())


def test_timeout_raises_server_unavailable(local):
    local.on("/generate", (200, {}, SEED_RESULT))
    local.delay = 1.0

    async def main():
        async with InferenceClient(local.url) as client:
            await client.generate(prompt="x", timeout=0.2)

    with pytest.raises(ServerUnavailableError, match="timed out"):
        run(main())


def test_wait_until_ready_polls_until_healthy(local):
    local.on(
        "/health",
        err(503, "starting", "engine loading"),
        err(503, "starting", "engine loading"),
        (200, {}, {"status": "ok", "model_loaded": True}),
    )

    async def main():
        async with InferenceClient(local.url) as client:
            return await client.wait_until_ready(timeout=10, interval=0.05)

    assert run(main())["status"] == "ok"
    assert len(local.requests) == 3


def test_wait_until_ready_times_out(local):
    local.on("/health", (503, {"Retry-After": "1"}, {"status": "unavailable", "reason": "engine loading"}))

    async def main():
        async with InferenceClient(local.url) as client:
            await client.wait_until_ready(timeout=0.5, interval=0.05)

    with pytest.raises(TimeoutError, match="engine loading"):
        run(main())


# ------------------------------------------------------------------ against a real server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from e2e_support import running_server

    with running_server(tmp_path_factory.mktemp("client-e2e"), tiny_model_dir, "--max-tokens", "16", workers=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from e2e_support import make_adapter

    return make_adapter(tmp_path_factory.mktemp("client-adapter") / "a", tiny_model_dir, seed=3)


def test_real_server_seed_example_and_groups(server):
    async def main():
        async with InferenceClient(server.url) as client:
            assert (await client.wait_until_ready(timeout=30))["status"] == "healthy"
            one = await client.generate(prompt="What is reinforcement learning?", temperature=0.7, max_tokens=8,
                                        policy_version=1, step_id=100)
            assert (one["policy_version"], one["step_id"]) == (1, 100)
            assert 1 <= len(one["completion_ids"]) <= 8 and isinstance(one["text"], str)
            group = await client.generate_results(
                messages=[{"role": "user", "content": "hi"}], n=3, temperature=1.0, max_tokens=6, logprobs=1
            )
            assert len(group) == 3
            assert all(len(r["logprobs"]) == len(r["completion_ids"]) for r in group)
            many = await client.generate_results(prompt=["a", "b"], max_tokens=4)
            assert [r["prompt_index"] for r in many] == [0, 1]
            # the processed log-probs of a sample equal /score's teacher-forced ones
            r = group[0]
            scored = await client.score(r["prompt_ids"], r["completion_ids"], temperature=1.0)
            assert np.allclose(scored["logprobs"], r["logprobs"], atol=1e-4)
            metrics = await client.metrics()
            assert "current_policy_version" in metrics
            assert "current_policy_version" in await client.metrics(format="prometheus")

    run(main())


def test_real_server_errors_are_typed(server):
    async def main():
        async with InferenceClient(server.url) as client:
            with pytest.raises(ValidationError) as info:
                await client.generate(prompt="x", max_token=3)  # the typo the schema must catch
            assert info.value.field == "max_token" and info.value.status == 422
            with pytest.raises(ValidationError) as info:
                await client.generate(prompt="x", temperature=-1)
            assert info.value.field == "temperature"
            with pytest.raises(NotFoundError):
                await client.load_adapter("/nonexistent/adapter")

    run(main())


def test_real_server_adapter_swaps_bump_the_version(server, adapter_dir):
    async def main():
        async with InferenceClient(server.url) as client:
            start = (await client.metrics())["current_policy_version"]
            loaded = await client.load_adapter(adapter_dir)
            assert loaded["policy_version"] == start + 1
            uploaded = await client.upload_adapter(adapter_dir)
            assert uploaded["policy_version"] == start + 2
            after = await client.generate(prompt="x", max_tokens=2)
            assert after["generated_by_version"] == start + 2
            back = await client.load_adapter(None)  # the base model again: a new version
            assert back["policy_version"] == start + 3

    run(main())


def test_real_server_concurrent_requests_reuse_connections(server):
    async def main():
        async with InferenceClient(server.url, max_connections=4) as client:
            results = await asyncio.gather(*(client.generate(prompt=f"p{i}", max_tokens=4, temperature=1.0)
                                             for i in range(12)))
            assert len(results) == 12

    run(main())
