"""Bad input on every route: each answer is the JSON error shape with the right status and,
for schema errors, the offending field named. Never a 5xx, never a request to the engine."""

from __future__ import annotations

import pytest
from falcon import testing

from mlxsup.api.media import MAX_DEPTH
from mlxsup.api.testing import fake_codec, make_app

CHAT = [{"role": "user", "content": "hi"}]
VALID = {
    "/generate": {"prompt": "hi"},
    "/score": {"prompt_ids": [1, 2], "completion_ids": [3]},
    "/abort": {"request_id": "x"},
    "/load_adapter": {"adapter_path": None},
    "/v1/completions": {"model": "m", "prompt": "hi"},
    "/v1/chat/completions": {"model": "m", "messages": CHAT},
}


@pytest.fixture(scope="module")
def codec():
    return fake_codec()


@pytest.fixture
def setup(codec, tmp_path):
    app, link, adapters = make_app(codec, str(tmp_path))
    return testing.TestClient(app), link, adapters


def check_error(r, status, field=None, type_=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json["error"]
    assert set(error) >= {"type", "message", "field"} and isinstance(error["message"], str) and error["message"]
    if field is not None:
        assert error["field"] == field, error
    if type_ is not None:
        assert error["type"] == type_
    return error


@pytest.mark.parametrize("path", list(VALID))
def test_valid_bodies_pass(setup, path):
    client, _, _ = setup
    assert client.simulate_post(path, json=VALID[path]).status_code == 200


@pytest.mark.parametrize("path", ["/generate", "/score", "/abort", "/load_adapter"])
def test_unknown_fields_are_refused_by_name(setup, path):
    client, link, adapters = setup
    error = check_error(client.simulate_post(path, json={**VALID[path], "max_token": 5}), 422, "max_token",
                        "validation_error")
    assert "max_token" in error["message"]
    assert not link.requests and not adapters.calls


def test_typo_suggests_the_field(setup):
    client, _, _ = setup
    error = check_error(client.simulate_post("/generate", json={"prompt": "x", "temprature": 1}), 422, "temprature")
    assert "temperature" in error["message"]


@pytest.mark.parametrize("path,ignored", [
    ("/v1/completions", {"frequency_penalty": 0.5, "presence_penalty": 1, "logit_bias": {"5": 1}, "user": "u",
                         "best_of": 2, "suffix": "x"}),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
                              "response_format": {"type": "json_object"}, "user": "u", "store": False,
                              "frequency_penalty": 0.1, "parallel_tool_calls": True, "metadata": {"a": "b"}}),
])
def test_openai_routes_accept_and_ignore_unimplemented_params(setup, path, ignored):
    client, link, _ = setup
    assert client.simulate_post(path, json={**VALID[path], **ignored}).status_code == 200
    check_error(client.simulate_post(path, json={**VALID[path], "max_token": 3}), 422, "max_token")


GENERATE_CASES = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", 5]}, "prompt[1]"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "min_p": 1.0}, "min_p"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "repetition_context_size": 0}, "repetition_context_size"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 18446744073709551615}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 100000}, "n"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "logprobs": "yes"}, "logprobs"),
    ({"prompt": "x", "logprobs_mode": "exact"}, "logprobs_mode"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "stop": ["a"] * 100}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "policy_version": [1]}, "policy_version"),
    ({"prompt": "x", "policy_version": {"a": 1}}, "policy_version"),
    ({"prompt": "x", "step_id": "7"}, "step_id"),
    ({"prompt": "x", "request_id": ""}, "request_id"),
    ({"prompt": "x", "request_id": "x" * 1000}, "request_id"),
    ({"prompt": "x", "min_policy_version": -1}, "min_policy_version"),
    ({"prompt_ids": []}, "prompt_ids"),
    ({"prompt_ids": [1, -2]}, "prompt_ids[1]"),
    ({"prompt_ids": [1, 2.5]}, "prompt_ids[1]"),
    ({"prompt_ids": [[1], [2, "x"]]}, "prompt_ids[1][1]"),
    ({"prompt_ids": [1, True]}, "prompt_ids[1]"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
    ({}, "prompt"),
    ({"prompt": "x", "prompt_ids": [1]}, "prompt_ids"),
    ({"prompt": "x", "messages": CHAT}, "messages"),
    ({"prompt": [[["deep"]]]}, "prompt[0]"),
]


@pytest.mark.parametrize("body,field", GENERATE_CASES)
def test_generate_schema_errors_name_the_field(setup, body, field):
    client, link, _ = setup
    check_error(client.simulate_post("/generate", json=body), 422, field, "validation_error")
    assert not link.requests


@pytest.mark.parametrize("path,body,field", [
    ("/score", {"prompt_ids": [1]}, "completion_ids"),
    ("/score", {"prompt_ids": [1], "completion_ids": []}, "completion_ids"),
    ("/score", {"completion_ids": [1]}, "prompt_ids"),
    ("/score", {"prompt_ids": [1], "completion_ids": [1], "logprobs_mode": "none"}, "logprobs_mode"),
    ("/abort", {"request_id": 5}, "request_id"),
    ("/load_adapter", {}, "adapter_path"),
    ("/load_adapter", {"adapter_path": 5}, "adapter_path"),
    ("/load_adapter", {"adapter_path": "/x", "mode": "now"}, "mode"),
    ("/v1/completions", {"model": "m"}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "x", "temperature": None, "n": "2"}, "n"),
    ("/v1/chat/completions", {"model": "m"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_other_routes_name_the_field(setup, path, body, field):
    client, link, adapters = setup
    check_error(client.simulate_post(path, json=body), 422, field)
    assert not link.requests and not adapters.calls


def test_openai_errors_carry_param_and_code_for_the_sdk(setup):
    client, _, _ = setup
    error = check_error(client.simulate_post("/v1/chat/completions", json={"messages": CHAT, "n": 0}), 422, "n")
    assert error["param"] == "n" and error["code"] == "validation_error"


@pytest.mark.parametrize("path", list(VALID))
@pytest.mark.parametrize("raw", [
    b"{not json", b'{"prompt": NaN}', b'{"prompt": "x", "temperature": Infinity}', b'{"prompt": "\xff\xfe"}',
    b'{"prompt": "\\ud800"}', b'{"temperature": 1e999}', b'{"a": 1', b"", b"   ",
])
def test_not_json_is_400(setup, path, raw):
    client, link, _ = setup
    check_error(client.simulate_post(path, body=raw, headers={"Content-Type": "application/json"}), 400,
                type_="invalid_json")
    assert not link.requests


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"prompt"', b"5", b"null", b"true"])
def test_json_that_is_not_an_object_is_422(setup, raw):
    client, _, _ = setup
    check_error(client.simulate_post("/generate", body=raw), 422, None, "validation_error")


@pytest.mark.parametrize("depth", [1024, 200_000])
def test_deeply_nested_json_is_refused(setup, depth):
    client, _, _ = setup
    raw = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"  # 1024 + the body's object: over the limit
    error = check_error(client.simulate_post("/generate", body=raw), 422)
    assert "more than 1024 deep" in error["message"]


DEEP = b"[" * 1020 + b"]" * 1020  # within orjson's limit, past Python's recursion limit


@pytest.mark.parametrize("path, raw", [
    ("/generate", b'{"prompt": %s}' % DEEP),
    ("/generate", b'{"messages": %s}' % DEEP),
    ("/generate", b'{"messages": [{"role": "user", "content": "hi", "x": %s}], "max_tokens": 2}' % DEEP),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": %s}' % DEEP),
])
def test_nesting_within_the_limit_is_a_schema_error_or_fine_never_a_crash(setup, path, raw):
    client, _, _ = setup
    r = client.simulate_post(path, body=raw)
    assert r.status_code in (200, 422), r.text


def test_brackets_in_strings_are_text(setup):
    client, _, _ = setup
    prompt = "[" * 1500 + '\\"{' * 100
    r = client.simulate_post("/generate", json={"prompt": prompt})
    assert r.status_code == 200, r.text


def test_body_over_the_limit_is_413(setup, monkeypatch):
    client, _, _ = setup
    monkeypatch.setattr("mlxsup.api.media.MAX_JSON_BYTES", 1000)
    monkeypatch.setattr("mlxsup.api.media.read_json_object.__defaults__", (1000,))
    error = check_error(client.simulate_post("/generate", json={"prompt": "x" * 2000}), 413, type_="payload_too_large")
    assert "1000" in error["message"]


def test_form_encoded_body_from_curl_is_read_as_json(setup):
    client, _, _ = setup
    r = client.simulate_post("/generate", body=b'{"prompt": "hi"}',
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200


def test_unknown_route_and_method(setup):
    client, _, _ = setup
    check_error(client.simulate_get("/nope"), 404, type_="not_found")
    check_error(client.simulate_post("/v1/embeddings", json={}), 404)
    r = client.simulate_get("/generate")
    check_error(r, 405, type_="method_not_allowed")
    assert "POST" in r.headers["Allow"]
    assert client.simulate_get("/health/").status_code == 200  # trailing slash tolerated


def test_max_depth_constant_is_what_the_message_says():
    assert MAX_DEPTH == 1024


@pytest.mark.parametrize("path,body", [
    ("/generate", {"prompt": "hi"}),
    ("/v1/completions", {"model": "m", "prompt": "hi"}),
    ("/v1/chat/completions", {"model": "m", "messages": CHAT}),
])
def test_ignore_eos_reaches_the_engine_and_is_off_by_default(setup, path, body):
    client, link, _ = setup
    assert client.simulate_post(path, json=body).status_code == 200
    assert client.simulate_post(path, json={**body, "ignore_eos": True}).status_code == 200
    assert [r[2].ignore_eos for r in link.requests] == [False, True]
    check_error(client.simulate_post(path, json={**body, "ignore_eos": "yes"}), 422, "ignore_eos")


def test_score_has_no_ignore_eos(setup):
    client, link, _ = setup
    body = {**VALID["/score"], "ignore_eos": True}
    check_error(client.simulate_post("/score", json=body), 422, "ignore_eos")
    assert not link.requests
