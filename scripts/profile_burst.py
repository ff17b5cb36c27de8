#!/usr/bin/env python3
"""Where does a burst's time go? (issue 17: separate requests released together against the
all-at-once BatchGenerator.)

Starts `mlxsup start` with the engine's step trace on (MLXSUP_STEP_TRACE, engine/steptrace.py),
releases --rounds rounds of R one-sample requests (or R requests of n = N) together on
/generate with log-probs, as `bench_server.py --workloads burst` does, and splits each round's
wall time on one clock (CLOCK_MONOTONIC, shared by the client and the engine process):

  arrive     release -> the engine has read the last request (the client writing them, HTTP,
             tokenizing, IPC; when the client began each request is given apart)
  admit      steps that admitted requests (prefill), from the first arrival to the last admission
  decode     steps with every row running and nothing left to admit
  tail       the last engine event -> the client holds the last answer (detokenizing, JSON)

and, over the round's loop iterations, the engine's own time: the runner (the model, sampling,
reading back tokens), the postprocessor (stop checks, detokenizing, events), routing events to
the rings, the flush/publish, polling requests, and waiting. Per decode step it gives the mean
of each at the full batch, in ms and in microseconds per row.

    python scripts/profile_burst.py --preset tiny --shape 128 --rounds 3
    python3 scripts/profile_burst.py --gpu --shape 128 --rounds 3 --out $OUT/burst
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_lib.burst import parse_shapes  # noqa: E402
import httpx  # noqa: E402

from bench_lib.loadgen import Item, MlxsupGenerate, Record  # noqa: E402
from bench_lib.prompts import Tokenizer, fixed_prompts  # noqa: E402
from bench_lib.rawhttp import RawClient  # noqa: E402

from mlxsup.engine import steptrace  # noqa: E402
from mlxsup.local_server import start_server  # noqa: E402

ENGINE_PHASES = ("runner_s", "post_s", "route_s", "flush_s", "poll_s", "wait_s")


async def release(url: str, proto: MlxsupGenerate, items: list[Item], t0: float,
                  client: str = "raw"):
    """Send every item at once (one connection each); the records and, with httpx, when the
    client began to write each request (its request hook), on the CLOCK_MONOTONIC of `t0`."""
    sent: list[float] = []
    if client == "raw":
        async with RawClient(url, 600.0) as session:
            records = [Record(t_start=0.0) for _ in items]
            await asyncio.gather(*(proto.send(session, item, rec, t0)
                                   for item, rec in zip(items, records)))
        return records, sent

    async def stamp(request):
        sent.append(time.monotonic())

    limits = httpx.Limits(max_connections=len(items) + 4, max_keepalive_connections=len(items) + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600.0),
                                 event_hooks={"request": [stamp]}) as client:
        records = [Record(t_start=0.0) for _ in items]
        await asyncio.gather(*(proto.send(client, item, rec, t0)
                               for item, rec in zip(items, records)))
    return records, sent


def split_round(rows: list[dict], t_release: float, t_done: float, batch: int) -> dict:
    """One round's split (see the module docstring) from the trace lines inside it."""
    lines = [r for r in rows if t_release <= r["t"] <= t_done]
    if not lines:
        return {}
    got = [r for r in lines if r["msgs"]]
    admits = [r for r in lines if r["admitted"]]
    emits = [r for r in lines if r["events"]]
    last_arrival = got[-1]["t"] + got[-1]["poll_s"] if got else t_release
    first_admit = admits[0]["t"] if admits else last_arrival
    last_admit = admits[-1]["t"] + admits[-1]["step_s"] if admits else first_admit
    last_event = emits[-1]["t"] + emits[-1]["step_s"] + emits[-1]["route_s"] if emits else t_done
    full = [r for r in lines if r["rows"] == batch and not r["admitted"] and r["step_s"] > 0]
    out = dict(
        wall_s=t_done - t_release,
        first_arrival_s=(got[0]["t"] - t_release) if got else None,
        arrive_s=last_arrival - t_release,
        wait_before_first_admit_s=first_admit - (got[0]["t"] if got else t_release),
        admit_s=last_admit - first_admit,
        admission_steps=len(admits),
        admitted_tokens=int(sum(r["admitted_tokens"] for r in admits)),
        max_rows=int(max(r["rows"] for r in lines)),
        decode_s=last_event - last_admit,
        tail_s=t_done - last_event,
        iterations=len(lines),
        steps=sum(1 for r in lines if r["step_s"] > 0),
        full_batch_steps=len(full),
        engine={k: sum(r[k] for r in lines) for k in ENGINE_PHASES},
    )
    if full:
        per = {k: sum(r[k] for r in full) / len(full) for k in ENGINE_PHASES}
        step = sum(r["step_s"] + r["route_s"] + r["flush_s"] + r["poll_s"] + r["wait_s"]
                   for r in full) / len(full)
        out["full_batch_step_ms"] = {k: round(v * 1e3, 3) for k, v in per.items()}
        out["full_batch_step_ms"]["loop"] = round(step * 1e3, 3)
        out["full_batch_us_per_row"] = {k: round(v * 1e6 / batch, 1) for k, v in per.items()}
    return out


def _fmt(split: dict) -> str:
    if not split:
        return "  (no trace lines in the round)"
    e = split["engine"]
    lines = [
        *([f"  client began its first request at {split['client_first_send_s']:.3f} s, its last "
           f"at {split['client_last_send_s']:.3f} s"] if split.get("client_last_send_s") else []),
        f"  wall {split['wall_s']:.3f} s = arrive {split['arrive_s']:.3f} (first request read at "
        f"{split['first_arrival_s'] or 0:.3f}) | wait before the first admission "
        f"{split['wait_before_first_admit_s']:.3f} | admit {split['admit_s']:.3f} "
        f"({split['admission_steps']} steps, {split['admitted_tokens']} prompt tokens, up to "
        f"{split['max_rows']} rows) | decode {split['decode_s']:.3f} | tail {split['tail_s']:.3f}",
        "  engine loop: " + ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in e.items())
        + f" over {split['iterations']} iterations ({split['steps']} steps)",
    ]
    if "full_batch_step_ms" in split:
        ms, us = split["full_batch_step_ms"], split["full_batch_us_per_row"]
        lines.append(f"  full-batch step ({split['full_batch_steps']} of them), ms: "
                     + ", ".join(f"{k[:-2] if k != 'loop' else k} {v}" for k, v in ms.items())
                     + "; us/row: " + ", ".join(f"{k[:-2]} {v}" for k, v in us.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the demo --preset, built if missing)")
    p.add_argument("--preset", default=None, help="demo preset (default tiny; --gpu bench1b)")
    p.add_argument("--gpu", action="store_true", help="bench1b, shape 128")
    p.add_argument("--shape", default="128", help="R or RxN (R requests of n = N)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="raw: bench_lib/rawhttp.py (default), httpx: its AsyncClient")
    p.add_argument("--mlxsup-args", default="", help="more `mlxsup start` flags")
    p.add_argument("--out", help="directory for the trace, the logs and split.json")
    args = p.parse_args(argv)
    (reqs, n), = parse_shapes(args.shape)
    batch = reqs * n
    model = args.model
    if model is None:
        from mlxsup.demo import default_demo_dir, ensure_demo_model

        preset = args.preset or ("bench1b" if args.gpu else "tiny")  # (bench_server's cache dir)
        model = ensure_demo_model(os.path.join(os.path.dirname(default_demo_dir()),
                                               f"bench-{preset}-seed{args.seed}"),
                                  seed=args.seed, preset=preset)
    out = args.out or tempfile.mkdtemp(prefix="profile-burst-")
    os.makedirs(out, exist_ok=True)
    trace_path = os.path.join(out, "trace.txt")
    tok = Tokenizer(model)
    proto = MlxsupGenerate(max_tokens=args.max_tokens, temperature=1.0, ignore_eos=True,
                           logprobs=True)
    rounds = [[Item(q.text, len(q.ids), n) for q in fixed_prompts(tok, args.seed + 9000 + r, reqs,
                                                                  args.prompt_tokens)]
              for r in range(args.rounds + 1)]  # (+1: the warm-up round, not reported)
    flags = ["--max-batch", str(batch), "--max-tokens", str(args.max_tokens),
             "--max-queue", str(max(512, 2 * reqs)), "--log-level", "INFO",
             *args.mlxsup_args.split()]
    times = []
    with start_server(model, os.path.join(out, "run"), *flags,
                      env={steptrace.ENV: trace_path}) as server:
        for r, items in enumerate(rounds):
            t0 = time.monotonic()
            records, sent = asyncio.run(release(server.url, proto, items, t0, args.client))
            t1 = time.monotonic()
            bad = [x.error for x in records if not x.ok]
            if bad:
                print(f"round {r}: {len(bad)} failed: {bad[0]}", file=sys.stderr)
                return 1
            tokens = sum(x.tokens for x in records)
            times.append((t0, t1, tokens, min(sent, default=t0) - t0, max(sent, default=t0) - t0))
            print(f"round {r}{' (warm-up)' if r == 0 else ''}: {t1 - t0:.3f} s, "
                  f"{tokens / (t1 - t0):.1f} tok/s", flush=True)
            time.sleep(1.0)
        server.stop()
    rows = steptrace.read(trace_path)
    splits = []
    for r, (t0, t1, tokens, first_sent, last_sent) in enumerate(times):
        split = split_round(rows, t0, t1, batch)
        split.update(round=r, tokens=tokens, tokens_per_s=tokens / (t1 - t0),
                     client_first_send_s=first_sent, client_last_send_s=last_sent)
        splits.append(split)
        if r:
            print(f"round {r}: {tokens / (t1 - t0):.1f} tok/s\n{_fmt(split)}")
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump(dict(argv=sys.argv, shape=args.shape, model=model, rounds=splits), f, indent=1)
    print(f"# {out}/split.json, trace {trace_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
