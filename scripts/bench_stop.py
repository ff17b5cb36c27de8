#!/usr/bin/env python3
"""What a stop string costs a generating sequence (issue 14): one request at a time, in
process, on the demo model (4 layers), tokens/s of

  none          no stop string
  stop          one stop string, checked incrementally (engine/postprocess.py)
  full decode   one stop string, checked as the engine did before: the whole completion
                decoded after every token (for comparison, patched in here only)

at each `--lengths` (default 500 and 3,500 tokens). The stop string never occurs, so every
run generates all its tokens (EOS ignored; T=1 with a fixed seed: the same tokens each run);
tokens/s counts from submit to the last token, prefill included (streamed, one request);
runs are interleaved (each variant first in turn), `--reps` of each, the median and the best
reported with their ratios to `none`. "postprocess us/token" is the time inside the engine's
postprocessing step (where the stop check runs) per token, the steadiest figure on a shared
machine, and the last column its excess over `none` as a share of a token's time. On Linux
the script re-executes itself with OpenBLAS preloaded, as the supervisor does for the engine.

    python scripts/bench_stop.py                           # demo model, 500 and 3,500 tokens
    python scripts/bench_stop.py --lengths 100 --reps 1    # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

STOP = "\u00a7never\u00a7"


class FullDecodeStops:
    """The check before the incremental one: decode every token so far with the tokenizer's
    `decode`, search it all."""

    tokenizer_decode = None  # set in main

    def __init__(self, stops, _decode):
        self.stops, self.decode, self.ids = tuple(stops), self.tokenizer_decode, []

    def push(self, token: int) -> bool:
        self.ids.append(token)
        text = self.decode(self.ids)
        return any(s in text for s in self.stops)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an mlx-lm model directory (default: the --preset demo model)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--lengths", default="500,3500", help="tokens per request, comma-separated")
    p.add_argument("--reps", type=int, default=3, help="interleaved runs per variant and length")
    p.add_argument("--prompt-tokens", type=int, default=16)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_step import setup

    path, model, tok, _vocab, prompt = setup(args.model, args.preset, args.prompt_tokens)
    import mlx.core as mx

    from mlxsup.engine import postprocess
    from mlxsup.engine.config import EngineConfig
    from mlxsup.engine.core import Engine
    from mlxsup.ipc.messages import GenerateRequest, SamplingParams, SequenceDone

    engine = Engine(EngineConfig(model=path, max_batch=1, flush_interval_ms=0.0),
                    model=model, tokenizer=tok)
    incremental = postprocess.StopStrings
    FullDecodeStops.tokenizer_decode = tok.decode

    request_ids = iter(range(1, 1 << 62))
    accept = engine.postprocessor.accept
    in_postprocess = [0.0]

    def timed_accept(*a, **k):
        t0 = time.perf_counter()
        try:
            return accept(*a, **k)
        finally:
            in_postprocess[0] += time.perf_counter() - t0

    engine.postprocessor.accept = timed_accept

    def rate(variant: str, max_tokens: int) -> tuple[float, float]:
        """tokens/s over the whole request and microseconds a token spent in postprocessing."""
        postprocess.StopStrings = FullDecodeStops if variant == "full decode" else incremental
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0,
                                logprobs_mode="processed", ignore_eos=True,
                                stop_strings=() if variant == "none" else (STOP,))
        done, n = None, 0
        in_postprocess[0] = 0.0
        try:
            t0 = time.perf_counter()
            engine.submit(GenerateRequest(next(request_ids), list(prompt), params, stream=True))
            while done is None:
                events = engine.step()
                for e in events:  # TokenChunks, then the SequenceDone with the last token
                    n += len(e.token_ids)
                    if isinstance(e, SequenceDone):
                        done = e
            spent = time.perf_counter() - t0
        finally:
            postprocess.StopStrings = incremental
        if done.finish_reason != "length" or n != max_tokens:
            raise SystemExit(f"{variant}: ended by {done.finish_reason} after {n} tokens; "
                             "pick another stop string")
        return max_tokens / spent, in_postprocess[0] / n * 1e6

    variants = ("none", "stop", "full decode")
    lengths = [int(n) for n in args.lengths.split(",")]
    rate("stop", 16)  # warm-up: shapes compiled
    print(f"model {path}, device {mx.default_device()}, BLAS {os.environ.get('MLXSUP_BLAS_LIB')}, "
          f"prompt {len(prompt)} tokens, {args.reps} runs each", flush=True)
    print("| tokens | stop check | tok/s, median | tok/s, best | median / none | best / none "
          "| postprocess us/token | extra postprocess / token time |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for n in lengths:
        runs = {v: [] for v in variants}
        for rep in range(args.reps):
            for v in variants[rep % 3:] + variants[:rep % 3]:  # each first in turn
                runs[v].append(rate(v, n))
        med = {v: statistics.median(r for r, _ in runs[v]) for v in variants}
        best = {v: max(r for r, _ in runs[v]) for v in variants}
        us = {v: min(u for _, u in runs[v]) for v in variants}
        for v in variants:
            extra = (us[v] - us["none"]) * med["none"] / 1e6  # the check's time / a token's
            print(f"| {n} | {v} | {med[v]:.1f} | {best[v]:.1f} | {med[v] / med['none']:.3f} "
                  f"| {best[v] / best['none']:.3f} | {us[v]:.1f} | {extra:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
