"""The OpenAPI 3.1 document, generated from the body models (`mlxsup.api.protocol`,
`mlxsup.api.openai_protocol`): every route's request body, its responses (streamed events
included) and every status it can answer. Served at GET /openapi.json; docs/openapi.json is
this module's output:

    python -m mlxsup.api.spec > docs/openapi.json

Only the route table below is written by hand (which model each route takes and answers, and
its statuses); every schema comes from the models, so the document cannot drift from what the
server validates and answers (tests/test_api_spec.py and tests/test_api_schema_fuzz.py check).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from pydantic.json_schema import models_json_schema

from mlxsup import __version__
from mlxsup.api import openai_protocol as oa
from mlxsup.api import protocol as p
from mlxsup.api import vllm_protocol as vp
from mlxsup.api.common import send_json
from mlxsup.api.errors import RETRY_AFTER_OVERLOADED, RETRY_AFTER_UNAVAILABLE
from mlxsup.config import SWAP_DRAIN, SWAP_MODES, ServerConfig
from mlxsup.ipc.messages import PAUSE_ABORT, PAUSE_MODES

_REF = "#/components/schemas/{model}"
DONE = "[DONE]"

# What each status means, for every route that lists it.
STATUS_TEXT = {
    400: "the body is not valid JSON",
    401: "no key, or a wrong one (with --api-key; adapter routes: --admin-key)",
    403: "the API key on an adapter route, a client that is not loopback without --admin-key, or a path "
         "outside --adapter-root",
    404: "not found (error.field names what)",
    413: "the body is too large",
    415: "not multipart/form-data",
    409: "aborted (POST /abort) while the engine restarted; weight routes: an adapter is loaded; "
         "prepare/commit: too many prepared swaps held, or a policy_version below the next one",
    422: "the request is invalid (error.field names the field by its path), or the engine died twice "
         "with it in flight (request_refused)",
    503: "overloaded, the engine (re)starting, or the supervisor busy: retry after Retry-After seconds",
}
API = (400, 401, 413, 422)  # every JSON route behind --api-key
ENGINE = (409, 503)  # every route whose request goes to the engine


@dataclass
class Route:
    path: str
    method: str
    summary: str
    ok: dict  # media type -> schema
    statuses: tuple
    body: Optional[type] = None
    security: str = "api"  # "api", "admin" or "none"
    ok_text: str = "OK"
    extra: dict = field(default_factory=dict)


def _ref(model) -> dict:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _sse(*events) -> dict:
    """A text/event-stream of `data: <event>` lines; each event's data is one of `events`
    (JSON Schema's contentSchema describes the decoded data), then `data: [DONE]`."""
    return {"text/event-stream": {
        "schema": {"type": "string", "contentMediaType": "text/event-stream",
                   "contentSchema": {"oneOf": [*(_ref(e) for e in events), {"const": DONE}]}},
        "x-sse-events": [e.__name__ for e in events] + [DONE],
    }}


def _routes() -> list[Route]:
    return [
        Route("/generate", "post", "Generate completions (the seed's route)",
              _json({"oneOf": [_ref(p.GenerateResult), _ref(p.GenerateResults)]}), (*API, *ENGINE),
              body=p.GenerateRequest,
              ok_text="one prompt with n=1: a bare result; otherwise {results: [...]}, prompt-major"),
        Route("/score", "post", "Teacher-forced log-probs of given completion tokens",
              _json(_ref(p.ScoreResult)), (*API, *ENGINE), body=p.ScoreRequest),
        Route("/abort", "post", "Abort a request by its request_id (any worker)",
              _json(_ref(p.AbortResult)), API, body=p.AbortRequest),
        Route("/load_adapter", "post", "Swap in a LoRA adapter from the server's disk",
              _json(_ref(p.SwapResult)), (*API, 403, 404, 503), body=p.LoadAdapterRequest, security="admin",
              ok_text="committed"),
        Route("/upload_adapter", "post", "Upload a LoRA adapter and swap it in",
              _json(_ref(p.SwapResult)), (400, 401, 403, 413, 415, 422, 503), security="admin",
              ok_text="committed", extra={
                  "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                      "type": "object",
                      "properties": {
                          "adapter_weights": {"type": "string", "format": "binary",
                                              "description": "adapters.safetensors"},
                          "adapter_config": {"type": "string", "format": "binary",
                                             "description": "adapter_config.json"},
                          "mode": {"enum": list(SWAP_MODES), "default": SWAP_DRAIN},
                      },
                      "required": ["adapter_weights", "adapter_config"],
                      "additionalProperties": False,
                  }}}},
                  "parameters": [{"name": "mode", "in": "query", "required": False,
                                  "schema": {"enum": list(SWAP_MODES)}}],
              }),
        Route("/prepare_adapter", "post", "Prepare an adapter swap without committing it (a fleet's first phase)",
              _json(_ref(p.PreparedResult)), (*API, 403, 404, 409, 503), body=p.PrepareAdapterRequest,
              security="admin", ok_text="prepared (nothing committed)"),
        Route("/commit_adapter", "post", "Commit a prepared adapter swap (a fleet's second phase)",
              _json(_ref(p.CommitResult)), (*API, 403, 404, 409, 503), body=p.CommitAdapterRequest,
              security="admin", ok_text="committed"),
        Route("/cancel_adapter", "post", "Drop a prepared adapter swap",
              _json(_ref(p.CancelResult)), (*API, 403, 404, 503), body=p.CancelAdapterRequest,
              security="admin", ok_text="dropped"),
        Route("/reset_prefix_cache", "post", "Drop every prefix-cache entry (running sequences keep their KV)",
              _json(_ref(p.ResetPrefixCacheResult)), (401, 403, 503), security="admin", ok_text="dropped"),
        Route("/update_weights", "post",
              "Replace model weights (all or any subset) from safetensors files on the server's disk",
              _json(_ref(p.WeightsResult)), (*API, 403, 404, 409, 503), body=p.UpdateWeightsRequest,
              security="admin", ok_text="committed"),
        Route("/upload_weights", "post",
              "Upload safetensors files (all of the model's parameters or any subset) and commit them",
              _json(_ref(p.WeightsResult)), (400, 401, 403, 409, 413, 415, 422, 503), security="admin",
              ok_text="committed",
              extra={
                  "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                      "type": "object",
                      "properties": {
                          "weights": {"type": "array", "items": {"type": "string", "format": "binary"},
                                      "description": "one or more safetensors files"},
                          "mode": {"enum": list(SWAP_MODES), "default": SWAP_DRAIN},
                      },
                      "required": ["weights"],
                      "additionalProperties": False,
                  }}}},
                  "parameters": [{"name": "mode", "in": "query", "required": False,
                                  "schema": {"enum": list(SWAP_MODES)}}],
              }),
        Route("/adapter", "get", "The adapter being served", _json(_ref(p.AdapterState)), (401,)),
        Route("/health", "get", "Health (no key needed)", _json(_ref(p.Health)), (503,), security="none",
              ok_text="engine ready"),
        Route("/metrics", "get", "Metrics: JSON, or Prometheus text when Accept asks text/plain or "
                                 "application/openmetrics-text",
              {**_json(_ref(p.Metrics)), "text/plain": {"schema": {"type": "string"}},
               "application/openmetrics-text": {"schema": {"type": "string"}}}, (401,)),
        Route("/openapi.json", "get", "This document", _json({"type": "object"}), (401,)),
        Route("/v1/models", "get", "OpenAI: list models", _json(_ref(oa.ModelList)), (401, 503)),
        Route("/v1/completions", "post", "OpenAI: completions",
              {**_json(_ref(oa.CompletionResponse)), **_sse(oa.CompletionChunk, p.ErrorBody)},
              (*API, *ENGINE), body=oa.CompletionRequest,
              ok_text="text_completion; with stream: true, SSE events (an error after the first event is an "
                      "error event)"),
        Route("/v1/chat/completions", "post", "OpenAI: chat completions",
              {**_json(_ref(oa.ChatCompletionResponse)), **_sse(oa.ChatCompletionChunk, p.ErrorBody)},
              (*API, *ENGINE), body=oa.ChatCompletionRequest,
              ok_text="chat.completion; with stream: true, SSE events (an error after the first event is an "
                      "error event)"),
        # vLLM's routes (docs/rl-frameworks.md)
        Route("/inference/v1/generate", "post", "vLLM: tokens in, tokens out",
              {**_json(_ref(vp.GenerateTokensResponse)), **_sse(vp.GenerateTokensChunk, p.ErrorBody)},
              (*API, *ENGINE), body=vp.GenerateTokensRequest,
              ok_text="with stream: true, SSE events (an error after the first event is an error event)"),
        Route("/tokenize", "post", "vLLM: tokenize a prompt or messages", _json(_ref(vp.TokenizeResponse)),
              (*API, 503), body=vp.TokenizeRequest),
        Route("/detokenize", "post", "vLLM: token ids to text", _json(_ref(vp.DetokenizeResponse)),
              (*API, 503), body=vp.DetokenizeRequest),
        Route("/pause", "post", "vLLM: pause generation (abort, wait or keep in-flight requests)",
              _json(_ref(vp.PauseState)), (401, 403, 422, *ENGINE), security="admin",
              ok_text="paused (mode=wait: once in-flight requests are done)", extra={"parameters": [
                  {"name": "mode", "in": "query", "required": False,
                   "schema": {"enum": list(PAUSE_MODES), "default": PAUSE_ABORT}},
                  {"name": "wait_for_inflight_requests", "in": "query", "required": False,
                   "schema": {"type": "boolean", "default": False},
                   "description": "older spelling of mode=wait (used when mode is absent)"}]}),
        Route("/resume", "post", "vLLM: resume after a pause", _json(_ref(vp.PauseState)), (401, 403, *ENGINE),
              security="admin"),
        Route("/is_paused", "get", "vLLM: the pause state", _json(_ref(vp.PauseState)), (401, *ENGINE)),
        Route("/abort_requests", "post", "vLLM: abort the given requests (any worker), or all",
              _json(_ref(vp.AbortRequestsResponse)), (*API, 403, *ENGINE), body=vp.AbortRequestsRequest,
              security="admin"),
        Route("/v1/load_lora_adapter", "post", "vLLM: load a LoRA adapter (a versioned swap)",
              _json(_ref(vp.LoraSwapResult)), (*API, 403, 404, 503), body=vp.LoadLoraRequest, security="admin",
              ok_text="committed"),
        Route("/v1/unload_lora_adapter", "post", "vLLM: back to the base model (a versioned swap)",
              _json(_ref(vp.LoraSwapResult)), (*API, 403, 503), body=vp.UnloadLoraRequest, security="admin",
              ok_text="committed"),
    ]


RESPONSE_MODELS = (
    p.GenerateResult, p.GenerateResults, p.ScoreResult, p.AbortResult, p.SwapResult, p.WeightsResult, p.AdapterState,
    p.PreparedResult, p.CommitResult, p.CancelResult,
    p.ResetPrefixCacheResult,
    p.Health, p.Unhealthy, p.Metrics, p.ErrorBody, oa.ModelList, oa.CompletionResponse, oa.CompletionChunk,
    oa.ChatCompletionResponse, oa.ChatCompletionChunk, vp.GenerateTokensResponse, vp.GenerateTokensChunk,
    vp.TokenizeResponse, vp.DetokenizeResponse, vp.PauseState, vp.AbortRequestsResponse, vp.LoraSwapResult,
)


def _error_response(status: int, openai: bool) -> dict:
    out = {"description": STATUS_TEXT[status], "content": _json(_ref(p.ErrorBody))}
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    if status == 503:
        out["headers"] = {"Retry-After": {
            "required": True, "description": f"seconds ({RETRY_AFTER_OVERLOADED} when overloaded, "
                                             f"{RETRY_AFTER_UNAVAILABLE} while the engine (re)starts)",
            "schema": {"type": "integer", "minimum": 0}}}
    return out


def _operation(route: Route) -> dict:
    openai = route.path.startswith("/v1/")
    responses = {"200": {"description": route.ok_text, "content": route.ok}}
    for status in sorted(route.statuses):
        responses[str(status)] = _error_response(status, openai)
    if route.path == "/health":
        responses["503"]["content"] = _json(_ref(p.Unhealthy))
        responses["503"]["description"] = "not ready yet (Retry-After)"
    op = {"summary": route.summary, "operationId": _operation_id(route), "responses": responses}
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": _json(_ref(route.body))}
    if route.security == "none":
        op["security"] = []
    elif route.security == "admin":
        op["security"] = [{"adminKey": []}, {}]  # without --admin-key: loopback clients, no key
    op.update(route.extra)
    return op


def _operation_id(route: Route) -> str:
    name = route.path.strip("/").replace("/", "_").replace(".", "_")
    return f"{route.method}_{name}"


def build_spec(config: ServerConfig = None) -> dict:
    """The document; `config` is accepted for the app's call and changes nothing (limits that
    depend on it are checked at request time and described in the fields' text)."""
    routes = _routes()
    models = [r.body for r in routes if r.body is not None] + list(RESPONSE_MODELS)
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    paths: dict = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method] = _operation(route)
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {"title": "mlxsup", "version": __version__,
                 "description": "Rollout server for RL trainers on MLX models. See docs/api.md. Log-probs "
                                f"of -inf are reported as {p.LOGPROB_FLOOR}."},
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "--api-key"},
                "adminKey": {"type": "http", "scheme": "bearer",
                             "description": "--admin-key (without it: loopback clients only)"},
            },
        },
        "security": [{"apiKey": []}, {}],  # without --api-key no key is needed
        "paths": paths,
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
