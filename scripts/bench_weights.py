#!/usr/bin/env python3
"""Full-weight updates through a real server: receipt -> first token under the new weights,
and the engine's peak RSS.

`mlxsup start` on a bench model; for each case (every parameter, or the last layer only) and
mode, the benchmark writes new weights (the model's + noise) to a directory, then sends
POST /update_weights and, at the same moment, a one-token /generate with `min_policy_version`
of the new version. Figures per update:

  ack_ms          until /update_weights answers (the version committed)
  first_token_ms  until that one-token /generate answers: the first token of a new request
                  under the new weights, on the client's clock (copy into the run dir, read,
                  check, MLX arrays, the wait for the step boundary, commit, one prefill)
  engine_*        the engine's own account (read, prepare = receipt to ready, wait, commit)
  copy_ms         ack minus the engine's prepare+wait+commit: mostly the supervisor's copy of
                  the files into the run dir (what a restarted engine replays)
  peak_rss_mb     the engine's peak RSS during the update (VmHWM, reset before it) over
                  its RSS before: what exists twice; compare with replaced_mb

`--load N` keeps N closed-loop /generate clients running during the updates (inflight and
drain then show the step boundary's cost).

    python scripts/bench_weights.py                      # bench75m on this CPU
    python scripts/bench_weights.py --gpu                # bench1b on the GPU machine
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from profile_step import setup, started_server  # noqa: E402


def engine_pid(run_dir: str) -> int:
    from mlxsup.supervisor import protocol

    st = protocol.call(run_dir, {"op": "status"})
    return [p["pid"] for p in st["processes"] if p["role"] == "engine"][0]


def rss_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def write_update(model, out_dir: str, select, seed: int) -> tuple[str, int, int]:
    """New values (old + noise) for the parameters whose names contain `select` (all: None)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxsup.engine.weights import write_weights

    shutil.rmtree(out_dir, ignore_errors=True)
    key = mx.random.key(seed)
    update = {}
    for name, arr in tree_flatten(model.parameters()):
        if select and not any(s in name for s in select):
            continue
        if not mx.issubdtype(arr.dtype, mx.floating):
            continue
        key, k = mx.random.split(key)
        update[name] = (arr + 1e-3 * mx.random.normal(arr.shape, key=k)).astype(arr.dtype)
    write_weights(out_dir, update)
    return out_dir, len(update), sum(a.nbytes for a in update.values())


def load_loop(client_factory, prompt_ids, stop: threading.Event, counts: list) -> None:
    with client_factory() as c:
        while not stop.is_set():
            r = c.post("/generate", json={"prompt_ids": prompt_ids, "max_tokens": 64,
                                          "temperature": 1.0, "ignore_eos": True})
            counts.append(r.status_code)


def one_update(client, client_factory, run_dir, wdir, mode, prompt_ids) -> dict:
    pid = engine_pid(run_dir)
    version = client.get("/adapter").json()["policy_version"] + 1
    rss0 = rss_kb(pid, "VmRSS")
    has_peak = reset_peak(pid)
    t0 = time.perf_counter()

    def probe():
        with client_factory() as c:
            r = c.post("/generate", json={"prompt_ids": prompt_ids, "max_tokens": 1,
                                          "min_policy_version": version})
            r.raise_for_status()
            return time.perf_counter(), r.json()["generated_by_version"]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(probe)
        r = client.post("/update_weights", json={"weight_dir": wdir, "mode": mode}, timeout=1800)
        t_ack = time.perf_counter()
        r.raise_for_status()
        t_first, v = fut.result(timeout=1800)
    body = r.json()
    assert body["policy_version"] == version and v == version, (body, v)
    peak = rss_kb(pid, "VmHWM")
    engine = sum(body.get(k) or 0.0 for k in ("prepare_ms", "wait_ms", "commit_ms"))
    return {
        "ack_ms": (t_ack - t0) * 1e3, "first_token_ms": (t_first - t0) * 1e3,
        "engine_read_ms": body.get("read_ms"), "engine_prepare_ms": body.get("prepare_ms"),
        "engine_wait_ms": body.get("wait_ms"), "engine_commit_ms": body.get("commit_ms"),
        "copy_ms": (t_ack - t0) * 1e3 - engine,
        "rss_before_mb": rss0 / 1024, "peak_rss_mb": (peak - rss0) / 1024 if has_peak else None,
        "num_tensors": body["num_tensors"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an mlx-lm model directory (default: the --preset demo model)")
    p.add_argument("--preset", default=None, help="bench75m (default) or bench1b (--gpu)")
    p.add_argument("--gpu", action="store_true", help="bench1b, for the GPU machine")
    p.add_argument("--modes", default="drain,inflight")
    p.add_argument("--cases", default="full,last", help="full: every parameter; last: the last layer")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--load", type=int, default=0, help="closed-loop /generate clients meanwhile")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    preset = args.preset or ("bench1b" if args.gpu else "bench75m")
    path, model, tok, vocab, prompt = setup(args.model, preset, 32)
    import httpx
    import mlx.core as mx

    num_layers = len(model.layers)
    selects = {"full": None, "last": [f"layers.{num_layers - 1}."]}
    scratch = tempfile.mkdtemp(prefix="mlxsup-bench-weights-")
    results = {"preset": preset, "model": path, "device": str(mx.default_device()),
               "load": args.load, "rows": []}
    try:
        with started_server(path, ("--workers", "1", "--max-batch", "8")) as (client, run_dir):
            factory = lambda: httpx.Client(base_url=str(client.base_url), timeout=1800)  # noqa: E731
            client.post("/generate", json={"prompt_ids": prompt, "max_tokens": 4}).raise_for_status()
            stop, counts = threading.Event(), []
            loaders = [threading.Thread(target=load_loop, args=(factory, prompt, stop, counts), daemon=True)
                       for _ in range(args.load)]
            for t in loaders:
                t.start()
            seed = 0
            try:
                for case in args.cases.split(","):
                    for mode in args.modes.split(","):
                        rows = []
                        for _ in range(args.reps):
                            seed += 1
                            wdir, n, nbytes = write_update(model, os.path.join(scratch, "w"),
                                                           selects[case], seed)
                            row = one_update(client, factory, run_dir, wdir, mode, prompt)
                            row.update(case=case, mode=mode, replaced_mb=nbytes / 2**20)
                            rows.append(row)
                            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                              for k, v in row.items()}), flush=True)
                        results["rows"] += rows
                        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]
                               if isinstance(rows[0][k], float)}
                        print(f"== {case} ({rows[0]['num_tensors']} tensors, {med['replaced_mb']:.0f} MiB), "
                              f"{mode}: first token {med['first_token_ms']:.0f} ms, ack "
                              f"{med['ack_ms']:.0f} ms (copy {med['copy_ms']:.0f}, read "
                              f"{med['engine_read_ms']:.0f}, prepare {med['engine_prepare_ms']:.0f}, "
                              f"wait {med['engine_wait_ms']:.0f}, commit {med['engine_commit_ms']:.2f}); "
                              f"peak RSS +{med.get('peak_rss_mb') or float('nan'):.0f} MiB "
                              f"(engine RSS before {med['rss_before_mb']:.0f} MiB)", flush=True)
            finally:
                stop.set()
                for t in loaders:
                    t.join(timeout=300)
            results["load_requests"] = len(counts)
            results["load_errors"] = sum(1 for c in counts if c != 200)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"# {preset} on {results['device']}, load {args.load}: {results.get('load_requests', 0)} "
          f"requests meanwhile, {results.get('load_errors', 0)} errors")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
