"""Bad input over real HTTP against a running server (docs/reliability.md): hypothesis-driven
bodies for /generate, /score, /load_adapter, /upload_adapter and the OpenAI routes (wrong
types, missing and unknown fields, huge and negative numbers, NaN and Infinity, invalid UTF-8,
lone surrogates, deep JSON, empty and enormous prompts, prompts longer than the context, token
ids outside the vocabulary, a million-token max_tokens), then slowloris-style partial requests
on raw sockets. The rule: only 4xx answers (a JSON error naming the field where one is at fault)
or real results, never a 5xx, never a dead or restarted process, and a normal request is
answered right after.

tests/test_api_fuzz.py fuzzes the app in-process through falcon's TestClient with a fake
engine; this module adds gunicorn's HTTP parsing, the IPC and the real engine (an out-of-range
token id that reached MLX's embedding would crash it), so it checks the processes, not only
the answers."""

from __future__ import annotations

import json
import socket
import time
from typing import Optional

import httpx
import pytest
from e2e_support import running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(120)

VOCAB = 512  # the tiny model's
CONTEXT = 4096
CHAT = [{"role": "user", "content": "hi"}]
BASE = {
    "/generate": {"prompt": "hi", "max_tokens": 4},
    "/score": {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5]},
    "/load_adapter": {"adapter_path": "/nonexistent/adapter"},
    "/v1/completions": {"model": "m", "prompt": "hi", "max_tokens": 4},
    "/v1/chat/completions": {"model": "m", "messages": CHAT, "max_tokens": 4},
}
REQUIRED = {  # a 422 may name these although the body lacks them
    "/generate": {"prompt", "prompt_ids", "messages"},
    "/score": {"prompt", "prompt_ids", "messages", "completion_ids"},
    "/load_adapter": {"adapter_path"},
    "/v1/completions": {"prompt", "model"},
    "/v1/chat/completions": {"messages", "model"},
}
FIELDS = sorted({
    "prompt", "prompt_ids", "messages", "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "repetition_context_size", "max_tokens", "logprobs", "logprobs_mode", "stop", "seed", "policy_version",
    "step_id", "request_id", "min_policy_version", "completion_ids", "adapter_path", "mode", "model", "stream",
    "stream_options", "echo", "top_logprobs", "max_completion_tokens", "role", "content", "max_token",
})  # fmt: skip
# Integers stay small or invalid: a valid max_tokens or n in the thousands is a legitimate,
# slow request, not bad input (the million-token max_tokens is below).
INTS = st.one_of(
    st.integers(-3, 6),
    st.sampled_from([-1, -(2**63), 2**31, 2**32, 2**53 + 1, 2**63, 2**64, 10**6, 10**30, VOCAB, CONTEXT + 1]),
)
STRINGS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "\x00", "\ud800", "\udfff", "💥" * 3, "drain", "abort", "inflight", "raw", "processed",
                     "user", "assistant", "../../etc/passwd", "/", "a" * 300, "x" * 5000]),
)
TOKEN_IDS = st.lists(st.one_of(st.integers(0, VOCAB - 1), INTS), max_size=6)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, STRINGS,
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-308, 5e-324, 1e308, -0.0]))
VALUES = st.recursive(
    st.one_of(SCALARS, TOKEN_IDS),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner, max_size=4)),
    max_leaves=12,
)  # fmt: skip


@st.composite
def mutated(draw, route):
    """The route's valid body with 1-3 fields replaced, added or removed."""
    body = dict(BASE[route])
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "add", "remove"]))
        if action == "remove" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif action == "replace" and body:
            body[draw(st.sampled_from(sorted(body)))] = draw(VALUES)
        else:
            body[draw(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)))] = draw(VALUES)
    return body


RAW = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([
        b"", b"null", b"[]", b"42", b'"str"', b"{", b'{"prompt": "hi"', b'{"prompt": NaN}', b'{"prompt": "hi", "temperature": NaN}',
        b'{"prompt": "hi", "max_tokens": Infinity}', b'{"prompt": "hi", "top_p": -Infinity}', b'{"prompt": "\xff\xfe"}',
        b'{"prompt": "\\ud800"}', b'{"prompt": "hi"}garbage', b"\xef\xbb\xbf{}", b'{"prompt": "hi", "prompt": "twice"}',
        b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b"\x00" * 32,
    ]),
)  # fmt: skip
SETTINGS = settings(max_examples=90, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


HEADER_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("rel-fuzz"), tiny_model_dir, "--max-tokens", "8", "--max-batch", "16",
                        "--header-timeout", str(HEADER_TIMEOUT_S), workers=2) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client(timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def processes(server):
    """The pids at the start; every test ends checking they are the same, none restarted."""
    return {role: sorted(server.pids(role)) for role in ("engine", "api-master", "api-worker")}


def root_of(field: str) -> str:
    for sep in ("[", "."):
        field = field.split(sep, 1)[0]
    return field


def check(route: str, r: httpx.Response, body=None) -> None:
    assert r.status_code < 500, (route, body, r.status_code, r.text[:500])
    if r.status_code < 400:
        return
    assert r.status_code in (400, 401, 403, 404, 405, 409, 413, 415, 422), (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] and err["message"], err
    if r.status_code == 422 and err["type"] == "validation_error" and isinstance(body, dict) and body:
        # The field is named, and it is one the body has (or a required one it lacks). Names
        # that are not printable come back escaped; an empty name comes back as null.
        names = set(body) | REQUIRED[route]
        names |= {k.encode("unicode_escape").decode("ascii") for k in body}
        field = err["field"]
        if field is None:
            assert "" in body, (route, body, err)
        else:
            assert field in names or root_of(field) in names, (route, body, err)


def post_json(client, route, body) -> httpx.Response:
    data = json.dumps(body, allow_nan=True).encode()  # NaN / Infinity go out as such
    return client.post(route, content=data, headers={"content-type": "application/json"})


def assert_alive_and_serving(server, client, processes) -> None:
    now = {role: sorted(server.pids(role)) for role in processes}
    assert now == processes, f"a process died or was replaced: {processes} -> {now}"
    st_ = server.status()
    assert st_["engine"]["restarts"] == 0 and st_["engine"]["ready"]
    r = client.post("/generate", json={"prompt": "a normal request", "max_tokens": 4})
    assert r.status_code == 200 and len(r.json()["completion_ids"]) >= 1, r.text  # within the client's timeout


@pytest.mark.parametrize("route", sorted(BASE))
def test_fuzz_mutated_bodies(route, server, client, processes):
    @SETTINGS
    @given(body=mutated(route))
    def run(body):
        check(route, post_json(client, route, body), body)

    run()
    assert_alive_and_serving(server, client, processes)


@pytest.mark.parametrize("route", sorted(BASE) + ["/upload_adapter"])
def test_fuzz_raw_bytes_and_arbitrary_json(route, server, client, processes):
    @settings(SETTINGS, max_examples=40)
    @given(payload=st.one_of(RAW, VALUES.map(lambda v: json.dumps(v, allow_nan=True).encode())))
    def run(payload):
        check(route, client.post(route, content=payload, headers={"content-type": "application/json"}))

    run()
    assert_alive_and_serving(server, client, processes)


PART_NAMES = st.one_of(st.sampled_from(["adapter_weights", "adapter_config", "mode", "other", ""]), st.text(max_size=8))


def test_fuzz_upload_multipart(server, client, processes):
    @settings(SETTINGS, max_examples=60)
    @given(parts=st.lists(st.tuples(PART_NAMES, st.binary(max_size=200)), max_size=4),
           mode=st.one_of(st.none(), STRINGS))  # fmt: skip
    def run(parts, mode):
        files = [(name, (f"f{i}", data)) for i, (name, data) in enumerate(parts)]
        params = {"mode": mode} if mode is not None else None
        try:
            r = client.post("/upload_adapter", files=files or {"x": ("x", b"")}, params=params)
        except UnicodeEncodeError:
            return  # httpx cannot send this part name; nothing reached the server
        check("/upload_adapter", r)

    run()
    assert_alive_and_serving(server, client, processes)


# ---------------------------------------------------------------------- named hard cases


def test_token_ids_outside_the_vocabulary_never_reach_the_engine(server, client, processes):
    """Out-of-range ids crash MLX's embedding (a segfault, not an exception): each must be a
    422 naming the position, on every route that takes ids."""
    for bad in (VOCAB, VOCAB + 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -1, -(2**63)):
        cases = [
            ("/generate", {"prompt_ids": [1, 2, bad], "max_tokens": 2}, "prompt_ids[2]"),
            ("/generate", {"prompt_ids": [[1, 2], [3, bad]], "max_tokens": 2}, "prompt_ids[1][1]"),
            ("/score", {"prompt_ids": [1, 2], "completion_ids": [3, bad]}, "completion_ids[1]"),
            ("/score", {"prompt_ids": [bad], "completion_ids": [3]}, "prompt_ids[0]"),
            ("/v1/completions", {"model": "m", "prompt": [1, bad], "max_tokens": 2}, "prompt[1]"),
            ("/v1/completions", {"model": "m", "prompt": [[1], [bad]], "max_tokens": 2}, "prompt[1][0]"),
        ]
        for route, body, field in cases:
            r = client.post(route, json=body)
            assert r.status_code == 422, (route, body, r.text)
            assert r.json()["error"]["field"] == field, (route, body, r.json())
    # The last id of the vocabulary is fine.
    r = client.post("/generate", json={"prompt_ids": [1, VOCAB - 1], "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = client.post("/score", json={"prompt_ids": [1], "completion_ids": [VOCAB - 1]})
    assert r.status_code == 200, r.text
    assert_alive_and_serving(server, client, processes)


def test_sizes_and_numbers_at_the_limits(server, client, processes):
    cases = [
        ("/generate", {"prompt": "hi", "max_tokens": 1_000_000}, 422, "max_tokens"),
        ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 1_000_000}, 422, "max_tokens"),
        ("/v1/chat/completions", {"model": "m", "messages": CHAT, "max_completion_tokens": 1_000_000}, 422,
         "max_completion_tokens"),
        ("/generate", {"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
        ("/generate", {"prompt": "hi", "n": 10**9}, 422, "n"),
        ("/generate", {"prompt": "hi", "temperature": -1}, 422, "temperature"),
        ("/generate", {"prompt": "hi", "top_p": 0}, 422, "top_p"),
        ("/generate", {"prompt": "hi", "seed": 2**64}, 422, "seed"),
        ("/generate", {"prompt": "hi", "max_tokens": 2.5}, 422, "max_tokens"),
        ("/generate", {"prompt": "word " * 6000, "max_tokens": 4}, 422, "prompt"),  # longer than the context
        ("/generate", {"prompt_ids": [5] * CONTEXT, "max_tokens": 4}, 422, "prompt_ids"),
        ("/score", {"prompt_ids": [5] * 3000, "completion_ids": [5] * 2000}, 422, None),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "word " * 6000}]}, 422,
         "messages"),
        ("/generate", {"prompt": ["hi"] * 10_000, "max_tokens": 1}, 422, "prompt"),  # more prompts than the queue
        ("/generate", {"prompt": "hi", "stop": ["s"] * 100}, 422, "stop"),
        ("/generate", {"prompt": "hi", "request_id": "r" * 10_000}, 422, "request_id"),
        ("/load_adapter", {"adapter_path": "a" * 100_000}, None, "adapter_path"),  # ENAMETOOLONG
        ("/load_adapter", {"adapter_path": "/tmp/\x00evil"}, None, "adapter_path"),  # NUL in a path
        ("/load_adapter", {"adapter_path": "/tmp", "mode": "sideways"}, 422, "mode"),
    ]
    for route, body, status, field in cases:
        r = client.post(route, json=body)
        check(route, r, body)
        assert 400 <= r.status_code < 500, (route, str(body)[:100], r.status_code, r.text)
        if status is not None:
            assert r.status_code == status, (route, str(body)[:100], r.text)
        if field is not None:
            assert root_of(r.json()["error"]["field"] or "") == field, (route, str(body)[:100], r.json())
    # Empty prompts are prompts (the BOS token); empty id lists are not.
    assert client.post("/generate", json={"prompt": "", "max_tokens": 2}).status_code == 200
    r = client.post("/generate", json={"prompt_ids": [], "max_tokens": 2})
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompt_ids"
    # A body over the 32 MiB cap is refused as such, whatever it holds.
    r = client.post("/generate", content=b'{"prompt": "' + b"a" * (33 * 2**20) + b'"}',
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413, r.text[:200]
    # Temperatures at the edge of floating point: tiny ones are greedy (1/T overflowed float32
    # into NaN logits, giving token 0 with null log-probs), huge ones are refused.
    body = {"prompt": "hi", "max_tokens": 4, "logprobs": 1}
    greedy = client.post("/generate", json=dict(body, temperature=0)).json()
    for t in (1e-30, 1e-38, 1e-39, 1e-308, 5e-324):
        r = client.post("/generate", json=dict(body, temperature=t))
        assert r.status_code == 200, r.text
        assert r.json()["completion_ids"] == greedy["completion_ids"] and r.json()["logprobs"] == [0.0] * 4, (t, r.json())
    r = client.post("/generate", json=dict(body, temperature=1e308))
    assert r.status_code == 422 and r.json()["error"]["field"] == "temperature"
    assert_alive_and_serving(server, client, processes)


def _partial(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head)
    return s


def _closed_within(s: socket.socket, seconds: float) -> Optional[float]:
    """Seconds until the server closed `s` (reading to EOF), or None if it was still open."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            if s.recv(4096) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def test_a_connection_that_never_finishes_its_request_head_is_closed(server, client, processes):
    """gunicorn's asgi worker would hold a half-sent request head forever (one file descriptor
    each); `--header-timeout` closes it, while a slow body and a keep-alive connection that
    is in use are not cut by it."""
    port = server.port
    t0 = time.monotonic()
    heads = [_partial(port, head) for head in (b"", b"POS", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-")]
    try:
        for s in heads:
            waited = _closed_within(s, HEADER_TIMEOUT_S + 10 - (time.monotonic() - t0))
            assert waited is not None, "a connection with half a request head is still open"
        assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - t0 < HEADER_TIMEOUT_S + 10
    finally:
        for s in heads:
            s.close()
    # One keep-alive connection used past the timeout: each request head arrives at once.
    with httpx.Client(base_url=server.url, timeout=30) as c:
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 1
        while time.monotonic() < deadline:
            assert c.post("/generate", json={"prompt": "kept", "max_tokens": 2}).status_code == 200
            time.sleep(0.5)
    # A body slower than the head timeout: answered.
    payload = b'{"prompt": "slow body", "max_tokens": 2}'
    s = _partial(port, (f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode())  # fmt: skip
    try:
        for k in range(len(payload)):
            s.sendall(payload[k:k + 1])
            time.sleep((HEADER_TIMEOUT_S + 1) / len(payload))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
    finally:
        s.close()
    assert_alive_and_serving(server, client, processes)


def test_slowloris_partial_requests(server, client, processes):
    port = server.port
    body_head = (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\": ")  # fmt: skip
    held = []
    try:
        for i in range(150):  # partial request lines, partial headers, partial bodies
            head = [b"POS", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-", body_head][i % 3]
            held.append(_partial(port, head))
        # Normal requests are answered at once meanwhile, on new connections.
        for i in range(10):  # a worker held by the partial requests would run past the client's timeout
            with httpx.Client(base_url=server.url, timeout=10) as c:
                r = c.post("/generate", json={"prompt": f"meanwhile {i}", "max_tokens": 4})
            assert r.status_code == 200, r.status_code
        # Bodies dribbled a byte at a time (complete in the end) get their normal answers.
        dribbled = []
        for payload in (b'{"prompt": "slow", "max_tokens": 3}', b'{"prompt": "slow", "max_tokens": -3}'):
            head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
            dribbled.append((_partial(port, head), payload))
        for k in range(max(len(p) for _, p in dribbled)):
            for s, p in dribbled:
                if k < len(p):
                    s.sendall(p[k:k + 1])
            time.sleep(0.02)
        answers = []
        for s, _ in dribbled:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            s.close()
            answers.append(data)
        assert answers[0].startswith(b"HTTP/1.1 200"), answers[0][:200]
        assert answers[1].startswith(b"HTTP/1.1 422") and b'"field":"max_tokens"' in answers[1], answers[1][:300]
        # A client that gives up half-way through a body: nothing breaks.
        for _ in range(20):
            s = _partial(port, body_head)
            s.shutdown(socket.SHUT_WR)
            s.close()
        # Garbage on the wire, oversized request lines and headers: 4xx or a closed connection.
        for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64,  # a TLS hello
                     b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
                     b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                     b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):  # fmt: skip
            s = _partial(port, junk)
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            s.close()
            if data:
                status = int(data.split(b" ", 2)[1])
                assert 400 <= status < 500, data[:200]
    finally:
        for s in held:
            s.close()
    assert_alive_and_serving(server, client, processes)
