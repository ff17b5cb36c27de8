#!/usr/bin/env python3
"""Why does one sequence decode slower in the server's engine process than the same `Engine`
in-process? (docs/benchmarks-gpu.md: concurrency 1 on the GPU against mlx-lm's `generate_step`.)

On one host, one model and one prompt, per-token decode time at batch 1 of:

  inproc        `Engine` in this process, as `profile_step.py` times it (max_batch 1, no
                flush interval, streamed)
  inproc-server the same with the server's engine settings (`--max-batch`, flush interval,
                not streamed)
  server[i]     `mlxsup start` with each `--variant`'s flags, /generate one request at a time

For each server it also records what differs in the engine process: its LD_PRELOAD, threads,
the CPU each thread and each of the server's processes used while serving, and (with
`--py-spy`) a native sampling profile of the engine's main thread; the in-process engine gets
the same profile, so the two can be compared frame by frame (`--out` keeps the raw stacks).

    python3 scripts/profile_server_gap.py --preset bench1b --py-spy /tmp/pyspy/bin/py-spy \\
        --variant "--max-batch 256" --variant "--max-batch 256 --blas off" --out $OUT/gap
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def _pyspy(binary, pid, seconds, out_path, rate=500):
    """Start py-spy (native frames, raw collapsed stacks) on `pid`; returns the Popen."""
    if not binary:
        return None
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--native", "--rate", str(rate), "--duration",
         str(max(1, round(seconds))), "--format", "raw", "--output", out_path],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish_pyspy(proc):
    if proc is None:
        return ""
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return (err or "")[-400:]


def top_frames(raw_path, n=40, thread_filter=None):
    """Self and inclusive shares by frame, of the stacks that hold a frame starting with
    `thread_filter` (the engine's step: the other threads and the idle waits left out)."""
    leaf, incl, total = {}, {}, 0
    try:
        lines = open(raw_path).read().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        try:
            c = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        if thread_filter and not any(f.startswith(thread_filter) for f in frames):
            continue
        total += c
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    pick = lambda d: [(k[:160], round(100 * v / max(total, 1), 1))
                      for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]
    return {"samples": total, "self": pick(leaf), "inclusive": pick(incl)}


def time_inproc(model, tok, path, prompt, args, **cfg):
    from profile_step import time_engine

    from mlxsup.engine.config import EngineConfig
    from mlxsup.engine.core import Engine
    from mlxsup.ipc.messages import GenerateRequest, SamplingParams, SequenceDone

    stream = cfg.pop("stream", True)
    engine = Engine(EngineConfig(model=path, **cfg), model=model, tokenizer=tok)
    time_engine(engine, prompt, 16, 1, 1)
    if stream:
        return time_engine(engine, prompt, args.max_tokens, args.reps, 1), engine
    # not streamed: the engine's own figures, from the first token to the last
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0,
                            logprobs_mode="processed", ignore_eos=True)
    per = []
    for rep in range(args.reps):
        engine.submit(GenerateRequest(2000 + rep, list(prompt), params, n=1, stream=False))
        done = None
        while done is None:
            events = engine.step()
            done = next((e for e in events if isinstance(e, SequenceDone)), None)
            if not events:
                hint = engine.wait_hint()
                if hint:
                    time.sleep(min(hint, 0.001))
        per.append((done.total_ms - done.ttft_ms) / max(len(done.token_ids) - 1, 1))
    return min(per), engine


def profile_inproc(engine, prompt, args, out_dir):
    """py-spy (native) on this process while the in-process engine decodes for a while."""
    from profile_step import time_engine

    if not args.py_spy:
        return {}
    raw = os.path.join(out_dir, "inproc.raw.txt")
    spy = _pyspy(args.py_spy, os.getpid(), args.spy_seconds, raw)
    time.sleep(1.0)
    t_end = time.time() + args.spy_seconds
    while time.time() < t_end:
        time_engine(engine, prompt, args.max_tokens, 1, 1)
    err = _finish_pyspy(spy)
    return {"pyspy_err": err, "frames": top_frames(raw, thread_filter="Engine.step")}


def _children(run_dir):
    try:
        with open(os.path.join(run_dir, "children.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def time_server_variant(path, prompt_text, args, flags, idx, out_dir):
    import psutil
    from profile_step import generate_body, one_at_a_time, started_server

    res = {"flags": " ".join(flags)}
    with started_server(path, flags) as (client, run_dir):
        kids = _children(run_dir)
        sup = psutil.Process(int(open(os.path.join(run_dir, "supervisor.pid")).read().split()[0])) \
            if os.path.exists(os.path.join(run_dir, "supervisor.pid")) else None
        procs = {f"{k['role']}:{k['pid']}": psutil.Process(k["pid"]) for k in kids}
        engine_pid = next((k["pid"] for k in kids if k["role"] == "engine"), None)
        if sup is not None:
            procs[f"supervisor:{sup.pid}"] = sup
            for c in sup.children(recursive=True):
                procs.setdefault(f"{c.name()}:{c.pid}", c)
        ep = psutil.Process(engine_pid)
        env = ep.environ()
        res["engine_env"] = {k: v for k, v in env.items()
                             if k.startswith(("LD_", "MLX", "OPENBLAS", "OMP", "CUDA", "PYTHON"))}
        res["engine_libs"] = sorted({m.path.rsplit("/", 1)[-1] for m in ep.memory_maps()
                                     if "blas" in m.path.lower() or "omp" in m.path.lower()})
        res["engine_affinity"] = len(ep.cpu_affinity()) if hasattr(ep, "cpu_affinity") else None
        res["engine_nice"] = ep.nice()
        body = generate_body(prompt_text, args.max_tokens)
        timed = one_at_a_time(client, body, args.reps)
        res["engine_per_token_ms"] = timed["server_engine_per_token_ms"]
        res["wall_per_token_ms"] = timed["server_wall_per_token_ms"]
        # CPU per process and per engine thread while serving one request at a time
        def cpu(p):
            try:
                t = p.cpu_times()
                return t.user + t.system
            except psutil.Error:
                return 0.0
        before = {k: cpu(p) for k, p in procs.items()}
        th0 = {t.id: t.user_time + t.system_time for t in ep.threads()}
        stop = threading.Event()

        def load():
            while not stop.is_set():
                client.post("/generate", json=body)
        raw = os.path.join(out_dir, f"server{idx}.raw.txt")
        spy = _pyspy(args.py_spy, engine_pid, args.spy_seconds, raw) if args.py_spy else None
        t0 = time.perf_counter()
        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(args.spy_seconds + 1.0)
        stop.set()
        worker.join()
        wall = time.perf_counter() - t0
        res["pyspy_err"] = _finish_pyspy(spy)
        res["cpu_pct"] = {k: round(100 * (cpu(p) - before[k]) / wall, 1) for k, p in procs.items()}
        names = {}
        try:
            for t in os.listdir(f"/proc/{engine_pid}/task"):
                with open(f"/proc/{engine_pid}/task/{t}/comm") as f:
                    names[int(t)] = f.read().strip()
        except OSError:
            pass
        res["engine_threads_cpu_pct"] = sorted(
            [f"{names.get(t.id, '?')}/{t.id}: "
             f"{100 * (t.user_time + t.system_time - th0.get(t.id, 0)) / wall:.1f}"
             for t in ep.threads()], key=lambda x: -float(x.rsplit(' ', 1)[1]))[:12]
        res["engine_num_threads"] = ep.num_threads()
        res["frames"] = top_frames(raw, thread_filter="Engine.step") if args.py_spy else {}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--preset", default="bench75m")
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variant", action="append", default=[],
                   help="`mlxsup start` flags of one server to time (repeatable)")
    p.add_argument("--py-spy", help="py-spy binary: native profiles of both engines")
    p.add_argument("--spy-seconds", type=float, default=8.0)
    p.add_argument("--inproc", action="append", default=[],
                   help="in-process settings to time too, e.g. 'max_batch=256,flush_interval_ms=10,"
                        "stream=0' (repeatable)")
    p.add_argument("--out", default="bench-out/gap")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from profile_step import setup

    path, model, tok, _, prompt = setup(args.model, args.preset, args.prompt_tokens)
    import mlx.core as mx

    report = {"model": path, "device": str(mx.default_device()),
              "ld_preload": os.environ.get("LD_PRELOAD", "")}
    print(json.dumps(report), flush=True)
    ms, eng = time_inproc(model, tok, path, prompt, args, max_batch=1,
                          flush_interval_ms=0.0)
    report["inproc_ms"] = ms
    print(f"inproc (max_batch 1, flush 0, streamed): {ms:.3f} ms/token", flush=True)
    report["inproc_profile"] = profile_inproc(eng, prompt, args, args.out)
    print(json.dumps(report["inproc_profile"], indent=1)[:3000], flush=True)
    report["inproc_variants"] = {}
    for spec in args.inproc:
        kw = {k: float(v) if k == "flush_interval_ms" else int(v)
              for k, v in (item.split("=") for item in spec.split(","))}
        ms2, _ = time_inproc(model, tok, path, prompt, args, **kw)
        report["inproc_variants"][spec] = ms2
        print(f"inproc ({spec}): {ms2:.3f} ms/token", flush=True)
    del eng
    mx.clear_cache()
    report["servers"] = []
    for i, flags in enumerate(args.variant or [""]):
        r = time_server_variant(path, tok.decode(prompt), args, shlex.split(flags), i, args.out)
        report["servers"].append(r)
        print(json.dumps(r, indent=1)[:4000], flush=True)
        with open(os.path.join(args.out, "gap.json"), "w") as f:
            json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "gap.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
