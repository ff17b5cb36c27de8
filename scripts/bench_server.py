#!/usr/bin/env python3
"""Side-by-side benchmark: mlxsup against mlx-lm's server and a raw BatchGenerator loop.

In one run, on the same model, prompts and BLAS environment:
  mlxsup         `mlxsup start --max-batch 5` (the seed's default)
  mlxsup-tuned   `mlxsup start --max-batch N` (N: --tuned-max-batch)
  mlx_lm         `python -m mlx_lm server` with its defaults (decode concurrency 32)
  mlx_lm-tuned   the same with --decode-concurrency N (not in the default set)
  raw            a plain mlx-lm BatchGenerator loop in one process (the limit); with it, at
                 concurrency 1, `generate_step` single-stream (mlx-lm's own fastest path)

Workloads (--workloads):
  single  (a) one sample per request, closed loop at each --concurrency
  grpo    (b) 16 prompts x n=8 (mlxsup: 16 requests with n=8 on /generate; mlx_lm: 128 requests)
  mixed   (c) prompt lengths log-uniform in 16..1024 tokens, closed loop
  swap    (d) mlxsup only: POST /load_adapter of two alternating adapters every few seconds
              under load; time from the swap request to the first token of the new version
  multiturn      (e) 8 conversations x 4 turns at once, a 300-word system prompt shared by all,
                 32 tokens a turn; each turn resends the conversation so far (bench_lib/multiturn)
  shared-prefix  (f) 32 requests of that system prompt + a question of their own, concurrency 8
  burst   (g) issue 17: each --burst-shapes shape's requests released together, --burst-rounds
              rounds (fresh prompts each), round 0 reported apart from the warm rounds; with
              log-probs; runs first, right after the server is ready (bench_lib/burst.py)

Systems for (g): raw-static, one BatchGenerator with the whole round inserted at once (the limit).

Examples (see docs/benchmarks.md for the recorded runs):
  python scripts/bench_server.py                      # CPU, bench75m, everything
  python scripts/bench_server.py --quick              # smoke test on the tiny model
  python scripts/bench_server.py --gpu                # H100: bench1b bf16, c=1,32,128,256
  python scripts/bench_server.py --systems raw,mlx_lm --workloads single --concurrency 1,8
  python scripts/bench_server.py --systems mlxsup-tuned,mlx_lm --workloads multiturn,shared-prefix
  python scripts/bench_server.py --gpu --systems mlxsup-tuned,raw-static --workloads burst

Writes OUT/results.json (meta, one cell per system x workload x concurrency), OUT/records.jsonl
(every request), OUT/bench.png (if matplotlib is installed) and prints the summary table last.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_lib import report  # noqa: E402
from bench_lib.loadgen import Item, MlxsupGenerate, OpenAICompletions, closed_loop  # noqa: E402
from bench_lib.monitor import TreeMonitor, cpu_delta, wait_idle  # noqa: E402
from bench_lib.systems import MlxLmServer, MlxsupServer, mlxsup_import_env  # noqa: E402

ALL_SYSTEMS = ("mlxsup", "mlxsup-tuned", "mlx_lm", "mlx_lm-tuned", "raw", "raw-static")
DEFAULT_SYSTEMS = "mlxsup,mlxsup-tuned,mlx_lm,raw"
GPU_SYSTEMS = "mlxsup-tuned,mlx_lm,raw"  # max-batch 5 on a GPU is a long wait with little to learn
ALL_WORKLOADS = ("single", "grpo", "mixed", "swap", "multiturn", "shared-prefix", "burst")
# Default set: the prefix-cache workloads (e), (f) run when asked for.
DEFAULT_WORKLOADS = "single,grpo,mixed,swap"

PROFILES = {
    # CPU, the ~75M model: the figures of docs/benchmarks.md.
    "cpu": dict(preset="bench75m", concurrency="1,8,32,128", duration=300.0, grace=120.0,
                swap_interval=3.0, swap_duration=30.0, mixed_concurrency=32, mixed_requests=64,
                burst_shapes="32"),
    # The lent H100: ~1B bfloat16 model, 128-token completions.
    "gpu": dict(preset="bench1b", concurrency="1,32,128,256", duration=60.0, grace=30.0,
                swap_interval=2.0, swap_duration=20.0, mixed_concurrency=128, mixed_requests=256,
                burst_shapes="128,256,16x8"),
    # Smoke test: tiny model, a few seconds per system.
    "quick": dict(preset="tiny", concurrency="1,4", duration=20.0, grace=10.0, max_tokens=16,
                  min_requests=4, grpo_prompts=4, grpo_n=2, grpo_rounds=1, mixed_concurrency=4,
                  mixed_requests=6, mixed_max=128, swap_interval=0.7, swap_duration=3.0,
                  swap_concurrency=2, prompt_tokens=24, request_timeout=60.0, burst_shapes="4,2x2",
                  burst_rounds=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--quick", action="store_true", help="smoke test: tiny model, small counts")
    prof.add_argument("--gpu", action="store_true",
                      help="GPU profile: bench1b (bfloat16), concurrency 1,32,128,256")
    p.add_argument("--model", help="model directory (default: build the demo --preset into the cache)")
    p.add_argument("--preset", help="demo preset when --model is absent (default bench75m; --gpu bench1b; --quick tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (and of the demo model)")
    p.add_argument("--systems", help=f"comma list of {', '.join(ALL_SYSTEMS)} "
                   f"(default {DEFAULT_SYSTEMS}; --gpu {GPU_SYSTEMS})")
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                   help=f"comma list of {', '.join(ALL_WORKLOADS)} (default {DEFAULT_WORKLOADS})")
    p.add_argument("--conversations", type=int, default=8, help="(e) conversations, all at once (default 8)")
    p.add_argument("--turns", type=int, default=4, help="(e) turns per conversation (default 4)")
    p.add_argument("--system-words", type=int, default=300, help="(e), (f) words of the shared system prompt")
    p.add_argument("--turn-tokens", type=int, default=32, help="(e), (f) completion tokens per request (default 32)")
    p.add_argument("--shared-requests", type=int, default=32, help="(f) requests (default 32)")
    p.add_argument("--shared-concurrency", type=int, default=8, help="(f) concurrency (default 8)")
    p.add_argument("--burst-shapes", help="(g) shapes: R (R one-sample requests) or RxN (R requests "
                   "of n=N), comma list (default 32; --gpu 128,256,16x8; --quick 4,2x2)")
    p.add_argument("--burst-rounds", type=int, help="(g) rounds per shape, the first reported apart (default 3)")
    p.add_argument("--burst-client", choices=("raw", "httpx"), default="raw",
                   help="(g) the client that releases a round: raw, bench_lib/rawhttp.py's lean one "
                   "(default: httpx's own cost was a quarter of a 128-request round), or httpx")
    p.add_argument("--concurrency", help="concurrencies of (a) (default 1,8,32,128; --gpu 1,32,128,256)")
    p.add_argument("--requests", type=int, help="requests per concurrency level (default max(8, 2 x concurrency); --quick max(4, 2 x c))")
    p.add_argument("--duration", type=float, help="seconds a level may keep sending (default 300; --gpu 90)")
    p.add_argument("--grace", type=float, help="seconds after --duration before open requests are cut (default 120)")
    p.add_argument("--request-timeout", type=float, default=None, help="per request (default 600)")
    p.add_argument("--max-tokens", type=int, default=None, help="completion tokens per sample (default 128)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for every system (default 1.0)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length of (a), (b), (d) (default 100)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="run every completion to max tokens where the system allows (raw: no stop "
                        "tokens; mlx_lm: logit_bias -1e9 on EOS; mlxsup: its ignore_eos field)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="(a), (c) and the load of (d) through streamed /v1/completions (client-side TTFT); "
                        "--no-stream: mlxsup's /generate and non-streamed /v1/completions")
    p.add_argument("--logprobs", action="store_true", help="ask every server for the sampled tokens' log-probs")
    p.add_argument("--max-batch", type=int, default=5, help="mlxsup's --max-batch for 'mlxsup' (default 5, the seed's)")
    p.add_argument("--tuned-max-batch", type=int, help="--max-batch of mlxsup-tuned and --decode-concurrency "
                   "of mlx_lm-tuned (default: the largest of --concurrency and the GRPO batch)")
    p.add_argument("--workers", type=int, help="mlxsup API workers (default: the server's)")
    p.add_argument("--mlxsup-args", default="",
                   help="more `mlxsup start` flags for both mlxsup systems, e.g. '--pipeline on'")
    p.add_argument("--raw-prefill-batch", type=int, default=8, help="prefill_batch_size of the raw loop (default 8, "
                   "as mlx_lm.server's --prompt-concurrency)")
    p.add_argument("--raw-static-prefill-batch", type=int, default=None,
                   help="prefill_batch_size of raw-static (default: the whole round in one pass, the "
                        "all-at-once limit issue 17 compares against)")
    p.add_argument("--grpo-prompts", type=int, default=None, help="(b) prompts per round (default 16)")
    p.add_argument("--grpo-n", type=int, default=None, help="(b) samples per prompt (default 8)")
    p.add_argument("--grpo-rounds", type=int, default=None, help="(b) rounds (default 2)")
    p.add_argument("--mixed-min", type=int, default=16)
    p.add_argument("--mixed-max", type=int, default=None, help="(default 1024)")
    p.add_argument("--mixed-concurrency", type=int, default=None)
    p.add_argument("--mixed-requests", type=int, default=None)
    p.add_argument("--swap-modes", default="inflight,drain", help="commit modes of (d) (default inflight,drain)")
    p.add_argument("--swap-interval", type=float, default=None, help="seconds between swaps")
    p.add_argument("--swap-duration", type=float, default=None, help="seconds of (d) per mode")
    p.add_argument("--swap-concurrency", type=int, default=None, help="closed-loop load under (d) (default 8)")
    p.add_argument("--blas", choices=("auto", "off"), default="auto",
                   help="the environment of every system: auto preloads the optimized BLAS (mlxsup.blas)")
    p.add_argument("--warm-levels", action=argparse.BooleanOptionalAction, default=True,
                   help="before each measured level, an unmeasured pass of the same shape (concurrency, "
                        "prompt lengths; 16 tokens): MLX compiles kernels per shape the first time it "
                        "meets one (on CUDA for seconds), which is start-up cost, not serving speed")
    p.add_argument("--warm-full", action=argparse.BooleanOptionalAction, default=None,
                   help="make that pass the level's full shape (as many requests, full max tokens; "
                        "other prompts): default on with --gpu, where a 16-token pass left seconds of "
                        "compiling inside measured levels; off on the CPU (one wave of 16 tokens)")
    p.add_argument("--settle", type=float, default=60.0,
                   help="at most this many seconds waiting for a server to go idle between cells")
    p.add_argument("--out", help="output folder (default bench-out/<date>-<profile>)")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="measure nothing: merge the results.json of earlier runs (e.g. one per system, "
                        "when one call may not last long enough for all) into --out, and report")
    args = p.parse_args(argv)
    profile = "quick" if args.quick else "gpu" if args.gpu else "cpu"
    defaults = dict(min_requests=8, max_tokens=128, prompt_tokens=100, grpo_prompts=16, grpo_n=8, grpo_rounds=2,
                    mixed_max=1024, swap_concurrency=8, request_timeout=600.0,
                    burst_rounds=3)
    defaults.update(PROFILES[profile])
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.profile = profile
    if args.warm_full is None:
        args.warm_full = profile == "gpu"
    if args.systems is None:
        args.systems = GPU_SYSTEMS if profile == "gpu" else DEFAULT_SYSTEMS
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    args.systems = [s for s in args.systems.split(",") if s]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.swap_modes = [m for m in args.swap_modes.split(",") if m]
    for s in args.systems:
        if s not in ALL_SYSTEMS:
            p.error(f"unknown system {s!r}; choose from {ALL_SYSTEMS}")
    for w in args.workloads:
        if w not in ALL_WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {ALL_WORKLOADS}")
    from bench_lib.burst import parse_shapes

    try:
        args.burst_shapes = parse_shapes(args.burst_shapes)
    except ValueError as e:
        p.error(str(e))
    if args.tuned_max_batch is None:
        bursts = [r * n for r, n in args.burst_shapes] if "burst" in args.workloads else []
        args.tuned_max_batch = max(args.concurrency + [args.grpo_prompts * args.grpo_n] + bursts)
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join(REPO, "bench-out", f"{stamp}-{profile}")
    args.out = os.path.abspath(args.out)
    return args


# ---------------------------------------------------------------------------- setup


def model_dir(args) -> str:
    if args.model:
        return os.path.abspath(args.model)
    from mlxsup.demo import default_demo_dir, ensure_demo_model

    path = os.path.join(os.path.dirname(default_demo_dir()), f"bench-{args.preset}-seed{args.seed}")
    t = time.perf_counter()
    ensure_demo_model(path, seed=args.seed, preset=args.preset)
    log(f"model: {path} ({time.perf_counter() - t:.1f} s to make sure it exists)")
    return path


def count_parameters(path: str) -> dict:
    """Parameters and dtypes from the safetensors headers (no mlx needed)."""
    import glob

    total, dtypes = 0, set()
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
            dtypes.add(info["dtype"])
    return {"parameters": total, "dtypes": sorted(dtypes)}


def system_env(args) -> dict:
    from mlxsup.blas import engine_env

    env = engine_env(os.environ, mode=args.blas)
    env.update(mlxsup_import_env(REPO, args.out))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Results:
    """results.json and records.jsonl, rewritten after every cell (a crash keeps what ran)."""

    def __init__(self, out: str, meta: dict):
        self.out = out
        self.meta = meta
        self.cells: list[dict] = []
        self.systems: dict = {}
        self.records_path = os.path.join(out, "records.jsonl")
        open(self.records_path, "w").close()

    def add(self, cell: dict, records: list[dict]) -> None:
        # Others' work on the machine skews a CPU run: keep the load next to each figure.
        cell.setdefault("loadavg_1m_after", round(os.getloadavg()[0], 2))
        self.cells.append(cell)
        with open(self.records_path, "a") as f:
            for r in records:
                f.write(json.dumps({"system": cell["system"], "workload": cell["workload"],
                                    "concurrency": cell.get("concurrency"), "mode": cell.get("mode"),
                                    **r}) + "\n")
        self.save()
        s = cell["stats"]
        log(f"{cell['system']:>13} {cell['workload']:>6} c={cell.get('concurrency', '-'):<4}"
            f" {s['tokens_per_s']:8.1f} tok/s  p50 {report._fmt(s['latency_p50_s'])} s"
            f"  ok/err/tmo/cut {s['ok']}/{s['errors']}/{s['timeouts']}/{s['cut']}")

    def save(self, extra: Optional[dict] = None) -> str:
        path = os.path.join(self.out, "results.json")
        data = {"meta": self.meta, "systems": self.systems, "cells": self.cells}
        if extra:
            data.update(extra)
        from mlxsup.files import write_json_atomic  # after the import shim (system_env)

        write_json_atomic(path, data, default=str)
        return path


# ---------------------------------------------------------------------------- workloads


class Workloads:
    """The prompts of every workload, fixed by the seed, shared by all systems."""

    def __init__(self, args, tok):
        from bench_lib.prompts import fixed_prompts, mixed_prompts

        # Fresh prompts for every level, so no server's prompt cache serves a prompt it saw
        # at an earlier level (mlx_lm.server keeps one; the raw loop has none).
        self.single = {conc: fixed_prompts(tok, args.seed * 100003 + conc, requests_for(args, conc),
                                           args.prompt_tokens)
                       for conc in args.concurrency}
        self.swap = fixed_prompts(tok, args.seed + 4000, 256, args.prompt_tokens)
        self.grpo = [fixed_prompts(tok, args.seed + 1000 + r, args.grpo_prompts, args.prompt_tokens)
                     for r in range(args.grpo_rounds)]
        self.mixed = mixed_prompts(tok, args.seed + 2000, args.mixed_requests, args.mixed_min, args.mixed_max)
        self.warm = fixed_prompts(tok, args.seed + 3000, 8, args.prompt_tokens)
        top = max([requests_for(args, c) for c in args.concurrency]
                  + [args.grpo_prompts * args.grpo_n, args.mixed_concurrency, 8])
        self.warm_levels = fixed_prompts(tok, args.seed + 5000, top, args.prompt_tokens)
        from bench_lib.multiturn import make_conversations, shared_prefix_items

        # (e) and (f): their warm-up passes use another system prompt (the shapes, not the
        # cache entries, of the measured run).
        self.conv = make_conversations(args.seed + 7000, args.conversations, args.turns, args.system_words)
        self.conv_warm = make_conversations(args.seed + 7500, args.conversations, 1, args.system_words)
        shared = make_conversations(args.seed + 8000, 1, 1, args.system_words)
        self.shared = shared_prefix_items(shared, args.shared_requests, args.seed + 8001, args.turn_tokens)
        self.shared_warm = shared_prefix_items(make_conversations(args.seed + 8500, 1, 1, args.system_words),
                                               args.shared_concurrency, args.seed + 8501, args.turn_tokens)
        # (g): fresh prompts for every shape and round (no prompt cache serves a repeat).
        self.burst = {shape: [fixed_prompts(tok, args.seed + 9000 + 97 * i + rnd, shape[0], args.prompt_tokens)
                              for rnd in range(args.burst_rounds)]
                      for i, shape in enumerate(args.burst_shapes)}
        self.warm_mixed = mixed_prompts(tok, args.seed + 6000,
                                        args.mixed_requests if args.warm_full else args.mixed_concurrency,
                                        args.mixed_min, args.mixed_max)

    @staticmethod
    def items(prompts, n=1, max_tokens=None) -> list[Item]:
        return [Item(p.text, len(p.ids), n, max_tokens) for p in prompts]

    def warm_for(self, workload: str, count: int):
        """Unmeasured prompts of the same shape as `workload`'s (never its own prompts)."""
        return (self.warm_mixed if workload == "mixed" else self.warm_levels)[:count]


def warm_tokens(args) -> int:
    return args.max_tokens if args.warm_full else min(16, args.max_tokens)


def requests_for(args, conc: int) -> int:
    return args.requests if args.requests else max(args.min_requests, 2 * conc)


# ---------------------------------------------------------------------------- servers


def make_server(name: str, args, model: str, env: dict):
    extra = shlex.split(args.mlxsup_args)
    if name == "mlxsup":
        return MlxsupServer(name, model, args.max_batch, args.max_tokens, env, args.out,
                            args.workers, extra)
    if name == "mlxsup-tuned":
        return MlxsupServer(name, model, args.tuned_max_batch, args.max_tokens, env, args.out,
                            args.workers, extra)
    if name == "mlx_lm":
        return MlxLmServer(name, model, args.max_tokens, env, args.out)
    if name == "mlx_lm-tuned":
        return MlxLmServer(name, model, args.max_tokens, env, args.out,
                           decode_concurrency=args.tuned_max_batch)
    raise ValueError(name)


def protocols(server, args, eos_ids):
    """(route of (a)/(c)/(d) load, route of (b)) for this server."""
    common = dict(max_tokens=args.max_tokens, temperature=args.temperature, eos_ids=eos_ids,
                  ignore_eos=args.ignore_eos, logprobs=args.logprobs)
    is_peer = server.kind == "mlx_lm"
    if server.kind == "mlxsup":
        native = MlxsupGenerate(**common)
    else:
        native = OpenAICompletions(stream=False, is_mlx_lm=True, **common)
    if args.stream:
        main = OpenAICompletions(stream=True, is_mlx_lm=is_peer, **common)
    else:
        main = native
    return main, native


def run_server_system(name, args, model, env, work: Workloads, monitor: TreeMonitor,
                      results: Results, eos_ids) -> None:
    server = make_server(name, args, model, env)
    info = {"kind": server.kind, "command": None, "error": None}
    results.systems[name] = info
    try:
        info["command"] = " ".join(server.command())
        t = time.perf_counter()
        log(f"{name}: starting ({info['command']})")
        server.start()
        info["start_s"] = time.perf_counter() - t
        monitor.watch(name, server.root_pid)
    except Exception as e:  # a system that does not start is reported, the others still run
        info["error"] = f"{type(e).__name__}: {e}"[-2000:]
        log(f"{name}: could not start: {info['error']}")
        try:
            server.stop()
        except Exception:
            pass
        results.save()
        return
    try:
        main, native = protocols(server, args, eos_ids)
        if "burst" in args.workloads:  # first: its round 0 is the first round after ready
            for shape in args.burst_shapes:
                cell, recs = run_burst_server(server, args, work, eos_ids, shape, monitor, name)
                results.add(cell, recs)
                settle(server, args)
        # Warm up: the first requests of a process load kernels and grow caches.
        warm = work.items(work.warm, max_tokens=min(16, args.max_tokens))
        asyncio.run(closed_loop(server.base_url, main, warm, min(4, len(warm)), len(warm), 120, 60,
                                args.request_timeout))
        if "grpo" in args.workloads and server.kind == "mlxsup":
            asyncio.run(closed_loop(server.base_url, native, work.items(work.warm[:2], n=2, max_tokens=8),
                                    2, 2, 60, 30, args.request_timeout))
        settle(server, args)

        def warm_level(workload, proto, conc, num, n=1, copies=1):
            if not args.warm_levels:
                return
            count = num if args.warm_full else conc
            prompts = work.warm_for(workload, max(1, count // copies))
            items = [it for it in work.items(prompts, n=n, max_tokens=warm_tokens(args))
                     for _ in range(copies)]
            asyncio.run(closed_loop(server.base_url, proto, items, conc, len(items), args.duration,
                                    args.grace, args.request_timeout))
            settle(server, args)

        def measure(workload, items, proto, conc, num, duration=None, grace=None, runner=None, **extra):
            section = f"{name}/{workload}/{conc}"
            cpu0 = monitor.cpu_seconds(name)
            monitor.begin(section)
            if runner is None:
                records, elapsed = asyncio.run(closed_loop(
                    server.base_url, proto, items, conc, num,
                    args.duration if duration is None else duration,
                    args.grace if grace is None else grace, args.request_timeout))
            else:  # (e): conversations, each turn after the last
                records, elapsed = asyncio.run(runner())
            monitor.end()
            cell = {"system": name, "workload": workload, "concurrency": conc,
                    "route": proto.path + (" (stream)" if getattr(proto, "stream", False) else ""),
                    "peak_rss_mb": monitor.peaks(section), "cpu_s": cpu_delta(monitor.cpu_seconds(name), cpu0),
                    **extra}
            recs = [r.as_dict() for r in records]
            cell["stats"] = report.summarize(recs, elapsed, (items[0].max_tokens if items else None)
                                             or args.max_tokens)
            if runner is not None:
                from bench_lib.multiturn import by_turn

                cell["by_turn"] = by_turn(recs)
            if server.kind == "mlxsup" and workload in ("multiturn", "shared-prefix"):
                cell["prefix_cache"] = prefix_cache_figures(server.base_url)
            results.add(cell, recs)
            settle(server, args)
            return cell

        if "single" in args.workloads:
            for conc in args.concurrency:
                warm_level("single", main, conc, requests_for(args, conc))
                measure("single", work.items(work.single[conc]), main, conc, requests_for(args, conc))
        if "grpo" in args.workloads:
            grpo_all = []
            if server.supports_n:
                warm_level("grpo", native, args.grpo_prompts, args.grpo_prompts, n=args.grpo_n)
            else:
                warm_level("grpo", native, args.grpo_prompts * args.grpo_n, args.grpo_prompts * args.grpo_n,
                           copies=args.grpo_n)
            for rnd, prompts in enumerate(work.grpo):
                if server.supports_n:
                    items, conc = work.items(prompts, n=args.grpo_n), len(prompts)
                else:  # one request per sample, all at once, as a trainer would send them
                    items = [it for it in work.items(prompts) for _ in range(args.grpo_n)]
                    conc = len(items)
                grpo_all.append(measure(f"grpo-round{rnd}", items, native, conc, len(items),
                                        duration=args.request_timeout, grace=0,
                                        requests_in_flight=conc))
            results.cells[:] = [c for c in results.cells if c not in grpo_all]
            results.add(merge_rounds(grpo_all, "grpo", args), [])
        if "mixed" in args.workloads:
            warm_level("mixed", main, args.mixed_concurrency, args.mixed_requests)
            measure("mixed", work.items(work.mixed), main, args.mixed_concurrency, args.mixed_requests)
        if "multiturn" in args.workloads:
            from bench_lib.multiturn import conversation_loop

            def conversations(conv):
                return lambda: conversation_loop(server.base_url, main, conv, args.turn_tokens,
                                                 args.request_timeout)

            if args.warm_levels:
                asyncio.run(conversations(work.conv_warm)())
                settle(server, args)
            measure("multiturn", [Item("", 0, 1, args.turn_tokens)], main, args.conversations,
                    args.conversations * args.turns, runner=conversations(work.conv),
                    turns=args.turns, system_words=args.system_words)
        if "shared-prefix" in args.workloads:
            if args.warm_levels:
                asyncio.run(closed_loop(server.base_url, main, work.shared_warm, args.shared_concurrency,
                                        len(work.shared_warm), args.duration, args.grace, args.request_timeout))
                settle(server, args)
            measure("shared-prefix", work.shared, main, args.shared_concurrency, len(work.shared),
                    system_words=args.system_words)
        if "swap" in args.workloads and server.kind == "mlxsup":
            from bench_lib.swaps import run_swaps

            for mode in args.swap_modes:
                cell, recs = run_swaps(server, args, model, work, main, native, mode, monitor, name)
                results.add(cell, recs)
                settle(server, args)
    except Exception as e:
        info["error"] = f"{type(e).__name__}: {e}"
        log(f"{name}: failed during the run: {info['error']}")
        import traceback

        traceback.print_exc()
    finally:
        info["peak_rss_mb"] = monitor.tree_peaks(name)
        monitor.unwatch(name)
        server.stop()
        info["logs"] = server.logs()
        results.save()


def run_burst_server(server, args, work: Workloads, eos_ids, shape, monitor: TreeMonitor, name: str):
    """(g) on a server: each round's requests released together; a server without `n` gets
    one request per sample. Log-probs on, as an RL trainer asks (issue 17)."""
    from bench_lib import burst

    common = dict(max_tokens=args.max_tokens, temperature=args.temperature, eos_ids=eos_ids,
                  ignore_eos=args.ignore_eos, logprobs=True)
    proto = (MlxsupGenerate(**common) if server.kind == "mlxsup"
             else OpenAICompletions(stream=False, is_mlx_lm=server.kind == "mlx_lm", **common))
    reqs, n = shape
    section = f"{name}/burst/{burst.label(shape)}"
    cpu0 = monitor.cpu_seconds(name)
    monitor.begin(section)
    rounds, all_recs = [], []
    for rnd, prompts in enumerate(work.burst[shape]):
        items = (work.items(prompts, n=n) if server.supports_n or n == 1
                 else [it for it in work.items(prompts) for _ in range(n)])
        records, elapsed = asyncio.run(closed_loop(server.base_url, proto, items, len(items), len(items),
                                                   args.request_timeout, 0, args.request_timeout,
                                                   client=args.burst_client))
        recs = [dict(r.as_dict(), round=rnd) for r in records]
        rounds.append({"records": recs, "elapsed_s": elapsed})
        all_recs += recs
        log(f"{name}: burst {burst.label(shape)} round {rnd}: {elapsed:.2f} s, "
            f"{sum(r['tokens'] for r in recs) / elapsed if elapsed else 0:.1f} tok/s")
        settle(server, args)
    monitor.end()
    cell = burst.make_cell(name, shape, rounds, report.summarize, args.max_tokens, route=proto.path,
                           requests_in_flight=len(items), client=args.burst_client,
                           peak_rss_mb=monitor.peaks(section),
                           cpu_s=cpu_delta(monitor.cpu_seconds(name), cpu0))
    return cell, all_recs


def prefix_cache_figures(base_url: str) -> Optional[dict]:
    """mlxsup's prefix-cache figures from /metrics (hits, hit rate, entries, bytes)."""
    import httpx

    try:
        return httpx.get(base_url + "/metrics", timeout=10).json().get("prefix_cache")
    except (httpx.HTTPError, ValueError):
        return None


def settle(server, args) -> None:
    if server.root_pid:
        waited = wait_idle([server.root_pid], max_wait=args.settle)
        if waited > 2:
            log(f"{server.name}: waited {waited:.1f} s for the server to go idle")


def merge_rounds(cells: list[dict], workload: str, args) -> dict:
    """GRPO rounds as one cell: records pooled, elapsed summed (rounds run back to back)."""
    if not cells:
        return {}
    merged = dict(cells[0])
    merged["workload"] = workload
    # Sequences decoding at once, whatever the request shape (16 x n=8 or 128 x n=1).
    merged["concurrency"] = args.grpo_prompts * args.grpo_n
    merged["requests_in_flight"] = cells[0]["concurrency"]
    merged["rounds"] = [{"elapsed_s": c["stats"]["elapsed_s"], "tokens_per_s": c["stats"]["tokens_per_s"],
                         "ok": c["stats"]["ok"]} for c in cells]
    stats = dict(cells[0]["stats"])
    for key in ("requests", "ok", "errors", "timeouts", "cut", "completion_tokens", "prompt_tokens",
                "elapsed_s", "short_completions"):
        stats[key] = sum(c["stats"][key] for c in cells)
    stats["tokens_per_s"] = stats["completion_tokens"] / stats["elapsed_s"] if stats["elapsed_s"] else 0.0
    stats["requests_per_s"] = stats["ok"] / stats["elapsed_s"] if stats["elapsed_s"] else 0.0
    stats["makespan_s"] = [c["stats"]["elapsed_s"] for c in cells]
    for key in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"):
        vals = [c["stats"][key] for c in cells if c["stats"][key] is not None]
        stats[key] = max(vals) if vals else None  # the worst round (per-round values in rounds)
    merged["stats"] = stats
    peaks: dict = {}
    for c in cells:
        for k, v in c.get("peak_rss_mb", {}).items():
            peaks[k] = max(peaks.get(k, 0), v)
    merged["peak_rss_mb"] = peaks
    cpu: dict = {}
    for c in cells:
        for k, v in (c.get("cpu_s") or {}).items():
            cpu[k] = round(cpu.get(k, 0.0) + v, 3)
    merged["cpu_s"] = cpu
    return merged


# ---------------------------------------------------------------------------- raw loop


def run_raw(args, model, env, work: Workloads, monitor: TreeMonitor, results: Results, eos_ids,
            name: str = "raw") -> None:
    info = {"kind": "raw", "error": None}
    results.systems[name] = info
    stop_ids = [] if args.ignore_eos else list(eos_ids)

    def reqs(prompts, n=1):
        return [{"ids": list(p.ids), "n": n} for p in prompts]

    def warm_job(workload, conc, num, n=1):
        """The unmeasured pass of the same shape before a measured job (see --warm-levels)."""
        if not args.warm_levels:
            return []
        prompts = work.warm_for(workload, num if args.warm_full else conc)
        return [{"name": f"warmup/{workload}-{conc}", "requests": reqs(prompts, n), "concurrency": conc,
                 "num_requests": len(prompts), "duration_s": args.duration, "grace_s": args.grace,
                 "max_tokens": warm_tokens(args)}]

    jobs = [{"name": "warmup/0", "requests": reqs(work.warm), "concurrency": 4, "num_requests": 8,
             "duration_s": 120, "grace_s": 60, "max_tokens": min(16, args.max_tokens)}]
    if "single" in args.workloads:
        for conc in args.concurrency:
            jobs += warm_job("single", conc, requests_for(args, conc))
            jobs.append({"name": f"single/{conc}", "requests": reqs(work.single[conc]), "concurrency": conc,
                         "num_requests": requests_for(args, conc), "duration_s": args.duration,
                         "grace_s": args.grace})
        if 1 in args.concurrency:
            if args.warm_levels:
                jobs.append({"name": "warmup/generate_step", "kind": "generate_step",
                             "requests": reqs(work.warm_for("single", 2)), "concurrency": 1, "num_requests": 2,
                             "duration_s": args.duration, "grace_s": args.grace,
                             "max_tokens": warm_tokens(args)})
            jobs.append({"name": "generate_step/1", "kind": "generate_step", "requests": reqs(work.single[1]),
                         "concurrency": 1, "num_requests": requests_for(args, 1),
                         "duration_s": args.duration, "grace_s": args.grace})
    if "grpo" in args.workloads:
        jobs += warm_job("grpo", args.grpo_prompts, args.grpo_prompts, n=args.grpo_n)
        for rnd, prompts in enumerate(work.grpo):
            jobs.append({"name": f"grpo-round{rnd}/{len(prompts)}", "requests": reqs(prompts, args.grpo_n),
                         "concurrency": len(prompts), "num_requests": len(prompts),
                         "duration_s": args.request_timeout, "grace_s": 0})
    if "mixed" in args.workloads:
        jobs += warm_job("mixed", args.mixed_concurrency, args.mixed_requests)
        jobs.append({"name": f"mixed/{args.mixed_concurrency}", "requests": reqs(work.mixed),
                     "concurrency": args.mixed_concurrency, "num_requests": args.mixed_requests,
                     "duration_s": args.duration, "grace_s": args.grace})
    if name == "raw-static":  # (g) only, no warm-up: round 0 is the first after the model loads
        from bench_lib.burst import label

        jobs = [{"name": f"burst-r{rnd}/{label(shape)}", "kind": "static", "requests": reqs(prompts, shape[1]),
                 "duration_s": args.request_timeout, "grace_s": 0}
                for shape in args.burst_shapes for rnd, prompts in enumerate(work.burst[shape])]
    spec = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "stop_ids": stop_ids, "prefill_batch": args.raw_prefill_batch,
            "static_prefill_batch": args.raw_static_prefill_batch, "jobs": jobs}
    spec_path = os.path.join(args.out, "raw-spec.json")
    out_path = os.path.join(args.out, "raw-result.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, os.path.join(HERE, "bench_lib", "rawloop.py"), spec_path, out_path]
    info["command"] = " ".join(cmd)
    log(f"raw: {info['command']}")
    log_path = os.path.join(args.out, "raw.log")
    info["logs"] = [log_path]
    cpu_marks: dict = {}
    with open(log_path, "w") as errlog:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=errlog, text=True,
                                stdin=subprocess.DEVNULL, cwd=args.out)
        monitor.watch(name, proc.pid)

        def follow():
            for line in proc.stdout:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "@start":
                    cpu_marks[parts[1]] = monitor.cpu_seconds(name)
                    monitor.begin(f"raw/{parts[1]}")
                elif len(parts) == 2 and parts[0] == "@end":
                    monitor.end()
                    cpu_marks[parts[1]] = cpu_delta(monitor.cpu_seconds(name), cpu_marks.get(parts[1], {}))
                    log(f"raw: {parts[1]} done")

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        budget = sum(j["duration_s"] + j["grace_s"] for j in jobs) + 600
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        except BaseException:  # a signal (SystemExit) or ^C: the loop must not outlive us
            proc.kill()
            proc.wait()
            raise
        reader.join(timeout=5)
        info["peak_rss_mb"] = monitor.tree_peaks(name)
        monitor.unwatch(name)
    if rc != 0 or not os.path.exists(out_path):
        with open(log_path) as f:
            info["error"] = f"raw loop exited {rc}: {f.read()[-2000:]}"
        log(info["error"])
        results.save()
        return
    with open(out_path) as f:
        raw = json.load(f)
    info["load_s"] = raw["load_s"]
    info["device"] = raw["device"]
    grpo_cells, grpo_records = [], []
    burst_rounds: dict = {}
    for job in raw["jobs"]:
        workload, conc = job["name"].split("/")
        if workload == "warmup":
            continue
        if workload.startswith("burst-r"):
            burst_rounds.setdefault(conc, []).append({"records": [dict(r, round=int(workload[7:]),
                                                                      ttft_source="in-process")
                                                                 for r in job["records"]],
                                                     "elapsed_s": job["elapsed_s"],
                                                     "mlx_peak_memory_mb": job["mlx_peak_memory_bytes"] / 2**20})
            continue
        system = "generate_step" if workload == "generate_step" else "raw"
        if workload == "generate_step":
            workload = "single"
        cell = {"system": system, "workload": workload, "concurrency": int(conc),
                "route": "in-process BatchGenerator" if system == "raw" else "in-process generate_step",
                "peak_rss_mb": monitor.peaks(f"raw/{job['name']}"), "cpu_s": cpu_marks.get(job["name"]),
                "mlx_peak_memory_mb": job["mlx_peak_memory_bytes"] / 2**20}
        for r in job["records"]:
            r["ttft_source"] = "in-process"
        cell["stats"] = report.summarize(job["records"], job["elapsed_s"], args.max_tokens)
        if workload.startswith("grpo-round"):
            grpo_cells.append(cell)
            grpo_records += [dict(r, round=workload) for r in job["records"]]
            cell["requests_in_flight"] = int(conc)
        else:
            results.add(cell, job["records"])
    if grpo_cells:
        results.add(merge_rounds(grpo_cells, "grpo", args), grpo_records)
    for mode, rounds in burst_rounds.items():
        from bench_lib.burst import make_cell

        reqs_, n = (int(x) for x in mode.split("x"))
        results.add(make_cell(name, (reqs_, n), rounds, report.summarize, args.max_tokens,
                              route="in-process BatchGenerator, all inserted at once",
                              prefill_batch=min(reqs_ * n, args.raw_static_prefill_batch or reqs_ * n),
                              peak_rss_mb=monitor.peaks(f"raw/burst-r0/{mode}"),
                              mlx_peak_memory_mb=max(r["mlx_peak_memory_mb"] for r in rounds)),
                    [r for rnd in rounds for r in rnd["records"]])


# ---------------------------------------------------------------------------- main


def meta_of(args, model, env) -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        rev, dirty = None, None
    import psutil

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "profile": args.profile,
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("mlx", "mlx-lm", "mlx-cuda-13", "httpx", "mlxsup")},
        "git": {"rev": rev, "dirty": dirty},
        "model": model,
        "model_info": count_parameters(model),
        "blas": {"LD_PRELOAD": env.get("LD_PRELOAD"), "OPENBLAS_NUM_THREADS": env.get("OPENBLAS_NUM_THREADS")},
        "args": {k: v for k, v in vars(args).items()},
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def merge(args) -> int:
    """Cells and systems of several runs in one results.json, with the table and targets."""
    runs = []
    for d in args.merge:
        with open(os.path.join(d, "results.json")) as f:
            runs.append(json.load(f))
    meta = dict(runs[0]["meta"])
    meta["merged_from"] = [{"dir": os.path.abspath(d), "command": r["meta"].get("command"),
                            "date": r["meta"].get("date")} for d, r in zip(args.merge, runs)]
    results = Results(args.out, meta)
    cells = {}
    for r in runs:  # a later run's cell replaces an earlier one of the same system and shape
        results.systems.update(r.get("systems", {}))
        run_cells = list(r.get("cells", []))
        # A run stopped between GRPO rounds left its finished rounds only: pool them.
        rounds: dict = {}
        for c in run_cells:
            if c["workload"].startswith("grpo-round"):
                rounds.setdefault(c["system"], []).append(c)
        run_args = argparse.Namespace(**r["meta"]["args"])
        for system, group in rounds.items():
            run_cells = [c for c in run_cells if c not in group]
            pooled = merge_rounds(group, "grpo", run_args)
            pooled["partial"] = f"{len(group)} of {run_args.grpo_rounds} rounds"
            run_cells.append(pooled)
        for c in run_cells:
            cells[(c["system"], c["workload"], c.get("concurrency"), c.get("mode"))] = c
    results.cells.extend(cells.values())
    return finish(args, results, meta, gpu=meta.get("profile") == "gpu")


def finish(args, results: Results, meta: dict, gpu: bool) -> int:
    order = {s: i for i, s in enumerate(("generate_step", "raw", "mlx_lm", "mlx_lm-tuned", "mlxsup",
                                         "mlxsup-tuned"))}
    wl = {w: i for i, w in enumerate(ALL_WORKLOADS)}
    results.cells.sort(key=lambda c: (wl.get(c["workload"], 9), c.get("concurrency") or 0,
                                      order.get(c["system"], 99), c.get("mode") or ""))
    from bench_lib import burst

    checks = report.targets(results.cells, gpu=gpu) + burst.targets(results.cells, gpu=gpu)
    info = meta["model_info"]
    title = (f"{info['parameters'] / 1e6:.3g}M params {'/'.join(info['dtypes'])}, "
             f"{meta['args']['max_tokens']} tokens, {meta['cpu']} x{meta['cpu_count']}, {meta['date']}")
    png = report.plot(results.cells, os.path.join(args.out, "bench.png"), title)
    path = results.save({"targets": checks, "plot": png})
    failed = {k: v["error"] for k, v in results.systems.items() if v.get("error")}
    print()
    print(f"# {title}")
    for m in meta.get("merged_from", [{"command": meta["command"]}]):
        print(f"# {m['command']}")
    why = "nothing measured" if not results.cells else "matplotlib missing"
    print(f"# results: {path}" + (f", plot: {png}" if png else f", no plot ({why})"))
    for k, v in failed.items():
        print(f"# {k} FAILED: {v.splitlines()[0] if v else v}")
    if checks:
        print("# targets (docs/benchmarks.md):")
        for line in checks:
            print(f"#   {line}")
    print()
    if any(c["workload"] != "burst" for c in results.cells) or not results.cells:
        print(report.table(results.cells))
    if any(c["workload"] == "burst" for c in results.cells):
        print()
        print(burst.table(results.cells))
    return 1 if failed and len(failed) == len(results.systems) else 0


def _exit_on_signal(signum, frame) -> None:
    # SystemExit unwinds through the `finally` blocks that stop the servers under test.
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        return merge(args)
    env = system_env(args)  # before any mlxsup import: may add the import shim
    model = model_dir(args)
    from bench_lib.prompts import Tokenizer

    tok = Tokenizer(model)
    eos_ids = tok.eos_ids
    work = Workloads(args, tok)
    meta = meta_of(args, model, env)
    log(f"model {meta['model_info']['parameters'] / 1e6:.3g}M parameters {meta['model_info']['dtypes']}, "
        f"systems {args.systems}, workloads {args.workloads}, out {args.out}")
    results = Results(args.out, meta)
    monitor = TreeMonitor()
    t0 = time.perf_counter()
    try:
        for name in args.systems:
            if name == "raw" and not {"single", "grpo", "mixed"} & set(args.workloads):
                log("raw: skipped (it runs single, grpo and mixed only)")
            elif name == "raw-static" and "burst" not in args.workloads:
                log("raw-static: skipped (it runs burst only)")
            elif name in ("raw", "raw-static"):
                run_raw(args, model, env, work, monitor, results, eos_ids, name)
            else:
                run_server_system(name, args, model, env, work, monitor, results, eos_ids)
    finally:
        monitor.close()
    meta["wall_s"] = time.perf_counter() - t0
    meta["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return finish(args, results, meta, gpu=args.gpu)


if __name__ == "__main__":
    sys.exit(main())
