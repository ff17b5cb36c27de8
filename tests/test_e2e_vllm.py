"""vLLM's routes end to end over real HTTP (`mlxsup start` on the tiny generated model, real
gunicorn workers and engine): /inference/v1/generate as verifiers / prime-rl drive it (a
multi-turn rollout whose turns extend each other's token ids), its log-probs against /score,
top and prompt log-probs, /tokenize, and the pause family under load."""

from __future__ import annotations

import concurrent.futures
import json
import math
import time

import pytest
from e2e_support import make_adapter, running_server, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("e2e-vllm"), tiny_model_dir, "--max-tokens", "24",
                        "--max-batch", "8", workers=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def post(client, path, body=None, status=200, **kw):
    r = client.post(path, json=body, **kw)
    assert r.status_code == status, r.text
    return r.json()


def gen(client, token_ids, **sampling):
    return post(client, "/inference/v1/generate", {"model": "m", "token_ids": token_ids,
                                                   "sampling_params": sampling})


def score(client, prompt_ids, completion_ids, **kw):
    return post(client, "/score", {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                                   **kw})["logprobs"]


def test_multi_turn_rollout_extends_ids_and_logprobs_equal_score(client):
    first = post(client, "/tokenize", {"messages": [{"role": "user", "content": "Hello there"}]})
    ids = first["tokens"]
    assert first["count"] == len(ids) > 0
    sampling = dict(temperature=0.8, top_k=20, max_tokens=12, seed=3, logprobs=0,
                    logprobs_mode="processed")
    turn1 = gen(client, ids, **sampling)
    (c1,) = turn1["choices"]
    assert turn1["prompt_token_ids"] == ids
    assert len(c1["token_ids"]) == len(c1["logprobs"]["content"]) > 0
    assert all(e["token"] == f"token_id:{t}" for e, t in zip(c1["logprobs"]["content"],
                                                            c1["token_ids"]))
    assert c1["generated_by_version"] == turn1["policy_version"]
    assert turn1["usage"]["prompt_tokens"] == len(ids)
    # turn 2 as verifiers builds it: the previous prompt and completion, then the new user turn
    suffix = post(client, "/tokenize", {"prompt": " And now?", "add_special_tokens": False})["tokens"]
    ids2 = ids + c1["token_ids"] + suffix
    turn2 = gen(client, ids2, **sampling)
    (c2,) = turn2["choices"]
    assert turn2["prompt_token_ids"][:len(ids) + len(c1["token_ids"])] == ids + c1["token_ids"]
    for prompt, choice in ((ids, c1), (ids2, c2)):
        want = score(client, prompt, choice["token_ids"], temperature=0.8, top_k=20,
                     logprobs_mode="processed")
        got = [e["logprob"] for e in choice["logprobs"]["content"]]
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4


def test_top_logprobs_hold_the_sampled_token_and_at_most_all_the_mass(client):
    out = gen(client, [5, 6, 7, 8], temperature=1.0, max_tokens=16, n=3, seed=1, logprobs=5,
              logprobs_mode="raw")
    assert len(out["choices"]) == 3
    for choice in out["choices"]:
        for t, entry in zip(choice["token_ids"], choice["logprobs"]["content"]):
            tops = entry["top_logprobs"]
            assert 5 <= len(tops) <= 6
            assert f"token_id:{t}" in [x["token"] for x in tops]
            assert sum(math.exp(x["logprob"]) for x in tops) <= 1 + 1e-5
            assert [x["logprob"] for x in tops[:5]] == sorted((x["logprob"] for x in tops[:5]),
                                                              reverse=True)
        raw = score(client, [5, 6, 7, 8], choice["token_ids"], logprobs_mode="raw")
        got = [e["logprob"] for e in choice["logprobs"]["content"]]
        assert max(abs(a - b) for a, b in zip(got, raw)) <= 1e-4


def test_prompt_logprobs_are_the_teacher_forced_scores(client):
    prompt = [3, 50, 21, 99, 7, 12]
    out = gen(client, prompt, max_tokens=1, temperature=0.0, prompt_logprobs=2)
    plp = out["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(prompt)
    want = score(client, prompt[:1], prompt[1:], logprobs_mode="raw")
    for t, entry, w in zip(prompt[1:], plp[1:], want):
        assert abs(entry[str(t)]["logprob"] - w) <= 1e-4
        ranked = sorted((v for v in entry.values() if v["rank"] is not None),
                        key=lambda v: v["rank"])
        assert len(ranked) == 2 and ranked[0]["logprob"] >= ranked[1]["logprob"]


def test_unsupported_sampling_params_refused_neutral_ones_accepted(client):
    ok = gen(client, [5, 6], max_tokens=2, presence_penalty=0.0, skip_special_tokens=False,
             logit_bias={}, min_tokens=0, ignore_eos=True)
    assert len(ok["choices"][0]["token_ids"]) == 2
    for field, value in (("presence_penalty", 0.5), ("logit_bias", {"5": 3.0}), ("min_tokens", 2)):
        r = client.post("/inference/v1/generate",
                        json={"token_ids": [5, 6], "sampling_params": {field: value}})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == f"sampling_params.{field}"
    r = client.post("/inference/v1/generate", json={"token_ids": [5], "sampling_params":
                                                   {"max_token": 3}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "sampling_params.max_token"
    r = client.post("/inference/v1/generate", json={"token_ids": [10**9]})
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("token_ids")


def test_streamed_generate_gives_the_tokens_of_the_unstreamed(server, client):
    sampling = dict(temperature=1.0, max_tokens=10, seed=8, n=2, logprobs=1, logprobs_mode="raw",
                    ignore_eos=True)
    whole = gen(client, [5, 6, 7], **sampling)
    with server.client() as c, c.stream("POST", "/inference/v1/generate", json={
            "token_ids": [5, 6, 7], "stream": True, "stream_options": {"include_usage": True},
            "sampling_params": sampling}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 20
    for choice in whole["choices"]:
        mine = [ch for c in chunks for ch in c["choices"] if ch["index"] == choice["index"]]
        assert [t for ch in mine for t in ch["token_ids"]] == choice["token_ids"]
        got = [e["logprob"] for ch in mine for e in ch["logprobs"]["content"]]
        assert max(abs(a - b["logprob"]) for a, b in zip(got, choice["logprobs"]["content"])) < 1e-5
        assert mine[-1]["finish_reason"] == "length"


def test_detokenize_inverts_tokenize(client):
    ids = post(client, "/tokenize", {"prompt": "machine learning", "return_token_strs": True})
    assert len(ids["token_strs"]) == ids["count"]
    text = post(client, "/detokenize", {"tokens": ids["tokens"]})["prompt"]
    assert "machine learning" in text


# ---------------------------------------------------------------- pause under load


def _load(server, n, **sampling):
    """`n` long generate requests in flight at once, each on its own connection; returns once
    the engine runs them (the control block is published every 100 ms: a reading lags, so the
    request count is read fresh first, and one snapshot must show the n new requests and n
    running sequences)."""
    with server.client() as c:
        time.sleep(0.3)
        base = _metrics(c)["num_requests"]

    def one(i):
        with server.client(timeout=120) as c:
            body = {"token_ids": [5 + i, 6, 7], "request_id": f"load-{i}",
                    "sampling_params": {"max_tokens": 400, "ignore_eos": True, "temperature": 1.0,
                                        "seed": 100 + i, "logprobs": 0, "logprobs_mode": "raw",
                                        **sampling}}
            r = c.post("/inference/v1/generate", json=body)
            assert r.status_code == 200, r.text
            return r.json()
    pool = concurrent.futures.ThreadPoolExecutor(n + 1)
    futures = [pool.submit(one, i) for i in range(n)]
    with server.client() as c:
        def running():
            m = _metrics(c)
            return m["num_requests"] >= base + n and m["num_running"] >= n
        wait_for(running, timeout=60, what=f"{n} running sequences", interval=0.02)
    return pool, futures


def _metrics(client) -> dict:
    return client.get("/metrics", headers={"Accept": "application/json"}).json()


def test_pause_abort_ends_in_flight_requests_with_their_tokens(server, client):
    version = client.get("/adapter").json()["policy_version"]
    pool, futures = _load(server, 4)
    with pool:
        paused = post(client, "/pause?mode=abort")
        assert paused["is_paused"] and paused["mode"] == "abort"
        results = [f.result(timeout=120) for f in futures]
    assert all(r["choices"][0]["finish_reason"] == "abort" for r in results)
    assert all(0 < len(r["choices"][0]["token_ids"]) < 400 for r in results)  # tokens so far
    assert all(set(r["choices"][0]["token_versions"]) == {version} for r in results)
    assert post(client, "/resume")["is_paused"] is False
    assert gen(client, [5], max_tokens=3, ignore_eos=True)["choices"][0]["finish_reason"] == "length"


def test_pause_wait_lets_in_flight_finish_and_holds_new_ones(server, client):
    pool, futures = _load(server, 3, max_tokens=150)
    with pool:
        paused_version = post(client, "/pause?mode=wait")["policy_version"]  # once they are done
        results = [f.result(timeout=30) for f in futures]
        assert all(r["choices"][0]["finish_reason"] == "length" for r in results)
        assert all(len(r["choices"][0]["token_ids"]) == 150 for r in results)
        assert all(r["choices"][0]["generated_by_version"] == paused_version for r in results)
        assert client.get("/is_paused").json() == {"is_paused": True, "mode": "wait"}
        other = server.client()
        late = pool.submit(gen, other, [9, 9], max_tokens=2, ignore_eos=True)
        time.sleep(0.5)
        assert not late.done()  # queued while paused
        post(client, "/resume")
        assert late.result(timeout=60)["choices"][0]["finish_reason"] == "length"
        other.close()


def test_pause_keep_resumes_the_same_sequences_and_versions_move_with_a_swap(
        server, client, tiny_model_dir, tmp_path):
    reference = [f.result(timeout=120) for f in _load(server, 3, max_tokens=200)[1]]
    adapter = make_adapter(tmp_path / "lora", tiny_model_dir, seed=5)
    version = client.get("/adapter").json()["policy_version"]
    pool, futures = _load(server, 3, max_tokens=200)
    with pool:
        post(client, "/pause?mode=keep")
        assert client.get("/is_paused").json() == {"is_paused": True, "mode": "keep"}
        time.sleep(0.3)  # (the control block is published every 100 ms)
        frozen = _metrics(client)["tokens_generated"]
        time.sleep(0.5)
        assert _metrics(client)["tokens_generated"] == frozen  # nothing decodes
        assert not any(f.done() for f in futures)  # frozen, not ended
        post(client, "/resume")
        results_unswapped = [f.result(timeout=120) for f in futures]
    for got, want in zip(results_unswapped, reference):
        assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
        assert got["choices"][0]["finish_reason"] == "length"
        assert set(got["choices"][0]["token_versions"]) == {version}

    # frozen mid-way, a LoRA load commits at once; the rows continue under the new version
    pool, futures = _load(server, 2, max_tokens=300)
    with pool:
        post(client, "/pause?mode=keep")
        loaded = post(client, "/v1/load_lora_adapter", {"lora_name": "step1",
                                                        "lora_path": adapter})
        assert loaded["policy_version"] == version + 1 and loaded["lora_name"] == "step1"
        post(client, "/resume")
        results = [f.result(timeout=120) for f in futures]
    for r in results:
        versions = r["choices"][0]["token_versions"]
        assert len(versions) == 300 and versions[0] == version and versions[-1] == version + 1
        assert versions == sorted(versions)
    unloaded = post(client, "/v1/unload_lora_adapter", {"lora_name": "step1"})
    assert unloaded["policy_version"] == version + 2
    assert gen(client, [5], max_tokens=2)["choices"][0]["generated_by_version"] == version + 2


# ---------------------------------------------------------------- the openai SDK, extra_body


@pytest.fixture(scope="module")
def sdk(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        yield c


def test_sdk_completions_echo_logprobs_equal_score_with_max_tokens_zero(sdk, client):
    """lm-eval's log-likelihood call: echo, logprobs 1, max_tokens 0, on token-id prompts."""
    prompt = [3, 50, 21, 99, 7]
    out = sdk.completions.create(model="m", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                 temperature=0.0)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt)
    want = score(client, prompt[:1], prompt[1:], logprobs_mode="raw")
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) <= 1e-4
    assert lp.top_logprobs[0] is None
    for top, got in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]):
        assert max(top.values()) >= got - 1e-6  # is_greedy is readable from it
    assert out.usage.completion_tokens == 0


def test_sdk_completions_echo_with_generation_and_extra_body_fields(sdk, client):
    prompt = [3, 50, 21, 99]
    out = sdk.completions.create(
        model="m", prompt=prompt, max_tokens=6, echo=True, logprobs=3, temperature=1.0, seed=4,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True,
                    "prompt_logprobs": 2, "logprobs_mode": "raw", "ignore_eos": True})
    choice = out.choices[0].model_dump()
    assert choice["prompt_token_ids"] == prompt and len(choice["token_ids"]) == 6
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in prompt + choice["token_ids"]]
    want_prompt = score(client, prompt[:1], prompt[1:], logprobs_mode="raw")
    want_completion = score(client, prompt, choice["token_ids"], logprobs_mode="raw")
    got = lp["token_logprobs"]
    assert max(abs(a - b) for a, b in zip(got[1:], want_prompt + want_completion)) <= 1e-4
    for t, top in zip(choice["token_ids"], lp["top_logprobs"][len(prompt):]):
        assert f"token_id:{t}" in top and 3 <= len(top) <= 4
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
    plp = choice["prompt_logprobs"]
    assert plp[0] is None
    assert max(abs(plp[i + 1][str(t)]["logprob"] - w)
               for i, (t, w) in enumerate(zip(prompt[1:], want_prompt))) <= 1e-4


def test_sdk_chat_top_logprobs_and_token_ids(sdk, client):
    out = sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0.9,
        seed=2, logprobs=True, top_logprobs=4,
        extra_body={"return_token_ids": True, "prompt_logprobs": 1, "logprobs_mode": "processed"})
    body = out.model_dump()
    prompt_ids = body["prompt_token_ids"]
    ids = body["choices"][0]["token_ids"]
    assert prompt_ids == post(client, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})["tokens"]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == len(ids)
    for t, entry in zip(ids, content):
        assert entry["token"] in [x["token"] for x in entry["top_logprobs"]]
        assert 4 <= len(entry["top_logprobs"]) <= 5
        assert sum(math.exp(x["logprob"]) for x in entry["top_logprobs"]) <= 1 + 1e-5
    want = score(client, prompt_ids, ids, temperature=0.9, logprobs_mode="processed")
    assert max(abs(e["logprob"] - w) for e, w in zip(content, want)) <= 1e-4
    assert len(body["prompt_logprobs"]) == len(prompt_ids)


def test_sdk_streamed_completion_carries_ids_and_top_logprobs(sdk):
    prompt = [3, 50, 21]
    stream = sdk.completions.create(model="m", prompt=prompt, max_tokens=5, logprobs=2,
                                    temperature=1.0, seed=9, stream=True,
                                    extra_body={"return_token_ids": True, "ignore_eos": True})
    chunks = [c.model_dump() for c in stream]
    first = chunks[0]["choices"][0]
    assert first["prompt_token_ids"] == prompt
    ids = [t for c in chunks for ch in c["choices"] for t in (ch.get("token_ids") or [])]
    assert len(ids) == 5
    tops = [d for c in chunks for ch in c["choices"] if ch["logprobs"]
            for d in ch["logprobs"]["top_logprobs"]]
    assert len(tops) == 5 and all(2 <= len(d) <= 3 for d in tops)


# ---------------------------------------------------------------- tool calls

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    from _tool_model import build_tool_model

    model = build_tool_model(str(tmp_path_factory.mktemp("tool-model")))
    with running_server(tmp_path_factory.mktemp("e2e-tools"), model, workers=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def tool_sdk(tool_server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        yield c


def test_tool_calls_are_parsed_into_message_tool_calls(tool_sdk):
    from _tool_model import CALL

    messages = [{"role": "user", "content": "Weather in Paris?"}]
    out = tool_sdk.chat.completions.create(model="m", messages=messages, tools=TOOLS,
                                           max_tokens=10, temperature=0.7, seed=1)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == CALL["name"]
    assert json.loads(call.function.arguments) == CALL["arguments"]
    # the call goes back into the conversation through the chat template
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    again = tool_sdk.chat.completions.create(model="m", messages=follow, tools=TOOLS, max_tokens=10)
    assert again.choices[0].message.tool_calls


def test_streamed_tool_calls_arrive_as_deltas(tool_sdk):
    from _tool_model import CALL

    stream = tool_sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
        max_tokens=10, stream=True)
    chunks = list(stream)
    calls = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == CALL["name"]
    assert json.loads(calls[0].function.arguments) == CALL["arguments"]
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_or_with_tool_choice_none_the_text_is_returned_as_is(tool_sdk, tool_server):
    from _tool_model import CALL_TEXT

    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        out = tool_sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Weather?"}], max_tokens=10, **extra)
        assert out.choices[0].message.tool_calls is None
        assert CALL_TEXT in out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop"
    with tool_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                 "tools": TOOLS, "tool_choice": "required"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "tool_choice"
        with_tools = post(c, "/tokenize", {"messages": [{"role": "user", "content": "x"}],
                                           "tools": TOOLS})
        without = post(c, "/tokenize", {"messages": [{"role": "user", "content": "x"}]})
        assert with_tools["count"] > without["count"]
        assert c.post("/detokenize", json={"tokens": with_tools["tokens"]}).json()["prompt"] \
            .count("get_weather") == 1


def test_a_model_without_a_tool_parser_returns_its_text_as_is(sdk):
    kw = dict(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, seed=5,
              temperature=1.0)
    plain = sdk.chat.completions.create(**kw)
    with_tools = sdk.chat.completions.create(tools=TOOLS, **kw)
    assert with_tools.choices[0].message.content == plain.choices[0].message.content
    assert with_tools.choices[0].message.tool_calls is None


def test_abort_requests_by_id_and_all(server, client):
    pool, futures = _load(server, 3)
    with pool:
        got = post(client, "/abort_requests", {"request_ids": ["load-1"]})
        assert got == {"status": "cancelled", "cancelled_request_ids": ["load-1"]}
        one = futures[1].result(timeout=60)
        assert one["choices"][0]["finish_reason"] == "abort"
        assert one["request_id"] == "load-1"
        assert not futures[0].done() and not futures[2].done()
        everything = post(client, "/abort_requests")
        assert everything["num_aborted"] == 2
        assert all(f.result(timeout=60)["choices"][0]["finish_reason"] == "abort"
                   for f in (futures[0], futures[2]))
    r = client.post("/pause?mode=later")
    assert r.status_code == 422 and r.json()["error"]["field"] == "mode"
    assert client.get("/is_paused").json() == {"is_paused": False, "mode": None}
