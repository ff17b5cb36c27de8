"""The engine's configuration: one frozen dataclass, built from `ServerConfig` at the edge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from mlxsup.config import ServerConfig


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to know; validated here, never deeper in the code.

    model: a local directory or a Hugging Face hub id (anything `mlx_lm.load` accepts).
    adapter_path: adapter committed at start (LoRA/DoRA in mlx-lm's format), or None.
    weight_dirs: weight updates committed at start, in order, before the adapter (directories
        of safetensors files; the run directory's copies of the committed updates).
    max_batch: sequences decoding at once; each of a request's `n` samples counts.
    flush_interval_ms: how long an idle engine waits for more arrivals before it starts.
    max_queue: requests waiting for admission (generate and score); beyond it `QueueFull`.
    max_tokens: default `max_tokens` of `Engine.generate` when no params are given.
    max_prefill_tokens: prompt tokens prefilled in one step (at least one request is always
        admitted), so a burst of long prompts does not stall running sequences for long.
    prefill_step_size: longest chunk of one prompt run through the model at once.
    prefill_chunk_tokens: prompt tokens (padding included) prefilled per step at most; the
        rest of a long admission is prefilled in the next steps while the running rows keep
        decoding, so no step lasts much longer than a decode step plus this much prefill
        (the wait for a step boundary, e.g. a swap's, stays bounded). None: whole prompts in
        the step that admits them.
    max_score_tokens: tokens teacher-forced in one scoring forward pass; its logits are
        `tokens x vocab` floats, so this bounds that memory.
    cache_limit_mb: MLX buffer-cache limit (freed buffers kept for reuse); None leaves MLX's.
    clear_cache_every: steps between `mx.clear_cache()` calls while busy.
    pipeline: True queues each decode step before reading the last one's tokens, so the
        host's work overlaps the device's (throughput while the host's work is a large part
        of a step); False runs each step to its end before the loop goes on (an adapter swap
        reaches new tokens one step sooner). None: True on a GPU, where a decode step is
        bound by the host's kernel launches; on the CPU chosen by the length of the steps
        (stepwise over 25 ms from step to step, pipelined under 15 ms: runner.SLOW_STEP_S).
    seed: seeds the streams of requests that give no seed; None draws one from the OS.
    kv_cache_gb: one KV budget (GiB) for the running batch and the prefix cache; None: half
        of the memory the weights leave (engine/prefix_cache.py, default_budget_bytes).
    prefix_cache: keep prompts' KV for later requests that start with them.
    warm_up: run `Engine.warm_up` before serving (the engine process does); None: on a GPU.
    """

    model: str
    adapter_path: Optional[str] = None
    weight_dirs: tuple = ()
    trust_remote_code: bool = False
    max_batch: int = 5
    flush_interval_ms: float = 10.0
    max_queue: int = 256
    max_tokens: int = 128
    min_policy_wait_s: float = 60.0
    max_prefill_tokens: int = 4096
    prefill_step_size: int = 2048
    max_score_tokens: int = 8192
    cache_limit_mb: Optional[int] = 1024
    clear_cache_every: int = 256
    seed: Optional[int] = None
    pipeline: Optional[bool] = None
    prefill_chunk_tokens: Optional[int] = None
    kv_cache_gb: Optional[float] = None
    prefix_cache: bool = True
    warm_up: Optional[bool] = None

    def __post_init__(self):
        if not self.model:
            raise ValueError("model must be a directory or a hub id")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.flush_interval_ms < 0:
            raise ValueError("flush_interval_ms must be >= 0")
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.min_policy_wait_s < 0:
            raise ValueError("min_policy_wait_s must be >= 0")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.prefill_step_size < 1:
            raise ValueError("prefill_step_size must be >= 1")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be >= 1 or None")
        if self.max_score_tokens < 1:
            raise ValueError("max_score_tokens must be >= 1")
        if self.cache_limit_mb is not None and self.cache_limit_mb < 0:
            raise ValueError("cache_limit_mb must be >= 0 or None")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ValueError("kv_cache_gb must be > 0 or None")
        if self.clear_cache_every < 1:
            raise ValueError("clear_cache_every must be >= 1")

    @classmethod
    def from_server_config(cls, cfg: ServerConfig, model: Optional[str] = None) -> "EngineConfig":
        """The engine's part of the server's configuration: every field both dataclasses have
        is passed as it is (a ServerConfig field the engine also declares needs no line here);
        the few the engine holds in another form are converted below. `model` overrides
        `cfg.model` (the engine process passes the demo model's directory when it is None)."""
        shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(cfg)}
        values = {name: getattr(cfg, name) for name in shared}
        values.update(
            model=model or cfg.model or "",
            pipeline={"on": True, "off": False}.get(cfg.pipeline),  # "auto": None
            prefill_chunk_tokens=cfg.prefill_chunk or None,  # 0: no limit
            kv_cache_gb=cfg.kv_cache_gb or None,  # 0: the engine's default budget
            prefix_cache=not cfg.no_prefix_cache,
            warm_up={"on": True, "off": False}.get(cfg.warm_up),  # "auto": None
        )
        return cls(**values)
