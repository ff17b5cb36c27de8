"""The OpenAPI 3.1 document, generated from the request schemas (`mlxsup.api.schemas`), so it
cannot drift from what the server validates. Served at GET /openapi.json; docs/openapi.json is
this module's output for the default configuration:

    python -m mlxsup.api.spec > docs/openapi.json
"""

from __future__ import annotations

import json

from mlxsup import __version__
from mlxsup.api.common import send_json
from mlxsup.api.schemas import Schemas
from mlxsup.config import ServerConfig

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_NULL_STR = {"type": ["string", "null"]}


def _obj(props: dict, required=None) -> dict:
    s = {"type": "object", "properties": props}
    s["required"] = list(required) if required is not None else list(props)
    return s


def _components() -> dict:
    result = _obj({
        "request_id": _STR,
        "policy_version": {"type": ["integer", "string", "null"], "description": "the request's, echoed"},
        "step_id": {"type": ["integer", "null"], "description": "the request's, echoed"},
        "prompt_ids": {"type": "array", "items": _INT},
        "completion_ids": {"type": "array", "items": _INT},
        "text": {"type": "string", "description": "detokenized completion, cut before any stop string"},
        "logprobs": {"type": ["array", "null"], "items": _NUM,
                     "description": "one per completion token; null when logprobs is 0"},
        "finish_reason": {"enum": ["stop", "length", "abort"]},
        "metadata": _obj({
            "batch_size": _INT, "latency_ms": _NUM, "current_policy_version": _INT,
            "server_policy_version": _INT, "queue_ms": _NUM, "ttft_ms": _NUM,
            "cached_tokens": {"type": "integer", "description": "prompt tokens whose KV came from the prefix cache"},
        }, required=["batch_size", "latency_ms", "current_policy_version"]),
        "generated_by_version": {"type": "integer", "description": "version of the first token"},
        "token_versions": {"type": "array", "items": _INT, "description": "version of each token"},
        "prompt_index": {"type": "integer", "description": "only in {results: [...]}"},
        "sample_index": {"type": "integer", "description": "only in {results: [...]}"},
    }, required=["request_id", "policy_version", "step_id", "prompt_ids", "completion_ids", "text",
                 "logprobs", "finish_reason", "metadata"])
    error = _obj({"error": _obj({
        "type": _STR, "message": _STR, "field": _NULL_STR,
        "param": {"type": ["string", "null"], "description": "OpenAI routes only (= field)"},
        "code": {"type": ["string", "null"], "description": "OpenAI routes only (= type)"},
    }, required=["type", "message", "field"])})
    swap = _obj({
        "status": {"const": "success"}, "policy_version": _INT, "message": _STR,
        "adapter_path": _NULL_STR, "mode": _STR,
        **{k: {"type": ["number", "null"], "description": d} for k, d in (
            ("read_ms", "reading and validating the adapter files"),
            ("prepare_ms", "from the engine's receipt of the swap until it could commit (read included)"),
            ("wait_ms", "waiting for the step boundary (drain: for in-flight sequences)"),
            ("commit_ms", "the commit itself"))},
    }, required=["status", "policy_version", "message"])
    return {
        "GenerateResult": result,
        "GenerateResults": _obj({"results": {"type": "array", "items": {"$ref": "#/components/schemas/GenerateResult"}}}),
        "Error": error,
        "SwapResult": swap,
        "ScoreResult": _obj({
            "request_id": _STR, "prompt_ids": {"type": "array", "items": _INT},
            "completion_ids": {"type": "array", "items": _INT},
            "logprobs": {"type": "array", "items": _NUM}, "logprobs_mode": _STR,
            "policy_version": {"type": "integer", "description": "version whose weights scored"},
            "metadata": _obj({"latency_ms": _NUM, "current_policy_version": _INT}),
        }),
        "Health": _obj({"status": _STR, "model_loaded": {"type": "boolean"}}),
        "Metrics": _obj({
            "current_policy_version": _INT, "queue_depth": _INT, "max_batch_size": _INT,
            "flush_interval_ms": _NUM, "tokens_per_s": _NUM, "num_running": _INT, "engine_epoch": _INT,
            "engine_restarts": _INT, "num_swaps": _INT, "engine_state": _STR,
            "prefix_cache": _obj({"lookups": _INT, "hits": _INT, "lookup_tokens": _INT, "hit_tokens": _INT,
                                  "hit_rate": _NUM, "entries": _INT, "bytes": _INT, "kv_budget_bytes": _INT}),
        }),
        "ResetPrefixCacheResult": _obj({"status": {"const": "success"}, "entries_dropped": _INT}),
        "Adapter": _obj({
            "policy_version": _INT, "adapter_path": _NULL_STR, "adapter_id": _NULL_STR,
            "loaded_at": {"type": ["string", "null"], "format": "date-time"},
            "committed_version": {"type": ["integer", "null"]}, "num_swaps": _INT,
        }),
        "AbortResult": _obj({"request_id": _STR, "status": {"const": "abort_requested"},
                             "found_in_this_worker": _INT}),
    }


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {400: "body is not valid JSON", 401: "no key sent", 403: "wrong key, or not loopback",
            404: "not found", 413: "too large", 415: "not multipart/form-data",
            422: "schema error (error.field names the field)",
            503: "overloaded or engine restarting (Retry-After)"}
    return {str(c): {"description": text[c], **_json(_ref("Error"))} for c in codes}


def _op(summary: str, ok: dict, *codes: int, body: dict = None, security=True, admin=False, **extra) -> dict:
    op = {"summary": summary, "responses": {"200": ok, **_errors(*codes)}}
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if not security:
        op["security"] = []
    elif admin:
        op["security"] = [{"adminKey": []}]
    op.update(extra)
    return op


def build_spec(config: ServerConfig = None) -> dict:
    schemas = Schemas(config or ServerConfig(run_dir="/nonexistent"))
    common = (400, 401, 403, 413, 422, 503)
    sse = {"text/event-stream": {"schema": {"type": "string"},
                                 "description": "with stream: true: `data: <chunk>` lines, then `data: [DONE]`"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlxsup", "version": __version__,
                 "description": "Rollout server for RL trainers on MLX models. See docs/api.md."},
        "components": {
            "schemas": _components(),
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "--api-key"},
                "adminKey": {"type": "http", "scheme": "bearer",
                             "description": "--admin-key (without it: loopback clients only)"},
            },
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/generate": {"post": _op(
                "Generate completions (the seed's route)",
                {"description": "one prompt with n=1: a bare result; otherwise {results: [...]}, prompt-major",
                 **_json({"oneOf": [_ref("GenerateResult"), _ref("GenerateResults")]})},
                *common, body=schemas.generate.schema())},
            "/score": {"post": _op("Teacher-forced log-probs of given completion tokens",
                                   {"description": "log-probs", **_json(_ref("ScoreResult"))},
                                   *common, body=schemas.score.schema())},
            "/abort": {"post": _op("Abort a request by its request_id (any worker)",
                                   {"description": "abort requested", **_json(_ref("AbortResult"))},
                                   400, 401, 403, 422, body=schemas.abort.schema())},
            "/load_adapter": {"post": _op("Swap in a LoRA adapter from the server's disk",
                                          {"description": "committed", **_json(_ref("SwapResult"))},
                                          400, 401, 403, 404, 422, 503, body=schemas.load_adapter.schema(),
                                          admin=True)},
            "/upload_adapter": {"post": _op(
                "Upload a LoRA adapter and swap it in",
                {"description": "committed", **_json(_ref("SwapResult"))},
                401, 403, 413, 415, 422, 503, admin=True,
                requestBody={"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object",
                    "properties": {
                        "adapter_weights": {"type": "string", "format": "binary",
                                            "description": "adapters.safetensors"},
                        "adapter_config": {"type": "string", "format": "binary",
                                           "description": "adapter_config.json"},
                        "mode": {"enum": ["drain", "abort", "inflight"], "default": "drain"},
                    },
                    "required": ["adapter_weights", "adapter_config"],
                    "additionalProperties": False,
                }}}},
                parameters=[{"name": "mode", "in": "query", "required": False,
                             "schema": {"enum": ["drain", "abort", "inflight"]}}],
            )},
            "/reset_prefix_cache": {"post": _op(
                "Drop every prefix-cache entry (running sequences keep their KV)",
                {"description": "dropped", **_json(_ref("ResetPrefixCacheResult"))}, 401, 403, 503,
                admin=True)},
            "/adapter": {"get": _op("The adapter being served",
                                    {"description": "adapter", **_json(_ref("Adapter"))}, 401, 403)},
            "/health": {"get": {
                "summary": "Health (no key needed)",
                "security": [],
                "responses": {"200": {"description": "engine ready", **_json(_ref("Health"))},
                              "503": {"description": "not ready yet (Retry-After)", **_json({"type": "object"})}},
            }},
            "/metrics": {"get": _op(
                "Metrics: JSON, or Prometheus text when Accept asks text/plain or application/openmetrics-text",
                {"description": "metrics", "content": {
                    "application/json": {"schema": _ref("Metrics")},
                    "text/plain": {"schema": {"type": "string"}},
                    "application/openmetrics-text": {"schema": {"type": "string"}},
                }}, 401, 403)},
            "/openapi.json": {"get": _op("This document", {"description": "OpenAPI 3.1", **_json({"type": "object"})},
                                         401, 403)},
            "/v1/models": {"get": _op("OpenAI: list models", {"description": "models", **_json({"type": "object"})},
                                      401, 403)},
            "/v1/completions": {"post": _op(
                "OpenAI: completions",
                {"description": "text_completion", "content": {"application/json": {"schema": {"type": "object"}},
                                                               **sse}},
                *common, body=schemas.completions.schema())},
            "/v1/chat/completions": {"post": _op(
                "OpenAI: chat completions",
                {"description": "chat.completion", "content": {"application/json": {"schema": {"type": "object"}},
                                                               **sse}},
                *common, body=schemas.chat.schema())},
        },
    }


def spec_text(config: ServerConfig = None) -> str:
    return json.dumps(build_spec(config), indent=2, sort_keys=True) + "\n"


class OpenApiResource:
    def __init__(self, config: ServerConfig):
        self.spec = build_spec(config)

    async def on_get(self, req, resp):
        send_json(resp, self.spec)


if __name__ == "__main__":
    print(spec_text(), end="")
