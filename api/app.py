"""The Falcon ASGI application of an API worker (falcon's asgilook shape).

`create_app(config)` builds every dependency (engine link, tokenizer, supervisor client, upload
store) and injects each into the resources that need it; resources only translate
HTTP to calls; middleware owns start-up, shutdown and auth. gunicorn runs it through
`mlxsup.api.asgi:app`. Nothing here imports mlx.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Mapping, Optional

import falcon
import falcon.asgi

from mlxsup.api import errors
from mlxsup.api.adapters import (
    AdapterResource,
    CancelAdapterResource,
    CommitAdapterResource,
    LoadAdapterResource,
    PrepareAdapterResource,
    ResetPrefixCacheResource,
    SupervisorAdapters,
    UploadAdapterResource,
)
from mlxsup.api.common import CodecRef
from mlxsup.api.engine_link import EngineLink, IpcEngineLink
from mlxsup.api.generate import AbortResource, GenerateResource
from mlxsup.api.middleware import AuthMiddleware, LifespanMiddleware
from mlxsup.api.openai import ChatCompletionsResource, CompletionsResource, ModelsResource, served_model_name
from mlxsup.api.score import ScoreResource
from mlxsup.api.spec import OpenApiResource
from mlxsup.api.status import HealthResource, MetricsResource
from mlxsup.api.textcodec import TextCodec
from mlxsup.api.uploads import UploadStore
from mlxsup.api import vllm
from mlxsup.api.weights import UpdateWeightsResource, UploadWeightsResource
from mlxsup.config import RUN_DIR_ENV, ServerConfig


def config_from_env(environ: Mapping[str, str] = os.environ) -> ServerConfig:
    """The configuration the supervisor wrote to `$MLXSUP_RUN_DIR/config.json`; also points
    this worker's `mlxsup` loggers at stderr (gunicorn's error log) at the configured level."""
    run_dir = environ.get(RUN_DIR_ENV)
    if not run_dir:
        raise RuntimeError(f"{RUN_DIR_ENV} is not set: the API worker needs the server's run directory "
                           "(the supervisor sets it; `mlxsup start` runs the server)")
    config = ServerConfig.load(run_dir)
    logger = logging.getLogger("mlxsup")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s [api {os.getpid()}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(config.log_level)
    return config


def create_app(
    config: ServerConfig,
    *,
    engine_link: Optional[EngineLink] = None,
    codec: Optional[TextCodec] = None,
    adapters: Optional[SupervisorAdapters] = None,
) -> falcon.asgi.App:
    """The API worker's app. `engine_link`, `codec` and `adapters` replace the real engine link,
    tokenizer and supervisor client (tests); by default they come from `config` (its run
    directory, model and flags)."""
    link = engine_link or IpcEngineLink(
        config.run_dir,
        request_timeout_s=config.request_timeout_s,
        min_policy_wait_s=config.min_policy_wait_s,
    )
    codecs = CodecRef(codec, functools.partial(TextCodec.load, config.model, config.trust_remote_code))
    adapters = adapters or SupervisorAdapters(config.run_dir, timeout_s=config.request_timeout_s)

    app = falcon.asgi.App(
        middleware=[LifespanMiddleware(codecs, link), AuthMiddleware(config.api_key, config.admin_key)],
    )
    app.req_options.strip_url_path_trailing_slash = True
    app.req_options.auto_parse_qs_csv = False

    app.add_route("/generate", GenerateResource(link, codecs, config))
    app.add_route("/score", ScoreResource(link, codecs, config))
    app.add_route("/abort", AbortResource(link))
    app.add_route("/load_adapter", LoadAdapterResource(adapters, config.adapter_root))
    app.add_route("/upload_adapter", UploadAdapterResource(adapters, UploadStore(config.run_dir),
                                                           config.max_upload_mb << 20))
    app.add_route("/adapter", AdapterResource(adapters, link))
    app.add_route("/prepare_adapter", PrepareAdapterResource(adapters, config.adapter_root))
    app.add_route("/commit_adapter", CommitAdapterResource(adapters))
    app.add_route("/cancel_adapter", CancelAdapterResource(adapters))
    app.add_route("/reset_prefix_cache", ResetPrefixCacheResource(adapters))
    app.add_route("/update_weights", UpdateWeightsResource(adapters, config.adapter_root))
    app.add_route("/upload_weights", UploadWeightsResource(adapters, UploadStore(config.run_dir),
                                                           config.max_upload_mb << 20))
    app.add_route("/health", HealthResource(link, codecs))
    app.add_route("/metrics", MetricsResource(link, config))
    app.add_route("/openapi.json", OpenApiResource(config))
    app.add_route("/v1/models", ModelsResource(link, config))
    app.add_route("/v1/completions", CompletionsResource(link, codecs, config))
    app.add_route("/v1/chat/completions", ChatCompletionsResource(link, codecs, config))

    # vLLM's routes (docs/rl-frameworks.md)
    app.add_route("/inference/v1/generate",
                  vllm.InferenceGenerateResource(link, codecs, config, served_model_name(config)))
    app.add_route("/tokenize", vllm.TokenizeResource(link, codecs))
    app.add_route("/detokenize", vllm.DetokenizeResource(link, codecs, config))
    app.add_route("/pause", vllm.PauseResource(link))
    app.add_route("/resume", vllm.ResumeResource(link))
    app.add_route("/is_paused", vllm.IsPausedResource(link))
    app.add_route("/abort_requests", vllm.AbortRequestsResource(link))
    app.add_route("/v1/load_lora_adapter", vllm.LoadLoraResource(adapters, config.adapter_root))
    app.add_route("/v1/unload_lora_adapter", vllm.UnloadLoraResource(adapters))

    app.add_error_handler(Exception, errors.handle_unexpected)
    app.add_error_handler(falcon.HTTPError, errors.handle_http_error)
    app.add_error_handler(errors.ApiError, errors.handle_api_error)
    return app
