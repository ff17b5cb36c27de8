"""vLLM's routes as resources (falcon's TestClient, the fake engine link): vLLM's sampling
parameters reach the engine as mlxsup's, the unsupported ones are refused naming the field,
and the tokenizer and control routes answer vLLM's shapes."""

from __future__ import annotations

import pytest
from falcon import testing

from mlxsup.api.testing import make_app
from mlxsup.api.textcodec import TextCodec


@pytest.fixture(scope="module")
def codec(tiny_model_dir):
    return TextCodec.load(tiny_model_dir)


@pytest.fixture
def app(codec, tmp_path):
    app, link, adapters = make_app(codec, str(tmp_path / "run"))
    return testing.TestClient(app), link, adapters


def generate(client, **body):
    return client.simulate_post("/inference/v1/generate", json=body)


def test_vllm_sampling_params_become_the_engines(app):
    client, link, _ = app
    r = generate(client, token_ids=[5, 6, 7], request_id="abc", sampling_params={
        "temperature": 0.5, "top_k": -1, "top_p": 0.9, "min_p": 0.1, "seed": 3, "n": 2,
        "max_tokens": 4, "stop": "x", "stop_token_ids": [9], "ignore_eos": True, "logprobs": 3,
        "logprobs_mode": "raw_logprobs", "skip_special_tokens": False, "presence_penalty": 0})
    assert r.status_code == 200, r.text
    (kind, ids, params, n, tag) = link.requests[-1]
    assert (kind, ids, n, tag) == ("generate", [5, 6, 7], 2, "abc")
    assert (params.temperature, params.top_k, params.top_p, params.min_p, params.seed) == \
        (0.5, 0, 0.9, 0.1, 3)
    assert (params.max_tokens, params.stop_strings, params.stop_token_ids, params.ignore_eos) == \
        (4, ("x",), (9,), True)
    assert (params.logprobs_mode, params.top_logprobs) == ("raw", 3)
    body = r.json
    assert body["request_id"] == "abc" and body["prompt_token_ids"] == [5, 6, 7]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    c = body["choices"][0]
    assert len(c["logprobs"]["content"]) == len(c["token_ids"])
    assert body["usage"]["completion_tokens"] == sum(len(x["token_ids"]) for x in body["choices"])


def test_defaults_are_vllms(app, codec):
    client, link, _ = app
    assert generate(client, token_ids=[5]).status_code == 200
    params = link.requests[-1][2]
    assert params.temperature == 1.0 and params.logprobs_mode == "none"
    assert params.max_tokens == codec.context_length - 1  # the rest of the context


@pytest.mark.parametrize("body,field", [
    ({}, "token_ids"),
    ({"token_ids": []}, "token_ids"),
    ({"token_ids": ["5"]}, "token_ids[0]"),
    ({"token_ids": [5], "stream": True, "sampling_params": {"prompt_logprobs": 1}},
     "sampling_params.prompt_logprobs"),
    ({"token_ids": [5], "priority": 2}, "priority"),
    ({"token_ids": [5], "prompt": "x"}, "prompt"),
    ({"token_ids": [5], "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
    ({"token_ids": [5], "sampling_params": {"top_p": 0}}, "sampling_params.top_p"),
    ({"token_ids": [5], "sampling_params": {"logprobs": 21}}, "sampling_params.logprobs"),
    ({"token_ids": [5], "sampling_params": {"frequency_penalty": 0.2}},
     "sampling_params.frequency_penalty"),
    ({"token_ids": [5], "sampling_params": {"bad_words": ["x"]}}, "sampling_params.bad_words"),
    ({"token_ids": [5], "sampling_params": {"best_of": 3}}, "sampling_params.best_of"),
    ({"token_ids": [5], "sampling_params": {"stop": 5}}, "sampling_params.stop"),
    ({"token_ids": [5], "sampling_params": {"max_tokens": 10**9}}, "sampling_params.max_tokens"),
])
def test_bad_and_unsupported_fields_are_refused_by_name(app, body, field):
    client, link, _ = app
    r = generate(client, **body)
    assert r.status_code == 422, r.text
    assert r.json["error"]["field"] == field
    assert not link.requests


def test_not_json_object_is_refused(app):
    client, _, _ = app
    assert client.simulate_post("/inference/v1/generate", body=b"[1, 2]").status_code in (400, 422)
    assert client.simulate_post("/inference/v1/generate", body=b"{").status_code == 400


def test_tokenize_and_detokenize(app, codec):
    client, _, _ = app
    r = client.simulate_post("/tokenize", json={"prompt": "hello world", "return_token_strs": True})
    assert r.status_code == 200
    assert r.json["tokens"] == codec.encode("hello world")
    assert r.json["count"] == len(r.json["tokens"]) == len(r.json["token_strs"])
    chat = client.simulate_post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.json["tokens"] == codec.encode_chat([{"role": "user", "content": "hi"}])
    no_prompt = client.simulate_post("/tokenize", json={
        "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False})
    assert no_prompt.json["count"] < chat.json["count"]
    both = client.simulate_post("/tokenize", json={"prompt": "x", "messages": []})
    assert both.status_code == 422
    r = client.simulate_post("/detokenize", json={"tokens": chat.json["tokens"]})
    assert "hi" in r.json["prompt"]
    assert client.simulate_post("/detokenize", json={"tokens": [10**9]}).status_code == 422


def test_pause_modes_and_their_spellings(app):
    client, link, _ = app
    assert client.simulate_post("/pause").json["mode"] == "abort"  # vLLM's default
    assert client.simulate_post("/pause?wait_for_inflight_requests=true").json["mode"] == "wait"
    assert client.simulate_post("/pause?mode=keep").json == {
        "is_paused": True, "mode": "keep", "status": "paused", "num_aborted": 0, "policy_version": 0}
    assert client.simulate_get("/is_paused").json == {"is_paused": True, "mode": "keep"}
    assert client.simulate_post("/resume").json["is_paused"] is False
    assert [c[0] for c in link.controls] == ["pause", "pause", "pause", "status", "resume"]
    assert client.simulate_post("/pause?wait_for_inflight_requests=maybe").status_code == 422


def test_lora_routes_are_versioned_swaps(app, tmp_path):
    client, _, adapters = app
    d = tmp_path / "lora"
    d.mkdir()
    r = client.simulate_post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(d)})
    assert r.status_code == 200 and r.json["policy_version"] == 1 and r.json["lora_name"] == "a"
    r = client.simulate_post("/v1/unload_lora_adapter", json={"lora_name": "a"})
    assert r.status_code == 200 and r.json["policy_version"] == 2
    assert [c[0] for c in adapters.calls] == [str(d), None]
    r = client.simulate_post("/v1/load_lora_adapter", json={"lora_name": "a",
                                                            "lora_path": str(tmp_path / "none")})
    assert r.status_code == 404 and r.json["error"]["field"] == "lora_path"
    r = client.simulate_post("/v1/load_lora_adapter", json={"lora_name": "a"})
    assert r.status_code == 422 and r.json["error"]["field"] == "lora_path"


def test_chat_stream_sends_the_prompt_ids_first_and_each_chunks_ids(codec, tmp_path):
    import asyncio
    import json

    import httpx

    app, _, _ = make_app(codec, str(tmp_path / "run"))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as http:
            r = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
                "return_token_ids": True})
            return r.text

    text = asyncio.run(main())
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[0]["prompt_token_ids"] == codec.encode_chat([{"role": "user", "content": "hi"}])
    ids = [t for c in chunks[1:] for ch in c["choices"] for t in ch.get("token_ids", [])]
    assert len(ids) == 3


def test_engine_limits_apply_to_vllm_routes(app):
    """The vocabulary size and context length the engine published are checked on vLLM's
    routes as on the others: 422 naming the id by its path, or the field that does not fit."""
    from mlxsup.api.testing import status_with

    client, link, _ = app
    status_with(link, vocab_size=100, context_length=8)
    r = generate(client, token_ids=[5, 100])
    assert r.status_code == 422 and r.json["error"]["field"] == "token_ids[1]", r.text
    r = client.simulate_post("/detokenize", json={"tokens": [1, 2, 150]})
    assert r.status_code == 422 and r.json["error"]["field"] == "tokens[2]", r.text
    r = generate(client, token_ids=[1] * 8)
    assert r.status_code == 422 and r.json["error"]["field"] == "token_ids", r.text
    r = generate(client, token_ids=[1] * 5, sampling_params={"max_tokens": 4})
    assert r.status_code == 422 and r.json["error"]["field"] == "sampling_params.max_tokens", r.text
    assert "at most 3" in r.json["error"]["message"]
    # absent max_tokens: the room the context leaves (vLLM's default)
    r = generate(client, token_ids=[1] * 5)
    assert r.status_code == 200, r.text
    assert link.requests[-1][2].max_tokens == 3
    r = client.simulate_post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 0, "echo": True,
                                                      "logprobs": 1})
    assert r.status_code == 200, r.text
    r = client.simulate_post("/v1/completions", json={"prompt": [1, 200], "max_tokens": 0, "echo": True})
    assert r.status_code == 422 and r.json["error"]["field"] == "prompt[1]", r.text
