"""Workloads whose prompts share long prefixes, where a prefix cache decides the speed.

multiturn      `conversations` conversations of `turns` turns, all at once (concurrency = the
               number of conversations); every conversation starts with the same system prompt
               of `system_words` words; each turn resends the whole conversation so far (system,
               earlier user messages and the server's own completions) plus a new user message,
               as an agent or a chat client does. A conversation's next turn waits for its last.
shared-prefix  `requests` requests of one shared prefix (the system prompt) plus a question of
               their own, closed loop at `concurrency` (few-shot prompts, GRPO-style shared
               instructions arriving one by one).

Both go through streamed /v1/completions with text prompts, so every server tokenizes what it
is sent (and a completion's text re-tokenized may differ from its tokens at the seam: the same
for every server).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx

from .loadgen import Item, Record, _describe
from .prompts import _words


@dataclass(frozen=True)
class Conversations:
    system: str
    users: list  # [conversation][turn] -> user message


def make_conversations(seed: int, conversations: int, turns: int, system_words: int,
                       user_words: int = 20) -> Conversations:
    rng = random.Random(seed)
    words = _words()
    system = "System: " + " ".join(rng.choice(words) for _ in range(system_words))
    users = [[" ".join(rng.choice(words) for _ in range(user_words)) for _ in range(turns)]
             for _ in range(conversations)]
    return Conversations(system, users)


def turn_prompt(conv: Conversations, c: int, history: list, turn: int) -> str:
    text = conv.system
    for t in range(turn):
        text += f"\nUser: {conv.users[c][t]}\nAssistant: {history[t]}"
    return text + f"\nUser: {conv.users[c][turn]}\nAssistant:"


def shared_prefix_items(conv: Conversations, count: int, seed: int, max_tokens: int) -> list[Item]:
    rng = random.Random(seed)
    words = _words()
    items = []
    for _ in range(count):
        question = " ".join(rng.choice(words) for _ in range(20))
        items.append(Item(f"{conv.system}\nUser: {question}\nAssistant:", 0, 1, max_tokens))
    return items


async def conversation_loop(base_url: str, protocol, conv: Conversations, max_tokens: int,
                            request_timeout: float) -> tuple[list[Record], float]:
    """Every conversation at once, each turn after the last; records carry `turn`."""
    n = len(conv.users)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    timeout = httpx.Timeout(request_timeout, connect=min(30.0, request_timeout))
    records: list[Record] = []
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

        async def one(c: int) -> None:
            history: list[str] = []
            for turn in range(len(conv.users[c])):
                rec = Record(t_start=time.perf_counter() - t0)
                rec.turn = turn
                rec.conversation = c
                records.append(rec)
                item = Item(turn_prompt(conv, c, history, turn), 0, 1, max_tokens)
                try:
                    await protocol.send(client, item, rec, t0)
                except httpx.TimeoutException as e:
                    rec.timeout, rec.error = True, f"timeout: {type(e).__name__}"
                except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
                    rec.error = _describe(e)
                if rec.t_end is None:
                    rec.t_end = time.perf_counter() - t0
                if not rec.ok:
                    return  # the conversation cannot go on without its last answer
                history.append(rec.text.strip())

        await asyncio.gather(*(one(c) for c in range(n)))
    ends = [r.t_end for r in records if r.t_end is not None]
    return records, (max(ends) if ends else time.perf_counter() - t0)


def by_turn(records: list[dict]) -> dict:
    """p50 TTFT and latency of each turn (seconds), over the conversations that reached it."""
    from .report import percentile

    out = {}
    for turn in sorted({r["turn"] for r in records if "turn" in r}):
        rs = [r for r in records if r.get("turn") == turn and r.get("ok")]
        ttft = [r["t_first"] - r["t_start"] for r in rs if r.get("t_first") is not None]
        lat = [r["t_end"] - r["t_start"] for r in rs if r.get("t_end") is not None]
        out[str(turn + 1)] = {"ok": len(rs), "ttft_p50_s": percentile(ttft, 50),
                              "latency_p50_s": percentile(lat, 50)}
    return out
