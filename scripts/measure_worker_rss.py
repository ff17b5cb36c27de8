#!/usr/bin/env python3
"""Resident memory of the API workers of a real server (`mlxsup start`: supervisor, engine,
gunicorn and its workers), once they are up and again after they served requests of every
kind that touches the tokenizer (text prompts, chat messages, OpenAI chat and completions).

    python scripts/measure_worker_rss.py                       # the demo model, 2 workers
    python scripts/measure_worker_rss.py --model DIR --workers 4 --requests 200

Prints one line per worker and a JSON summary (MiB); says whether torch and transformers are
installed in this environment, since that is what made workers heavy: transformers imports
torch when it finds it (docs/reliability.md, "API worker memory").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time

import httpx
import psutil

MIB = 1 << 20


def workers_of(run_dir: str) -> list[psutil.Process]:
    """The API workers, as the supervisor's status lists them."""
    from mlxsup.supervisor import protocol

    status = protocol.call(run_dir, {"op": "status"})
    return [psutil.Process(p["pid"]) for p in status["processes"] if p["role"] == "api-worker"]


def rss_mib(procs) -> list[float]:
    return [round(p.memory_info().rss / MIB, 1) for p in procs]


def serve_requests(client: httpx.Client, num: int) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is RL? " * 20}]
    bodies = [("/generate", {"prompt": "What is machine learning? " * 30, "max_tokens": 8}),
              ("/generate", {"messages": chat, "max_tokens": 8, "logprobs": 1}),
              ("/v1/chat/completions", {"model": "m", "messages": chat, "max_tokens": 8, "logprobs": True}),
              ("/v1/completions", {"model": "m", "prompt": "héllo wörld 😀 " * 50, "max_tokens": 8,
                                   "stream": True})]
    for i in range(num):
        path, body = bodies[i % len(bodies)]
        client.post(path, json=body, headers={"Connection": "close"}).raise_for_status()  # spread over workers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory or hub id (default: the demo model)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args(argv)

    if args.model is None:
        from mlxsup.demo import ensure_demo_model

        args.model = ensure_demo_model()
    from mlxsup.local_server import start_server

    with tempfile.TemporaryDirectory(prefix="mlxsup-rss-run-") as run_dir:
        with start_server(args.model, run_dir, "--workers", str(args.workers), "--log-level", "WARNING",
                          cwd=tempfile.gettempdir(), timeout=600) as server, server.client(timeout=120) as client:
            deadline = time.monotonic() + 60
            while len(workers_of(run_dir)) < args.workers:  # every worker booted (health answers from one)
                if time.monotonic() > deadline:
                    raise SystemExit("the API workers did not come up")
                time.sleep(0.2)
            for _ in range(4 * args.workers):  # let each worker load its tokenizer (lifespan start-up)
                client.get("/health").raise_for_status()
            workers = workers_of(run_dir)
            started = rss_mib(workers)
            serve_requests(client, args.requests)
            served = rss_mib(workers)
    for pid, a, b in zip((w.pid for w in workers), started, served):
        print(f"api worker {pid}: {a:.1f} MiB up, {b:.1f} MiB after {args.requests} requests")
    print(json.dumps({
        "model": args.model, "workers": args.workers, "requests": args.requests,
        "torch_installed": importlib.util.find_spec("torch") is not None,
        "transformers_installed": importlib.util.find_spec("transformers") is not None,
        "rss_mib_up": started, "rss_mib_served": served, "max_rss_mib": max(served + started),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
