"""Helpers of the end-to-end tests: start real servers with `mlxsup start`, stop them whatever
happened, check that nothing of an instance is left, and build LoRA adapters for the tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

from mlxsup.demo import ATTENTION_KEYS, write_random_adapter
from mlxsup.supervisor import protocol
from mlxsup.supervisor.children import orphans
from mlxsup.supervisor.launcher import free_port  # noqa: F401 - the tests import it from here
from mlxsup.supervisor.rundir import is_owned

SHM = "/dev/shm"


def mlxsup(*args, timeout=120, check=False, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "mlxsup", *args], capture_output=True, text=True, timeout=timeout,
        env=None if env is None else dict(os.environ, **env),
    )  # fmt: skip
    if check and out.returncode != 0:
        raise AssertionError(f"mlxsup {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@dataclass
class Server:
    """One running instance started by `mlxsup start` (a daemon)."""

    run_dir: str
    port: int
    model: str
    start_output: subprocess.CompletedProcess = None
    segments: set = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def status(self) -> dict:
        return protocol.call(self.run_dir, {"op": "status"})

    def pids(self, role: str) -> list[int]:
        return [p["pid"] for p in self.status()["processes"] if p["role"] == role]

    def version(self) -> int:
        return self.status()["policy_version"]


def start_server(
    tmp_path, model: str, *extra: str, workers: int = 2, host: str = "127.0.0.1", name: str = "run",
    env: dict | None = None,
) -> Server:
    run_dir = str(tmp_path / name)
    port = free_port()
    out = mlxsup(
        "start", "--model", model, "--host", host, "--port", str(port), "--run-dir", run_dir,
        "--workers", str(workers), *extra, timeout=300, env=env,
    )  # fmt: skip
    server = Server(run_dir=run_dir, port=port, model=model, start_output=out)
    server.segments = instance_segments(run_dir)
    if out.returncode != 0:
        stop_server(server)
        raise AssertionError(f"mlxsup start failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n{logs(run_dir)}")
    return server


def instance_segments(run_dir: str) -> set[str]:
    try:
        with open(os.path.join(run_dir, "ipc.json")) as f:
            instance = json.load(f)["instance_id"]
    except (OSError, ValueError, KeyError):
        return set()
    return {n for n in os.listdir(SHM) if n.startswith(f"mxs_{instance}_")} | {
        f"mxs_{instance}_c"
    }


def logs(run_dir: str, tail: int = 40) -> str:
    parts = []
    for name in ("supervisor.log", "engine.log", "api.log"):
        path = os.path.join(run_dir, name)
        with contextlib.suppress(OSError):
            lines = open(path, errors="replace").read().splitlines()[-tail:]
            parts.append(f"--- {name}\n" + "\n".join(lines))
    return "\n".join(parts)


def stop_server(server: Server) -> None:
    """Stop the instance whatever state it is in, then kill anything of it that is left."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        mlxsup("stop", "--run-dir", server.run_dir, timeout=90)
    for proc in orphans(server.run_dir):
        with contextlib.suppress(Exception):
            proc.kill()


def assert_nothing_left(server: Server) -> None:
    """No process, shared-memory segment, socket, doorbell or pid file of the instance."""
    run_dir = server.run_dir
    assert not is_owned(run_dir), "a supervisor still owns the run dir"
    assert orphans(run_dir) == [], f"processes remain: {orphans(run_dir)}"
    left = set(os.listdir(run_dir)) if os.path.isdir(run_dir) else set()
    for name in ("control.sock", "supervisor.pid", "children.json", "ipc.json", "shm.manifest", "engine.bell"):
        assert name not in left, f"{name} remains in the run dir"
    assert not [n for n in left if n.startswith("slot-")], "slot doorbells or locks remain"
    segs = server.segments | instance_segments(run_dir)
    assert not (segs & set(os.listdir(SHM))), f"segments remain: {segs & set(os.listdir(SHM))}"
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
