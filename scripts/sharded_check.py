"""A fixed workload through one engine, alone or sharded under `mlx.launch`; rank 0 writes
every token, log-prob and score to OUT (JSON), so runs with different rank counts compare.

    python scripts/sharded_check.py MODEL OUT
    mlx.launch -n 2 --backend ring --python .venv/bin/python scripts/sharded_check.py MODEL OUT
"""

import json
import sys

from mlxsup.engine import distributed
from mlxsup.engine.config import EngineConfig
from mlxsup.engine.core import Engine
from mlxsup.ipc.messages import (ErrorEvent, GenerateRequest, SamplingParams, ScoreRequest,
                                 ScoreResult, SequenceDone)


def main(model_dir: str, out: str) -> int:
    group = distributed.group_from_env()
    cfg = distributed.sharded_config(EngineConfig(model=model_dir, max_batch=3, seed=0,
                                                     flush_interval_ms=0))
    if group is None:
        engine = Engine(cfg)
    else:
        model, tok = distributed.load_sharded(cfg)
        engine = Engine(cfg, model=model, tokenizer=tok)
        if group.rank() != 0:
            distributed.follow(engine, group)
            return 0
        leader = distributed.lead(engine, group)
    P = SamplingParams
    reqs = [GenerateRequest(1, [5, 6, 7, 8], P(max_tokens=12, temperature=0.0,
                                               logprobs_mode="raw")),
            GenerateRequest(2, [9, 10], P(max_tokens=10, temperature=1.0, seed=7,
                                            logprobs_mode="raw"), n=4),
            GenerateRequest(3, list(range(3, 30)), P(max_tokens=8, temperature=0.7, top_p=0.9,
                                                     seed=3, logprobs_mode="processed"))]
    results = {"done": {}, "scores": {}, "versions": []}
    pending = {1: 1, 2: 4, 3: 1}
    for r in reqs:
        engine.submit(r)
    swaps = [(3, "inflight"), (9, "drain"), (14, "abort")]  # (not before step, mode)
    step = 0
    while any(pending.values()) or engine.has_work() or swaps or 4 not in pending:
        if swaps and step >= swaps[0][0] and engine.pending_swap is None:
            engine.request_swap(engine.prepare_adapter(None), swaps.pop(0)[1])
        if engine.policy_version == 3 and 4 not in pending:  # after the abort swap
            engine.submit(GenerateRequest(4, [11, 12, 13], P(max_tokens=6, temperature=0.0,
                                                              logprobs_mode="raw")))
            pending[4] = 1
        for ev in engine.step():
            if isinstance(ev, SequenceDone):
                results["done"][f"{ev.request_id}.{ev.seq_index}"] = dict(
                    tokens=list(ev.token_ids), logprobs=list(ev.logprobs),
                    reason=ev.finish_reason)
                pending[ev.request_id] -= 1
            elif isinstance(ev, ErrorEvent) and ev.request_id in pending:
                results["done"][f"{ev.request_id}.error"] = ev.message
                pending[ev.request_id] = 0
        results["versions"].append(engine.policy_version)
        step += 1
        if step > 500:
            raise SystemExit("the workload did not finish")
    done = results["done"]["1.0"]
    for i, mode in enumerate(("raw", "processed")):
        engine.submit(ScoreRequest(100 + i, [5, 6, 7, 8], done["tokens"], mode,
                                   SamplingParams(temperature=0.7)))
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, ScoreResult):
                results["scores"][str(ev.request_id)] = list(ev.logprobs)
    if group is not None:
        results["plans"] = leader.plans_sent
        leader.stop()
    with open(out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
