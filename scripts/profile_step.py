#!/usr/bin/env python3
"""Where a decode step's time goes at small batches (docs/benchmarks.md: concurrency 1 against mlx-lm's
single-stream `generate_step`).

One process, one model, the same prompt; per-token decode time (first token excluded) of:

  generate_step   mlx-lm's single-stream generator (plain `KVCache`, its own sampler)
  batchgen        mlx-lm's `BatchGenerator` (batch caches, one row)
  engine          mlxsup's `Engine` in-process (scheduler, runner, per-row sampler with
                  log-probs, postprocessing; no IPC, no HTTP)

and the parts: the model's forward with a plain and with a batch cache (graph built and
evaluated per call, no pipelining), mlxsup's sampler against mlx-lm's categorical sampler on
the same logits, and a cProfile of the engine's loop (time inside `mlx.core.eval` is the wait
for the device; the rest is host work that the pipelining must hide).

    python scripts/profile_step.py                          # bench75m on this machine
    python scripts/profile_step.py --preset bench1b --batch 1,8 --json out.json   # the GPU
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import cProfile
import io
import json
import os
import pstats
import shlex
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)


# Mean per-token gaps of the last timed runs, by what was timed: a median hides the slow steps
# (allocations after the buffer cache was cleared, synchronisations) that a request still pays.
MEANS: dict = {}


def per_token_ms(stamps: list[float], name: str = "") -> float:
    """Median gap between consecutive token arrivals, in ms (the first token excluded); the
    mean goes to MEANS[name]."""
    gaps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    gaps = gaps[1:] if len(gaps) > 2 else gaps
    if name:
        MEANS[name] = min(MEANS.get(name, float("inf")), statistics.fmean(gaps))
    return statistics.median(gaps)


def time_generate_step(model, prompt, max_tokens, reps):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=1.0)  # as the others sample
    out = []
    for _ in range(reps):
        stamps = []
        for _tok, _lp in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                       sampler=sampler):
            stamps.append(time.perf_counter())
        out.append(per_token_ms(stamps, "generate_step"))
    return min(out)


def time_batchgen(model, prompt, max_tokens, reps, batch):
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    out = []
    for _ in range(reps):
        gen = BatchGenerator(model, max_tokens=max_tokens, sampler=make_sampler(temp=1.0),
                             completion_batch_size=batch, prefill_batch_size=batch)
        gen.insert([list(prompt)] * batch, [max_tokens] * batch)
        stamps = []
        while True:
            _, responses = gen.next()
            if responses:
                stamps.append(time.perf_counter())
            if responses and all(r.finish_reason is not None for r in responses):
                break
        gen.close()
        out.append(per_token_ms(stamps))
    return min(out)


def time_engine(engine, prompt, max_tokens, reps, batch, profile=None, temperature=1.0,
                name=""):
    from mlxsup.ipc.messages import GenerateRequest, SamplingParams, SequenceDone, TokenChunk

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                            logprobs_mode="processed")
    out = []
    for rep in range(reps):
        rid = 1000 + rep
        engine.submit(GenerateRequest(rid, list(prompt), params, n=batch, stream=True))
        stamps, done = [], 0
        if profile is not None:
            profile.enable()
        while done < batch:
            events = engine.step()
            if any(isinstance(e, TokenChunk) for e in events):
                stamps.append(time.perf_counter())
            done += sum(isinstance(e, SequenceDone) for e in events)
            if not events:
                hint = engine.wait_hint()
                if hint:
                    time.sleep(min(hint, 0.001))
        if profile is not None:
            profile.disable()
        out.append(per_token_ms(stamps, name))
    return min(out)


def lean_sampler(logits, rows, keys, ctx):
    """mlx-lm's sampling (one global stream, categorical) in place of the per-row one: what the
    engine's loop costs with the cheapest sampler that still returns log-probs."""
    import mlx.core as mx

    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    tokens = mx.random.categorical(lp).astype(mx.int32)
    return tokens, mx.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0], keys


def time_calls(fn, reps=50):
    import mlx.core as mx

    for _ in range(3):
        mx.eval(fn())
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t0) / reps * 1e3


def parts(model, prompt, batch, vocab):
    """Forward with each cache kind and the two samplers, each built and evaluated per call."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    from mlxsup.engine import sampling
    from mlxsup.engine.runner import _merge
    from mlxsup.ipc.messages import SamplingParams

    res = {}
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([prompt] * 1), cache=cache))
    x = mx.array([[prompt[-1]]])
    if batch == 1:
        res["forward_kvcache_ms"] = time_calls(lambda: model(x, cache=cache))  # cache grows; fine
    bcache = _merge([make_prompt_cache(model) for _ in range(batch)])
    mx.eval(model(mx.array([prompt] * batch), cache=bcache))
    xb = mx.array([[prompt[-1]]] * batch)
    res["forward_batchcache_ms"] = time_calls(lambda: model(xb, cache=bcache))
    logits = mx.random.normal((batch, vocab)).astype(mx.bfloat16 if "16" in str(
        next(iter(_leaves(model))).dtype) else mx.float32)
    rows = sampling.RowParams.build([SamplingParams(temperature=1.0)] * batch, vocab)
    keys = sampling.keys_for(list(range(batch)))
    res["sampler_mlxsup_ms"] = time_calls(lambda: sampling.sample(logits, rows, keys, None)[:2])
    cat = make_sampler(temp=1.0)
    res["sampler_mlx_lm_ms"] = time_calls(
        lambda: (cat(logits - mx.logsumexp(logits, axis=-1, keepdims=True)),
                 logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    return res


@contextlib.contextmanager
def started_server(path, extra_args=()):
    """`mlxsup start` on the model (outside the repository, on a free port); yields (an httpx
    client of it, its run dir) and stops it after."""
    from mlxsup.local_server import start_server

    with tempfile.TemporaryDirectory(prefix="mlxsup-profile-run-") as run_dir:
        with start_server(path, run_dir, "--log-level", "WARNING", *extra_args, cwd=tempfile.gettempdir(),
                          timeout=600) as server:
            with server.client(timeout=120) as client:
                yield client, run_dir


def one_at_a_time(client, body, reps):
    """Three unmeasured /generate requests, then `max(reps, 5)` one after another. Returns the
    medians: per-token ms inside the engine (from the answer's metadata), on the client's
    clock, TTFT and queue ms."""
    for _ in range(3):
        client.post("/generate", json=body).raise_for_status()
    engine, wall, ttft, queue = [], [], [], []
    for _ in range(max(reps, 5)):
        t0 = time.perf_counter()
        r = client.post("/generate", json=body)
        spent = (time.perf_counter() - t0) * 1e3
        r.raise_for_status()
        data = r.json()
        meta, n = data["metadata"], len(data["completion_ids"])
        engine.append((meta["latency_ms"] - meta["ttft_ms"]) / (n - 1))
        wall.append(spent / n)
        ttft.append(meta["ttft_ms"])
        queue.append(meta["queue_ms"])
    med = statistics.median
    return {"server_engine_per_token_ms": med(engine), "server_wall_per_token_ms": med(wall),
            "server_ttft_ms": med(ttft), "server_queue_ms": med(queue)}


def generate_body(prompt_text, max_tokens):
    return {"prompt": prompt_text, "max_tokens": max_tokens, "temperature": 1.0,
            "ignore_eos": True}


def time_server(path, prompt_text, max_tokens, reps, extra_args=()):
    """`mlxsup start` on the model; sequential /generate requests (one sequence at a time).
    Returns per-token ms inside the engine, on the client's clock, TTFT and queue ms
    (medians)."""
    with started_server(path, extra_args) as (client, _):
        return one_at_a_time(client, generate_body(prompt_text, max_tokens), reps)


def _print_row(batch: int, row: dict) -> None:
    print(f"\n== batch {batch}: per-token ms (tokens/s per sequence)")
    for k, v in row.items():
        if k.endswith("_ms"):
            print(f"  {k:32s} {v:8.3f} ms" + (f"  ({1e3 / v:7.1f} tok/s)" if k in (
                "generate_step_ms", "batchgen_ms", "engine_ms", "engine_greedy_ms") else ""),
                flush=True)


def _leaves(model):
    from mlx.utils import tree_flatten

    return (v for _, v in tree_flatten(model.parameters()))


def setup(model_dir, preset, prompt_tokens):
    """Make mlxsup importable without an install (the GPU machine has none; children get the
    shim's PYTHONPATH too), re-execute with OpenBLAS as the supervisor starts the engine, load
    `model_dir` or the preset's demo model. Returns (path, model, tokenizer, vocabulary size,
    a prompt of `prompt_tokens` ids)."""
    from bench_lib.systems import mlxsup_import_env

    # One shim folder for this process and the one it re-executes as (exit handlers do not
    # survive the exec), removed when the last one ends.
    shim = os.environ.get("MLXSUP_PROFILE_SHIM") or tempfile.mkdtemp(prefix="mlxsup-profile-")
    os.environ["MLXSUP_PROFILE_SHIM"] = shim
    atexit.register(shutil.rmtree, shim, True)
    os.environ.update(mlxsup_import_env(REPO, shim))
    from mlxsup.blas import reexec_with_blas

    reexec_with_blas()
    import mlx.core as mx
    from mlx_lm import load

    from mlxsup.demo import ensure_demo_model

    path = model_dir or ensure_demo_model(
        os.path.expanduser(f"~/.cache/mlxsup/bench-{preset}-seed0"), preset=preset)
    model, tok = load(path)
    vocab = model(mx.array([[0]])).shape[-1]
    return path, model, tok, vocab, [10 + (i * 7919) % (vocab - 20) for i in range(prompt_tokens)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an mlx-lm model directory (default: the --preset demo model)")
    p.add_argument("--preset", default="bench75m")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--quick", action="store_true",
                   help="only generate_step, the engine (both samplers) and --server")
    p.add_argument("--server", action="store_true",
                   help="also time `mlxsup start` on the model at batch 1 (/generate, one at a time)")
    p.add_argument("--server-args", default="",
                   help="more `mlxsup start` flags for --server, e.g. '--pipeline on --blas off'")
    args = p.parse_args(argv)
    path, model, tok, vocab, prompt = setup(args.model, args.preset, args.prompt_tokens)
    import mlx.core as mx

    from mlxsup.engine.config import EngineConfig
    from mlxsup.engine.core import Engine

    print(f"model {path}, device {mx.default_device()}, vocab {vocab}", flush=True)
    report = {"model": path, "device": str(mx.default_device()), "batches": {}}
    for batch in [int(b) for b in args.batch.split(",")]:
        row = {}
        engine = Engine(EngineConfig(model=path, max_batch=max(batch, 1), flush_interval_ms=0.0),
                        model=model, tokenizer=tok)
        time_engine(engine, prompt, 16, 1, batch)  # warm-up: shapes compiled
        MEANS.clear()
        if batch == 1:
            row["generate_step_ms"] = time_generate_step(model, prompt, args.max_tokens, args.reps)
        if not args.quick:
            row["batchgen_ms"] = time_batchgen(model, prompt, args.max_tokens, args.reps, batch)
        row["engine_ms"] = time_engine(engine, prompt, args.max_tokens, args.reps, batch,
                                       name="engine")
        from mlxsup.engine import sampling

        other = "engine_compiled" if not sampling._compile_enabled() else "engine_op_by_op_sampler"
        sampling.COMPILE = other == "engine_compiled"  # compiled sampler against op by op
        try:
            row[f"{other}_ms"] = time_engine(engine, prompt, args.max_tokens, args.reps, batch,
                                             name=other)
        finally:
            sampling.COMPILE = None
        row.update({f"{k}_mean_ms": v for k, v in MEANS.items()})
        if args.server and batch == 1:
            row.update(time_server(path, tok.decode(prompt), args.max_tokens, args.reps,
                                   shlex.split(args.server_args)))
        if args.quick:
            report["batches"][batch] = row
            _print_row(batch, row)
            continue
        row["engine_greedy_ms"] = time_engine(engine, prompt, args.max_tokens, args.reps, batch,
                                              temperature=0.0)
        from mlxsup.engine import runner as runner_mod

        real = runner_mod.sampling.sample
        runner_mod.sampling.sample = lean_sampler
        try:
            row["engine_lean_sampler_ms"] = time_engine(engine, prompt, args.max_tokens,
                                                        args.reps, batch)
        finally:
            runner_mod.sampling.sample = real
        prof = cProfile.Profile()
        row["engine_profiled_ms"] = time_engine(engine, prompt, args.max_tokens, 1, batch, prof)
        row.update(parts(model, prompt, batch, vocab))
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        row["profile_top"] = s.getvalue()
        report["batches"][batch] = row
        _print_row(batch, row)
        print(row["profile_top"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
