"""End to end over real HTTP: `mlxsup start` (daemon) on the tiny generated model, then every
seed endpoint and field with its values checked, adapters loaded, uploaded and reloaded from
the shell, and the openai SDK. One server for the module; tests that swap adapters read the
version they start from, so they do not depend on each other's order."""

from __future__ import annotations

import concurrent.futures
import json
import os

import httpx
import pytest
from e2e_support import make_adapter, mlxsup, running_server, wait_for

pytestmark = pytest.mark.timeout(180)

PROMPT = "What is machine learning?"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("e2e-api"), tiny_model_dir, "--max-tokens", "24",
                        "--warm-up", "on", workers=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(tiny_model_dir, "tokenizer.json"))


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, tiny_model_dir, seed=i + 1) for i, name in enumerate(("a", "b", "c"))}


def generate(client, **body) -> dict:
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def score(client, prompt_ids, completion_ids, **kw) -> list[float]:
    r = client.post("/score", json={"prompt_ids": prompt_ids, "completion_ids": completion_ids, **kw})
    assert r.status_code == 200, r.text
    return r.json()["logprobs"]


def current_version(client) -> int:
    r = client.get("/adapter")
    assert r.status_code == 200, r.text
    return r.json()["policy_version"]


def greedy_ids(client, prompt=PROMPT) -> list[int]:
    return generate(client, prompt=prompt, max_tokens=12, temperature=0.0)["completion_ids"]


# ---------------------------------------------------------------------- start


def test_start_said_where_it_serves(server):
    out = server.start_output
    assert out.returncode == 0
    assert f"127.0.0.1:{server.port}" in out.stdout and server.run_dir in out.stdout
    assert "WARNING" not in out.stderr  # loopback only: nothing exposed, nothing to warn about


# ---------------------------------------------------------------------- seed endpoints


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "healthy", "model_loaded": True}


def test_the_engine_warms_up_before_it_reports_ready(server):
    """`--warm-up on` (a GPU's default) runs the engine's paths before ready, in the engine
    process; what that leaves behind is tested in test_engine_generate.py."""
    log = open(os.path.join(server.run_dir, "engine.log")).read()
    assert log.index("warmed up in") < log.index("ready: policy version")


def test_metrics_seed_fields_and_prometheus(client):
    m = client.get("/metrics").json()
    assert m["max_batch_size"] == 5 and m["flush_interval_ms"] == 10
    assert isinstance(m["queue_depth"], int) and m["queue_depth"] >= 0
    assert m["current_policy_version"] == current_version(client)
    for key in ("tokens_per_s", "num_running", "engine_epoch", "engine_restarts", "num_swaps"):
        assert key in m
    r = client.get("/metrics", headers={"Accept": "text/plain"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "mlxsup_current_policy_version" in r.text and "mlxsup_queue_depth" in r.text


def test_generate_seed_request_and_response(client, tokenizer):
    version = current_version(client)
    body = generate(
        client, prompt=PROMPT, temperature=0.7, top_p=1.0, max_tokens=16, logprobs=1,
        policy_version=42, step_id=1000, request_id="unique-request-id", seed=3,
    )  # fmt: skip
    assert body["request_id"] == "unique-request-id"
    assert body["policy_version"] == 42 and body["step_id"] == 1000  # echoed
    prompt_ids, completion_ids = body["prompt_ids"], body["completion_ids"]
    assert all(isinstance(t, int) for t in prompt_ids + completion_ids)
    assert PROMPT in tokenizer.decode(prompt_ids, skip_special_tokens=True)
    assert 1 <= len(completion_ids) <= 16
    assert body["text"] == tokenizer.decode(completion_ids, skip_special_tokens=True)
    assert len(body["logprobs"]) == len(completion_ids) and all(lp <= 0.0 for lp in body["logprobs"])
    assert body["finish_reason"] in ("stop", "length")
    if body["finish_reason"] == "length":
        assert len(completion_ids) == 16
    meta = body["metadata"]
    assert meta["batch_size"] >= 1 and meta["latency_ms"] > 0
    assert meta["current_policy_version"] == version
    # The seed's defaults: max_tokens is the server's --max-tokens (24 here), greedy, no logprobs.
    body = generate(client, prompt=PROMPT)
    assert body["logprobs"] is None and body["policy_version"] is None and body["request_id"]
    assert len(body["completion_ids"]) <= 24


def test_logprobs_match_score(client):
    # Sampled with temperature and top-p: the processed log-probs are the sampler's.
    sampled = dict(temperature=0.8, top_p=0.9)
    body = generate(client, prompt=PROMPT, max_tokens=16, logprobs=1, seed=11, **sampled)
    scored = score(client, body["prompt_ids"], body["completion_ids"], logprobs_mode="processed", **sampled)
    assert scored == pytest.approx(body["logprobs"], abs=1e-4)
    # Raw mode: log-softmax at temperature 1, whatever the sampler did.
    body = generate(client, prompt=PROMPT, max_tokens=16, logprobs=1, logprobs_mode="raw", temperature=0.0)
    scored = score(client, body["prompt_ids"], body["completion_ids"], logprobs_mode="raw")
    assert scored == pytest.approx(body["logprobs"], abs=1e-4)


def test_logprobs_do_not_depend_on_the_batch(client):
    bodies = [dict(prompt=f"{PROMPT} {i}", max_tokens=12, logprobs=1, logprobs_mode="raw") for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda b: generate(client, **b), bodies))
    assert all(r["metadata"]["batch_size"] >= 1 for r in results)
    for r in results:
        scored = score(client, r["prompt_ids"], r["completion_ids"], logprobs_mode="raw")
        assert scored == pytest.approx(r["logprobs"], abs=1e-4)


def test_several_prompts_and_samples(client, tokenizer):
    prompts = ["one two three", "1 + 2 ="]
    body = generate(client, prompt=prompts, max_tokens=6)
    assert [r["prompt_index"] for r in body["results"]] == [0, 1]
    for r, p in zip(body["results"], prompts):
        assert p in tokenizer.decode(r["prompt_ids"], skip_special_tokens=True)
        assert r["text"] == tokenizer.decode(r["completion_ids"], skip_special_tokens=True)
    body = generate(client, prompt=PROMPT, n=3, temperature=1.0, max_tokens=6, seed=5)
    assert [r["sample_index"] for r in body["results"]] == [0, 1, 2]
    assert len({tuple(r["prompt_ids"]) for r in body["results"]}) == 1


def test_errors_are_json_with_the_field(client):
    r = client.post("/generate", json={"prompt": PROMPT, "max_token": 5})
    assert r.status_code == 422 and r.json()["error"]["field"] == "max_token"
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_limits_the_engine_published_are_checked_by_the_api(client, tiny_model_dir):
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        config = json.load(f)
    vocab, ctx = config["vocab_size"], config["max_position_embeddings"]
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == ctx
    r = client.post("/generate", json={"prompt_ids": [1, vocab]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompt_ids[1]"
    assert f"vocabulary size {vocab}" in r.json()["error"]["message"]  # the API's check, not the engine's
    prompt = [5] * (ctx - 3)
    r = client.post("/generate", json={"prompt_ids": prompt, "max_tokens": 4})
    assert r.status_code == 422 and r.json()["error"]["field"] == "max_tokens"
    # absent, max_tokens is the room the context leaves (3) rather than --max-tokens (24)
    done = generate(client, prompt_ids=prompt, ignore_eos=True)
    assert len(done["completion_ids"]) == 3 and done["finish_reason"] == "length"


def test_minus_infinity_log_probs_are_minus_9999(client):
    prompt = [1, 2, 3]
    (top,) = generate(client, prompt_ids=prompt, max_tokens=1, temperature=0.0)["completion_ids"]
    other = (top + 1) % 100
    # top_k=1 leaves one token in the processed distribution: any other has log-prob -inf
    logprobs = score(client, prompt, [other], top_k=1, temperature=1.0)
    assert logprobs == [-9999.0]


# ---------------------------------------------------------------------- adapters


def test_load_adapter_changes_outputs_and_adds_one(client, adapters):
    base_version = current_version(client)
    r = client.post("/load_adapter", json={"adapter_path": None})  # a known starting point
    assert r.status_code == 200, r.text
    v = r.json()["policy_version"]
    assert v == base_version + 1
    base = generate(client, prompt=PROMPT, max_tokens=12, logprobs=1, logprobs_mode="raw")
    r = client.post("/load_adapter", json={"adapter_path": adapters["a"]})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "success" and answer["policy_version"] == v + 1 and answer["message"]
    tuned = generate(client, prompt=PROMPT, max_tokens=12, logprobs=1, logprobs_mode="raw")
    assert tuned["metadata"]["current_policy_version"] == v + 1
    assert tuned["completion_ids"] != base["completion_ids"] or tuned["logprobs"] != pytest.approx(base["logprobs"], abs=1e-3)
    # /score follows the adapter too.
    assert score(client, tuned["prompt_ids"], tuned["completion_ids"], logprobs_mode="raw") == pytest.approx(
        tuned["logprobs"], abs=1e-4
    )
    adapter = client.get("/adapter").json()
    assert adapter["policy_version"] == v + 1


def test_load_adapter_failures_keep_the_version(client, adapters, tmp_path, tiny_model_dir):
    v = current_version(client)
    r = client.post("/load_adapter", json={"adapter_path": str(tmp_path / "missing")})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    bad = make_adapter(tmp_path / "bad", tiny_model_dir, seed=9, rank=4)
    weights = os.path.join(bad, "adapters.safetensors")
    with open(weights, "r+b") as f:  # truncate the tensor data: a corrupt file
        f.truncate(os.path.getsize(weights) // 2)
    r = client.post("/load_adapter", json={"adapter_path": bad})
    assert r.status_code == 422, r.text
    assert current_version(client) == v
    assert generate(client, prompt=PROMPT, max_tokens=4)["metadata"]["current_policy_version"] == v


def test_upload_adapter_matches_the_loaded_one_and_adds_one(client, adapters):
    r = client.post("/load_adapter", json={"adapter_path": adapters["b"]})
    assert r.status_code == 200, r.text
    v = r.json()["policy_version"]
    loaded = greedy_ids(client)
    client.post("/load_adapter", json={"adapter_path": None}).raise_for_status()
    with open(os.path.join(adapters["b"], "adapters.safetensors"), "rb") as w, open(
        os.path.join(adapters["b"], "adapter_config.json"), "rb"
    ) as c:
        r = client.post(
            "/upload_adapter",
            files={"adapter_weights": ("adapters.safetensors", w), "adapter_config": ("adapter_config.json", c)},
        )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "success" and r.json()["policy_version"] == v + 2
    assert greedy_ids(client) == loaded  # the same weights give the same tokens


def test_reload_adapter_from_the_shell(server, client, adapters):
    v = current_version(client)
    out = mlxsup("reload-adapter", adapters["c"], "--run-dir", server.run_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(v + 1)
    assert current_version(client) == v + 1
    with_c = greedy_ids(client)
    out = mlxsup("reload-adapter", "--base", "--mode", "abort", "--port", str(server.port), "--run-dir", server.run_dir)
    assert out.returncode == 0 and out.stdout.strip() == str(v + 2)
    base = greedy_ids(client)
    out = mlxsup("reload-adapter", adapters["c"], "--mode", "inflight", "--run-dir", server.run_dir)
    assert out.stdout.strip() == str(v + 3)
    assert greedy_ids(client) == with_c and with_c != base
    out = mlxsup("reload-adapter", "/definitely/not/here", "--run-dir", server.run_dir)
    assert out.returncode == 1 and "not_found" in out.stderr
    st = json.loads(mlxsup("status", "--run-dir", server.run_dir, "--json").stdout)
    assert st["policy_version"] == v + 3 and st["adapter"] == adapters["c"]


def test_concurrent_reloads_each_add_one(client, adapters):
    v = current_version(client)
    paths = [adapters["a"], adapters["b"], adapters["c"], None]

    def load(path):
        r = client.post("/load_adapter", json={"adapter_path": path})
        assert r.status_code == 200, r.text
        return r.json()["policy_version"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        versions = sorted(pool.map(load, paths))
    assert versions == [v + 1, v + 2, v + 3, v + 4]
    assert current_version(client) == v + 4


# ---------------------------------------------------------------------- openai SDK


def test_openai_sdk_completions_and_chat(server, client):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    models = sdk.models.list()
    assert len(models.data) == 1
    model = models.data[0].id

    done = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=1)
    text = done.choices[0].text
    assert text == generate(client, prompt=PROMPT, max_tokens=10)["text"]
    assert done.choices[0].finish_reason in ("stop", "length")
    assert len(done.choices[0].logprobs.token_logprobs) == done.usage.completion_tokens
    streamed = "".join(
        chunk.choices[0].text
        for chunk in sdk.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
        if chunk.choices
    )
    assert streamed == text

    messages = [{"role": "user", "content": "Say something."}]
    chat = sdk.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, logprobs=True)
    content = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and isinstance(content, str)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert content == generate(client, messages=messages, max_tokens=10)["text"]
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in sdk.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, stream=True)
        if chunk.choices
    )
    assert streamed == content


def test_status_reports_every_process(server):
    out = mlxsup("status", "--run-dir", server.run_dir, "--json")
    st = json.loads(out.stdout)
    roles = sorted(p["role"] for p in st["processes"])
    assert roles == ["api-master", "api-worker", "api-worker", "engine", "supervisor"]
    assert st["engine"]["tokens_generated"] > 0 and st["engine"]["epoch"] == 1
    text = mlxsup("status", "--run-dir", server.run_dir).stdout
    assert "tokens/s" in text and "api-worker" in text
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/metrics").json()["current_policy_version"] == st["policy_version"]


def test_prefix_cache_over_real_http(server, client):
    """A conversation's next turn reuses the KV of the last one, across the real rings; the
    reset route (admin: loopback here) empties it; status and /metrics show it."""
    prompt_ids = [5 + (i * 7) % 300 for i in range(80)]
    first = generate(client, prompt_ids=prompt_ids, max_tokens=8, temperature=0.0, logprobs=1,
                     cache_salt="e2e")
    history = prompt_ids + first["completion_ids"]
    second = generate(client, prompt_ids=history + [9, 10], max_tokens=8, temperature=0.0, logprobs=1,
                      cache_salt="e2e")
    assert second["metadata"]["cached_tokens"] >= len(history) - 1
    # The same log-probs as a score of those tokens from scratch (another salt: no entry).
    cold = score(client, history + [9, 10], second["completion_ids"], logprobs_mode="processed",
                 temperature=0.0, cache_salt="cold")
    assert max(abs(a - b) for a, b in zip(cold, second["logprobs"])) < 1e-4
    r = client.post("/reset_prefix_cache")
    assert r.status_code == 200 and r.json()["entries_dropped"] >= 1, r.text
    again = generate(client, prompt_ids=history + [9, 10], max_tokens=8, temperature=0.0,
                     cache_salt="e2e")
    assert again["metadata"]["cached_tokens"] == 0 and again["completion_ids"] == second["completion_ids"]
    wait_for(lambda: client.get("/metrics").json()["prefix_cache"]["entries"] >= 1, 10,
             "the cache's figures in /metrics")  # (the engine publishes them every 0.1 s)
    metrics = client.get("/metrics").json()["prefix_cache"]
    assert metrics["hits"] >= 1 and metrics["kv_budget_bytes"] > 0
    st = json.loads(mlxsup("status", "--run-dir", server.run_dir, "--json").stdout)
    assert st["engine"]["prefix_cache"]["hit_tokens"] >= len(history) - 1
    assert "prefix cache:" in mlxsup("status", "--run-dir", server.run_dir).stdout
