"""The OpenAPI document: generated from the body models, served as docs/openapi.json says, and
exact: every answer of every route (errors, SSE events, -inf log-probs included) validates
against the schema the document gives for its route and status. Over falcon's TestClient, the
fake engine link and the model-free codec; tests/test_api_schema_fuzz.py does the same against a live server."""

from __future__ import annotations

import json
import math
import os

import asyncio

import httpx
import jsonschema
import orjson
import pytest
from falcon import testing

from mlxsup.api.protocol import LOGPROB_FLOOR
from mlxsup.api.testing import FakeEngineLink, fake_codec, make_app, status_with

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def codec():
    return fake_codec()


@pytest.fixture
def setup(codec, tmp_path):
    app, link, adapters = make_app(codec, str(tmp_path))
    client = testing.TestClient(app)
    return client, link, client.simulate_get("/openapi.json").json


def _validator(spec: dict, schema: dict) -> jsonschema.Draft202012Validator:
    # the document is the root, so "#/components/schemas/..." references resolve
    return jsonschema.Draft202012Validator({**spec, **schema})


def check_answer(spec: dict, path: str, method: str, r) -> None:
    """`r` conforms to what the document says `path` answers with r's status."""
    responses = spec["paths"][path][method]["responses"]
    assert str(r.status_code) in responses, f"{method.upper()} {path} answered undocumented {r.status_code}: {r.text}"
    doc = responses[str(r.status_code)]
    for name, header in doc.get("headers", {}).items():
        if header.get("required"):
            assert r.headers.get(name.lower()) is not None, (path, r.status_code, name)
    ctype = r.headers["content-type"].split(";")[0]
    media = doc["content"][ctype]
    if ctype == "text/event-stream":
        events = [line[len("data: "):] for line in r.text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]"
        validator = _validator(spec, media["schema"]["contentSchema"])
        for data in events:
            validator.validate(data if data == "[DONE]" else json.loads(data))
    elif ctype == "application/json":
        _validator(spec, media["schema"]).validate(r.json())


def test_document_is_served_matches_docs_and_is_valid(setup):
    from mlxsup.api.spec import spec_text

    client, _, served = setup
    with open(os.path.join(ROOT, "docs", "openapi.json")) as f:
        on_disk = json.load(f)
    assert served == on_disk == json.loads(spec_text()), "regenerate: python -m mlxsup.api.spec > docs/openapi.json"
    assert served["openapi"].startswith("3.1")
    schemas = served["components"]["schemas"]
    for name, schema in schemas.items():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert set(served["paths"]) >= {"/generate", "/score", "/abort", "/load_adapter", "/upload_adapter",
                                    "/adapter", "/health", "/metrics", "/v1/models", "/v1/completions",
                                    "/v1/chat/completions"}
    for name in ("GenerateRequest", "ScoreRequest", "AbortRequest", "LoadAdapterRequest"):
        assert schemas[name]["additionalProperties"] is False, name
    assert "--max-tokens" in schemas["GenerateRequest"]["properties"]["max_tokens"]["description"]
    chat = schemas["ChatCompletionRequest"]
    assert "tools" in chat["properties"] and chat["additionalProperties"] is False
    for path, ops in served["paths"].items():
        for method, op in ops.items():
            if "requestBody" in op:
                assert {"413", "422"} <= set(op["responses"]), (path, op["responses"].keys())
            if "503" in op["responses"]:
                assert op["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    # streamed events are declared schemas, not plain strings
    sse = served["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    refs = [e.get("$ref") for e in sse["schema"]["contentSchema"]["oneOf"]]
    assert "#/components/schemas/ChatCompletionChunk" in refs and "#/components/schemas/ErrorBody" in refs


@pytest.mark.parametrize("body,valid", [
    ({"prompt": "hi", "n": 2, "stop": ["x"], "policy_version": "v"}, True),
    ({"prompt_ids": [1, 2], "prompt": None, "logprobs": True}, True),
    ({"prompt": "hi", "max_token": 3}, False),
    ({}, False),
    ({"prompt": "hi", "prompt_ids": [1]}, False),
    ({"prompt": "hi", "temperature": "hot"}, False),
])
def test_request_schema_says_what_the_validator_does(setup, body, valid):
    client, _, spec = setup
    validator = _validator(spec, {"$ref": "#/components/schemas/GenerateRequest"})
    assert validator.is_valid(body) is valid
    assert (client.simulate_post("/generate", json=body).status_code == 200) is valid


def _requests():
    admin = {"/load_adapter": {"adapter_path": None}}
    return [
        ("post", "/generate", {"prompt": "hi", "logprobs": 1}),
        ("post", "/generate", {"prompt": ["a", "b"], "n": 2, "max_tokens": 3}),
        ("post", "/generate", {"prompt": "hi", "max_token": 1}),
        ("post", "/generate", {"prompt_ids": [1, 10**6]}),
        ("post", "/generate", {"prompt": "hi", "max_tokens": 100_000}),
        ("post", "/score", {"prompt_ids": [1, 2], "completion_ids": [3, 4]}),
        ("post", "/score", {"prompt_ids": [1]}),
        ("post", "/abort", {"request_id": "x"}),
        ("post", "/load_adapter", admin["/load_adapter"]),
        ("post", "/load_adapter", {"adapter_path": "/does/not/exist"}),
        ("post", "/prepare_adapter", {"adapter_path": None, "ttl_s": 5}),
        ("post", "/prepare_adapter", {"adapter_path": None, "ttl_s": 0}),
        ("post", "/commit_adapter", {"prepared_id": "p-none", "mode": "abort"}),
        ("post", "/commit_adapter", {"prepared_id": "x", "policy_version": 0}),
        ("post", "/cancel_adapter", {"prepared_id": "p-none"}),
        ("get", "/adapter", None),
        ("get", "/health", None),
        ("get", "/metrics", None),
        ("get", "/v1/models", None),
        ("post", "/v1/completions", {"prompt": "hi", "logprobs": 1, "echo": True}),
        ("post", "/v1/completions", {"prompt": [[1, 2], [3]], "stream": True, "logprobs": 0,
                                     "stream_options": {"include_usage": True}}),
        ("post", "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 1, "n": 2}),
        ("post", "/v1/chat/completions", {"messages": CHAT, "stream": True, "logprobs": True,
                                          "stream_options": {"include_usage": True}}),
        ("post", "/v1/chat/completions", {"messages": CHAT, "n": 0}),
        ("post", "/reset_prefix_cache", None),
        ("post", "/update_weights", {"weight_dir": "/does/not/exist"}),
        ("post", "/update_weights", {"weight_dir": "/tmp", "mod": "drain"}),
        # vLLM's extensions of the OpenAI routes
        ("post", "/v1/completions", {"prompt": "hi", "logprobs": 2, "echo": True, "max_tokens": 0,
                                     "prompt_logprobs": 1, "return_token_ids": True}),
        ("post", "/v1/completions", {"prompt": "hi", "stream": True, "logprobs": 2, "echo": True,
                                     "return_token_ids": True, "return_tokens_as_token_ids": True}),
        ("post", "/v1/completions", {"prompt": "hi", "max_tokens": 0, "stream": True}),
        ("post", "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 3,
                                          "prompt_logprobs": 2, "return_token_ids": True}),
        ("post", "/v1/chat/completions", {"messages": CHAT, "stream": True, "logprobs": True, "top_logprobs": 2,
                                          "return_token_ids": True}),
        ("post", "/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}),
        # vLLM's routes
        ("post", "/inference/v1/generate", {"token_ids": [5, 6], "sampling_params": {
            "max_tokens": 3, "logprobs": 2, "prompt_logprobs": 1, "n": 2}}),
        ("post", "/inference/v1/generate", {"token_ids": [5, 6], "stream": True, "stream_options": {
            "include_usage": True}, "sampling_params": {"max_tokens": 3, "logprobs": 1}}),
        ("post", "/inference/v1/generate", {"token_ids": [5, 10**6]}),
        ("post", "/inference/v1/generate", {"token_ids": [5], "sampling_params": {"max_tokens": 100_000}}),
        ("post", "/inference/v1/generate", {"token_ids": [5], "sampling_params": {"frequency_penalty": 1.0}}),
        ("post", "/tokenize", {"prompt": "hi", "return_token_strs": True}),
        ("post", "/tokenize", {"messages": CHAT}),
        ("post", "/tokenize", {"prompt": "hi", "messages": CHAT}),
        ("post", "/detokenize", {"tokens": [5, 6]}),
        ("post", "/detokenize", {"tokens": [10**6]}),
        ("post", "/pause", None),
        ("get", "/is_paused", None),
        ("post", "/resume", None),
        ("post", "/abort_requests", {"request_ids": ["x"]}),
        ("post", "/abort_requests", {}),
        ("post", "/abort_requests", {"request_ids": "x"}),
        ("post", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/does/not/exist"}),
        ("post", "/v1/unload_lora_adapter", {"lora_name": "a"}),
        ("post", "/v1/unload_lora_adapter", {"lora_name": ""}),
    ]


def test_every_documented_operation_is_exercised(setup):
    """The conformance test below sends a request to every route the document lists."""
    _, _, spec = setup
    documented = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    exercised = {(method, path) for method, path, _ in _requests()}
    multipart = {("post", "/upload_adapter"), ("post", "/upload_weights")}
    assert documented - exercised <= multipart | {("get", "/openapi.json")}


def _neg_inf_logprobs(link: FakeEngineLink) -> None:
    """Make the fake engine report -inf for every other token, and for the last of each token's
    top log-probs, as a processed distribution does for a token it excludes."""
    sequence, tops = link._sequence, link._tops

    def with_inf(prompt_ids, params, seq_index):
        ids, logprobs, finish = sequence(prompt_ids, params, seq_index)
        return ids, [-math.inf if i % 2 else lp for i, lp in enumerate(logprobs)], finish

    def tops_with_inf(ids, logprobs, k):
        top_ids, top_lps = tops(ids, logprobs, k)
        return top_ids, [-math.inf if k > 1 and i % k == k - 1 else lp for i, lp in enumerate(top_lps)]

    link._sequence, link._tops = with_inf, tops_with_inf


def test_every_answer_conforms_to_the_document(codec, tmp_path):
    # over httpx's ASGI transport: falcon's TestClient does not read an SSE stream to its end
    app, link, _ = make_app(codec, str(tmp_path))
    _neg_inf_logprobs(link)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            spec = (await client.get("/openapi.json")).json()
            for method, path, body in _requests():
                r = await client.request(method.upper(), path, json=body)
                check_answer(spec, path, method, r)
            status_with(link, engine_state="starting")
            for method, path, body in [("post", "/generate", {"prompt": "hi"}), ("get", "/health", None),
                                       ("post", "/v1/chat/completions", {"messages": CHAT, "stream": True})]:
                r = await client.request(method.upper(), path, json=body)
                assert r.status_code == 503
                check_answer(spec, path, method, r)

    asyncio.run(main())


def test_minus_infinity_is_reported_as_the_floor_on_every_route(setup):
    client, link, _ = setup
    _neg_inf_logprobs(link)
    r = client.simulate_post("/generate", json={"prompt": "hi", "logprobs": 1})
    assert r.json["logprobs"][1] == LOGPROB_FLOOR and r.json["logprobs"][0] > LOGPROB_FLOOR

    async def score(prompt_ids, completion_ids, **kw):
        from mlxsup.ipc.messages import ScoreResult

        return ScoreResult(request_id=1, logprobs=[-0.5, -math.inf], policy_version=0)

    link.score = score
    r = client.simulate_post("/score", json={"prompt_ids": [1], "completion_ids": [2, 3]})
    assert r.json["logprobs"] == [-0.5, LOGPROB_FLOOR]
    r = client.simulate_post("/v1/chat/completions", json={"messages": CHAT, "logprobs": True})
    content = r.json["choices"][0]["logprobs"]["content"]
    assert content[1]["logprob"] == LOGPROB_FLOOR
    r = client.simulate_post("/v1/completions", json={"prompt": "hi", "logprobs": 0})
    assert r.json["choices"][0]["logprobs"]["token_logprobs"][1] == LOGPROB_FLOOR
    assert b"null" not in orjson.dumps(r.json["choices"][0]["logprobs"]["token_logprobs"])
    r = client.simulate_post("/inference/v1/generate", json={"token_ids": [5, 6], "sampling_params": {
        "max_tokens": 2, "logprobs": 0}})
    assert [e["logprob"] for e in r.json["choices"][0]["logprobs"]["content"]][1] == LOGPROB_FLOOR


def test_minus_infinity_in_top_and_prompt_logprobs_is_the_floor(setup):
    """-inf among the top log-probs (a truncated token) and in prompt_logprobs answer -9999.0
    too, never a non-JSON value."""
    client, link, _ = setup
    _neg_inf_logprobs(link)

    async def score(prompt_ids, completion_ids, *, top_logprobs=0, **kw):
        from mlxsup.ipc.messages import ScoreResult

        n = len(completion_ids)
        return ScoreResult(request_id=1, logprobs=[-math.inf] * n, policy_version=0,
                           top_ids=[t + j for t in completion_ids for j in range(top_logprobs)],
                           top_logprobs=[-0.5 if j == 0 else -math.inf for _ in completion_ids
                                         for j in range(top_logprobs)])

    link.score = score
    r = client.simulate_post("/inference/v1/generate", json={"token_ids": [5, 6, 7], "sampling_params": {
        "max_tokens": 2, "logprobs": 2, "prompt_logprobs": 2}})
    assert r.status_code == 200, r.text
    body = r.json
    prompt = body["prompt_logprobs"]
    assert prompt[0] is None and len(prompt) == 3
    for entry in prompt[1:]:
        values = sorted(v["logprob"] for v in entry.values())
        assert values[0] == LOGPROB_FLOOR and values[-1] == -0.5
    token = body["choices"][0]["logprobs"]["content"][0]
    assert all(t["logprob"] > LOGPROB_FLOOR for t in token["top_logprobs"])  # the truncated one is left out
    r = client.simulate_post("/v1/chat/completions", json={"messages": CHAT, "logprobs": True, "top_logprobs": 2,
                                                          "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    assert {v["logprob"] for e in r.json["prompt_logprobs"][1:] for v in e.values()} <= {-0.5, LOGPROB_FLOOR}
    assert LOGPROB_FLOOR in {v["logprob"] for e in r.json["prompt_logprobs"][1:] for v in e.values()}
    r = client.simulate_post("/v1/completions", json={"prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 200, r.text
    assert r.json["choices"][0]["logprobs"]["token_logprobs"][1:] == [LOGPROB_FLOOR] * (
        len(r.json["choices"][0]["logprobs"]["token_logprobs"]) - 1)

