#!/usr/bin/env python
"""GRPO with LoRA, learning through an mlxsup server.

The whole reinforcement-learning cycle, end to end:

  rollouts   mlxsup samples `--group-size` completions per prompt, with the log-probability of
             every sampled token under the distribution it drew from ("processed") and the
             policy version that generated them;
  reward     a verifiable reward computed from the token ids alone (see `number_reward`);
  advantage  rewards normalised within each group (GRPO: no value network);
  loss       the clipped importance-ratio surrogate (PPO/GRPO), the server's log-probs being
             the behaviour policy;
  update     one Adam step on LoRA weights (mlx-lm's `linear_to_lora_layers`) of the trainer's
             own copy of the model;
  swap       the adapter saved in mlx-lm's format (adapter_config.json + adapters.safetensors)
             and loaded (or uploaded) into the server, which bumps its policy version by one.

It runs one step off-policy: the next batch of rollouts is requested before training on the
current one, so generation overlaps training. Each rollout carries its version; one generated
by the weights the trainer holds is on-policy, one a version older is corrected by the
importance ratio, anything older (or a group whose samples span versions) is dropped and
counted. As a check on the whole pipeline, each step compares the server's log-probs with the
trainer's own, computed under the same version's weights: they must agree (mean |log ratio|
about 1e-6 in float32).

    python examples/grpo.py --start                       # starts a server on the demo model
    python examples/grpo.py --url http://localhost:8000   # a running server (same --model!)

Writes OUT/grpo_log.json (every step's figures), OUT/reward_curve.png (matplotlib) or
OUT/reward_curve.txt, and OUT/adapters/ (the adapter of each version). docs/grpo.md explains
the choices.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.platform.startswith("linux") and "MLXSUP_BLAS_LIB" not in os.environ:
    # mlx[cpu] on Linux ships the reference BLAS; re-exec with OpenBLAS preloaded (as the
    # supervisor does for the engine) before mlx is imported: the backward pass is ~10x faster.
    try:
        from mlxsup.blas import engine_env

        _env = engine_env(os.environ)
    except ImportError:
        _env = {}
    if "MLXSUP_BLAS_LIB" in _env:
        os.execve(sys.executable, [sys.executable, *sys.argv], _env)

import argparse
import asyncio
import contextlib
import gc
import json
import math
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load as mlx_load
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlxsup.client import InferenceClient, as_results
from mlxsup.config import SWAP_DRAIN, SWAP_MODES
from mlxsup.local_server import start_server

PROMPTS = [
    "What is 12 + 7?",
    "Tell me about the river.",
    "Count to ten.",
    "Write a short poem about the sea.",
    "How old is the tree in the garden?",
    "Give me a phone number.",
    "What did the teacher say?",
    "Name a year.",
    "Describe the city at night.",
    "How many apples are in the basket?",
    "What is the answer?",
    "Say something kind.",
    "Where does the road go?",
    "List some numbers.",
    "What time is it?",
    "Why is the sky blue?",
]


@dataclass(frozen=True)
class GRPOConfig:
    """Every knob of the run; argparse fills it at the edge (`parse_args`)."""

    url: Optional[str] = None  # a running server; None with start=True starts one
    start: bool = False
    model: Optional[str] = None  # None: the built-in demo model (the server's default too)
    out: str = "grpo-out"
    steps: int = 50
    group_size: int = 8
    prompts_per_step: int = 8
    lr: float = 5e-4
    max_tokens: int = 24
    temperature: float = 1.0
    clip_eps: float = 0.2
    warmup_steps: int = 5  # linear learning-rate warm-up
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_layers: int = 0  # 0: every layer
    full_layers: int = 0  # > 0: train these last layers' full weights (no LoRA), pushed each step
    max_staleness: int = 1  # rollouts older than this many versions are dropped
    upload: bool = False  # send adapters over HTTP instead of passing a path
    swap_mode: str = SWAP_DRAIN
    seed: int = 0
    keep_adapters: int = 3  # adapter directories kept on disk
    server_max_batch: int = 64  # for --start
    server_run_dir: Optional[str] = None  # for --start: None is a temporary directory
    quiet: bool = False

    def __post_init__(self):
        if self.url is None and not self.start:
            raise ValueError("give --url of a running server or --start")
        if self.url is not None and self.start:
            raise ValueError("give --url or --start, not both")
        for name in ("steps", "group_size", "prompts_per_step", "max_tokens", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are relative to the group)")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError("temperature must be > 0")
        if not (0 < self.clip_eps < 1):
            raise ValueError("clip_eps must be in (0, 1)")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.warmup_steps < 0 or self.max_grad_norm <= 0:
            raise ValueError("warmup_steps must be >= 0 and max_grad_norm > 0")
        if self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")
        if self.keep_adapters < self.max_staleness + 2:
            raise ValueError("keep_adapters must be >= max_staleness + 2")


# ---------------------------------------------------------------------------- reward


def number_token_ids(tokenizer) -> frozenset:
    """Ids of the tokens that spell a number ("7", " 42"): the target set of the reward."""
    ids = set()
    for tok_id in range(len(tokenizer.get_vocab())):
        text = tokenizer.decode([tok_id])
        if text.strip().isdigit() and text.strip().isascii():
            ids.add(tok_id)
    return frozenset(ids)


def number_reward(completion_ids, target_ids: frozenset, max_tokens: int) -> float:
    """Distinct number tokens in the completion over `max_tokens`: 1.0 for a completion that
    uses its whole budget on numbers without repeating one. Verifiable from the token ids
    alone and dense (every token counts); "distinct" closes the shortcut a random model finds
    at once (repeating one number token: "15151515..."), so the policy has to move its whole
    distribution toward the number tokens. The random demo model starts near 0.07."""
    return len(target_ids.intersection(completion_ids)) / max_tokens


def group_advantages(rewards, eps: float = 1e-4) -> list:
    """GRPO's advantage: (r - mean(group)) / std(group); a group with equal rewards gives
    zeros (it carries no signal about which sample was better)."""
    r = np.asarray(rewards, dtype=np.float64)
    std = r.std()
    if std < eps:
        return [0.0] * len(r)
    return list((r - r.mean()) / (std + eps))


# ---------------------------------------------------------------------------- rollouts


MIXED = -1  # the version given to a rollout whose tokens come from more than one version


@dataclass
class Rollout:
    prompt_ids: list
    completion_ids: list
    logprobs: list  # server's processed log-probs (behaviour policy)
    version: int  # the policy version that generated it
    finish_reason: str
    text: str
    reward: float = 0.0
    advantage: float = 0.0


@dataclass
class Group:
    prompt_index: int
    rollouts: list


@dataclass
class Batch:
    step: int
    groups: list
    requested_at: float
    done_at: float
    seconds_per_request: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.completion_ids) for g in self.groups for r in g.rollouts)


def result_version(result: dict) -> int:
    """The version that generated a result. mlxsup says so in `generated_by_version` (and
    `token_versions`, one per token); `metadata.current_policy_version` is the server's version
    when it answered, which a swap during generation has already moved on, so it is only a
    fallback for servers that give nothing better (the seed's reference server)."""
    if result.get("generated_by_version") is not None:
        return int(result["generated_by_version"])
    version = (result.get("metadata") or {}).get("current_policy_version")
    if version is None:
        raise ValueError(f"result says nothing about the version that generated it: {sorted(result)}")
    return int(version)


def result_token_versions(result: dict) -> Optional[list]:
    """The version of each completion token, when the server reports it."""
    value = result.get("token_versions")
    return [int(v) for v in value] if isinstance(value, list) else None


async def request_group(client: InferenceClient, prompt_ids, cfg: GRPOConfig, step: int, index: int):
    results = as_results(
        await client.generate(
            prompt_ids=list(prompt_ids),
            n=cfg.group_size,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            logprobs=1,
            logprobs_mode="processed",
            step_id=step,
            request_id=f"grpo-{cfg.seed}-{step}-{index}",
        )
    )
    rollouts = []
    for res in results:
        per_token = result_token_versions(res)
        version = result_version(res)
        if per_token and set(per_token) != {version}:
            version = MIXED  # spans two versions ("inflight" swaps): dropped by `partition_by_version`
        if len(res["logprobs"]) != len(res["completion_ids"]):
            raise ValueError("server returned logprobs and completion_ids of different lengths")
        rollouts.append(
            Rollout(
                prompt_ids=list(res["prompt_ids"]),
                completion_ids=list(res["completion_ids"]),
                logprobs=[float(x) for x in res["logprobs"]],
                version=version,
                finish_reason=res.get("finish_reason", ""),
                text=res.get("text", ""),
            )
        )
    return Group(prompt_index=index, rollouts=rollouts)


async def collect(client, prompt_ids_list, cfg: GRPOConfig, step: int) -> Batch:
    """All groups of one step, requested concurrently (the server batches them)."""
    t0 = time.perf_counter()

    async def timed(i, p):
        s = time.perf_counter()
        g = await request_group(client, p, cfg, step, i)
        return g, time.perf_counter() - s

    done = await asyncio.gather(*(timed(i, p) for i, p in enumerate(prompt_ids_list)))
    return Batch(step, [g for g, _ in done], t0, time.perf_counter(), [s for _, s in done])


@dataclass
class Partition:
    kept: list  # groups to train on
    num_on_policy: int = 0  # rollouts generated by the trainer's current version
    num_off_policy: int = 0  # rollouts up to max_staleness versions old (ratio-corrected)
    num_dropped_stale: int = 0
    num_dropped_mixed: int = 0  # groups whose samples span versions, or a sample that does
    versions: dict = field(default_factory=dict)  # version -> rollout count (before dropping)


def partition_by_version(groups, trainer_version: int, max_staleness: int, known_versions) -> Partition:
    """Keep groups generated by one version that is at most `max_staleness` behind the
    trainer's and whose weights the trainer still knows; count everything else as dropped.
    Never silently mixes versions: a group is trained on only if all its samples share one."""
    part = Partition(kept=[])
    for g in groups:
        versions = {r.version for r in g.rollouts}
        for r in g.rollouts:
            part.versions[r.version] = part.versions.get(r.version, 0) + 1
        if len(versions) != 1 or MIXED in versions:
            part.num_dropped_mixed += len(g.rollouts)
            continue
        (v,) = versions
        if v > trainer_version:
            raise RuntimeError(
                f"rollout of version {v} is newer than the trainer's {trainer_version}: "
                "someone else is loading adapters into this server"
            )
        if trainer_version - v > max_staleness or v not in known_versions:
            part.num_dropped_stale += len(g.rollouts)
            continue
        if v == trainer_version:
            part.num_on_policy += len(g.rollouts)
        else:
            part.num_off_policy += len(g.rollouts)
        part.kept.append(g)
    return part


# ---------------------------------------------------------------------------- policy


def _pack(rollouts):
    """Right-padded inputs/targets, a mask of completion positions, behaviour log-probs."""
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    width = max(lengths) - 1
    b = len(rollouts)
    inputs = np.zeros((b, width), np.int32)
    targets = np.zeros((b, width), np.int32)
    mask = np.zeros((b, width), np.float32)
    old = np.zeros((b, width), np.float32)
    for i, r in enumerate(rollouts):
        full = r.prompt_ids + r.completion_ids
        inputs[i, : len(full) - 1] = full[:-1]
        targets[i, : len(full) - 1] = full[1:]
        start = len(r.prompt_ids) - 1  # the position whose next token is completion token 0
        mask[i, start : start + len(r.completion_ids)] = 1.0
        if r.logprobs:  # absent only when the caller wants log-probs, not a loss
            old[i, start : start + len(r.completion_ids)] = r.logprobs
    return mx.array(inputs), mx.array(targets), mx.array(mask), mx.array(old)


def token_logprobs(model, inputs, targets, temperature: float):
    """log p(target | prefix) at `temperature`, no truncation: the server's "processed" mode
    with top_p=1, top_k=0, min_p=0 and no repetition penalty (equal to "raw" at 1.0)."""
    logits = model(inputs).astype(mx.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logz = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - logz


def grpo_loss(model, inputs, targets, mask, old_logprobs, advantages, temperature, clip_eps):
    """Clipped surrogate of GRPO, each sequence's token mean, averaged over sequences.

    ratio = pi_theta / pi_behaviour per token, the behaviour log-probs being the server's."""
    logp = token_logprobs(model, inputs, targets, temperature)
    log_ratio = (logp - old_logprobs) * mask
    ratio = mx.exp(log_ratio)
    adv = advantages[:, None]
    surrogate = mx.minimum(ratio * adv, mx.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    num_tokens = mx.maximum(mask.sum(axis=1), 1.0)
    loss = -((surrogate * mask).sum(axis=1) / num_tokens).mean()
    clipped = ((mx.abs(ratio - 1) > clip_eps) * mask).sum() / mx.maximum(mask.sum(), 1.0)
    return loss, (mx.abs(log_ratio).sum() / mx.maximum(mask.sum(), 1.0), clipped)


class Policy:
    """The trainer's copy of the model with LoRA layers, its optimizer, and adapter I/O."""

    def __init__(self, model_path: str, cfg: GRPOConfig):
        self.model_path = model_path
        self.cfg = cfg
        mx.random.seed(cfg.seed)
        self.model, self.tokenizer = mlx_load(model_path)
        self.model.freeze()
        if cfg.full_layers:  # full weights of the last layers, pushed with /update_weights
            for layer in self.model.layers[-cfg.full_layers:]:
                layer.unfreeze()
            self.lora_config = None
        else:
            self._add_lora(cfg)
        self.model.eval()
        self._init_optimizer(cfg)

    def _add_lora(self, cfg: GRPOConfig) -> None:
        num_layers = cfg.lora_layers or len(self.model.layers)
        self.lora_config = {
            "fine_tune_type": "lora",
            "num_layers": num_layers,
            # dropout 0: the trainer's forward must equal the server's (the log-ratio check)
            "lora_parameters": {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": 0.0},
        }
        linear_to_lora_layers(self.model, num_layers, self.lora_config["lora_parameters"])

    def _init_optimizer(self, cfg: GRPOConfig) -> None:
        # Warm-up: Adam's first steps move every weight by about lr whatever the gradient's
        # size, which on the random demo model shifted log-probs by ~1.4 nats per token, far
        # outside the clip range of the next (one-step-stale) batch.
        lr = cfg.lr
        if cfg.warmup_steps:
            lr = optim.join_schedules(
                [optim.linear_schedule(cfg.lr / cfg.warmup_steps, cfg.lr, cfg.warmup_steps),
                 optim.linear_schedule(cfg.lr, cfg.lr, 1)],
                [cfg.warmup_steps],
            )
        self.optimizer = optim.Adam(learning_rate=lr, bias_correction=True)  # as PyTorch's
        self._grad = nn.value_and_grad(self.model, grpo_loss)

    def weights(self) -> dict:
        """The LoRA weights now (arrays are immutable: a snapshot costs nothing)."""
        return dict(tree_flatten(self.model.trainable_parameters()))

    def num_trainable(self) -> int:
        return sum(v.size for v in self.weights().values())

    def logprobs_under(self, weights: dict, rollouts) -> list:
        """Per-token log-probs of each rollout's completion under `weights`."""
        current = self.weights()
        self.model.update(tree_unflatten(list(weights.items())))
        try:
            inputs, targets, mask, _ = _pack(rollouts)
            logp = token_logprobs(self.model, inputs, targets, self.cfg.temperature)
            mx.eval(logp)
        finally:
            self.model.update(tree_unflatten(list(current.items())))
        logp = np.array(logp)
        out = []
        for i, r in enumerate(rollouts):
            start = len(r.prompt_ids) - 1
            out.append(logp[i, start : start + len(r.completion_ids)])
        return out

    def train_step(self, rollouts) -> dict:
        inputs, targets, mask, old = _pack(rollouts)
        adv = mx.array(np.array([r.advantage for r in rollouts], np.float32))
        (loss, (abs_log_ratio, clip_frac)), grads = self._grad(
            self.model, inputs, targets, mask, old, adv, self.cfg.temperature, self.cfg.clip_eps
        )
        grads, grad_norm = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, loss, grad_norm)
        return {
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "mean_abs_log_ratio_vs_behaviour": abs_log_ratio.item(),
            "clip_fraction": clip_frac.item(),
        }

    def save_adapter(self, path: str) -> str:
        """Write the adapter in mlx-lm's format (loads with `mlx_lm.load(model, adapter_path=)`),
        or with --full the trained layers' weights as model.safetensors (mlx-lm's names)."""
        os.makedirs(path, exist_ok=True)
        if self.lora_config is None:
            mx.save_safetensors(os.path.join(path, "model.safetensors"), self.weights())
            return path
        mx.save_safetensors(os.path.join(path, "adapters.safetensors"), self.weights())
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({**self.lora_config, "model": self.model_path}, f, indent=2)
        return path


# ---------------------------------------------------------------------------- the loop


def compare_logprobs(server_logprobs, trainer_logprobs) -> dict:
    """Mean and max |server - trainer| over every token, and the worst token's two values
    (a large gap on a token of log-prob -30 is float32 rounding; on -0.5 it is a bug)."""
    server = np.concatenate([np.asarray(s, np.float64) for s in server_logprobs] or [np.zeros(0)])
    trainer = np.concatenate([np.asarray(t, np.float64) for t in trainer_logprobs] or [np.zeros(0)])
    if server.size == 0:
        return {"mean": math.nan, "max": math.nan, "worst": None}
    diffs = np.abs(server - trainer)
    i = int(diffs.argmax())
    return {"mean": float(diffs.mean()), "max": float(diffs[i]),
            "worst": {"server": float(server[i]), "trainer": float(trainer[i])}}


class Trainer:
    """The loop. HTTP runs on the event loop; every MLX call runs on one dedicated thread
    (`on_mlx`), so the next batch's requests keep flowing while the trainer computes. (MLX
    arrays belong to the thread whose stream built them, hence one thread, not a pool.)"""

    def __init__(self, cfg: GRPOConfig, client: InferenceClient, policy: Policy, mlx_thread, log=print):
        self.cfg = cfg
        self.client = client
        self.log = log
        self.policy = policy
        self.mlx_thread = mlx_thread
        self.targets = number_token_ids(self.policy.tokenizer)
        template = self.policy.tokenizer.apply_chat_template
        self.prompt_ids = [
            list(template([{"role": "user", "content": p}], add_generation_prompt=True)) for p in PROMPTS
        ]
        self.rng = random.Random(cfg.seed)
        self.version: Optional[int] = None  # the server version holding the trainer's weights
        self.snapshots: dict = {}  # version -> LoRA weights
        self.adapter_dirs: list = []
        self.records: list = []

    async def on_mlx(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.mlx_thread, fn, *args)

    def prompts_for_step(self) -> list:
        return [self.rng.choice(self.prompt_ids) for _ in range(self.cfg.prompts_per_step)]

    async def push_adapter(self, tag: str) -> dict:
        """Save the current LoRA weights and swap them into the server; returns timing."""
        path = os.path.join(os.path.abspath(self.cfg.out), "adapters", tag)
        await self.on_mlx(self.policy.save_adapter, path)
        t0 = time.perf_counter()
        if self.cfg.full_layers and self.cfg.upload:
            answer = await self.client.upload_weights(path, mode=self.cfg.swap_mode)
        elif self.cfg.full_layers:
            answer = await self.client.update_weights(path, mode=self.cfg.swap_mode)
        elif self.cfg.upload:
            answer = await self.client.upload_adapter(path, mode=self.cfg.swap_mode)
        else:
            answer = await self.client.load_adapter(path, mode=self.cfg.swap_mode)
        swap_ms = (time.perf_counter() - t0) * 1000
        new_version = int(answer["policy_version"])
        if self.version is not None and new_version != self.version + 1:
            raise RuntimeError(f"server went from version {self.version} to {new_version}, expected +1")
        self.version = new_version
        self.snapshots[new_version] = self.policy.weights()
        for old in [v for v in self.snapshots if v < new_version - self.cfg.max_staleness]:
            del self.snapshots[old]
        self.adapter_dirs.append(path)
        while len(self.adapter_dirs) > self.cfg.keep_adapters:
            shutil.rmtree(self.adapter_dirs.pop(0), ignore_errors=True)
        return {"swap_ms": swap_ms, "new_version": new_version, "server_message": answer.get("message")}

    def _score(self, batch: Batch) -> None:
        for g in batch.groups:
            for r in g.rollouts:
                r.reward = number_reward(r.completion_ids, self.targets, self.cfg.max_tokens)

    def _check_and_train(self, part: Partition) -> dict:
        """Runs on the MLX thread, so the event loop keeps the next batch's requests moving."""
        by_version: dict = {}
        for g in part.kept:
            by_version.setdefault(g.rollouts[0].version, []).extend(g.rollouts)
        check = {}
        all_server, all_trainer = [], []
        for v, rollouts in sorted(by_version.items()):
            trainer_lp = self.policy.logprobs_under(self.snapshots[v], rollouts)
            server_lp = [r.logprobs for r in rollouts]
            check[str(v)] = compare_logprobs(server_lp, trainer_lp)["mean"]
            all_server += server_lp
            all_trainer += trainer_lp
        same = compare_logprobs(all_server, all_trainer)
        train = {}
        rollouts = [r for g in part.kept for r in g.rollouts]
        for g in part.kept:
            for r, a in zip(g.rollouts, group_advantages([r.reward for r in g.rollouts])):
                r.advantage = a
        if rollouts:
            train = self.policy.train_step(rollouts)
        return {"same_version_abs_log_ratio": same["mean"], "same_version_max_abs_log_ratio": same["max"],
                "same_version_worst_token": same["worst"],
                "per_version_abs_log_ratio": check, **train}

    async def run(self) -> list:
        cfg = self.cfg
        t_start = time.perf_counter()
        info = await self.client.wait_until_ready(timeout=120)
        self.log(f"server ready: {json.dumps(info)[:200]}")
        self.log(f"trainer: {self.policy.num_trainable():,} LoRA parameters; "
                 f"{len(self.targets)} number tokens in the target set")
        # A first swap puts the trainer's initial weights (LoRA B = 0: the base model) on the
        # server, so trainer and server agree on what this version means whatever ran before.
        init = await self.push_adapter("init")
        self.log(f"version {self.version}: initial adapter loaded in {init['swap_ms']:.0f} ms")
        pending = asyncio.create_task(collect(self.client, self.prompts_for_step(), cfg, 0))
        try:
            for step in range(cfg.steps):
                batch = await pending
                # One-step off-policy: the next rollouts are requested before we train on these.
                if step + 1 < cfg.steps:
                    prompts = self.prompts_for_step()
                    pending = asyncio.create_task(collect(self.client, prompts, cfg, step + 1))
                self._score(batch)
                trainer_version = self.version
                part = partition_by_version(
                    batch.groups, trainer_version, cfg.max_staleness, self.snapshots
                )
                t0 = time.perf_counter()
                stats = await self.on_mlx(self._check_and_train, part)
                train_s = time.perf_counter() - t0
                if part.kept:
                    swap = await self.push_adapter(f"step-{step:05d}")
                else:  # nothing to learn from: no update, no new version
                    swap = {"swap_ms": None, "new_version": self.version}
                rewards = [r.reward for g in batch.groups for r in g.rollouts]
                record = {
                    "step": step,
                    "mean_reward": float(np.mean(rewards)),
                    "max_reward": float(np.max(rewards)),
                    "rollout_versions": {str(k): v for k, v in sorted(part.versions.items())},
                    "group_versions": [sorted({r.version for r in g.rollouts}) for g in batch.groups],
                    "trainer_version": trainer_version,
                    "new_version": swap["new_version"],
                    "num_on_policy": part.num_on_policy,
                    "num_off_policy": part.num_off_policy,
                    "num_dropped_stale": part.num_dropped_stale,
                    "num_dropped_mixed": part.num_dropped_mixed,
                    "rollout_tokens": batch.num_tokens,
                    "rollout_s": batch.done_at - batch.requested_at,
                    "rollout_tokens_per_s": batch.num_tokens / max(batch.done_at - batch.requested_at, 1e-9),
                    "mean_completion_tokens": batch.num_tokens / max(1, len(rewards)),
                    "train_s": train_s,
                    "swap_ms": swap["swap_ms"],
                    "elapsed_s": time.perf_counter() - t_start,
                    "sample": batch.groups[0].rollouts[0].text[:60],
                    **stats,
                }
                self.records.append(record)
                if record["same_version_abs_log_ratio"] > 1e-3:
                    self.log(
                        f"WARNING: the server's log-probs differ from the trainer's for the same version "
                        f"(mean |log ratio| {record['same_version_abs_log_ratio']:.2e}): is the server "
                        f"serving the trainer's --model, with no truncation (top_p/top_k/min_p)?"
                    )
                if not cfg.quiet:
                    self.log(
                        f"step {step:3d}  reward {record['mean_reward']:.3f}  "
                        f"versions {record['rollout_versions']} (trainer v{trainer_version})  "
                        f"|log ratio| same-version {record['same_version_abs_log_ratio']:.2e}  "
                        f"vs behaviour {record.get('mean_abs_log_ratio_vs_behaviour', math.nan):.3f}  "
                        f"{record['rollout_tokens_per_s']:.0f} tok/s  "
                        f"swap {record['swap_ms'] or 0:.0f} ms  -> v{record['new_version']}"
                    )
        finally:
            if not pending.done():
                pending.cancel()
                try:
                    await pending
                except (asyncio.CancelledError, Exception):
                    pass
        return self.records


# ---------------------------------------------------------------------------- reporting


def text_chart(values, width: int = 60, height: int = 12, label: str = "mean reward") -> str:
    """A reward curve in plain text (when matplotlib is not installed): one column per step,
    or per run of steps averaged together when there are more steps than `width`."""
    if not values:
        return "(no data)"
    cols = min(width, len(values))
    edges = [round(i * len(values) / cols) for i in range(cols + 1)]
    col_vals = [float(np.mean(values[edges[i]:edges[i + 1]])) for i in range(cols)]
    lo, hi = min(col_vals), max(col_vals)
    span = max(hi - lo, 1e-9)
    rows_of = [round((v - lo) / span * height) for v in col_vals]
    lines = []
    for row in range(height, -1, -1):
        marks = "".join("*" if r == row else " " for r in rows_of)
        lines.append(f"{lo + span * row / height:7.3f} |{marks}")
    lines.append(" " * 8 + "+" + "-" * cols)
    lines.append(" " * 9 + f"steps 0..{len(values) - 1}  ({label})")
    return "\n".join(lines)


def write_reports(cfg: GRPOConfig, records: list, extra: dict) -> dict:
    os.makedirs(cfg.out, exist_ok=True)
    rewards = [r["mean_reward"] for r in records]
    k = max(1, min(5, len(rewards) // 4 or 1))
    summary = {
        "first_steps_mean_reward": float(np.mean(rewards[:k])) if rewards else None,
        "last_steps_mean_reward": float(np.mean(rewards[-k:])) if rewards else None,
        "window": k,
        "max_same_version_abs_log_ratio": max(
            (r["same_version_max_abs_log_ratio"] for r in records
             if not math.isnan(r["same_version_max_abs_log_ratio"])),
            default=None,
        ),
        "num_dropped_stale": sum(r["num_dropped_stale"] for r in records),
        "num_dropped_mixed": sum(r["num_dropped_mixed"] for r in records),
        **extra,
    }
    curve = os.path.join(cfg.out, "reward_curve.txt")
    with open(curve, "w") as f:
        f.write(text_chart(rewards) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        pass
    else:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(len(rewards)), rewards, marker=".")
        ax.set_xlabel("step (one policy version each)")
        ax.set_ylabel("mean reward")
        ax.set_title("GRPO through mlxsup")
        fig.tight_layout()
        curve = os.path.join(cfg.out, "reward_curve.png")
        fig.savefig(curve, dpi=120)
        plt.close(fig)
    log_path = os.path.join(cfg.out, "grpo_log.json")
    summary["log"], summary["curve"] = log_path, curve
    with open(log_path, "w") as f:
        json.dump({"config": asdict(cfg), "summary": summary, "steps": records}, f, indent=2)
    return summary


# ---------------------------------------------------------------------------- entry


def parse_args(argv=None) -> GRPOConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="URL of a running mlxsup server (started with the same --model)")
    where.add_argument("--start", action="store_true",
                       help="start a server on a free port and stop it at the end")
    p.add_argument("--model", help="model directory (default: the built-in demo model, as the server's)")
    p.add_argument("--out", default=GRPOConfig.out, help="output directory (log, curve, adapters)")
    p.add_argument("--steps", type=int, default=GRPOConfig.steps)
    p.add_argument("--group-size", type=int, default=GRPOConfig.group_size,
                   help="samples per prompt (n)")
    p.add_argument("--prompts-per-step", type=int, default=GRPOConfig.prompts_per_step)
    p.add_argument("--lr", type=float, default=GRPOConfig.lr)
    p.add_argument("--max-tokens", type=int, default=GRPOConfig.max_tokens)
    p.add_argument("--temperature", type=float, default=GRPOConfig.temperature)
    p.add_argument("--clip-eps", type=float, default=GRPOConfig.clip_eps)
    p.add_argument("--warmup-steps", type=int, default=GRPOConfig.warmup_steps)
    p.add_argument("--max-grad-norm", type=float, default=GRPOConfig.max_grad_norm)
    p.add_argument("--lora-rank", type=int, default=GRPOConfig.lora_rank)
    p.add_argument("--lora-scale", type=float, default=GRPOConfig.lora_scale)
    p.add_argument("--lora-layers", type=int, default=GRPOConfig.lora_layers, help="0: every layer")
    p.add_argument("--full", type=int, default=0, metavar="LAYERS", dest="full_layers",
                   help="train the full weights of the last LAYERS layers instead of a LoRA adapter, "
                        "pushed each step with /update_weights (/upload_weights with --upload)")
    p.add_argument("--max-staleness", type=int, default=GRPOConfig.max_staleness)
    p.add_argument("--upload", action="store_true", help="send adapters over HTTP (/upload_adapter)")
    p.add_argument("--swap-mode", default=GRPOConfig.swap_mode, choices=SWAP_MODES)
    p.add_argument("--seed", type=int, default=GRPOConfig.seed)
    p.add_argument("--server-max-batch", type=int, default=GRPOConfig.server_max_batch,
                   help="--max-batch of the server --start starts")
    p.add_argument("--server-run-dir",
                   help="run directory of the server --start starts (default: a temporary one)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    return GRPOConfig(
        url=a.url, start=a.start, model=a.model, out=a.out, steps=a.steps, group_size=a.group_size,
        prompts_per_step=a.prompts_per_step, lr=a.lr, max_tokens=a.max_tokens, temperature=a.temperature,
        clip_eps=a.clip_eps, warmup_steps=a.warmup_steps, max_grad_norm=a.max_grad_norm, lora_rank=a.lora_rank, lora_scale=a.lora_scale, lora_layers=a.lora_layers,
        full_layers=a.full_layers, max_staleness=a.max_staleness, upload=a.upload, swap_mode=a.swap_mode, seed=a.seed,
        server_max_batch=a.server_max_batch, server_run_dir=a.server_run_dir, quiet=a.quiet,
    )


async def train(cfg: GRPOConfig, url: str, model_path: str, log=print) -> dict:
    async with InferenceClient(url, timeout=600) as client:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx") as mlx_thread:
            loop = asyncio.get_running_loop()
            policy = await loop.run_in_executor(mlx_thread, Policy, model_path, cfg)
            trainer = Trainer(cfg, client, policy, mlx_thread, log=log)
            records = await trainer.run()
    return write_reports(cfg, records, {"url": url, "model": model_path})


def main(argv=None) -> int:
    cfg = parse_args(argv)
    model_path = cfg.model
    if model_path is None:
        from mlxsup.demo import ensure_demo_model

        model_path = ensure_demo_model()
    if cfg.start:  # a server on a free loopback port, stopped at the end whatever happens
        with contextlib.ExitStack() as stack:
            run_dir = cfg.server_run_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="mlxsup-grpo-"))
            flags = ("--max-batch", str(cfg.server_max_batch), "--max-tokens", str(cfg.max_tokens))
            print(f"starting: mlxsup start --model {model_path} --run-dir {run_dir} {' '.join(flags)}", flush=True)
            server = stack.enter_context(start_server(model_path, run_dir, *flags))
            summary = asyncio.run(train(cfg, server.url, model_path))
    else:
        summary = asyncio.run(train(cfg, cfg.url, model_path))
    with open(os.path.join(cfg.out, "reward_curve.txt")) as f:
        print(f.read())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without running C++ static destructors: MLX, used from a thread other than the main
    # one (the trainer's MLX thread), sometimes aborts the process while tearing down at exit
    # ("terminate called without an active exception", MLX issue 3126), after everything was
    # written. Freeing the arrays on that thread first did not prevent it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
