"""The raw engine: a plain mlx-lm `BatchGenerator` loop in one process, no HTTP, no IPC.

The limit a server can approach. Run as a subprocess by bench_server.py (so that it gets the
same BLAS environment as the servers, and its memory is measured on its own):

    python rawloop.py SPEC.json RESULT.json

SPEC: {"model", "max_tokens", "temperature", "stop_ids", "prefill_batch", "jobs": [{"name",
"requests": [{"ids": [...], "n": int}], "concurrency", "num_requests", "duration_s",
"grace_s"}]}. Each job is a closed loop like the HTTP load generator's: `concurrency` requests
in flight, a new one inserted as soon as one finishes, until `num_requests` were issued or
`duration_s` passed; whatever is unfinished at `duration_s + grace_s` is cut. A request with
n > 1 inserts its prompt n times (BatchGenerator has no shared prefill). Prints `@start NAME`
and `@end NAME` around each job so the parent can attribute memory samples. A job of kind
"static" inserts all of its requests at once (run_static); "generate_step" runs mlx-lm's
single-stream path.
"""

from __future__ import annotations

import json
import sys
import time


def run_job(model, job: dict, spec: dict) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    requests = job["requests"]
    concurrency = int(job["concurrency"])
    num_requests = int(job["num_requests"])
    max_n = max(r.get("n", 1) for r in requests)
    max_tokens = int(job.get("max_tokens", spec["max_tokens"]))
    stop = [[t] for t in spec.get("stop_ids", [])] or None
    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=stop,
        sampler=make_sampler(temp=float(spec.get("temperature", 0.0))),
        completion_batch_size=max(1, concurrency * max_n),
        prefill_batch_size=max(1, min(concurrency * max_n, int(spec.get("prefill_batch", 8)))),
    )
    mx.reset_peak_memory()
    records: list[dict] = []
    owner: dict[int, dict] = {}  # uid -> request record
    active = 0
    issued = 0
    duration = float(job["duration_s"])
    hard_stop = duration + float(job["grace_s"])
    t0 = time.perf_counter()
    cut = False
    while True:
        now = time.perf_counter() - t0
        while active < concurrency and issued < num_requests and now < duration:
            req = requests[issued % len(requests)]
            n = int(req.get("n", 1))
            rec = {
                "t_start": now, "t_first": None, "t_end": None, "ok": False, "cut": False,
                "tokens": 0, "prompt_tokens": len(req["ids"]), "n": n, "left": n, "error": None,
            }
            for uid in gen.insert([list(req["ids"])] * n, [max_tokens] * n):
                owner[uid] = rec
            records.append(rec)
            issued += 1
            active += 1
        if active == 0:
            break
        if now > hard_stop:
            cut = True
            break
        _, responses = gen.next()
        now = time.perf_counter() - t0
        for r in responses:
            rec = owner[r.uid]
            if rec["t_first"] is None:
                rec["t_first"] = now
            rec["tokens"] += 1
            if r.finish_reason is not None:
                del owner[r.uid]
                rec["left"] -= 1
                if rec["left"] == 0:
                    rec["t_end"] = now
                    rec["ok"] = True
                    active -= 1
    end = time.perf_counter() - t0
    if cut:
        for rec in records:
            if not rec["ok"]:
                rec["cut"] = True
    gen.close()
    del gen
    mx.clear_cache()
    for rec in records:
        del rec["left"]
    return {"name": job["name"], "records": records, "elapsed_s": end,
            "mlx_peak_memory_bytes": int(mx.get_peak_memory())}


def run_generate_step(model, job: dict, spec: dict) -> dict:
    """mlx-lm's single-stream path (`generate_step`), one request after another: the speed a
    server at concurrency 1 should reach. No EOS check (generate_step leaves that to callers)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    requests = job["requests"]
    max_tokens = int(job.get("max_tokens", spec["max_tokens"]))
    sampler = make_sampler(temp=float(spec.get("temperature", 0.0)))
    stop = set(spec.get("stop_ids", []))
    mx.reset_peak_memory()
    records = []
    t0 = time.perf_counter()
    for i in range(int(job["num_requests"])):
        now = time.perf_counter() - t0
        if now >= float(job["duration_s"]):
            break
        req = requests[i % len(requests)]
        rec = {"t_start": now, "t_first": None, "t_end": None, "ok": False, "cut": False,
               "tokens": 0, "prompt_tokens": len(req["ids"]), "n": 1, "error": None}
        records.append(rec)
        for token, _ in generate_step(mx.array(req["ids"]), model, max_tokens=max_tokens,
                                      sampler=sampler):
            rec["tokens"] += 1
            if rec["t_first"] is None:
                rec["t_first"] = time.perf_counter() - t0
            if int(token) in stop:
                break
        rec["t_end"] = time.perf_counter() - t0
        rec["ok"] = True
    end = time.perf_counter() - t0
    mx.clear_cache()
    return {"name": job["name"], "records": records, "elapsed_s": end,
            "mlx_peak_memory_bytes": int(mx.get_peak_memory())}


def run_static(model, job: dict, spec: dict) -> dict:
    """Every request of the job inserted at once into one BatchGenerator (no arrivals, no
    closed loop): the all-at-once limit of a rollout round (issue 17's `raw-static`).
    `completion_batch_size` holds the whole round, and so does one prefill pass unless the spec
    sets `static_prefill_batch` (rows a pass): the engine's limit, not mlx_lm.server's 8."""
    total = sum(int(r.get("n", 1)) for r in job["requests"])
    job = dict(job, concurrency=len(job["requests"]), num_requests=len(job["requests"]),
               duration_s=float(job.get("duration_s", 3600.0)), grace_s=float(job.get("grace_s", 0.0)))
    spec = dict(spec, prefill_batch=min(total, int(spec.get("static_prefill_batch") or total)))
    return run_job(model, job, spec)


def main(argv) -> int:
    spec_path, out_path = argv[1], argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    import mlx.core as mx
    import mlx_lm

    t = time.perf_counter()
    model, _ = mlx_lm.load(spec["model"])
    load_s = time.perf_counter() - t
    print(f"@ready {load_s:.2f}", flush=True)
    results = []
    for job in spec["jobs"]:
        print(f"@start {job['name']}", flush=True)
        run = {"generate_step": run_generate_step, "static": run_static}.get(job.get("kind"), run_job)
        results.append(run(model, job, spec))
        print(f"@end {job['name']}", flush=True)
    with open(out_path, "w") as f:
        json.dump({"load_s": load_s, "device": str(mx.default_device()), "jobs": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
