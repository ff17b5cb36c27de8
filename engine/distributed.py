"""One engine over several `mx.distributed` ranks: rank 0 leads, the others follow.

The model is split by mlx-lm's `sharded_load` (tensor parallel through the model's `shard()`,
pipeline where the model only has `pipeline()`), so every forward pass is a collective: all
ranks must run the same passes, with the same shapes, in the same order.

Rank 0 runs the whole `Engine` (scheduler, IPC, supervisor link). Its `ModelRunner` is wrapped
in `LeaderRunner`, which before every call that runs the model (`step`, `score`) or changes the
batch (`remove`, `reset`) or the weights (a swap's prepare and commit) broadcasts that call -
the step's plan: admissions with their prompt ids, sampling params and per-sample seeds (the
sampling keys), removals, the commit - and only then runs it. Each follower runs `follow()`: receive a
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
- DoRA on a layer whose input is split, and adapters or updates on a pipelined model, are
  refused (engine/adapters.py, engine/sharding.py).

Swaps (LoRA adapters, full-weight updates) prepare on every rank and commit at the same step.
Every rank reads the same path (one machine, or a path every machine sees alike) and keeps its
slice of each tensor, cut as `model.shard()` cut the layer (engine/sharding.py). Rank 0 reads
in the background as on one rank; the plan that goes out next tells the followers to start
their own background read (`notes` ride on every plan). When rank 0 prepares (engine thread),
it sends a `prepare` plan and every rank prepares its slice; then one gather - the extra
collective of a swap, two small `all_sum`s - brings every rank's outcome to every rank: an
error, or a digest of the tensors it read. Only when all ranks prepared the same contents is
the swap prepared anywhere (the followers keep it under the plan id, rank 0 returns it);
otherwise every rank drops it and rank 0 raises the first rank's error (prefixed with its
rank), so a follower that cannot read the files turns the swap into an error everywhere and
no rank ever serves weights the others do not. The commit is then one plan op naming that id,
at the step boundary rank 0 commits at. Rank 0 dropping a prepared swap it never commits (a
refused version, a cancelled two-phase swap) sends a `drop` note, so nothing lingers.

The alternative - rank 0 commits, followers prepare at the commit - would leave a follower
that fails (a missing file, memory) on the old weights while rank 0 serves the new ones; and
waiting for "ready" at commit time would put the read inside the step. Agreeing at prepare
costs one gather per swap, off the step path.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import logging
import pickle
import threading
import weakref
from typing import Optional

import mlx.core as mx
import numpy as np

from . import sharding
from .adapter_files import LEAVES, AdapterError, AdapterFiles
from .weights import WeightError

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


def gather(group, payload: bytes) -> list[bytes]:
    """Every rank's `payload`, in rank order, on every rank (two `all_sum`s: the lengths,
    then the bytes at each rank's offset)."""
    size, rank = group.size(), group.rank()
    lengths = np.zeros(size, dtype=np.int32)
    lengths[rank] = len(payload)
    lengths = np.array(mx.distributed.all_sum(mx.array(lengths), group=group, stream=mx.cpu))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    buf = np.zeros(int(offsets[-1]), dtype=np.uint8)
    buf[offsets[rank]:offsets[rank + 1]] = np.frombuffer(payload, dtype=np.uint8)
    out = mx.distributed.all_sum(mx.array(buf), group=group, stream=mx.cpu)
    mx.eval(out)
    out = np.array(out).tobytes()
    return [out[offsets[r]:offsets[r + 1]] for r in range(size)]


def load_sharded(config):
    """(model, tokenizer) of `config.model`, this rank's shard; the model carries how each
    parameter was split (engine/sharding.py), for adapters and weight updates."""
    from mlx_lm.utils import sharded_load

    tok_cfg = {"trust_remote_code": True} if config.trust_remote_code else None
    with sharding.recording() as notes:
        model, tok = sharded_load(config.model, tokenizer_config=tok_cfg,
                                  trust_remote_code=config.trust_remote_code)
    sharding.attach(model, notes, mx.distributed.init())
    return model, tok


def sharded_config(config):
    """`config` as every rank must run it: a fixed step mode and no prefix cache (see the
    module docstring);
    unset, pipelined on a GPU (as one rank does there) and stepwise on the CPU."""
    pipeline = config.pipeline
    if pipeline is None:
        pipeline = mx.default_device() != mx.cpu
    return dataclasses.replace(config, pipeline=pipeline, prefix_cache=False)


# ---------------------------------------------------------------------- preparing on all ranks


class RankError(Exception):
    """A rank failed to prepare a swap for a reason other than its files (HTTP 500)."""


def fingerprint(files) -> str:
    """A digest of the tensors (names, dtypes, shapes, bytes) a rank read for a swap: the
    ranks compare them, so files changed between two ranks' reads are caught."""
    h = hashlib.sha1(usedforsecurity=False)
    if isinstance(files, AdapterFiles):
        h.update(repr((files.fine_tune_type, files.rank, files.scale)).encode())
        tensors = ((f"{name}.{leaf}", getattr(mw, leaf)) for name, mw in files.modules.items()
                   for leaf in LEAVES if getattr(mw, leaf) is not None)
    else:
        tensors = files.tensors.items()
    for name, arr in tensors:
        h.update(f"{name}:{files.dtypes[name]}:{tuple(arr.shape)};".encode())
        h.update(np.ascontiguousarray(arr))
    return h.hexdigest()


class _Read:
    """Swap files read on rank 0, with the token the followers read them under."""

    def __init__(self, files, token: int, digest: str):
        self.files, self.token, self.digest = files, token, digest

    def __getattr__(self, name):  # (path, nbytes, ... of the files, for any reader)
        if name == "files":
            raise AttributeError(name)
        return getattr(self.files, name)


class _BackgroundRead:
    """A follower's read of swap files in a thread (numpy only, as rank 0's)."""

    def __init__(self, manager, path: str):
        self._result = None
        self._thread = threading.Thread(target=self._run, args=(manager, path), daemon=True,
                                        name="rank-swap-reader")
        self._thread.start()

    def _run(self, manager, path: str) -> None:
        try:
            files = manager.read(path)
            self._result = (files, fingerprint(files))
        except Exception as e:  # (reported in the gather)
            self._result = e

    def result(self):
        self._thread.join()
        return self._result


def _prepare_here(manager, path: str, read):
    """(prepared or None, status) of this rank. `read`: (files, digest), an exception from a
    background read, or None to read now."""
    try:
        if isinstance(read, BaseException):
            raise read
        files, digest = read if read is not None else (None, None)
        if files is None:
            files = manager.read(path)
            digest = fingerprint(files)
        return manager.prepare(files), ("ok", digest)
    except AdapterError as e:  # WeightError too
        return None, ("refused", e.kind, str(e))
    except Exception as e:
        log.exception("preparing %s failed", path)
        return None, ("failed", "", f"{type(e).__name__}: {e}")


def _agree(group, kind: str, path: str, status) -> Optional[Exception]:
    """Every rank's outcome on every rank; the error all ranks then raise or drop, or None
    when every rank prepared the same tensors."""
    statuses = [pickle.loads(b) for b in gather(group, pickle.dumps(status))]
    error = WeightError if kind == "weights" else AdapterError
    for rank, st in enumerate(statuses):
        if st[0] == "ok":
            continue
        where = f"rank {rank} of {len(statuses)}: " if rank else ""
        if st[0] == "refused":
            return error(where + st[2], kind=st[1])
        return RankError(f"{where}preparing {path} failed: {st[2]}")
    digests = [st[1] for st in statuses]
    if len(set(digests)) > 1:
        other = next(r for r, d in enumerate(digests) if d != digests[0])
        return error(f"ranks 0 and {other} read different contents at {path}: it changed while "
                     f"the swap was being prepared (write each update to a new directory, or "
                     f"leave it unchanged until the swap is done)")
    return None


class _Adapters:
    """The engine's `AdapterManager` on rank 0: reads, prepares and commits reach every rank
    (see the module docstring)."""

    kind = "adapter"

    def __init__(self, inner, leader: "LeaderRunner"):
        self._inner, self._leader = inner, leader

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def read(self, path):
        return self._leader.read(self.kind, self._inner, path)

    def prepare(self, source):
        if source is None:  # the base model: nothing to read, every rank has it
            return self._inner.prepare(None)
        return self._leader.prepare(self.kind, self._inner, source)

    def commit(self, prepared):
        if prepared.path is not None and prepared.plan_id is None:
            raise RuntimeError("an adapter prepared outside the sharded engine cannot commit: "
                               "the other ranks do not hold it")
        self._leader.send(("commit", (prepared.plan_id if prepared.path is not None else None,)))
        self._inner.commit(prepared)


class _Weights(_Adapters):
    """The engine's `WeightManager` on rank 0, the same way."""

    kind = "weights"

    def prepare(self, source):
        return self._leader.prepare(self.kind, self._inner, source)

    def commit(self, prepared):
        if prepared.plan_id is None:
            raise RuntimeError("weights prepared outside the sharded engine cannot commit: "
                               "the other ranks do not hold them")
        self._leader.send(("commit_weights", (prepared.plan_id,)))
        self._inner.commit(prepared)


class LeaderRunner:
    """Rank 0's `ModelRunner`: each call is sent to the followers, then run here."""

    def __init__(self, runner, group):
        self._runner, self._group = runner, group
        self.plans_sent = 0
        # Notes for the followers, sent with the next plan: start a background read, drop a
        # read or a prepared swap. Appended from any thread (the reader, finalizers).
        self._notes: collections.deque = collections.deque()
        self._tokens = itertools.count(1)
        self._plan_ids = itertools.count(1)

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
        notes = []
        while self._notes:
            notes.append(self._notes.popleft())
        broadcast(self._group, pickle.dumps((call, notes), protocol=pickle.HIGHEST_PROTOCOL))
        self.plans_sent += 1

    # swaps

    def read(self, kind: str, manager, path: str) -> _Read:
        """Rank 0's read (any thread); the followers start theirs with the next plan."""
        token = next(self._tokens)
        self._notes.append(("read", token, kind, path))
        try:
            files = manager.read(path)
            out = _Read(files, token, fingerprint(files))
        except BaseException:
            self._notes.append(("drop_read", token))
            raise
        weakref.finalize(out, self._notes.append, ("drop_read", token))
        return out

    def prepare(self, kind: str, manager, source):
        """Prepare `source` (a path, a `_Read`, or files read elsewhere) on every rank; returns
        rank 0's prepared swap, or raises the first rank's error (nothing prepared anywhere)."""
        if isinstance(source, _Read):
            token, path, read = source.token, source.path, (source.files, source.digest)
        elif isinstance(source, str):
            token, path, read = None, source, None
        else:
            token, path, read = None, source.path, (source, fingerprint(source))
        plan_id = next(self._plan_ids)
        self.send(("prepare", (plan_id, kind, token, path)))
        prepared, status = _prepare_here(manager, path, read)
        error = _agree(self._group, kind, path, status)
        if error is not None:
            raise error
        prepared.plan_id = plan_id
        weakref.finalize(prepared, self._notes.append, ("drop", plan_id))
        return prepared

    # the runner

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
    engine.adapters = _Adapters(engine.adapters, leader)
    engine.weights = _Weights(engine.weights, leader)
    return leader


def follow(engine, group) -> int:
    """A follower's loop: run rank 0's calls on this rank's runner until it says stop.
    Returns the number of plans run."""
    runner = engine.runner
    managers = {_Adapters.kind: engine.adapters, _Weights.kind: engine.weights}
    reads: dict[int, _BackgroundRead] = {}  # token -> a read rank 0 started
    prepared: dict[int, object] = {}  # plan id -> a swap every rank prepared
    count = 0
    while True:
        (op, args), notes = pickle.loads(broadcast(group, None))
        for note in notes:
            if note[0] == "read":
                _, token, kind, path = note
                reads[token] = _BackgroundRead(managers[kind], path)
            elif note[0] == "drop_read":
                reads.pop(note[1], None)
            elif note[0] == "drop":
                prepared.pop(note[1], None)
        if op == "stop":
            return count
        count += 1
        if op == "prepare":
            plan_id, kind, token, path = args
            background = reads.pop(token, None)
            mine, status = _prepare_here(managers[kind], path,
                                         background.result() if background else None)
            if _agree(group, kind, path, status) is None:
                prepared[plan_id] = mine
        elif op == "commit":
            (plan_id,) = args
            adapters = engine.adapters
            adapters.commit(adapters.prepare(None) if plan_id is None else prepared.pop(plan_id))
        elif op == "commit_weights":
            engine.weights.commit(prepared.pop(args[0]))
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
