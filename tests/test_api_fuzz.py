"""Property-based fuzzing of every route with hypothesis through falcon's TestClient: whatever the
body (arbitrary JSON, valid bodies with one field replaced or added, raw bytes), the answer is
200 or a 4xx in the error shape; never a 5xx, never an exception out of a resource."""

from __future__ import annotations

import json

import pytest
from falcon import testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxsup.api.testing import fake_codec, make_app

CHAT = [{"role": "user", "content": "hi"}]
ROUTES = {
    "/generate": {"prompt": "hi", "max_tokens": 4},
    "/score": {"prompt_ids": [1, 2], "completion_ids": [3]},
    "/abort": {"request_id": "x"},
    "/load_adapter": {"adapter_path": None},
    "/v1/completions": {"model": "m", "prompt": "hi", "max_tokens": 4},
    "/v1/chat/completions": {"model": "m", "messages": CHAT, "max_tokens": 4},
    "/inference/v1/generate": {"token_ids": [1, 2], "sampling_params": {"max_tokens": 4,
                                                                       "logprobs": 2}},
    "/tokenize": {"messages": CHAT},
    "/detokenize": {"tokens": [1, 2]},
    "/abort_requests": {"request_ids": ["x"]},
    "/v1/load_lora_adapter": {"lora_name": "a", "lora_path": "/nonexistent"},
}
FIELDS = sorted({
    "prompt", "prompt_ids", "messages", "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "repetition_context_size", "max_tokens", "logprobs", "logprobs_mode", "stop", "seed", "policy_version",
    "step_id", "request_id", "min_policy_version", "completion_ids", "adapter_path", "mode", "model", "stream",
    "stream_options", "echo", "top_logprobs", "max_completion_tokens", "tools", "role", "content",
    "token_ids", "sampling_params", "prompt_logprobs", "return_token_ids", "return_tokens_as_token_ids",
    "tool_choice", "tokens", "request_ids", "lora_name", "lora_path", "priority", "add_special_tokens",
})
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64 - 1, 10**6]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["", "drain", "processed", "raw", "user", "text", "\x00", "\ud7ff", "é" * 3]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), inner, max_size=5)),
    max_leaves=25,
)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    codec = fake_codec()
    app, _, _ = make_app(codec, str(tmp_path_factory.mktemp("fuzz")))
    return testing.TestClient(app)


def check(r):
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 200:
        assert 400 <= r.status_code < 500
        error = r.json["error"]
        assert isinstance(error["type"], str) and isinstance(error["message"], str)
        assert "field" in error


@pytest.mark.parametrize("path", list(ROUTES))
def test_fuzz_arbitrary_json(client, path):
    @SETTINGS
    @given(body=json_values)
    def run(body):
        check(client.simulate_post(path, body=json.dumps(body)))

    run()


@pytest.mark.parametrize("path", list(ROUTES))
def test_fuzz_one_field_replaced_or_added(client, path):
    @SETTINGS
    @given(key=st.sampled_from(FIELDS), value=json_values, drop=st.booleans())
    def run(key, value, drop):
        body = dict(ROUTES[path])
        if drop and body:
            body.pop(next(iter(body)))
        body[key] = value
        check(client.simulate_post(path, body=json.dumps(body)))

    run()


@pytest.mark.parametrize("path", list(ROUTES) + ["/upload_adapter"])
def test_fuzz_raw_bytes(client, path):
    @SETTINGS
    @given(raw=st.binary(max_size=200), ctype=st.sampled_from(
        ["application/json", "multipart/form-data; boundary=xyz", "text/plain", "multipart/form-data"]))
    def run(raw, ctype):
        check(client.simulate_post(path, body=raw, headers={"Content-Type": ctype}))

    run()


def test_fuzz_multipart_parts(client):
    @SETTINGS
    @given(parts=st.lists(st.tuples(st.sampled_from(["adapter_weights", "adapter_config", "mode", "x", ""]),
                                    st.binary(max_size=64)), max_size=4))
    def run(parts):
        body = b""
        for name, data in parts:
            body += (b'--xyz\r\nContent-Disposition: form-data; name="' + name.encode()
                     + b'"; filename="f"\r\n\r\n' + data + b"\r\n")
        body += b"--xyz--\r\n"
        check(client.simulate_post("/upload_adapter", body=body,
                                   headers={"Content-Type": "multipart/form-data; boundary=xyz"}))

    run()


def test_normal_request_right_after_the_fuzz(client):
    r = client.simulate_post("/generate", json={"prompt": "still fine?"})
    assert r.status_code == 200 and r.json["completion_ids"]
