"""GET /health and GET /metrics (JSON, or Prometheus text when the Accept header asks)."""

from __future__ import annotations

import os

from mlxsup.api.common import send_json
from mlxsup.api.errors import RETRY_AFTER_UNAVAILABLE
from mlxsup.config import ServerConfig
from mlxsup.ipc.control import prefix_cache_hit_rate, prefix_cache_json

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TEXT = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class HealthResource:
    def __init__(self, link, codecs):
        self.link = link
        self.codecs = codecs

    async def on_get(self, req, resp):
        status = self.link.status()
        if status.is_ready and self.codecs.codec is not None:
            send_json(resp, {"status": "healthy", "model_loaded": True})
            return
        send_json(resp, {"status": "unavailable", "model_loaded": False, "engine_state": status.engine_state,
                         "reason": status.why_not_ready() if self.codecs.codec is not None
                         else "the tokenizer is not loaded yet"}, status=503)
        resp.set_header("Retry-After", str(RETRY_AFTER_UNAVAILABLE))


# (name, help, type, value from (status, config)); counters end in _total as OpenMetrics wants.
_GAUGES = (
    ("current_policy_version", "Policy version the engine serves", "gauge", lambda s, c: s.policy_version),
    ("queue_depth", "Requests waiting in the engine queue", "gauge", lambda s, c: s.queue_depth),
    ("num_running", "Sequences decoding in the running batch", "gauge", lambda s, c: s.num_running),
    ("max_batch_size", "Most sequences decoding at once (--max-batch)", "gauge", lambda s, c: c.max_batch),
    ("flush_interval_ms", "Idle-engine batching wait (--flush-interval-ms)", "gauge",
     lambda s, c: c.flush_interval_ms),
    ("tokens_per_s", "Generated tokens per second over the last 10 s", "gauge", lambda s, c: s.tokens_per_s),
    ("engine_epoch", "Engine start count of this run", "gauge", lambda s, c: s.engine_epoch),
    ("engine_up", "1 when the engine accepts requests", "gauge", lambda s, c: int(s.is_ready)),
    ("heartbeat_age_seconds", "Seconds since the engine's last heartbeat", "gauge",
     lambda s, c: s.heartbeat_age_s),
    ("worker_inflight_requests", "This API worker's requests in the engine", "gauge",
     lambda s, c: s.num_inflight),
    ("engine_restarts_total", "Engine restarts by the supervisor", "counter", lambda s, c: s.engine_restarts),
    ("swaps_total", "Committed adapter swaps (this engine)", "counter", lambda s, c: s.num_swaps),
    ("tokens_generated_total", "Tokens generated (this engine)", "counter", lambda s, c: s.tokens_generated),
    ("prefill_tokens_total", "Prompt tokens prefilled (this engine)", "counter", lambda s, c: s.prefill_tokens),
    ("requests_total", "Requests admitted (this engine)", "counter", lambda s, c: s.num_requests),
    ("prefix_cache_queries_total", "Prompts looked up in the prefix cache", "counter",
     lambda s, c: s.prefix_cache_lookups),
    ("prefix_cache_hits_total", "Prompts that found a cached prefix", "counter", lambda s, c: s.prefix_cache_hits),
    ("prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix cache", "counter",
     lambda s, c: s.prefix_cache_lookup_tokens),
    ("prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache", "counter",
     lambda s, c: s.prefix_cache_hit_tokens),
    ("prefix_cache_hit_rate", "Share of looked-up prompt tokens served from the cache", "gauge",
     lambda s, c: prefix_cache_hit_rate(s)),
    ("prefix_cache_entries", "Entries in the prefix cache", "gauge", lambda s, c: s.prefix_cache_entries),
    ("prefix_cache_bytes", "Bytes of KV held by the prefix cache", "gauge", lambda s, c: s.prefix_cache_bytes),
    ("kv_budget_bytes", "KV budget of the running batch and the cache (--kv-cache-gb)", "gauge",
     lambda s, c: s.kv_budget_bytes),
)



def metrics_json(status, config: ServerConfig) -> dict:
    return {
        # the seed's four fields first
        "current_policy_version": status.policy_version,
        "queue_depth": status.queue_depth,
        "max_batch_size": config.max_batch,
        "flush_interval_ms": config.flush_interval_ms,
        "tokens_per_s": round(status.tokens_per_s, 3),
        "num_running": status.num_running,
        "engine_epoch": status.engine_epoch,
        "engine_restarts": status.engine_restarts,
        "num_swaps": status.num_swaps,
        "engine_state": status.engine_state,
        "supervisor_state": status.supervisor_state,
        "adapter_id": status.adapter_id or None,
        "tokens_generated": status.tokens_generated,
        "prefill_tokens": status.prefill_tokens,
        "num_requests": status.num_requests,
        "heartbeat_age_s": None if status.heartbeat_age_s is None else round(status.heartbeat_age_s, 3),
        "max_queue": config.max_queue,
        "prefix_cache": prefix_cache_json(status),
        "worker": {"pid": os.getpid(), "slot": status.slot, "inflight": status.num_inflight,
                   "link_open": status.link_open},
    }


def metrics_text(status, config: ServerConfig, openmetrics: bool) -> str:
    lines = []
    labels = f'{{slot="{status.slot}"}}' if status.slot is not None else ""
    for name, help_text, kind, value_of in _GAUGES:
        value = value_of(status, config)
        if value is None:
            continue
        full = f"mlxsup_{name}"
        family = full[: -len("_total")] if (kind == "counter" and openmetrics) else full
        lines.append(f"# HELP {family} {help_text}")
        lines.append(f"# TYPE {family} {kind}")
        sample_labels = labels if name.startswith("worker_") else ""
        lines.append(f"{full}{sample_labels} {_number(value)}")
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class MetricsResource:
    def __init__(self, link, config: ServerConfig):
        self.link = link
        self.config = config

    async def on_get(self, req, resp):
        status = self.link.status()
        preferred = req.client_prefers(("application/json", "application/openmetrics-text", "text/plain"))
        if preferred in ("application/openmetrics-text", "text/plain"):
            openmetrics = preferred == "application/openmetrics-text"
            resp.content_type = OPENMETRICS_TEXT if openmetrics else PROMETHEUS_TEXT
            resp.text = metrics_text(status, self.config, openmetrics)
            return
        send_json(resp, metrics_json(status, self.config))
