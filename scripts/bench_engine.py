#!/usr/bin/env python3
"""In-process benchmark of the engine (docs/engine.md, Benchmark), one run, same model and prompts:

  batch     engine tokens/s against a plain mlx-lm BatchGenerator loop at batch 1, 8, 32
            (T=1, every token's log-prob returned by both; prefill included)
  overhead  the same two loops' time per step on the tiny demo model (the loop's own cost)
  grpo      8 prompts x n=8 (one prefill per prompt) against the same 64 sequences fed as
            64 separate requests
  adapters  prepare (read + validate + load) and commit latency of rank 8, 16 and 64 LoRA
            adapters on every linear layer of the model
  memory    RSS and MLX active memory over 200 swaps (with requests between them) on the
            benchmark model, and over 10,000 short requests on the demo model

The model is the ~75M-parameter `bench75m` demo preset (built once into --model-dir). On
Linux the script re-executes itself with OpenBLAS preloaded (mlxsup.blas), as the supervisor
does for the engine; --blas off keeps the reference BLAS.

    python scripts/bench_engine.py                 # everything, prints a markdown table
    python scripts/bench_engine.py --only batch,grpo --reps 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _prompts(n, rng, lo, hi, vocab=8000):
    return [[rng.randrange(10, vocab) for _ in range(rng.randrange(lo, hi + 1))] for _ in range(n)]


# ------------------------------------------------------------------ systems


def run_plain(model, eos_ids, prompts, max_tokens, batch, steps=None):
    """A plain BatchGenerator loop that returns tokens and their log-probs. `steps`, a list,
    receives the duration of every call that produced tokens."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in eos_ids],
                         sampler=make_sampler(temp=1.0), completion_batch_size=batch,
                         prefill_batch_size=batch)
    t0 = time.perf_counter()
    uids = gen.insert(prompts, [max_tokens] * len(prompts))
    tokens = {u: [] for u in uids}
    logprobs = {u: [] for u in uids}
    while True:
        ts = time.perf_counter()
        responses = gen.next_generated()
        if not responses:
            break
        lps = mx.stack([r.logprobs for r in responses])
        toks = mx.array([r.token for r in responses])
        chosen = mx.take_along_axis(lps, toks[:, None], axis=-1)[:, 0].tolist()
        for r, lp in zip(responses, chosen):
            tokens[r.uid].append(r.token)
            logprobs[r.uid].append(lp)
        if steps is not None:
            steps.append(time.perf_counter() - ts)
    dt = time.perf_counter() - t0
    gen.close()
    return sum(len(t) for t in tokens.values()), dt


_request_ids = iter(range(1 << 40, 1 << 62))


def run_engine(engine, prompts, max_tokens, n=1, steps=None):
    """The engine on the same work (all requests submitted at once), stepped to the end;
    `steps`, a list, receives the duration of every step that produced tokens."""
    from mlxsup.ipc.messages import GenerateRequest, SamplingParams, SequenceDone

    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, logprobs_mode="processed")
    t0 = time.perf_counter()
    for p in prompts:
        engine.submit(GenerateRequest(next(_request_ids), p, params, n))
    ntok = 0
    before = engine.stats()["tokens_generated"]
    while engine.has_work():
        ts = time.perf_counter()
        events = engine.step()
        after = engine.stats()["tokens_generated"]
        if steps is not None and after > before:
            steps.append(time.perf_counter() - ts)
        before = after
        ntok += sum(len(e.token_ids) for e in events if isinstance(e, SequenceDone))
    return ntok, time.perf_counter() - t0


def make_engine(model, tokenizer, model_dir, max_batch, **kw):
    from mlxsup.engine import Engine, EngineConfig

    cfg = EngineConfig(model=model_dir, max_batch=max_batch, flush_interval_ms=0,
                       max_queue=100_000, max_prefill_tokens=kw.pop("max_prefill_tokens", 65536),
                       seed=0, **kw)
    return Engine(cfg, model=model, tokenizer=tokenizer)


# ------------------------------------------------------------------ sections


def bench_batch(model, tok, model_dir, args, rows):
    rng = random.Random(0)
    eos = sorted(tok.eos_token_ids)
    for batch in (1, 8, 32):
        prompts = _prompts(batch, rng, 32, 96)
        engine = make_engine(model, tok, model_dir, batch)
        run_engine(engine, prompts[:1], 4)  # warm-up
        run_plain(model, eos, prompts[:1], 4, batch)
        best = {"plain": 0.0, "engine": 0.0}
        steps = {"plain": [], "engine": []}
        for _ in range(args.reps):
            for name in ("plain", "engine"):
                gc.collect()
                if name == "plain":
                    ntok, dt = run_plain(model, eos, prompts, args.max_tokens, batch, steps[name])
                else:
                    ntok, dt = run_engine(engine, prompts, args.max_tokens, steps=steps[name])
                best[name] = max(best[name], ntok / dt)
        ratio = best["engine"] / best["plain"]
        # The 10th percentile of decode-step times: what each loop costs when the shared
        # CPU leaves it alone (whole-run throughput swings with the neighbours' load).
        p10 = {k: sorted(v)[len(v) // 10] * 1e3 for k, v in steps.items()}
        rows.append(("batch", f"batch {batch}: plain BatchGenerator loop", f"{best['plain']:.1f} tok/s",
                     f"p10 step {p10['plain']:.1f} ms"))
        rows.append(("batch", f"batch {batch}: engine", f"{best['engine']:.1f} tok/s",
                     f"{ratio:.3f}x (goal >= 0.97x); p10 step {p10['engine']:.1f} ms "
                     f"({p10['plain'] / p10['engine']:.3f}x)"))
        print(f"batch {batch}: plain {best['plain']:.1f} tok/s, engine {best['engine']:.1f} tok/s, "
              f"{ratio:.3f}x; p10 step plain {p10['plain']:.1f} ms, engine {p10['engine']:.1f} ms",
              flush=True)


def bench_overhead(args, rows, tmp):
    """Per-step time on the tiny demo model, where the model costs next to nothing: the
    loop's own overhead, steady under CPU contention that blurs the 75M-model figures."""
    from mlx_lm import load

    from mlxsup.demo import build_demo_model

    path = build_demo_model(os.path.join(tmp, "tiny"), seed=0, preset="tiny")
    model, tok = load(path)
    rng = random.Random(5)
    for batch in (1, 8, 32):
        prompts = _prompts(batch, rng, 32, 96, vocab=500)
        engine = make_engine(model, tok, path, batch)
        run_engine(engine, prompts[:1], 4)
        run_plain(model, [], prompts[:1], 4, batch)
        plain, eng = [], []
        for _ in range(5):
            ntok, dt = run_plain(model, [], prompts, 128, batch)
            plain.append(dt * 1e3 / (ntok / batch))
            ntok, dt = run_engine(engine, prompts, 128)
            eng.append(dt * 1e3 / (ntok / batch))
        rows.append(("overhead", f"tiny model, batch {batch}: ms per step, plain / engine",
                     f"{min(plain):.2f} / {min(eng):.2f} ms", f"{min(plain) / min(eng):.2f}x"))
        print(f"overhead batch {batch}: plain {min(plain):.2f} ms/step, engine {min(eng):.2f}", flush=True)


def bench_grpo(model, tok, model_dir, args, rows):
    rng = random.Random(1)
    prompts = _prompts(8, rng, args.grpo_prompt, args.grpo_prompt)
    engine = make_engine(model, tok, model_dir, 64)
    run_engine(engine, prompts[:1], 2, n=2)  # warm-up
    best = {"grouped": 0.0, "separate": 0.0}
    for _ in range(args.reps):
        for name in ("separate", "grouped"):
            gc.collect()
            if name == "grouped":
                ntok, dt = run_engine(engine, prompts, args.grpo_tokens, n=8)
            else:
                ntok, dt = run_engine(engine, [p for p in prompts for _ in range(8)], args.grpo_tokens)
            best[name] = max(best[name], ntok / dt)
    ratio = best["grouped"] / best["separate"]
    shape = f"8 prompts x n=8, prompt {args.grpo_prompt}, {args.grpo_tokens} new tokens"
    rows.append(("grpo", f"GRPO {shape}: 64 separate requests", f"{best['separate']:.1f} tok/s", ""))
    rows.append(("grpo", f"GRPO {shape}: 8 requests with n=8", f"{best['grouped']:.1f} tok/s",
                 f"{ratio:.2f}x (goal >= 1.3x)"))
    print(f"grpo: separate {best['separate']:.1f}, grouped {best['grouped']:.1f}, {ratio:.2f}x", flush=True)


def _write_lora(engine, path, rank, seed=0):
    import numpy as np

    from mlxsup.demo import write_adapter

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, spec in engine.adapters.layer_specs.items():
        tensors[name + ".lora_a"] = (rng.standard_normal((spec.input_dims, rank)) * 0.01).astype(np.float32)
        tensors[name + ".lora_b"] = (rng.standard_normal((rank, spec.output_dims)) * 0.01).astype(np.float32)
    return write_adapter(path, tensors, rank, 2.0)


def bench_adapters(model, tok, model_dir, args, rows, tmp):
    engine = make_engine(model, tok, model_dir, 8)
    prompts = _prompts(4, random.Random(2), 16, 32)
    for rank in (8, 16, 64):
        path = _write_lora(engine, os.path.join(tmp, f"r{rank}"), rank)
        prep_ms, commit_ms = [], []
        for i in range(5):
            t0 = time.perf_counter()
            prepared = engine.prepare_adapter(path)
            prep_ms.append((time.perf_counter() - t0) * 1e3)
            for target in (prepared, engine.prepare_adapter(None)):
                # Commit under load: sequences are running when the swap lands.
                for p in prompts:
                    from mlxsup.ipc.messages import GenerateRequest, SamplingParams
                    engine.submit(GenerateRequest(10**9 + len(commit_ms) * 10 + prompts.index(p), p,
                                                  SamplingParams(max_tokens=6, temperature=1.0)))
                engine.step()
                ticket = engine.request_swap(target, "inflight", engine.policy_version + 1)
                while not ticket.done:
                    engine.step()
                if target is prepared:
                    commit_ms.append(ticket.commit_ms)
                while engine.has_work():
                    engine.step()
        size = prepared.nbytes / 2**20
        prep_ms.sort()
        commit_ms.sort()
        rows.append(("adapters", f"rank {rank} LoRA, {prepared.num_layers} layers, {size:.1f} MiB: prepare",
                     f"{prep_ms[len(prep_ms) // 2]:.1f} ms (median of 5)", ""))
        rows.append(("adapters", f"rank {rank}: commit (prepared, under load)",
                     f"{commit_ms[len(commit_ms) // 2]:.3f} ms (median), {commit_ms[-1]:.3f} max",
                     "goal < 5 ms" if rank == 16 else ""))
        print(f"rank {rank}: prepare {prep_ms}, commit {commit_ms}", flush=True)


def bench_memory(model, tok, model_dir, args, rows, tmp):
    import mlx.core as mx
    import psutil

    from mlxsup.ipc.messages import SamplingParams

    proc = psutil.Process()
    engine = make_engine(model, tok, model_dir, 16)
    paths = [_write_lora(engine, os.path.join(tmp, f"m{r}"), r, seed=r) for r in (8, 16, 64)]
    prompts = _prompts(4, random.Random(3), 8, 24)
    samples = []
    for i in range(args.swaps):
        target = engine.prepare_adapter(paths[i % 3] if i % 4 != 3 else None)
        engine.request_swap(target, ("drain", "inflight", "abort")[i % 3], engine.policy_version + 1)
        engine.generate(prompts, SamplingParams(max_tokens=4, temperature=1.0))
        if i % 20 == 19:
            gc.collect()
            samples.append((i + 1, proc.memory_info().rss / 2**20, mx.get_active_memory() / 2**20))
            print(f"swaps {i + 1}: rss {samples[-1][1]:.1f} MiB, mlx active {samples[-1][2]:.1f} MiB",
                  flush=True)
    first, last = samples[0], samples[-1]
    rows.append(("memory", f"{args.swaps} swaps (bench75m): RSS after {first[0]} / {last[0]} swaps",
                 f"{first[1]:.1f} / {last[1]:.1f} MiB", f"{last[1] - first[1]:+.1f} MiB"))
    rows.append(("memory", f"{args.swaps} swaps: MLX active after {first[0]} / {last[0]} swaps",
                 f"{first[2]:.1f} / {last[2]:.1f} MiB", f"{last[2] - first[2]:+.2f} MiB"))
    if args.requests:
        from mlxsup.demo import build_demo_model
        from mlxsup.engine import Engine, EngineConfig

        demo = build_demo_model(os.path.join(tmp, "demo"), seed=0, preset="demo")
        eng = Engine(EngineConfig(model=demo, max_batch=64, flush_interval_ms=0, max_queue=100_000,
                                  seed=0))
        rng = random.Random(4)
        params = SamplingParams(max_tokens=4, temperature=1.0, logprobs_mode="processed")
        marks = []
        done = 0
        while done < args.requests:
            batch = _prompts(500, rng, 4, 48, vocab=2000)
            eng.generate(batch, params)
            done += len(batch)
            gc.collect()
            marks.append((done, proc.memory_info().rss / 2**20, mx.get_active_memory() / 2**20))
        half = len(marks) // 2
        first, second = marks[1:half], marks[half:]  # the first 500 warm the allocator up
        for i, what in ((1, "RSS"), (2, "MLX active")):
            lo1, hi1 = min(m[i] for m in first), max(m[i] for m in first)
            lo2, hi2 = min(m[i] for m in second), max(m[i] for m in second)
            rows.append(("memory", f"{done} requests (demo model): {what} range, requests "
                         f"{first[0][0]}-{first[-1][0]} / {second[0][0]}-{second[-1][0]}",
                         f"{lo1:.1f}-{hi1:.1f} / {lo2:.1f}-{hi2:.1f} MiB",
                         f"max {hi2 - hi1:+.1f} MiB"))
        print(f"requests: {marks}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "mlxsup-bench75m"))
    p.add_argument("--preset", default="bench75m")
    p.add_argument("--only", default="batch,overhead,grpo,adapters,memory")
    p.add_argument("--reps", type=int, default=4, help="runs per cell; the best is reported")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--grpo-prompt", type=int, default=256)
    p.add_argument("--grpo-tokens", type=int, default=64)
    p.add_argument("--swaps", type=int, default=200)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--blas", choices=("auto", "off"), default="auto")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    from mlxsup.blas import reexec_with_blas

    reexec_with_blas(args.blas)

    import mlx.core as mx
    from mlx_lm import load

    from mlxsup.demo import build_demo_model

    if not os.path.exists(os.path.join(args.model_dir, "model.safetensors")):
        build_demo_model(args.model_dir, seed=0, preset=args.preset)
    model, tok = load(args.model_dir)
    nparams = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    print(f"model {args.model_dir}: {nparams / 1e6:.1f}M parameters; BLAS "
          f"{os.environ.get('MLXSUP_BLAS_LIB', 'reference')}; mlx {mx.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sections = set(args.only.split(","))
        if "batch" in sections:
            bench_batch(model, tok, args.model_dir, args, rows)
        if "overhead" in sections:
            bench_overhead(args, rows, tmp)
        if "grpo" in sections:
            bench_grpo(model, tok, args.model_dir, args, rows)
        if "adapters" in sections:
            bench_adapters(model, tok, args.model_dir, args, rows, tmp)
        if "memory" in sections:
            bench_memory(model, tok, args.model_dir, args, rows, tmp)
    print()
    print("| section | measurement | result | vs goal |")
    print("|---|---|---|---|")
    for section, what, value, note in rows:
        print(f"| {section} | {what} | {value} | {note} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
