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
    ]


def _neg_inf_logprobs(link: FakeEngineLink) -> None:
    """Make the fake engine report -inf for every other token, as a processed distribution does
    for a token it excludes."""
    sequence = link._sequence

    def with_inf(prompt_ids, params, seq_index):
        ids, logprobs, finish = sequence(prompt_ids, params, seq_index)
        return ids, [-math.inf if i % 2 else lp for i, lp in enumerate(logprobs)], finish

    link._sequence = with_inf


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
