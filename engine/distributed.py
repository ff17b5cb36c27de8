"""One engine over several `mx.distributed` ranks: rank 0 leads, the others follow.

The model is split by mlx-lm's `sharded_load` (tensor parallel through the model's `shard()`,
pipeline where the model only has `pipeline()`), so every forward pass is a collective: all
ranks must run the same passes, with the same shapes, in the same order.

Rank 0 runs the whole `Engine` (scheduler, IPC, supervisor link). Its `ModelRunner` is wrapped
in `LeaderRunner`, which before every call that runs the model (`step`, `score`) or changes the
batch (`remove`, `reset`) or the weights (an adapter commit) broadcasts that call - the step's
plan: admissions with their prompt ids, sampling params and per-sample seeds (the sampling
keys), removals, the commit - and only then runs it. Each follower runs `follow()`: receive a
plan, run the same call on its own runner. The runner is deterministic given its calls (the
samplers draw from the seeds in the admissions; logits are identical on every rank after the
sharded layers' all_sum), so every rank samples the same tokens and stays in lockstep without
sending tokens back.

The plan travels over `mx.distributed` itself (two `all_sum`s: its length, then its bytes, the
followers adding zeros), not over a side channel: one collective that every backend
`mlx.launch` offers has (ring, JACCL, MPI, NCCL), over the link the model already uses, and a
dead rank breaks it as it breaks the model's own collectives. That is what mlx-lm's server does
too for its prompts.

What differs from one rank, on purpose:
- The runner's step mode is fixed (never chosen by measured step times: two ranks timing
  differently would run different passes).
- The prefix cache is off (`prefix_cache=False`): its lookups, stores and evictions would
  have to be part of the plan. Finished rows' KV is not kept.
- Prompt states are not kept for samples admitted in a later step (`save_prefix`): each rank
  would have to name its own cache objects in the plan. Those samples prefill again; the
  results are the same.
- LoRA adapters are refused on a sharded model (the low-rank factors would need sharding
  like the layers they adapt); swapping back to the base weights works, in every mode.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from typing import Optional

import mlx.core as mx
import numpy as np

log = logging.getLogger("mlxsup.engine.distributed")


def group_from_env() -> Optional["mx.distributed.Group"]:
    """The group `mlx.launch` set up for this process, or None when it runs alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def broadcast(group, payload: Optional[bytes]) -> bytes:
    """Rank 0's `payload` on every rank (the others pass None)."""
    lead = group.rank() == 0
    n = mx.array([len(payload) if lead else 0], dtype=mx.int32)
    n = int(mx.distributed.all_sum(n, group=group, stream=mx.cpu).item())
    if lead:
        buf = mx.array(np.frombuffer(payload, dtype=np.uint8))
    else:
        buf = mx.zeros((n,), dtype=mx.uint8)
    out = mx.distributed.all_sum(buf, group=group, stream=mx.cpu)
    mx.eval(out)
    return payload if lead else np.array(out).tobytes()


def load_sharded(config):
    """(model, tokenizer) of `config.model`, this rank's shard."""
    from mlx_lm.utils import sharded_load

    tok_cfg = {"trust_remote_code": True} if config.trust_remote_code else None
    return sharded_load(config.model, tokenizer_config=tok_cfg,
                        trust_remote_code=config.trust_remote_code)


def sharded_config(config):
    """`config` as every rank must run it: a fixed step mode and no prefix cache (see the
    module docstring);
    unset, pipelined on a GPU (as one rank does there) and stepwise on the CPU."""
    pipeline = config.pipeline
    if pipeline is None:
        pipeline = mx.default_device() != mx.cpu
    if config.weight_dirs:  # each rank holds a shard: a full tensor fits none of them
        raise ShardedWeightsError(WEIGHTS_REFUSED)
    return dataclasses.replace(config, pipeline=pipeline, prefix_cache=False)


WEIGHTS_REFUSED = "full-weight updates are not supported on a sharded engine yet"


class ShardedAdapterError(ValueError):
    pass


class _Adapters:
    """The engine's `AdapterManager` whose commits reach every rank (see `LeaderRunner`)."""

    def __init__(self, inner, send):
        self._inner, self._send = inner, send

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def prepare(self, source):
        if source is not None:
            raise ShardedAdapterError("LoRA adapters are not supported on a sharded engine yet; "
                                      "only a swap to the base weights (path null)")
        return self._inner.prepare(None)

    def commit(self, prepared):
        self._send(("commit", (None,)))
        self._inner.commit(prepared)


class _Weights:
    """The engine's `WeightManager`, refusing updates: rank 0 would commit full tensors on its
    shard alone (the other ranks' layers would keep the old weights)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def prepare(self, source):
        from .weights import WeightError

        raise WeightError(WEIGHTS_REFUSED)


class ShardedWeightsError(ValueError):
    pass


class LeaderRunner:
    """Rank 0's `ModelRunner`: each call is sent to the followers, then run here."""

    def __init__(self, runner, group):
        self._runner, self._group = runner, group
        self.plans_sent = 0

    def __getattr__(self, name):
        # Plain attributes (num_rows, vocab_size, ...) are read from the real runner. A method
        # not defined here would run on rank 0 alone and leave the followers waiting in the
        # next collective forever: refuse it loudly instead.
        value = getattr(self._runner, name)
        if callable(value):
            raise AttributeError(f"LeaderRunner.{name} is not broadcast to the other ranks: "
                                 "add it to LeaderRunner and follow()")
        return value

    def send(self, call) -> None:
        broadcast(self._group, pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL))
        self.plans_sent += 1

    def step(self, admissions, version, prefill=True):
        admissions = [dataclasses.replace(a, prefix=None, save_prefix=False) for a in admissions]
        self.send(("step", ([dataclasses.replace(a, owner=None) for a in admissions],
                            version, prefill)))
        return self._runner.step(admissions, version, prefill)

    def remove(self, seq_ids, store=None, version=-1):
        # (no prefix cache on a sharded engine, so `store` has nowhere to go: not sent)
        self.send(("remove", (list(seq_ids),)))
        return self._runner.remove(seq_ids, store, version)

    def reset(self):
        self.send(("reset", ()))
        return self._runner.reset()

    def score(self, items, max_tokens):
        self.send(("score", (list(items), max_tokens)))
        return self._runner.score(items, max_tokens)

    def score_top(self, items, max_tokens):
        self.send(("score_top", (list(items), max_tokens)))
        return self._runner.score_top(items, max_tokens)

    def stop(self) -> None:
        """Release the followers (they return from `follow`)."""
        self.send(("stop", ()))


def lead(engine, group) -> LeaderRunner:
    """Make rank 0's `engine` send its plans to the other ranks of `group`."""
    leader = LeaderRunner(engine.runner, group)
    engine.runner = leader
    engine.adapters = _Adapters(engine.adapters, leader.send)
    engine.weights = _Weights(engine.weights)
    return leader


def follow(engine, group) -> int:
    """A follower's loop: run rank 0's calls on this rank's runner until it says stop.
    Returns the number of plans run."""
    runner, adapters = engine.runner, engine.adapters
    count = 0
    while True:
        op, args = pickle.loads(broadcast(group, None))
        if op == "stop":
            return count
        count += 1
        if op == "commit":
            adapters.commit(adapters.prepare(*args))
        elif op in ("step", "remove", "reset", "score", "score_top"):
            getattr(runner, op)(*args)
        else:
            raise RuntimeError(f"unknown plan op from rank 0: {op!r}")



# ---------------------------------------------------------------------- the engine process's entry points


def init_group(backend: str) -> "mx.distributed.Group":
    """The group of a rank the supervisor started (`MLX_RANK` and the backend's variables set
    as `mlx.launch` sets them). Strict: a rank that cannot join raises here instead of running
    on as a group of one."""
    group = mx.distributed.init(strict=True, backend=backend)
    if group.size() < 2:
        raise RuntimeError(f"the {backend} group has {group.size()} rank; a sharded engine needs 2 or more")
    return group


def sharded_engine(config, policy_version: int = 0):
    """An `Engine` on this rank's shard of `config.model`, configured as every rank must run it
    (`sharded_config`); rank 0 then `lead()`s it, the others `follow()` it."""
    from .core import Engine

    config = sharded_config(config)
    model, tokenizer = load_sharded(config)
    return Engine(config, policy_version, model=model, tokenizer=tokenizer)
