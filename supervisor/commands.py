"""The children's command lines, and how their exits read in a log."""

from __future__ import annotations

import signal
import sys

from mlxsup.config import ServerConfig

GUNICORN_GRACEFUL_S = 30


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
        "--worker-class", "asgi",
        "--asgi-loop", "uvloop",
        "--workers", str(config.workers),
        "--bind", bind,
        "--graceful-timeout", str(GUNICORN_GRACEFUL_S),
        "--timeout", "60",
        "--log-level", config.log_level.lower(),
        "--no-control-socket",
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
