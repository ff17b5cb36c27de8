"""(d) Adapter swaps under load (mlxsup only).

A closed-loop load of /generate requests (mlxsup's trainer route, which reports the version of
every token) runs for `--swap-duration` seconds; every `--swap-interval` seconds the benchmark
POSTs /load_adapter with one of two adapters in turn, in commit `mode` (inflight, drain, abort).
For each swap it measures, from the moment the swap request is sent:
- ack: until /load_adapter answers (with the new policy version V);
- probe: until a one-token /generate sent at the same moment with `min_policy_version: V`
  answers: the first token of a new request under the new version (client clock, exact);
- in flight: until the first token of version V among the requests under load, placed on the
  client clock from the server's `ttft_ms`/`latency_ms` and the token's position, by linear
  interpolation over the request's decode time (an estimate, good to about one decode step);
- engine: the server's own exact figure (the supervisor's status `last_swap`): from the
  engine's receipt of the swap to the end of the first decode step under the new weights,
  and from the commit to it (the client -> API -> supervisor -> engine hop, a few ms, is not
  in it).
Failed requests are the load's errors and timeouts, failed swaps, and stale probes; in drain
mode a completion whose tokens carry two versions is counted too (drain promises one).
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx

from bench_lib import report
from bench_lib.loadgen import closed_loop
from bench_lib.monitor import cpu_delta
from mlxsup.config import FIRST_TOKEN_FIELDS, SWAP_TIMINGS  # the engine's account of each swap in /load_adapter's answer
from mlxsup.demo import write_random_adapter
from mlxsup.supervisor import protocol


def run_swaps(server, args, model, work, main, native, mode, monitor, name):
    # nonzero A and B (std 0.05) on q_proj and v_proj of every layer: each swap really changes the outputs
    adapter_dirs = [os.path.abspath(write_random_adapter(os.path.join(args.out, "adapters", tag), model, seed, std=0.05))
                    for tag, seed in (("a", 1), ("b", 2))]
    items = work.items(work.swap)
    conc = args.swap_concurrency
    section = f"{name}/swap-{mode}/{conc}"
    cpu0 = monitor.cpu_seconds(name)
    monitor.begin(section)
    records, elapsed, swaps = asyncio.run(
        _run(server.base_url, native, items, conc, args, adapter_dirs, mode, work.warm[0].text,
             server.run_dir))
    monitor.end()
    recs = [r.as_dict() for r in records]
    stats = report.summarize(recs, elapsed, args.max_tokens)
    inflight = []
    for s in swaps:
        s["inflight_ms"] = None
        if s["ok"] and s["version"] is not None:
            t = _first_token_of(records, s["version"], s["t_request"])
            if t is not None:
                s["inflight_ms"] = (t - s["t_request"]) * 1000.0
                inflight.append(s["inflight_ms"])
    probe = [s["probe_ms"] for s in swaps if s.get("probe_ms") is not None]
    acks = [s["ack_ms"] for s in swaps if s.get("ack_ms") is not None and s["ok"]]
    engine_first = [s["first_token_ms"] for s in swaps if s.get("first_token_ms") is not None]
    multi = sum(1 for r in records if any(len(v) > 1 for v in r.versions if isinstance(v, list)))
    swap = {
        "swaps": len(swaps),
        "swaps_ok": sum(1 for s in swaps if s["ok"]),
        "ack_ms": acks,
        "ack_p50_ms": report.percentile(acks, 50),
        "ack_max_ms": max(acks) if acks else None,
        "probe_ms": probe,
        "probe_p50_ms": report.percentile(probe, 50),
        "probe_max_ms": max(probe) if probe else None,
        "probe_failed": sum(1 for s in swaps if s["ok"] and (s.get("probe_error") or s.get("probe_stale"))),
        "inflight_ms": inflight,
        "inflight_p50_ms": report.percentile(inflight, 50),
        "inflight_max_ms": max(inflight) if inflight else None,
        "engine_first_token_ms": engine_first,
        "engine_first_token_p50_ms": report.percentile(engine_first, 50),
        "engine_first_token_max_ms": max(engine_first) if engine_first else None,
        "commit_to_first_token_p50_ms": report.percentile(
            [s["commit_to_first_token_ms"] for s in swaps
             if s.get("commit_to_first_token_ms") is not None], 50),
        "multi_version_completions": multi,
        **{f"{k[:-3]}_p50_ms": report.percentile(
            [s[k] for s in swaps if s.get(k) is not None], 50) for k in SWAP_TIMINGS},
        "detail": swaps,
    }
    cell = {"system": name, "workload": "swap", "mode": mode, "concurrency": conc,
            "route": native.path, "interval_s": args.swap_interval,
            "peak_rss_mb": monitor.peaks(section), "cpu_s": cpu_delta(monitor.cpu_seconds(name), cpu0),
            "swap": swap, "stats": stats}
    return cell, recs


def _first_token_of(records, version, t_request):
    """Earliest estimated client time of a token of `version` (or later) generated after
    `t_request`, over the load's completed requests."""
    best = None
    for r in records:
        if not r.ok or r.t_first is None or r.t_end is None or not r.token_versions:
            continue
        tv = r.token_versions
        idx = next((i for i, v in enumerate(tv) if v >= version), None)
        if idx is None:
            continue
        span = r.t_end - r.t_first
        t = r.t_first + (span * idx / (len(tv) - 1) if len(tv) > 1 else 0.0)
        if t >= t_request and (best is None or t < best):
            best = t
    return best


async def _current_version(client) -> int:
    r = await client.get("/metrics", headers={"Accept": "application/json"})
    return int(r.json()["current_policy_version"])


async def _engine_first_token(run_dir, version, wait_s=5.0):
    """The supervisor's `last_swap` first-token fields for `version` once the engine has
    reported them (None after `wait_s`, or if a later swap came first)."""
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline:
        try:
            last = (await asyncio.to_thread(protocol.call, run_dir, {"op": "status"}, 5.0)
                    ).get("last_swap") or {}
        except Exception:  # noqa: BLE001 - a figure missing, not a failed swap
            return None
        if last.get("policy_version") != version:
            return None
        if last.get("first_token_ms") is not None:
            return last
        await asyncio.sleep(0.1)
    return None


async def _run(base_url, proto, items, conc, args, adapter_dirs, mode, probe_text, run_dir):
    t0 = time.perf_counter()
    proto.keep_token_versions = True
    load = asyncio.ensure_future(closed_loop(
        base_url, proto, items, conc, 10**9, args.swap_duration, args.grace, args.request_timeout, t0=t0))
    swaps = []
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:
        version = await _current_version(client)
        await asyncio.sleep(min(2.0, args.swap_interval))  # the load is under way
        k = 0
        while time.perf_counter() - t0 < args.swap_duration - args.swap_interval / 2:
            path = adapter_dirs[k % 2]
            k += 1
            s = {"adapter": os.path.basename(path), "mode": mode, "ok": False, "version": None,
                 "expected_version": version + 1, "t_request": time.perf_counter() - t0}
            swap_call = client.post("/load_adapter", json={"adapter_path": path, "mode": mode})
            probe_call = client.post("/generate", json={"prompt": probe_text, "max_tokens": 1,
                                                        "temperature": 0.0,
                                                        "min_policy_version": version + 1})
            ack, probe = await asyncio.gather(_timed(swap_call, t0), _timed(probe_call, t0))
            r, t_ack, err = ack
            if r is not None:
                s["ack_ms"] = (t_ack - s["t_request"]) * 1000.0
                s["status"] = r.status_code
                if r.status_code == 200:
                    body = r.json()
                    s["version"] = body.get("policy_version")
                    s.update({k: body.get(k) for k in SWAP_TIMINGS})
                    s["ok"] = s["version"] is not None
                    version = s["version"] if s["ok"] else version
                else:
                    s["error"] = r.text[:300]
            else:
                s["error"] = err
            pr, t_probe, perr = probe
            if pr is not None and pr.status_code == 200:
                s["probe_ms"] = (t_probe - s["t_request"]) * 1000.0
                got = pr.json().get("generated_by_version")
                s["probe_version"] = got
                s["probe_stale"] = s["ok"] and (got is None or got < s["version"])
            else:
                s["probe_error"] = perr or f"HTTP {pr.status_code}: {pr.text[:300]}"
            if s["ok"]:
                last = await _engine_first_token(run_dir, s["version"])
                if last:
                    s.update({k: last.get(k) for k in FIRST_TOKEN_FIELDS})
            swaps.append(s)
            spent = time.perf_counter() - t0 - s["t_request"]
            await asyncio.sleep(max(0.0, args.swap_interval - spent))
    records, elapsed = await load
    return records, elapsed, swaps


async def _timed(call, t0):
    try:
        r = await call
        return r, time.perf_counter() - t0, None
    except httpx.HTTPError as e:
        return None, time.perf_counter() - t0, f"{type(e).__name__}: {e}"
