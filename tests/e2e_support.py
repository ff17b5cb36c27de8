"""Helpers of the end-to-end tests: start real servers with `mlxsup start` (mlxsup.local_server),
stop them whatever happened, check that nothing of an instance is left, and build LoRA adapters
for the tiny model."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Optional

import httpx

from mlxsup.demo import ATTENTION_KEYS, write_random_adapter
from mlxsup.local_server import SHM, LocalServer, instance_segments, run_mlxsup
from mlxsup.local_server import start_server as start_local_server
from mlxsup.supervisor import protocol
from mlxsup.supervisor.launcher import free_port  # noqa: F401 - the tests import it from here
from mlxsup.supervisor.rundir import is_owned

__all__ = ["SHM", "Server", "instance_segments", "free_port"]  # besides the helpers below

Server = LocalServer  # one running instance started by `mlxsup start` (a daemon)


def mlxsup(*args, timeout=120, check=False, env=None):
    out = run_mlxsup(*args, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"mlxsup {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def start_server(tmp_path, model: str, *extra: str, workers: int = 2, host: str = "127.0.0.1", name: str = "run",
                 env: dict | None = None) -> Server:
    """`mlxsup start` with the run dir `tmp_path/name` on a free port; stopped again if it fails."""
    return start_local_server(model, str(tmp_path / name), "--workers", str(workers), *extra, host=host, env=env)


def stop_server(server: Server) -> None:
    """Stop the instance whatever state it is in, then kill anything of it that is left."""
    server.stop(timeout=90)


def assert_nothing_left(server: Server) -> None:
    """No process, shared-memory segment, socket, doorbell or pid file of the instance."""
    assert not is_owned(server.run_dir), "a supervisor still owns the run dir"
    left = server.leftovers()
    assert left["processes"] == [], f"processes remain: {left['processes']}"
    assert left["files"] == [], f"{left['files']} remain in the run dir"
    assert left["segments"] == [], f"segments remain: {left['segments']}"
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))


@contextlib.contextmanager
def running_server(tmp_path, model: str, *extra: str, **kwargs):
    """`start_server` for a `with` block: stopped whatever happens, and checked to have left
    nothing behind (processes, segments, sockets) once stopped."""
    server = start_server(tmp_path, model, *extra, **kwargs)
    try:
        yield server
    finally:
        stop_server(server)
    assert_nothing_left(server)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (protocol.ControlError, OSError, httpx.HTTPError, KeyError, ValueError) as e:
            value, last_error = None, e
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error!r})")


def is_healthy(server: Server) -> bool:
    with server.client(timeout=5) as c:
        r = c.get("/health")
    return r.status_code == 200 and r.json()["status"] == "healthy"


# ---------------------------------------------------------------------- adapters


# What trainers' configs also carry besides mlx-lm's fields; the server must tolerate it.
TRAINER_CONFIG_EXTRAS = {"model_type": "llama", "target_modules": list(ATTENTION_KEYS), "trainable": True}


def make_adapter(directory, model_dir: str, seed: int, std: float = 0.3, rank: int = 8,
                 extra_config: Optional[dict] = None) -> str:
    """A LoRA adapter for `model_dir` in mlx-lm's layout (nonzero random weights on the attention
    query and value projections of every layer), its config carrying trainers' extra fields."""
    return write_random_adapter(directory, model_dir, seed, std=std, rank=rank,
                                extra_config={**TRAINER_CONFIG_EXTRAS, **(extra_config or {})})


def load_until(server, stop, results: list, index: int, max_tokens: int = 48, timeout: float = 60.0) -> None:
    """Send /generate requests one after another until `stop` (a threading.Event); record
    (status, headers, body) or the exception. A request that hangs fails the test through its
    timeout. `index` tells the clients' prompts and seeds apart."""
    i = 0
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(timeout)) as c:
        while not stop.is_set():
            i += 1
            body = {"prompt": f"Tell me about {index} and {i}.", "max_tokens": max_tokens, "temperature": 0.8,
                    "seed": index * 1000 + i, "logprobs": 1}  # fmt: skip
            try:
                r = c.post("/generate", json=body)
                results.append((r.status_code, dict(r.headers), r.json()))
            except Exception as e:  # noqa: BLE001 - recorded and failed on by the caller
                results.append((None, {}, repr(e)))
