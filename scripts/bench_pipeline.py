#!/usr/bin/env python3
"""The engine's step modes side by side, in one process, on one model (docs/benchmarks.md):

  pipelined  each step queues the next decode step before reading the last one's tokens
             (`--pipeline on`, a GPU's default)
  stepwise   each step runs its decode step to the end (`--pipeline off`)
  adaptive   stepwise while steps are long, pipelined while short (`--pipeline auto` on the CPU)

For each batch size: `--reps` interleaved runs of each mode (100-token prompts, T=1, every
token's log-prob, `--max-tokens` tokens, EOS ignored, prefill included), best run reported,
with the ratios to pipelined. On Linux the script re-executes itself with OpenBLAS
preloaded, as the supervisor does for the engine.

    python scripts/bench_pipeline.py                       # bench75m, batch 1, 8, 32
    python scripts/bench_pipeline.py --preset tiny --batch 1,4 --reps 1 --max-tokens 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an mlx-lm model directory (default: the --preset demo model)")
    p.add_argument("--preset", default="bench75m")
    p.add_argument("--batch", default="1,8,32", help="batch sizes, comma-separated")
    p.add_argument("--reps", type=int, default=3, help="interleaved runs per mode and batch")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=100)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_step import setup

    path, model, tok, vocab, _ = setup(args.model, args.preset, args.prompt_tokens)
    import mlx.core as mx

    from mlxsup.engine.config import EngineConfig
    from mlxsup.engine.core import Engine
    from mlxsup.ipc.messages import SamplingParams

    batches = [int(b) for b in args.batch.split(",")]
    engines = {mode: Engine(EngineConfig(model=path, max_batch=max(batches),
                                         flush_interval_ms=0.0, pipeline=setting),
                            model=model, tokenizer=tok)
               for mode, setting in (("pipelined", True), ("stepwise", False), ("adaptive", None))}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0,
                            logprobs_mode="processed", ignore_eos=True)
    warm = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    print(f"model {path}, device {mx.default_device()}, BLAS {os.environ.get('MLXSUP_BLAS_LIB')}",
          flush=True)
    print("| batch | pipelined tok/s | stepwise tok/s | adaptive tok/s | stepwise / pipelined "
          "| adaptive / pipelined | adaptive ends |\n|---|---|---|---|---|---|---|")
    for b in batches:
        prompts = [[10 + (i * 7919 + j * 31) % (vocab - 20) for i in range(args.prompt_tokens)]
                   for j in range(b)]
        best = {}
        for eng in engines.values():
            eng.generate(prompts, warm)  # shapes seen once before the timed runs
        for _ in range(args.reps):
            for mode, eng in engines.items():
                t0 = time.perf_counter()
                out = eng.generate(prompts, params)
                rate = sum(len(d.token_ids) for o in out for d in o) / (time.perf_counter() - t0)
                best[mode] = max(best.get(mode, 0.0), rate)
        ad = engines["adaptive"].runner
        ends = "pipelined" if ad.pipeline else "stepwise"
        if ad.step_s is not None:
            ends += f" ({ad.step_s * 1e3:.0f} ms a step)"
        print(f"| {b} | {best['pipelined']:.1f} | {best['stepwise']:.1f} | {best['adaptive']:.1f} "
              f"| {best['stepwise'] / best['pipelined']:.3f} "
              f"| {best['adaptive'] / best['pipelined']:.3f} | {ends} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
