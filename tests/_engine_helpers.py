"""Shared helpers of the engine tests: an independent numpy reference of the processed
distribution, teacher-forced logits, running requests to completion, and small models of
other architectures written in mlx-lm's layout."""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
import numpy as np

from mlxsup.ipc.messages import ErrorEvent, ScoreResult, SequenceDone, TokenChunk

# A truncation border closer than this (in logit or probability mass) may be decided either
# way by float32 rounding; such rows are not compared (the tests count them).
BORDER_MARGIN = 1e-5


def teacher_forced_logits(model, prompt, completion) -> np.ndarray:
    """float64 logits predicting each completion token, from one plain forward pass."""
    x = mx.array(list(prompt) + list(completion))[None]
    logits = model(x)[0].astype(mx.float32)
    p = len(prompt)
    return np.array(logits, dtype=np.float64)[p - 1 : p - 1 + len(completion)]


def _lse(z):
    m = z[np.isfinite(z)].max()
    return m + np.log(np.exp(z - m).sum())


def reference_logprob(row, token, params, history, mode):
    """(log-prob of `token`, distance of this row to a truncation border) for one position,
    in float64, following docs/engine.md (Sampling and log-probabilities)."""
    row = np.array(row, dtype=np.float64)
    if mode == "raw":
        return row[token] - _lse(row), np.inf
    l = row.copy()
    if params.repetition_penalty != 1.0:
        for t in set(list(history)[-params.repetition_context_size:]):
            l[t] = l[t] * params.repetition_penalty if l[t] < 0 else l[t] / params.repetition_penalty
    if params.temperature == 0:
        return (0.0 if token == int(np.argmax(l)) else -np.inf), np.inf
    z = l / params.temperature
    margin = np.inf
    V = len(z)
    if 0 < params.top_k < V:
        s = np.sort(z)[::-1]
        kth = s[params.top_k - 1]
        margin = min(margin, s[params.top_k - 1] - s[params.top_k])
        z[z < kth] = -np.inf
    if params.top_p < 1.0:
        p = np.exp(z - _lse(z))
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]
        keep = above < params.top_p
        margin = min(margin, np.abs(above - params.top_p).min())
        thr = z[order][keep].min()
        z[z < thr] = -np.inf
    if params.min_p > 0:
        thr = z.max() + np.log(params.min_p)
        fin = z[np.isfinite(z)]
        margin = min(margin, np.abs(fin - thr).min())
        z[z < thr] = -np.inf
    return z[token] - _lse(z), margin


def check_fidelity(model, prompt, completion, logprobs, params, mode, tol=1e-4):
    """Compare returned log-probs with the reference; returns (max error, rows skipped)."""
    assert len(logprobs) == len(completion)
    logits = teacher_forced_logits(model, prompt, completion)
    worst, skipped = 0.0, 0
    history = list(prompt)
    for row, token, got in zip(logits, completion, logprobs):
        want, margin = reference_logprob(row, token, params, history, mode)
        history.append(token)
        if margin < BORDER_MARGIN:
            skipped += 1
            continue
        assert np.isfinite(want), (token, got)
        err = abs(want - got)
        worst = max(worst, err)
    assert worst <= tol, worst
    return worst, skipped


def run(engine, requests, stagger=0, max_steps=100000):
    """Submit `requests` (all at once, or `stagger` per step) and step until every one has
    finished. Returns {request_id: [events]}."""
    events: dict[int, list] = {r.request_id: [] for r in requests}
    todo = list(requests)
    pending = {r.request_id: (r.n if hasattr(r, "n") else 1) for r in requests}
    for _ in range(max_steps):
        if todo:
            k = stagger or len(todo)
            for r in todo[:k]:
                engine.submit(r)
            todo = todo[k:]
        for ev in engine.step():
            if ev.request_id not in events:
                continue
            events[ev.request_id].append(ev)
            if isinstance(ev, (SequenceDone,)):
                pending[ev.request_id] -= 1
            elif isinstance(ev, (ScoreResult, ErrorEvent)):
                pending[ev.request_id] = 0
        if not todo and all(v == 0 for v in pending.values()):
            return events
    raise AssertionError("requests did not finish")


def make_engine(model_dir, max_batch: int = 16, **config):
    """An in-process `Engine` on `model_dir` as the engine tests use it: seeded, events flushed
    at every step (`flush_interval_ms=0`); `config` sets any other EngineConfig field."""
    from mlxsup.engine import Engine, EngineConfig

    return Engine(EngineConfig(**{"model": model_dir, "max_batch": max_batch, "flush_interval_ms": 0, "seed": 0,
                                  **config}))


def drive(engine, events: list, steps=None) -> list:
    """Step `engine` while it has work (at most `steps` steps), appending every event to
    `events`; returns `events`. For tests that submit, swap and step by hand."""
    i = 0
    while engine.has_work() and (steps is None or i < steps):
        events.extend(engine.step())
        i += 1
    return events


def done_by_request(events: list) -> dict:
    """{request_id: its SequenceDone} of a flat event list (one sample per request)."""
    return {e.request_id: e for e in events if isinstance(e, SequenceDone)}


def done_events(events, request_id):
    return sorted((e for e in events[request_id] if isinstance(e, SequenceDone)),
                  key=lambda e: e.seq_index)


def chunks(events, request_id):
    return [e for e in events[request_id] if isinstance(e, TokenChunk)]


def write_model(out_dir, tokenizer_dir, model_type, args: dict, seed=0) -> str:
    """A random model of another architecture in mlx-lm's layout, with the tiny demo
    model's tokenizer, so `mlx_lm.load` (and so the engine) loads it."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = dict(args, model_type=model_type)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(tokenizer_dir):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json",
                                                    "generation_config.json"):
            shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    mx.save_safetensors(os.path.join(out_dir, "model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    return out_dir
