"""The OpenAI routes through the official `openai` SDK, unchanged, pointed at the app in-process
(httpx's ASGI transport): models, completions and chat, streamed and not, logprobs formats,
n and several prompts, errors as the SDK's exceptions."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from mlxsup.api.errors import ApiError
from mlxsup.api.testing import FakeEngineLink, fake_codec, make_app
from mlxsup.ipc.messages import TokenChunk

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def codec():
    return fake_codec()


def sdk_for(app):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="k", http_client=http, max_retries=0)


@pytest.fixture
def env(codec, tmp_path):
    words = codec.encode("hello there world of tokens", "x")[1:]
    link = FakeEngineLink(completion=lambda prompt, params, seq: words[seq:][: params.max_tokens])
    app, link, _ = make_app(codec, str(tmp_path), link=link, api_key="k")
    return app, link, words


def run(coro):
    return asyncio.run(coro)


def test_models(env, codec):
    app, _, _ = env

    async def main():
        models = await sdk_for(app).models.list()
        assert [m.id for m in models.data] == ["test-model"] and models.data[0].object == "model"

    run(main())


def test_completions(env, codec):
    app, link, words = env

    async def main():
        sdk = sdk_for(app)
        done = await sdk.completions.create(model="test-model", prompt="What is RL?", max_tokens=4, temperature=0,
                                           logprobs=1)
        choice = done.choices[0]
        assert done.object == "text_completion" and done.id.startswith("cmpl-")
        assert choice.text == codec.decode(words[:4]) and choice.finish_reason == "length" and choice.index == 0
        lp = choice.logprobs
        assert len(lp.token_logprobs) == 4 == done.usage.completion_tokens
        assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
        assert lp.top_logprobs[0] == {lp.tokens[0]: lp.token_logprobs[0]}
        assert done.usage.prompt_tokens == len(codec.encode("What is RL?"))
        params = link.requests[0][2]
        assert params.temperature == 0 and params.max_tokens == 4 and params.logprobs_mode == "processed"

        chunks = [c async for c in await sdk.completions.create(model="m", prompt="What is RL?", max_tokens=4,
                                                                temperature=0, stream=True)]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
        assert chunks[-1].choices[0].finish_reason == "length"

        # OpenAI's defaults: max_tokens 16, temperature 1; no logprobs unless asked
        done = await sdk.completions.create(model="m", prompt="x")
        assert done.choices[0].logprobs is None
        params = link.requests[-1][2]
        assert params.max_tokens == 16 and params.temperature == 1.0 and params.logprobs_mode == "none"

    run(main())


def test_completions_several_prompts_n_echo_and_token_prompts(env, codec):
    app, link, words = env

    async def main():
        sdk = sdk_for(app)
        done = await sdk.completions.create(model="m", prompt=["a", "b"], n=2, max_tokens=3)
        assert [c.index for c in done.choices] == [0, 1, 2, 3]
        assert done.usage.completion_tokens == 4 * 3 and done.usage.prompt_tokens == 4
        done = await sdk.completions.create(model="m", prompt="Q:", echo=True, max_tokens=2)
        assert done.choices[0].text == "Q:" + codec.decode(words[:2])
        done = await sdk.completions.create(model="m", prompt=[1, 60, 61], max_tokens=2)
        assert link.requests[-1][1] == [1, 60, 61]
        streamed = {}
        async for chunk in await sdk.completions.create(model="m", prompt=["a", "b"], n=2, max_tokens=3, stream=True):
            for c in chunk.choices:
                streamed[c.index] = streamed.get(c.index, "") + c.text
        assert sorted(streamed) == [0, 1, 2, 3] and streamed[1] == codec.decode(words[1:4])

    run(main())


def test_chat(env, codec):
    app, link, words = env

    async def main():
        sdk = sdk_for(app)
        chat = await sdk.chat.completions.create(model="m", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                                 top_logprobs=2)
        choice = chat.choices[0]
        assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
        assert choice.message.role == "assistant" and choice.message.content == codec.decode(words[:5])
        entries = choice.logprobs.content
        assert len(entries) == chat.usage.completion_tokens == 5
        assert "".join(e.token for e in entries) == choice.message.content
        assert entries[0].bytes == list(entries[0].token.encode()) and entries[0].top_logprobs[0].token == entries[0].token
        rendered = "<|start|>user\nSay something.<|eot|>\n<|start|>assistant\n"  # the demo model's template
        assert link.requests[0][1] == codec.tokenizer.encode(rendered, add_special_tokens=False).ids

        stream = await sdk.chat.completions.create(model="m", messages=CHAT, max_tokens=5, temperature=0, stream=True,
                                                   stream_options={"include_usage": True}, logprobs=True)
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == 5

        # default max_tokens is the server's --max-tokens; max_completion_tokens wins
        await sdk.chat.completions.create(model="m", messages=CHAT)
        assert link.requests[-1][2].max_tokens == 128
        await sdk.chat.completions.create(model="m", messages=CHAT, max_tokens=9, max_completion_tokens=3)
        assert link.requests[-1][2].max_tokens == 3

        chat = await sdk.chat.completions.create(model="m", messages=CHAT, n=3, max_tokens=2)
        assert [c.index for c in chat.choices] == [0, 1, 2]

    run(main())


def test_stop_strings_never_reach_the_client(codec, tmp_path):
    ids = codec.encode("alpha beta gamma delta", "x")[1:]
    link = FakeEngineLink(completion=lambda prompt, params, seq: ids)
    app, link, _ = make_app(codec, str(tmp_path), link=link)

    async def main():
        sdk = sdk_for(app)
        done = await sdk.chat.completions.create(model="m", messages=CHAT, stop=[" gam"])
        assert done.choices[0].message.content == "alpha beta"
        text = "".join([c.choices[0].delta.content or "" async for c in
                        await sdk.chat.completions.create(model="m", messages=CHAT, stop=" gam", stream=True)
                        if c.choices])
        assert text == "alpha beta"
        assert link.requests[-1][2].stop_strings == (" gam",)

    run(main())


def test_errors_are_the_sdk_exceptions(env):
    app, link, _ = env

    async def main():
        sdk = sdk_for(app)
        with pytest.raises(openai.UnprocessableEntityError) as e:
            await sdk.chat.completions.create(model="m", messages=CHAT, n=0)
        assert e.value.body["param"] == "n" or "n" in str(e.value)
        with pytest.raises(openai.AuthenticationError):
            bad = openai.AsyncOpenAI(base_url="http://test/v1", api_key="wrong", max_retries=0,
                                     http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))
            await bad.models.list()
        link.error = ApiError(503, "overloaded", "queue full", retry_after=1)
        with pytest.raises(openai.InternalServerError) as e:  # the SDK's class for 5xx
            await sdk.chat.completions.create(model="m", messages=CHAT, stream=True)
        assert e.value.status_code == 503 and "queue full" in str(e.value)

    run(main())


def test_failure_mid_stream_is_an_error_event(codec, tmp_path):
    class Breaks(FakeEngineLink):
        async def stream(self, prompt_ids, params, **kw):
            async for event in super().stream(prompt_ids, params, **kw):
                yield event
                raise ApiError(503, "engine_restarted", "the engine restarted; retry", retry_after=2)

    app, _, _ = make_app(codec, str(tmp_path), link=Breaks())

    async def main():
        stream = await sdk_for(app).chat.completions.create(model="m", messages=CHAT, stream=True)
        with pytest.raises(openai.APIError) as e:
            async for _ in stream:
                pass
        assert "restarted" in str(e.value)

    run(main())


def test_cancelled_stream_stops_the_engine_stream(codec, tmp_path):
    """gunicorn cancels the request task of a client that went away: the engine stream is closed."""
    closed = []

    class Slow(FakeEngineLink):
        async def stream(self, prompt_ids, params, **kw):
            try:
                while True:
                    yield TokenChunk(request_id=1, seq_index=0, token_ids=[30], logprobs=[], versions=[0])
                    await asyncio.sleep(0.01)
            finally:
                closed.append(True)

    app, _, _ = make_app(codec, str(tmp_path), link=Slow())

    async def main():
        sent = []
        body = b'{"messages": [{"role": "user", "content": "x"}], "stream": true}'
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
        events = [{"type": "http.request", "body": body, "more_body": False}]
        gone = asyncio.Event()

        async def receive():
            if events:
                return events.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        task = asyncio.ensure_future(app(scope, receive, send))
        while len(sent) < 4:
            await asyncio.sleep(0.01)
        task.cancel()  # what gunicorn does after the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert closed == [True]
        assert sent[0]["status"] == 200

    run(main())
