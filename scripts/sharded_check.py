"""A fixed workload through one engine, alone or sharded under `mlx.launch`; rank 0 writes
every token, log-prob and score to OUT (JSON), so runs with different rank counts compare.

    python scripts/sharded_check.py MODEL OUT
    mlx.launch -n 2 --backend ring --python .venv/bin/python scripts/sharded_check.py MODEL OUT

The swaps: a LoRA adapter on every linear layer of the blocks (inflight, read in the
background first), the base model (drain), a full-weight update of layers split either way
and of an unsplit one (abort, read in the background first), the adapter again on top of the
update (inflight, prepared from its path). Then the swaps that must fail: a missing path, a
directory removed after rank 0 read it (the followers cannot read it), one rewritten after
rank 0 read it (the ranks would read different contents); on one rank the last two succeed,
on several they fail everywhere, and a last request shows every rank still serves the same
weights. Rank 0 writes the adapter and the update next to OUT.
"""

import json
import os
import shutil
import sys

import mlx.core as mx
import numpy as np

from mlxsup.engine import distributed
from mlxsup.demo import write_adapter
from mlxsup.engine.adapter_files import AdapterError
from mlxsup.engine.config import EngineConfig
from mlxsup.engine.core import Engine
from mlxsup.engine.weights import write_weights
from mlxsup.ipc.messages import (ErrorEvent, GenerateRequest, SamplingParams, ScoreRequest,
                                 ScoreResult, SequenceDone)

# Full tensors the update replaces: output split, input split (on a sharded Llama), unsplit.
UPDATED = ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.gate_proj.weight",
           "model.layers.1.self_attn.k_proj.weight", "model.norm.weight")


def write_lora(engine, path: str, seed: int) -> str:
    """A random rank-4 LoRA adapter on every adaptable layer (full sizes on any rank count)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, spec in sorted(engine.adapters.layer_specs.items()):
        tensors[name + ".lora_a"] = rng.normal(0, 0.2, (spec.input_dims, 4)).astype(np.float32)
        tensors[name + ".lora_b"] = rng.normal(0, 0.2, (4, spec.output_dims)).astype(np.float32)
    return write_adapter(path, tensors, rank=4, scale=4.0)


def write_update(model_dir: str, path: str) -> str:
    """The checkpoint's tensors `UPDATED`, perturbed (seeded); of a quantized layer its
    weight, scales and biases together, the scales perturbed."""
    full = mx.load(os.path.join(model_dir, "model.safetensors"))
    rng = np.random.default_rng(5)
    arrays = {}
    for name in UPDATED:
        layer = name.rpartition(".")[0]
        if layer + ".scales" in full:
            arrays.update({layer + "." + leaf: full[layer + "." + leaf]
                           for leaf in ("weight", "biases") if layer + "." + leaf in full})
            name = layer + ".scales"
        w = full[name]
        arrays[name] = w + mx.array(rng.normal(0, 0.05, w.shape).astype(np.float32)).astype(w.dtype)
    return write_weights(path, arrays)


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
    files_dir = os.path.splitext(out)[0] + "-swaps"
    shutil.rmtree(files_dir, ignore_errors=True)
    adapter = write_lora(engine, os.path.join(files_dir, "adapter"), seed=1)
    update = write_update(model_dir, os.path.join(files_dir, "update"))

    P = SamplingParams
    reqs = [GenerateRequest(1, [5, 6, 7, 8], P(max_tokens=12, temperature=0.0,
                                               logprobs_mode="raw")),
            GenerateRequest(2, [9, 10], P(max_tokens=10, temperature=1.0, seed=7,
                                            logprobs_mode="raw"), n=4),
            GenerateRequest(3, list(range(3, 30)), P(max_tokens=8, temperature=0.7, top_p=0.9,
                                                     seed=3, logprobs_mode="processed"))]
    results = {"done": {}, "scores": {}, "versions": [], "probes": {}}
    pending = {1: 1, 2: 4, 3: 1}
    for r in reqs:
        engine.submit(r)
    # (not before step, mode, what): "read:" reads in one step, prepares in the next
    swaps = [(3, "inflight", "read:" + adapter), (9, "drain", None),
             (14, "abort", "weights:" + update), (26, "inflight", adapter)]
    late = {3: GenerateRequest(4, [11, 12, 13], P(max_tokens=6, temperature=0.0,
                                                   logprobs_mode="raw")),
            4: GenerateRequest(5, [7, 3, 9], P(max_tokens=8, temperature=0.0,
                                                logprobs_mode="raw"))}
    read = None  # (mode, files) read in the step before
    step = 0
    while any(pending.values()) or engine.has_work() or swaps or read or late:
        if read is not None:
            mode, kind, files = read
            prepared = (engine.prepare_weights(files) if kind == "weights"
                        else engine.prepare_adapter(files))
            engine.request_swap(prepared, mode)
            read = None
        elif swaps and step >= swaps[0][0] and engine.pending_swap is None:
            _, mode, what = swaps.pop(0)
            if what is None or not what.startswith(("read:", "weights:")):
                engine.request_swap(engine.prepare_adapter(what), mode)
            elif what.startswith("read:"):
                read = (mode, "adapter", engine.adapters.read(what[5:]))
            else:
                read = (mode, "weights", engine.weights.read(what[8:]))
        request = late.pop(engine.policy_version, None)
        if request is not None:
            engine.submit(request)
            pending[request.request_id] = 1
        for ev in engine.step():
            if isinstance(ev, SequenceDone):
                results["done"][f"{ev.request_id}.{ev.seq_index}"] = dict(
                    tokens=list(ev.token_ids), logprobs=list(ev.logprobs),
                    reason=ev.finish_reason, versions=list(ev.versions))
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

    probes = results["probes"]
    try:
        engine.prepare_adapter(os.path.join(files_dir, "missing"))
        probes["missing"] = "prepared"
    except AdapterError as e:
        probes["missing"] = [e.kind, str(e)]
    for name in ("removed", "rewritten"):
        path = shutil.copytree(adapter, os.path.join(files_dir, name))
        files = engine.adapters.read(path)  # rank 0's read; the followers read at the prepare
        if name == "removed":
            shutil.rmtree(path)
        else:
            write_lora(engine, path, seed=2)
        try:
            engine.prepare_adapter(files)
            probes[name] = "prepared"
        except AdapterError as e:
            probes[name] = [e.kind, str(e)]
        del files
    engine.submit(GenerateRequest(6, [4, 4, 5], P(max_tokens=8, temperature=0.0,
                                                  logprobs_mode="raw")))
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, SequenceDone):
                results["done"]["6.0"] = dict(tokens=list(ev.token_ids),
                                              logprobs=list(ev.logprobs), reason=ev.finish_reason,
                                              versions=list(ev.versions))
    results["final_version"] = engine.policy_version
    if group is not None:
        results["plans"] = leader.plans_sent
        leader.stop()
    with open(out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
