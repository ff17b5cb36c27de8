"""Test doubles for the API's dependencies (as `falcon.testing` is for falcon apps): a fake
engine link that answers deterministically, a codec that needs no model, and a fake supervisor
for the adapter routes.

    app = create_app(config, engine_link=FakeEngineLink(), codec=fake_codec(), adapters=FakeAdapters())
    client = falcon.testing.TestClient(app)
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Callable, Optional, Sequence

from mlxsup.api.engine_link import EngineStatus
from mlxsup.api.errors import ApiError
from mlxsup.api.textcodec import TextCodec
from mlxsup.ipc.messages import (
    LOGPROBS_NONE,
    OP_PAUSE,
    OP_RESUME,
    ControlResult,
    SamplingParams,
    ScoreResult,
    SequenceDone,
    TokenChunk,
)


def default_completion(prompt_ids: Sequence[int], params: SamplingParams, seq_index: int) -> list[int]:
    """A deterministic completion: up to max_tokens ids derived from the prompt."""
    base = sum(prompt_ids) + 7 * seq_index
    length = min(params.max_tokens, 4 + seq_index)
    return [(base + 3 * i) % 200 + 20 for i in range(length)]


class FakeEngineLink:
    """An `EngineLink` without an engine. Settable: `status_fields` (EngineStatus fields),
    `error` (an ApiError every request raises), `delay_s`, `completion` (prompt, params, seq ->
    ids). Records `requests` (kind, prompt_ids, params, n, tag), `aborted` tags and `controls`."""

    def __init__(self, completion: Optional[Callable] = None, **status_fields):
        self.status_fields = {"link_open": True, "engine_state": "ready", "heartbeat_age_s": 0.1,
                              "engine_epoch": 1, "slot": 0, **status_fields}
        self.completion = completion or default_completion
        self.error: Optional[ApiError] = None
        self.delay_s = 0.0
        self.requests: list = []
        self.cache_salts: list[str] = []  # the cache_salt of each request, in order
        self.cached_tokens = 0  # num_cached_tokens of every SequenceDone
        self.aborted: list = []
        self.controls: list = []
        self.paused: Optional[str] = None
        self.cancelled = 0
        self.num_starts = 0
        self.num_closes = 0

    async def start(self):
        self.num_starts += 1

    async def close(self):
        self.num_closes += 1

    def status(self) -> EngineStatus:
        return EngineStatus(**self.status_fields)

    def _sequence(self, prompt_ids, params, seq_index):
        ids = list(self.completion(prompt_ids, params, seq_index))
        logprobs = [] if params.logprobs_mode == LOGPROBS_NONE else [-0.5 - 0.01 * i for i in range(len(ids))]
        finish = "length" if len(ids) >= params.max_tokens else "stop"
        return ids, logprobs, finish

    def _tops(self, ids, logprobs, k):
        """With top_logprobs k: the token itself as the most likely, then the next ids at one
        nat less each (flat, k per token, as the engine packs them)."""
        if not k or not logprobs:
            return [], []
        top_ids, top_lps = [], []
        for t, lp in zip(ids, logprobs):
            top_ids += [t + j for j in range(k)]
            top_lps += [lp - j for j in range(k)]
        return top_ids, top_lps

    async def _begin(self, kind, prompt_ids, params, n, tag):
        self.requests.append((kind, list(prompt_ids), params, n, tag))
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error

    async def generate(self, prompt_ids, params, *, n=1, min_policy_version=-1, tag=None, cache_salt=""):
        await self._begin("generate", prompt_ids, params, n, tag)
        self.cache_salts.append(cache_salt)
        version = self.status_fields.get("policy_version", 0)
        out = []
        for s in range(n):
            ids, logprobs, finish = self._sequence(prompt_ids, params, s)
            top_ids, top_lps = self._tops(ids, logprobs, params.top_logprobs)
            out.append(SequenceDone(request_id=1, seq_index=s, finish_reason=finish, token_ids=ids,
                                    logprobs=logprobs, versions=[version] * len(ids),
                                    num_prompt_tokens=len(prompt_ids), batch_size=n, policy_version=version,
                                    queue_ms=0.5, ttft_ms=1.0, total_ms=2.0, top_ids=top_ids,
                                    top_logprobs=top_lps, num_cached_tokens=self.cached_tokens))
        return out

    async def stream(self, prompt_ids, params, *, n=1, min_policy_version=-1, tag=None, cache_salt=""):
        await self._begin("stream", prompt_ids, params, n, tag)
        self.cache_salts.append(cache_salt)
        version = self.status_fields.get("policy_version", 0)
        for s in range(n):
            ids, logprobs, finish = self._sequence(prompt_ids, params, s)
            for i, t in enumerate(ids):
                top_ids, top_lps = self._tops([t], logprobs[i:i + 1], params.top_logprobs)
                yield TokenChunk(request_id=1, seq_index=s, token_ids=[t], logprobs=logprobs[i:i + 1],
                                 versions=[version], top_ids=top_ids, top_logprobs=top_lps)
                await asyncio.sleep(0)
            yield SequenceDone(request_id=1, seq_index=s, finish_reason=finish, token_ids=[], logprobs=[],
                               versions=[], num_prompt_tokens=len(prompt_ids), batch_size=n,
                               policy_version=version, num_cached_tokens=self.cached_tokens)

    async def score(self, prompt_ids, completion_ids, *, logprobs_mode, params, tag=None,
                    top_logprobs=0, cache_salt=""):
        await self._begin("score", prompt_ids, params, 1, tag)
        self.cache_salts.append(cache_salt)
        logprobs = [-0.25] * len(completion_ids)
        top_ids, top_lps = self._tops(list(completion_ids), logprobs, top_logprobs)
        return ScoreResult(request_id=1, logprobs=logprobs, policy_version=self.status_fields.get("policy_version", 0),
                           top_ids=top_ids, top_logprobs=top_lps)

    async def control(self, op, mode=""):
        """Engine controls, recorded in `controls`; the pause state kept in `paused`."""
        self.controls.append((op, mode))
        if op == OP_PAUSE:
            self.paused = mode
        elif op == OP_RESUME:
            self.paused = None
        return ControlResult(1, self.paused is not None, self.paused or "")

    async def abort(self, tag):
        self.aborted.append(tag)
        return 0


def fake_codec(context_length: Optional[int] = 4096, template: Optional[str] = None) -> TextCodec:
    """A real `TextCodec` over a tokenizer built in memory instead of a model's files: byte-level
    with no merges (one token per UTF-8 byte, so any text round-trips), the demo model's special
    tokens (ids 0-3: pad, bos, eot, start; bos prepended to prompts) and its chat template unless
    `template` is given. Builds in milliseconds; API resource tests use it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from mlxsup import demo

    vocab = {token: i for i, token in enumerate(demo.SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in demo.SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(single=f"{demo.BOS} $A", pair=f"{demo.BOS} $A $B",
                                                       special_tokens=[(demo.BOS, vocab[demo.BOS])])
    return TextCodec(tok, template=demo.CHAT_TEMPLATE if template is None else template,
                     named_specials={"bos_token": demo.BOS, "eos_token": demo.EOT, "pad_token": demo.PAD},
                     context_length=context_length, name="fake-model")


class FakeAdapters:
    """The supervisor's side of the adapter routes: records calls, answers `reply` (default:
    success, version + 1). `committed()` returns `state`."""

    def __init__(self, run_dir: str = "/nonexistent"):
        self.run_dir = run_dir
        self.calls: list = []
        self.version = 0
        self.reply: Optional[dict] = None
        self.state: dict = {}
        self.prepared: dict = {}  # prepared_id -> path (the two-phase routes)

    async def reload(self, path, mode):
        self.calls.append((path, mode, os.path.isdir(path) if path else None))
        if self.reply is not None:
            return self.reply
        self.version += 1
        self.state = {"adapter_path": path, "policy_version": self.version, "committed_at": 1700000000.0}
        return {"ok": True, "policy_version": self.version, "adapter": path, "mode": mode,
                "message": f"Loaded adapter from {path}" if path else "Back to the base model"}

    async def prepare(self, path, ttl_s):
        self.calls.append(("prepare", path, ttl_s))
        if self.reply is not None:
            return self.reply
        key = f"p{len(self.calls)}"
        self.prepared[key] = path
        return {"ok": True, "prepared_id": key, "adapter": path, "policy_version": self.version,
                "next_policy_version": self.version + 1, "expires_in_s": float(ttl_s),
                "read_ms": 1.0, "prepare_ms": 2.0}

    async def commit(self, prepared_id, mode, policy_version):
        self.calls.append(("commit", prepared_id, mode, policy_version))
        path = self.prepared.pop(prepared_id, False)
        if path is False:
            return {"ok": False, "error": {"type": "not_found", "message": "no such prepared swap",
                                           "field": "prepared_id"}}
        reply = await self.reload(path, mode)
        return {**reply, "prepared_id": prepared_id}

    async def cancel(self, prepared_id):
        self.calls.append(("cancel", prepared_id))
        if self.prepared.pop(prepared_id, False) is False:
            return {"ok": False, "error": {"type": "not_found", "message": "no such prepared swap",
                                           "field": "prepared_id"}}
        return {"ok": True, "prepared_id": prepared_id, "policy_version": self.version}

    async def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return self.reply if self.reply is not None else {"ok": True, "entries_dropped": 3}

    def committed(self) -> dict:
        return dict(self.state)


def status_with(link: FakeEngineLink, **fields) -> None:
    """Change some EngineStatus fields of a fake link."""
    known = {f.name for f in dataclasses.fields(EngineStatus)}
    unknown = set(fields) - known
    if unknown:
        raise TypeError(f"unknown EngineStatus fields: {sorted(unknown)}")
    link.status_fields.update(fields)


def make_app(codec, run_dir: str, *, link: Optional[FakeEngineLink] = None,
             adapters: Optional[FakeAdapters] = None, **config_fields):
    """(app, link, adapters): the real app over fakes, with a ServerConfig built from
    `config_fields` (model defaults to "test-model")."""
    from mlxsup.api.app import create_app
    from mlxsup.config import ServerConfig

    config_fields.setdefault("model", "test-model")
    config = ServerConfig(run_dir=run_dir, **config_fields)
    # the limits a real engine publishes when ready, here from the tokenizer's model
    link = link or FakeEngineLink(vocab_size=getattr(codec, "vocab_size", None),
                                  context_length=getattr(codec, "context_length", None))
    adapters = adapters or FakeAdapters(run_dir)
    return create_app(config, engine_link=link, codec=codec, adapters=adapters), link, adapters
