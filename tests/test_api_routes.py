"""Resource logic of every route with falcon's TestClient over a fake engine link and the
model-free codec (api.testing.fake_codec): the seed's response shape exactly, the multi-result envelope,
/score, /abort, /health, /metrics (JSON and Prometheus), /adapter (the OpenAPI document:
test_api_spec.py)."""

from __future__ import annotations

import json
import os
import re

import pytest
from falcon import testing

from mlxsup.api.errors import ApiError
from mlxsup.api.testing import FakeEngineLink, fake_codec, make_app, status_with

SEED_KEYS = ["request_id", "policy_version", "step_id", "prompt_ids", "completion_ids", "text", "logprobs",
             "finish_reason", "metadata"]
EXTRA_KEYS = ["generated_by_version", "token_versions"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def codec():
    return fake_codec()


@pytest.fixture
def setup(codec, tmp_path):
    app, link, adapters = make_app(codec, str(tmp_path))
    return testing.TestClient(app), link, adapters


def test_seed_request_answers_the_seed_shape(setup, codec):
    client, link, _ = setup
    status_with(link, policy_version=7)
    r = client.simulate_post("/generate", json={
        "prompt": "What is machine learning?", "temperature": 0.7, "top_p": 1.0, "max_tokens": 128,
        "logprobs": 1, "policy_version": 42, "step_id": 1000, "request_id": "unique-request-id"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json
    assert list(body) == SEED_KEYS + EXTRA_KEYS
    assert body["request_id"] == "unique-request-id" and body["policy_version"] == 42 and body["step_id"] == 1000
    assert body["prompt_ids"] == codec.encode("What is machine learning?")
    assert body["text"] == codec.decode(body["completion_ids"])
    assert len(body["logprobs"]) == len(body["completion_ids"]) and all(isinstance(x, float) for x in body["logprobs"])
    assert body["finish_reason"] in ("stop", "length")
    assert set(body["metadata"]) >= {"batch_size", "latency_ms", "current_policy_version"}
    assert body["metadata"]["current_policy_version"] == 7 and body["metadata"]["batch_size"] >= 1
    assert body["generated_by_version"] == 7 and body["token_versions"] == [7] * len(body["completion_ids"])
    kind, prompt_ids, params, n, tag = link.requests[0]
    assert (kind, n, tag) == ("generate", 1, "unique-request-id")
    assert params.temperature == 0.7 and params.max_tokens == 128 and params.logprobs_mode == "processed"


def test_seed_defaults(setup, codec, tmp_path):
    client, link, _ = setup
    body = client.simulate_post("/generate", json={"prompt": "hi"}).json
    assert body["logprobs"] is None and body["policy_version"] is None and body["step_id"] is None
    assert re.fullmatch(r"req-[0-9a-f]{24}", body["request_id"])
    params = link.requests[0][2]
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.0, 1.0, 0, 0.0)
    assert (params.repetition_penalty, params.repetition_context_size) == (1.0, 20)
    assert params.max_tokens == 128 and params.logprobs_mode == "none" and params.seed is None
    # max_tokens defaults to the server's --max-tokens
    app, link2, _ = make_app(codec, str(tmp_path / "b"), max_tokens=24)
    testing.TestClient(app).simulate_post("/generate", json={"prompt": "hi"})
    assert link2.requests[0][2].max_tokens == 24


def test_null_means_default_and_seed_style_values(setup):
    client, link, _ = setup
    r = client.simulate_post("/generate", json={"prompt": "hi", "temperature": None, "max_tokens": 8.0,
                                                "logprobs": True, "top_k": -1, "stop": None, "policy_version": "v3"})
    assert r.status_code == 200, r.text
    params = link.requests[0][2]
    assert params.temperature == 0.0 and params.max_tokens == 8 and params.top_k == 0
    assert params.logprobs_mode == "processed" and r.json["policy_version"] == "v3"


def test_several_prompts_and_samples_answer_the_envelope(setup, codec):
    client, link, _ = setup
    r = client.simulate_post("/generate", json={"prompt": ["one", "two", "three"], "n": 2, "logprobs": 1,
                                                "request_id": "g1", "step_id": 5})
    results = r.json["results"]
    assert list(r.json) == ["results"] and len(results) == 6
    assert [(x["prompt_index"], x["sample_index"]) for x in results] == [(p, s) for p in range(3) for s in range(2)]
    for x in results:
        assert list(x)[:9] == SEED_KEYS and x["request_id"] == "g1" and x["step_id"] == 5
        assert x["prompt_ids"] == codec.encode(["one", "two", "three"][x["prompt_index"]])
    assert results[0]["completion_ids"] != results[1]["completion_ids"]  # samples differ
    assert [req[3] for req in link.requests] == [2, 2, 2]  # one engine request per prompt, n samples each
    # one prompt with n > 1, and a one-element list, answer the envelope too
    assert len(client.simulate_post("/generate", json={"prompt": "x", "n": 3}).json["results"]) == 3
    assert len(client.simulate_post("/generate", json={"prompt": ["x"]}).json["results"]) == 1


def test_prompt_ids_and_messages(setup, codec):
    client, link, _ = setup
    body = client.simulate_post("/generate", json={"prompt_ids": [1, 50, 60]}).json
    assert body["prompt_ids"] == [1, 50, 60]
    body = client.simulate_post("/generate", json={"prompt_ids": [[1, 2], [3]]}).json
    assert [x["prompt_ids"] for x in body["results"]] == [[1, 2], [3]]
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    body = client.simulate_post("/generate", json={"messages": messages}).json
    rendered = "<|start|>system\nbe brief<|eot|>\n<|start|>user\nhi there<|eot|>\n<|start|>assistant\n"
    assert body["prompt_ids"] == codec.tokenizer.encode(rendered, add_special_tokens=False).ids
    body = client.simulate_post("/generate", json={"messages": [messages, messages[1:]]}).json
    assert len(body["results"]) == 2


def test_stop_strings_are_cut_from_the_text(codec, tmp_path):
    target = codec.encode("one two three four", "x")[1:]
    link = FakeEngineLink(completion=lambda prompt, params, seq: target)
    app, link, _ = make_app(codec, str(tmp_path), link=link)
    body = testing.TestClient(app).simulate_post("/generate", json={"prompt": "x", "stop": [" three", "zzz"]}).json
    assert body["text"] == "one two" and body["completion_ids"] == target
    assert link.requests[0][2].stop_strings == (" three", "zzz")


def test_engine_not_ready_answers_503_with_retry_after(setup):
    client, link, _ = setup
    status_with(link, engine_state="starting")
    for path, body in [("/generate", {"prompt": "x"}), ("/score", {"prompt_ids": [1], "completion_ids": [2]}),
                       ("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
        r = client.simulate_post(path, json=body)
        assert r.status_code == 503 and r.headers["Retry-After"] == "2", path
        assert r.json["error"]["type"] == "engine_unavailable" and "starting" in r.json["error"]["message"]
    r = client.simulate_get("/health")
    assert r.status_code == 503 and r.headers["Retry-After"] and r.json["status"] != "healthy"
    assert not link.requests
    # a bad request is still a 422 while the engine restarts: the client's bug is reported first
    r = client.simulate_post("/generate", json={"prompt": "x", "max_token": 1})
    assert r.status_code == 422


def test_engine_errors_pass_through(setup):
    client, link, _ = setup
    link.error = ApiError(503, "overloaded", "queue full", retry_after=1)
    r = client.simulate_post("/generate", json={"prompt": ["a", "b"]})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and r.json["error"]["type"] == "overloaded"
    link.error = ApiError(422, "validation_error", "prompt too long", "prompt_ids")
    r = client.simulate_post("/generate", json={"prompt": "x"})
    assert r.status_code == 422 and r.json["error"]["field"] == "prompt_ids"


def test_score(setup):
    client, link, _ = setup
    status_with(link, policy_version=3)
    r = client.simulate_post("/score", json={"prompt_ids": [1, 2, 3], "completion_ids": [4, 5],
                                             "logprobs_mode": "raw", "temperature": 0.5, "request_id": "s1"})
    assert r.status_code == 200, r.text
    body = r.json
    assert body["logprobs"] == [-0.25, -0.25] and body["policy_version"] == 3 and body["request_id"] == "s1"
    assert body["prompt_ids"] == [1, 2, 3] and body["completion_ids"] == [4, 5] and body["logprobs_mode"] == "raw"
    kind, prompt_ids, params, _, tag = link.requests[0]
    assert kind == "score" and params.temperature == 0.5 and tag == "s1"
    body = client.simulate_post("/score", json={"prompt": "hello", "completion_ids": [4]}).json
    assert body["logprobs_mode"] == "processed" and body["prompt_ids"][0] == 1  # BOS added as /generate does


def test_token_ids_outside_the_vocabulary_are_refused(setup, codec):
    client, link, _ = setup
    r = client.simulate_post("/generate", json={"prompt_ids": [1, codec.vocab_size]})
    assert r.status_code == 422 and r.json["error"]["field"] == "prompt_ids[1]"
    r = client.simulate_post("/score", json={"prompt_ids": [1], "completion_ids": [2, 3, 10**6]})
    assert r.status_code == 422 and r.json["error"]["field"] == "completion_ids[2]"
    assert not link.requests


def test_prompt_longer_than_the_context_and_huge_max_tokens(setup, codec):
    client, _, _ = setup
    ctx = codec.context_length
    r = client.simulate_post("/generate", json={"prompt_ids": [5] * ctx})
    assert r.status_code == 422 and r.json["error"]["field"] == "prompt_ids" and str(ctx) in r.json["error"]["message"]
    r = client.simulate_post("/generate", json={"prompt": "x", "max_tokens": 1_000_000})
    assert r.status_code == 422 and r.json["error"]["field"] == "max_tokens"
    r = client.simulate_post("/generate", json={"prompt": ["a", "b"], "max_tokens": 10**7})
    assert r.status_code == 422 and r.json["error"]["field"] == "max_tokens"


def test_abort(setup):
    client, link, _ = setup
    r = client.simulate_post("/abort", json={"request_id": "run-3"})
    assert r.status_code == 200 and r.json["status"] == "abort_requested" and link.aborted == ["run-3"]
    r = client.simulate_post("/abort", json={})
    assert r.status_code == 422 and r.json["error"]["field"] == "request_id"


def test_health(setup, codec, tmp_path):
    client, link, _ = setup
    r = client.simulate_get("/health")
    assert r.status_code == 200 and r.json == {"status": "healthy", "model_loaded": True}
    status_with(link, heartbeat_age_s=30.0)  # the engine stopped beating: the supervisor restarts it
    assert client.simulate_get("/health").status_code == 503
    status_with(link, heartbeat_age_s=0.1, link_open=False)
    r = client.simulate_get("/health")
    assert r.status_code == 503 and "not connected" in r.json["reason"]


def test_lifespan_starts_and_closes_the_link(setup):
    client, link, _ = setup
    client.simulate_get("/health")
    assert link.num_starts == 1 and link.num_closes == 1


def test_metrics_json(setup):
    client, link, _ = setup
    status_with(link, policy_version=9, queue_depth=3, num_running=2, engine_restarts=1, num_swaps=4,
                tokens_per_s=12.5, engine_epoch=2)
    m = client.simulate_get("/metrics").json
    assert list(m)[:4] == ["current_policy_version", "queue_depth", "max_batch_size", "flush_interval_ms"]
    assert (m["current_policy_version"], m["queue_depth"], m["max_batch_size"], m["flush_interval_ms"]) == (9, 3, 5, 10.0)
    assert (m["num_running"], m["engine_restarts"], m["num_swaps"], m["tokens_per_s"], m["engine_epoch"]) == (2, 1, 4, 12.5, 2)
    assert m["worker"]["pid"] == os.getpid()


PROM_LINE = re.compile(r'^(# (HELP|TYPE) [a-z_]+ .+|[a-z_]+(\{[a-z]+="[^"]*"\})? -?[0-9.e+inf]+|# EOF)$')


@pytest.mark.parametrize("accept,ctype,openmetrics", [
    ("text/plain", "text/plain; version=0.0.4", False),
    ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1", "application/openmetrics-text; version=1.0.0", True),
])
def test_metrics_prometheus(setup, accept, ctype, openmetrics):
    client, link, _ = setup
    status_with(link, policy_version=9, tokens_generated=1234, slot=1)
    r = client.simulate_get("/metrics", headers={"Accept": accept})
    assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
    lines = r.text.rstrip("\n").split("\n")
    assert all(PROM_LINE.match(line) for line in lines), [x for x in lines if not PROM_LINE.match(x)]
    assert "mlxsup_current_policy_version 9" in lines and "mlxsup_tokens_generated_total 1234" in lines
    assert 'mlxsup_worker_inflight_requests{slot="1"} 0' in lines
    assert (lines[-1] == "# EOF") == openmetrics
    types = dict(line.split()[2:4] for line in lines if line.startswith("# TYPE"))
    assert types["mlxsup_queue_depth"] == "gauge"
    assert types["mlxsup_engine_restarts" if openmetrics else "mlxsup_engine_restarts_total"] == "counter"
    # no Accept (curl's */*) keeps the seed's JSON
    assert client.simulate_get("/metrics", headers={"Accept": "*/*"}).json["max_batch_size"] == 5


def test_adapter(setup):
    client, link, adapters = setup
    assert client.simulate_get("/adapter").json["adapter_path"] is None
    adapters.state = {"adapter_path": "/a/b", "policy_version": 4, "committed_at": 1700000000.5}
    status_with(link, policy_version=4, adapter_id="/a/b", num_swaps=4)
    body = client.simulate_get("/adapter").json
    assert body == {"policy_version": 4, "adapter_path": "/a/b", "adapter_id": "/a/b",
                    "loaded_at": "2023-11-14T22:13:20.500000+00:00", "committed_version": 4, "num_swaps": 4}


def test_one_failing_prompt_cancels_the_others(codec, tmp_path):
    import asyncio

    class OneFails(FakeEngineLink):
        async def generate(self, prompt_ids, params, **kw):
            if prompt_ids == codec.encode("bad"):
                await asyncio.sleep(0.05)
                raise ApiError(422, "validation_error", "engine refused it", "prompt_ids")
            self.delay_s = 5.0
            return await super().generate(prompt_ids, params, **kw)

    link = OneFails()
    app, link, _ = make_app(codec, str(tmp_path), link=link)
    r = testing.TestClient(app).simulate_post("/generate", json={"prompt": ["ok", "bad", "fine"]})
    assert r.status_code == 422 and r.json["error"]["message"] == "engine refused it"
    assert link.cancelled == 2  # the other prompts' engine requests were cancelled (so aborted)


def test_context_rule_explicit_max_tokens_must_fit_and_absent_one_takes_the_room_left(codec, tmp_path):
    # the limits as the engine publishes them with "ready" (here a small context)
    app, link, _ = make_app(codec, str(tmp_path), link=FakeEngineLink(vocab_size=codec.vocab_size,
                                                                      context_length=20), max_tokens=8)
    client = testing.TestClient(app)
    r = client.simulate_post("/generate", json={"prompt_ids": [5] * 15, "max_tokens": 6})
    assert r.status_code == 422 and r.json["error"]["field"] == "max_tokens" and "20" in r.json["error"]["message"]
    assert not link.requests
    assert client.simulate_post("/generate", json={"prompt_ids": [5] * 15, "max_tokens": 5}).status_code == 200
    assert client.simulate_post("/generate", json={"prompt_ids": [5] * 15}).status_code == 200
    assert client.simulate_post("/generate", json={"prompt_ids": [5] * 4}).status_code == 200
    # per prompt of a batch: each gets the room its own length leaves
    assert client.simulate_post("/generate", json={"prompt_ids": [[5] * 17, [5] * 2]}).status_code == 200
    assert [params.max_tokens for _, _, params, _, _ in link.requests] == [5, 5, 8, 3, 8]
    r = client.simulate_post("/generate", json={"prompt_ids": [[5] * 2, [5] * 20]})
    assert r.status_code == 422 and r.json["error"]["field"] == "prompt_ids[1]"
    # chat: the field named is the one the client gave
    app, link, _ = make_app(codec, str(tmp_path), link=FakeEngineLink(vocab_size=codec.vocab_size,
                                                                      context_length=64))
    client = testing.TestClient(app)
    chat = {"messages": [{"role": "user", "content": "x"}]}
    r = client.simulate_post("/v1/chat/completions", json={**chat, "max_completion_tokens": 10**5})
    assert r.status_code == 422 and r.json["error"]["field"] == "max_completion_tokens"
    r = client.simulate_post("/v1/chat/completions", json={**chat, "max_tokens": 60})
    assert r.status_code == 422 and r.json["error"]["field"] == "max_tokens"
    assert not link.requests


def test_token_ids_are_checked_against_the_vocabulary_the_engine_published(codec, tmp_path):
    app, link, _ = make_app(codec, str(tmp_path), link=FakeEngineLink(vocab_size=100, context_length=64))
    client = testing.TestClient(app)
    r = client.simulate_post("/generate", json={"prompt_ids": [[1, 2], [3, 100]]})
    assert r.status_code == 422 and r.json["error"]["field"] == "prompt_ids[1][1]"
    assert "vocabulary size 100" in r.json["error"]["message"]
    r = client.simulate_post("/v1/completions", json={"prompt": [99, 100]})
    assert r.status_code == 422 and r.json["error"]["field"] == "prompt[1]"
    assert not link.requests
    assert client.simulate_post("/generate", json={"prompt_ids": [99]}).status_code == 200
    assert client.simulate_get("/v1/models").json["data"][0]["max_model_len"] == 64
