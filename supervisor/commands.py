"""The children's command lines, and how their exits read in a log."""

from __future__ import annotations

import signal
import sys

from mlxsup.config import ServerConfig

GUNICORN_GRACEFUL_S = 30
# Idle keep-alive connections are kept this long. gunicorn's default (2 s) is shorter than
# common clients' idle expiry (httpx 5 s, so the openai SDK and mlxsup.client): a client that
# reuses a connection just as the server closes it loses its POST ("Server disconnected without
# sending a response"), which a CPU-starved client under load does often (scripts/load_test.py
# lost 15 of 2,000). Not longer: on stop, gunicorn waits for idle connections to close (up to
# --graceful-timeout), so an idle client delays `mlxsup stop` by up to this long.
GUNICORN_KEEPALIVE_S = 10


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def gunicorn_argv(config: ServerConfig) -> list[str]:
    """The gunicorn master's command line: asgi workers on uvloop, no control socket (two
    instances would share its default path), no pid file (the supervisor is the pid owner)."""
    host = config.host
    bind = f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"
    return [
        sys.executable, "-m", "gunicorn",
        "--worker-class", "mlxsup.api.worker.ASGIWorker",
        "--asgi-loop", "uvloop",
        "--workers", str(config.workers),
        "--bind", bind,
        "--graceful-timeout", str(GUNICORN_GRACEFUL_S),
        "--timeout", "60",
        "--keep-alive", str(GUNICORN_KEEPALIVE_S),
        "--log-level", config.log_level.lower(),
        "--no-control-socket",
        # a client that hangs up is cancelled at once, so its sequences leave the batch now
        "--asgi-disconnect-grace-period", "0",
        "--name", f"mlxsup-api-{config.port}",
        "mlxsup.api.asgi:app",
    ]  # fmt: skip


def engine_argv(config: ServerConfig, control_fd: int, epoch: int) -> list[str]:
    """The engine's command line: a fresh interpreter (never a fork of this process)."""
    return [
        sys.executable, "-m", "mlxsup.engine",
        "--run-dir", config.run_dir,
        "--control-fd", str(control_fd),
        "--epoch", str(epoch),
    ]  # fmt: skip
