#!/usr/bin/env python3
"""Load test (docs/reliability.md, Load test): a burst of requests at high concurrency through several API workers,
on loopback, against servers this script starts and stops itself.

Two phases, each on its own fresh server (`mlxsup start`, 127.0.0.1, a free port, a temporary
run directory):

  within   --max-queue >= --concurrency: the engine's queue can never be over its bound, so the
           pass criteria are zero lost, zero 5xx and zero 503;
  over     --max-queue far below the concurrency (--over-queue): the queue bound IS exceeded,
           so 503s must appear; each must be a retryable `overloaded` with Retry-After, the
           client retries it (honouring Retry-After, as mlxsup.client does), and in the end
           every request is answered: zero lost, zero 5xx. 503s are counted.

"Lost" = a request that got no HTTP answer (connection error, timeout) or an answer that is not
its own (wrong request_id, missing results). Every 200 answer is checked: request_id echoed,
1 <= tokens <= max_tokens, one log-prob and one version per token.

The mix: 80% /generate (n=1), 10% /generate with n=4 (a GRPO group), 10% /score.

    python scripts/load_test.py                          # 2,000 requests, concurrency 256, 4 workers
    python scripts/load_test.py --requests 500 --phases within --out /tmp/load.json

Prints a summary per phase and writes everything to --out (JSON). Exit code 0 when every
criterion holds, 1 otherwise. Stops by itself: each phase ends when its requests are answered
(or after --phase-timeout seconds, which fails it), and the servers are stopped whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import httpx

from mlxsup.local_server import LocalServer, ServerStartError, run_mlxsup, start_server

# ---------------------------------------------------------------------- servers (shared with soak.py)


def build_model(preset: str, directory: str) -> str:
    out = run_mlxsup("demo-model", directory, "--preset", preset, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"cannot build the {preset} demo model: {out.stderr}")
    return out.stdout.strip()


def start(model: str, run_dir: str, *flags: str) -> LocalServer:
    try:
        return start_server(model, run_dir, *flags)
    except ServerStartError as e:
        raise SystemExit(str(e)) from None


def stop(server: LocalServer) -> dict:
    """Stop it; report what is left (processes, segments, files that a stop must remove)."""
    return server.stop(timeout=180)


# ---------------------------------------------------------------------- one phase

WORDS = ("policy gradient reward model token batch adapter rollout advantage value loss update step sample "
         "learning rate clip ratio baseline group trainer server memory engine queue").split()  # fmt: skip


def make_request(i: int, rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    rid = f"load-{i}-{uuid.uuid4().hex[:8]}"
    kind = rng.random()
    if kind < 0.1:
        ids = [rng.randint(3, 200) for _ in range(rng.randint(3, 30))]
        return "/score", {"prompt_ids": ids, "completion_ids": [rng.randint(3, 200) for _ in range(rng.randint(1, 16))],
                          "logprobs_mode": "raw", "request_id": rid}  # fmt: skip
    body = {"prompt": prompt, "max_tokens": rng.randint(max(1, max_tokens // 2), max_tokens), "temperature": 0.8,
            "logprobs": 1, "seed": i, "request_id": rid}  # fmt: skip
    if kind < 0.2:
        body["n"] = 4
    return "/generate", body


def check_answer(path: str, body: dict, data) -> Optional[str]:
    """None if `data` is a complete answer to `body`, else what is wrong."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if path == "/score":
        if data.get("request_id") != body["request_id"]:
            return "request_id"
        if len(data.get("logprobs") or []) != len(body["completion_ids"]):
            return "score logprobs"
        return None
    results = data["results"] if "results" in data else [data]
    if len(results) != body.get("n", 1):
        return f"{len(results)} results for n={body.get('n', 1)}"
    for r in results:
        if r.get("request_id") != body["request_id"]:
            return "request_id"
        ids = r.get("completion_ids") or []
        if not 1 <= len(ids) <= body["max_tokens"] and r.get("finish_reason") != "abort":
            return f"{len(ids)} tokens"
        if len(r.get("logprobs") or []) != len(ids) or len(r.get("token_versions") or []) != len(ids):
            return "logprobs/token_versions length"
    return None


@dataclass
class Outcome:
    path: str
    attempts: int = 0
    status: Optional[int] = None  # final
    error: Optional[str] = None  # final: no answer or a wrong one
    statuses: list = field(default_factory=list)  # every attempt's status (None: no HTTP answer)
    types_503: list = field(default_factory=list)
    retry_after_missing: int = 0
    latency_s: float = 0.0


async def one(client: httpx.AsyncClient, i: int, rng: random.Random, args, retry_503: bool) -> Outcome:
    path, body = make_request(i, rng, args.max_tokens)
    out = Outcome(path)
    t0 = time.monotonic()
    while True:
        out.attempts += 1
        try:
            r = await client.post(path, json=body)
        except httpx.HTTPError as e:
            out.statuses.append(None)
            out.status, out.error = None, f"no answer: {e!r}"
            break
        out.statuses.append(r.status_code)
        out.status = r.status_code
        if r.status_code == 503:
            try:
                out.types_503.append(r.json()["error"]["type"])
            except (ValueError, KeyError, TypeError):
                out.types_503.append("?")
            retry_after = r.headers.get("retry-after")
            if retry_after is None:
                out.retry_after_missing += 1
            if retry_503 and out.attempts < args.max_attempts:
                # Honour Retry-After (seconds) with jitter, as mlxsup.client does, capped so the
                # phase stays short.
                wait = min(float(retry_after or 1), args.retry_cap_s) * (0.5 + rng.random())
                await asyncio.sleep(wait)
                continue
            out.error = "503 not retried" if not retry_503 else "503 after every attempt"
            break
        if r.status_code != 200:
            out.error = f"HTTP {r.status_code}: {r.text[:200]}"
            break
        out.error = check_answer(path, body, r.json())
        break
    out.latency_s = time.monotonic() - t0
    return out


async def sample_queue(url: str, stop: asyncio.Event, seen: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                m = (await c.get("/metrics")).json()
                seen["max_queue_depth"] = max(seen.get("max_queue_depth", 0), m["queue_depth"])
                seen["max_running"] = max(seen.get("max_running", 0), m["num_running"])
            await asyncio.sleep(0.05)


async def run_phase(url: str, args, retry_503: bool) -> dict:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    sem = asyncio.Semaphore(args.concurrency)
    seen: dict = {}
    stop_sampling = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        async def bounded(i):
            async with sem:
                return await one(client, i, random.Random(rng.random()), args, retry_503)

        sampler = asyncio.create_task(sample_queue(url, stop_sampling, seen))
        t0 = time.monotonic()
        try:
            outcomes = await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(args.requests))),
                                              timeout=args.phase_timeout)  # fmt: skip
        except asyncio.TimeoutError:
            outcomes = None
        wall = time.monotonic() - t0
        stop_sampling.set()
        await sampler
    if outcomes is None:
        return {"timed_out": True, "wall_s": wall}
    lat = sorted(o.latency_s for o in outcomes)
    by_status: dict = {}
    for o in outcomes:
        for s in o.statuses:
            by_status[str(s)] = by_status.get(str(s), 0) + 1
    types_503: dict = {}
    for o in outcomes:
        for t in o.types_503:
            types_503[t] = types_503.get(t, 0) + 1
    return {
        "timed_out": False,
        "requests": len(outcomes),
        "http_attempts": sum(o.attempts for o in outcomes),
        "answered_ok": sum(1 for o in outcomes if o.status == 200 and o.error is None),
        "lost": sum(1 for o in outcomes if o.error is not None),
        "lost_examples": [o.error for o in outcomes if o.error][:5],
        "statuses_all_attempts": by_status,
        "num_5xx": sum(1 for o in outcomes for s in o.statuses if s is not None and s >= 500 and s != 503),
        "num_503": sum(1 for o in outcomes for s in o.statuses if s == 503),
        "types_503": types_503,
        "retry_after_missing": sum(o.retry_after_missing for o in outcomes),
        "requests_retried": sum(1 for o in outcomes if o.attempts > 1),
        "max_attempts_seen": max(o.attempts for o in outcomes),
        "by_route": {p: sum(1 for o in outcomes if o.path == p) for p in ("/generate", "/score")},
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(outcomes) / wall, 1),
        "latency_s": {"p50": round(lat[len(lat) // 2], 3), "p90": round(lat[int(len(lat) * 0.9)], 3),
                      "p99": round(lat[int(len(lat) * 0.99)], 3), "max": round(lat[-1], 3)},  # fmt: skip
        "max_queue_depth_seen": seen.get("max_queue_depth"),
        "max_running_seen": seen.get("max_running"),
    }


def judge(name: str, res: dict, max_queue: int, concurrency: int) -> list[str]:
    """The criteria; returns the failures."""
    if res.get("timed_out"):
        return [f"{name}: did not finish within the phase timeout"]
    fails = []
    if res["lost"]:
        fails.append(f"{name}: {res['lost']} requests lost ({res['lost_examples']})")
    if res["num_5xx"]:
        fails.append(f"{name}: {res['num_5xx']} 5xx answers other than 503")
    if res["retry_after_missing"]:
        fails.append(f"{name}: {res['retry_after_missing']} 503s without Retry-After")
    other_503 = {t: n for t, n in res["types_503"].items() if t != "overloaded"}
    if other_503:
        fails.append(f"{name}: 503s that are not the queue bound: {other_503}")
    if max_queue >= concurrency and res["num_503"]:
        fails.append(f"{name}: {res['num_503']} 503s although the queue bound ({max_queue}) >= concurrency")
    if max_queue < concurrency and not res["num_503"]:
        fails.append(f"{name}: no 503 although the queue bound ({max_queue}) < concurrency: is the bound enforced?")
    return fails


def print_phase(name: str, flags: list, res: dict, left: dict, fails: list) -> None:
    print(f"\n== phase {name}: server flags {' '.join(flags)}")
    if res.get("timed_out"):
        print(f"   TIMED OUT after {res['wall_s']:.0f} s")
    else:
        print(f"   requests {res['requests']} ({res['by_route']}), HTTP attempts {res['http_attempts']}, "
              f"wall {res['wall_s']} s, {res['requests_per_s']} req/s")
        print(f"   answered {res['answered_ok']}, LOST {res['lost']}, 5xx (not 503) {res['num_5xx']}, "
              f"503 {res['num_503']} {res['types_503'] or ''} on {res['requests_retried']} requests "
              f"(most attempts for one request: {res['max_attempts_seen']})")
        print(f"   latency p50 {res['latency_s']['p50']} s, p90 {res['latency_s']['p90']} s, "
              f"p99 {res['latency_s']['p99']} s, max {res['latency_s']['max']} s (including retries)")
        print(f"   engine queue depth peak {res['max_queue_depth_seen']} (bound {res['max_queue']}), "
              f"running peak {res['max_running_seen']}")
    print(f"   after stop: processes {left['processes'] or 'none'}, segments {left['segments'] or 'none'}, "
          f"run-dir files {left['files'] or 'none'}")
    print("   " + ("PASS" if not fails else "FAIL: " + "; ".join(fails)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=256, help="queue bound of the 'within' phase")
    ap.add_argument("--over-queue", type=int, default=16, help="queue bound of the 'over' phase")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24, help="largest max_tokens of a request")
    ap.add_argument("--model", help="model directory (default: the demo model of --preset, built in a temp dir)")
    ap.add_argument("--preset", default="demo", help="demo-model preset when --model is not given")
    ap.add_argument("--phases", default="within,over")
    ap.add_argument("--max-attempts", type=int, default=50, help="attempts per request in the 'over' phase")
    ap.add_argument("--retry-cap-s", type=float, default=0.25, help="cap on a Retry-After wait")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--phase-timeout", type=float, default=480.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="load_test_result.json")
    args = ap.parse_args(argv)

    report = {"args": vars(args), "phases": {}, "failures": []}
    with tempfile.TemporaryDirectory(prefix="mlxsup-load-") as tmp:
        model = args.model or build_model(args.preset, os.path.join(tmp, "model"))
        print(f"mlxsup load test: {args.requests} requests at concurrency {args.concurrency} through "
              f"{args.workers} API workers, model {model}, loopback only")
        for name in [p.strip() for p in args.phases.split(",") if p.strip()]:
            bound = args.max_queue if name == "within" else args.over_queue
            flags = ["--workers", str(args.workers), "--max-queue", str(bound), "--max-batch", str(args.max_batch),
                     "--max-tokens", str(args.max_tokens), "--log-level", "WARNING"]  # fmt: skip
            server = start(model, os.path.join(tmp, f"run-{name}"), *flags)
            left = {"processes": [], "segments": [], "files": []}
            try:
                st = server.status()
                roles = [p["role"] for p in st["processes"]]
                res = asyncio.run(run_phase(server.url, args, retry_503=(name == "over")))
                res["max_queue"] = bound
                res["processes_before"] = roles
                after = server.status()
                res["engine_restarts"] = after["engine"]["restarts"]
                res["api_restarts"] = after.get("api_restarts")
                res["worker_pids_unchanged"] = sorted(p["pid"] for p in st["processes"] if p["role"] == "api-worker") == \
                    sorted(p["pid"] for p in after["processes"] if p["role"] == "api-worker")  # fmt: skip
            finally:
                left = stop(server)
            fails = judge(name, res, bound, args.concurrency)
            if not res.get("timed_out"):
                if res["engine_restarts"]:
                    fails.append(f"{name}: the engine restarted {res['engine_restarts']} times")
                if not res["worker_pids_unchanged"]:
                    fails.append(f"{name}: an API worker was replaced (it died)")
            if left["processes"] or left["segments"] or left["files"] or left["stop_exit_code"] != 0:
                fails.append(f"{name}: the stop left {left}")
            res["after_stop"] = left
            report["phases"][name] = res
            report["failures"] += fails
            print_phase(name, flags, res, left, fails)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    ok = not report["failures"]
    print(f"\n{'PASS' if ok else 'FAIL'}: {len(report['failures'])} failed criteria; JSON written to {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
