"""The prefix cache's HTTP surface over a fake engine link: `cache_salt` reaches the engine from
every generating route and /score, cached prompt tokens are reported where vLLM and OpenAI
clients read them, /reset_prefix_cache takes the admin key, /metrics shows the cache."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from falcon import testing

from mlxsup.api.testing import make_app, status_with
from mlxsup.api.textcodec import TextCodec


@pytest.fixture(scope="module")
def codec(tiny_model_dir):
    return TextCodec.load(tiny_model_dir)


@pytest.fixture
def setup(codec, tmp_path):
    app, link, adapters = make_app(codec, str(tmp_path), api_key="user", admin_key="admin")
    return testing.TestClient(app, headers={"Authorization": "Bearer user"}), link, adapters


def test_cache_salt_reaches_the_engine_from_every_route(setup):
    client, link, _ = setup
    calls = [("/generate", {"prompt": "hi"}),
             ("/score", {"prompt": "hi", "completion_ids": [5, 6]}),
             ("/v1/completions", {"prompt": "hi"}),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True})]
    for route, body in calls:
        r = client.simulate_post(route, json={**body, "cache_salt": "run-7"})
        assert r.status_code == 200, (route, r.text)
    assert link.cache_salts == ["run-7"] * len(calls)
    client.simulate_post("/generate", json={"prompt": "hi"})
    assert link.cache_salts[-1] == ""
    r = client.simulate_post("/generate", json={"prompt": "hi", "cache_salt": 7})
    assert r.status_code == 422 and r.json["error"]["field"] == "cache_salt"


def test_cached_tokens_are_reported(setup, codec, tmp_path):
    client, link, _ = setup
    link.cached_tokens = 12
    body = client.simulate_post("/generate", json={"prompt": "hello there"}).json
    assert body["metadata"]["cached_tokens"] == 12

    # The OpenAI SDK reads them where OpenAI puts them, streamed and not.
    app, link, _ = make_app(codec, str(tmp_path / "sdk"), api_key="k")
    link.cached_tokens = 12

    async def calls():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        sdk = openai.AsyncOpenAI(base_url="http://test/v1", api_key="k", http_client=http, max_retries=0)
        done = await sdk.completions.create(model="m", prompt=["a", "b"], n=2, max_tokens=3,
                                            extra_body={"cache_salt": "s"})
        stream = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        await http.aclose()
        return done, chunks

    done, chunks = asyncio.run(calls())
    assert done.usage.prompt_tokens_details.cached_tokens == 24  # per prompt, not per sample
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 12
    assert link.cache_salts[0] == "s"


def test_reset_prefix_cache_takes_the_admin_key(setup):
    client, _, adapters = setup
    r = client.simulate_post("/reset_prefix_cache")
    assert r.status_code == 403 and not adapters.calls
    r = client.simulate_post("/reset_prefix_cache", headers={"Authorization": "Bearer admin"})
    assert r.status_code == 200 and r.json == {"status": "success", "entries_dropped": 3}
    assert adapters.calls == [("reset_prefix_cache",)]
    adapters.reply = {"ok": False, "error": {"type": "engine_unavailable", "message": "down"}}
    r = client.simulate_post("/reset_prefix_cache", headers={"Authorization": "Bearer admin"})
    assert r.status_code == 503 and r.json["error"]["type"] == "engine_unavailable"


def test_metrics_show_the_prefix_cache(setup):
    client, link, _ = setup
    status_with(link, prefix_cache_lookups=10, prefix_cache_hits=4, prefix_cache_lookup_tokens=1000,
                prefix_cache_hit_tokens=250, prefix_cache_entries=3, prefix_cache_bytes=4096,
                kv_budget_bytes=1 << 30)
    body = client.simulate_get("/metrics").json
    assert body["prefix_cache"] == {"lookups": 10, "hits": 4, "lookup_tokens": 1000, "hit_tokens": 250,
                                    "hit_rate": 0.25, "entries": 3, "bytes": 4096,
                                    "kv_budget_bytes": 1 << 30}
    text = client.simulate_get("/metrics", headers={"Accept": "text/plain"}).text
    for line in ("mlxsup_prefix_cache_hits_total 4", "mlxsup_prefix_cache_hit_rate 0.25",
                 "mlxsup_prefix_cache_entries 3", "mlxsup_prefix_cache_bytes 4096",
                 f"mlxsup_kv_budget_bytes {1 << 30}"):
        assert line in text.splitlines(), line
