#!/usr/bin/env python3
"""What does one admission step cost, in-process, and why? (issue 17: on the H200 the warm
burst of 128 separate requests spent 150-510 ms in each of its four admission steps.)

Replays admission patterns on an `Engine` (no server): each pattern is a list of group sizes;
a group's one-sample requests (100-token prompts, 128 tokens each at temperature 1 with
log-probs) are submitted together and admitted by one step, then --decode-steps decode steps
run before the next group, and the pattern's rows run to the end. Each step's time is
printed, so a pattern run twice shows what the first run built (kernels for new shapes) and
patterns of other sizes show whether new shapes cost again. --no-prefix-cache and
--max-prefill-tokens vary the engine around it.

    python3 scripts/probe_admission.py --preset bench1b 28,40,40,20 28,40,40,20 33,37,41,17 128
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import mlx.core as mx  # noqa: E402

from mlxsup.engine.config import EngineConfig  # noqa: E402
from mlxsup.engine.core import Engine  # noqa: E402
from mlxsup.ipc.messages import GenerateRequest, SamplingParams  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("patterns", nargs="+", help="comma lists of group sizes")
    p.add_argument("--model")
    p.add_argument("--preset", default="bench1b")
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=2)
    p.add_argument("--max-prefill-tokens", type=int, default=1 << 20)
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--engine-args", default="", help="more EngineConfig fields, k=v,k=v")
    args = p.parse_args(argv)
    model = args.model
    if model is None:
        from mlxsup.demo import default_demo_dir, ensure_demo_model

        model = ensure_demo_model(os.path.join(os.path.dirname(default_demo_dir()),
                                               f"bench-{args.preset}-seed0"), preset=args.preset)
    patterns = [[int(x) for x in s.split(",")] for s in args.patterns]
    extra = dict(kv.split("=") for kv in args.engine_args.split(",") if kv)
    extra = {k: (int(v) if v.lstrip("-").isdigit() else v) for k, v in extra.items()}
    cfg = EngineConfig(model=model, max_batch=max(sum(pt) for pt in patterns),
                       max_queue=4096, flush_interval_ms=0, seed=0,
                       max_prefill_tokens=args.max_prefill_tokens,
                       prefix_cache=not args.no_prefix_cache, **extra)
    t0 = time.perf_counter()
    eng = Engine(cfg)
    print(f"mlx {mx.__version__} {mx.default_device()}, engine built in "
          f"{time.perf_counter() - t0:.1f} s, pipeline {eng.runner.pipeline}", flush=True)
    rng = random.Random(0)
    vocab = eng.vocab_size
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, logprobs_mode="processed",
                            ignore_eos=True)
    rid = 1
    for pattern in patterns:
        t_pattern = time.perf_counter()
        line = []
        for size in pattern:
            for _ in range(size):
                prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)]
                eng.submit(GenerateRequest(rid, prompt, params, 1))
                rid += 1
            t = time.perf_counter()
            eng.step()
            admit_ms = (time.perf_counter() - t) * 1e3
            decode = []
            for _ in range(args.decode_steps):
                t = time.perf_counter()
                eng.step()
                decode.append((time.perf_counter() - t) * 1e3)
            line.append(f"+{size}: admit {admit_ms:.0f} ms, then "
                        + "/".join(f"{d:.0f}" for d in decode))
        steps, t_rest = 0, time.perf_counter()
        worst = 0.0
        while eng.has_work():
            t = time.perf_counter()
            eng.step()
            worst = max(worst, time.perf_counter() - t)
            steps += 1
        rest = time.perf_counter() - t_rest
        total = time.perf_counter() - t_pattern
        print(f"{','.join(map(str, pattern))}: {total:.2f} s, "
              f"{sum(pattern) * args.max_tokens / total:.0f} tok/s | " + " | ".join(line)
              + f" | rest {steps} steps {rest * 1e3 / max(steps, 1):.1f} ms/step "
              f"(worst {worst * 1e3:.0f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
