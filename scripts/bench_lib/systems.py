"""The systems under test: start, identify the processes to measure, stop.

- `MlxsupServer`: `python -m mlxsup start` (a daemon that returns once healthy), stopped with
  `python -m mlxsup stop`, through mlxsup.local_server; its process tree is the supervisor's.
- `MlxLmServer`: `python -m mlx_lm server`, one process.
- the raw loop runs through `rawloop.py` (see bench_server.py).

Every server listens on 127.0.0.1 only, on a free port, with the same environment (the one
`mlxsup.blas.engine_env` builds) so the same BLAS does the matrix products everywhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    from mlxsup.supervisor.launcher import free_port  # after the import shim (mlxsup_import_env)

    return free_port(HOST)


def mlxsup_import_env(repo_root: str, work_dir: str) -> dict:
    """PYTHONPATH additions that make `mlxsup` and its subpackages importable without an
    install (the GPU machine has no pip install of the project): a folder with a `mlxsup`
    package whose subpackages are symlinks to the repository's folders. Children must not run
    in the repository's root, where `python -m` would find the bare `mlxsup/` folder first."""
    try:
        import importlib.util

        if importlib.util.find_spec("mlxsup.engine") is not None:
            return {}
    except ImportError:
        pass
    shim = os.path.join(work_dir, "pyshim")
    pkg = os.path.join(shim, "mlxsup")
    os.makedirs(pkg, exist_ok=True)
    for name in os.listdir(os.path.join(repo_root, "mlxsup")):
        _symlink(os.path.join(repo_root, "mlxsup", name), os.path.join(pkg, name))
    for sub in ("engine", "api", "ipc", "supervisor"):
        if os.path.isdir(os.path.join(repo_root, sub)):
            _symlink(os.path.join(repo_root, sub), os.path.join(pkg, sub))
    sys.path.insert(0, shim)
    for name in [m for m in sys.modules if m == "mlxsup" or m.startswith("mlxsup.")]:
        del sys.modules[name]  # find_spec imported the bare folder: import again from the shim
    old = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": shim + (os.pathsep + old if old else "")}


def _symlink(src: str, dst: str) -> None:
    if not os.path.lexists(dst):
        os.symlink(src, dst)


def wait_http(url: str, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code < 500:
                return
            last = r.status_code
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready within {timeout:.0f} s: {last}")


class Server:
    name: str
    kind: str  # "mlxsup" or "mlx_lm"
    base_url: str
    root_pid: Optional[int] = None
    supports_n = False
    supports_stream = True

    def start(self) -> None: ...

    def stop(self) -> None: ...


class MlxsupServer(Server):
    """mlxsup.local_server's `start_server` with the benchmark's flags, environment and cwd."""

    kind = "mlxsup"
    supports_n = True

    def __init__(self, name: str, model: str, max_batch: int, max_tokens: int, env: dict,
                 work_dir: str, workers: Optional[int] = None, extra_args=(),
                 start_timeout: float = 600.0):
        self.name = name
        self.model = model
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.env = env
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.work_dir = work_dir  # the cwd of every child: not the repository (see mlxsup_import_env)
        self.run_dir = os.path.join(work_dir, f"run-{name}")
        self.log_path = os.path.join(work_dir, f"{name}.start.log")
        self.workers = workers
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.server = None  # the LocalServer once started

    def flags(self) -> list[str]:
        flags = ["--max-batch", str(self.max_batch), "--max-tokens", str(self.max_tokens), "--log-level", "WARNING"]
        if self.workers:
            flags += ["--workers", str(self.workers)]
        max_queue = max(256, 4 * self.max_batch)
        return flags + ["--max-queue", str(max_queue)] + self.extra_args

    def command(self) -> list[str]:
        """The `mlxsup start` command line `start` runs (for the report)."""
        return [sys.executable, "-m", "mlxsup", "start", "--model", self.model, "--host", HOST,
                "--port", str(self.port), "--run-dir", self.run_dir, *self.flags()]

    def start(self) -> None:
        from mlxsup.local_server import ServerStartError, start_server  # after the import shim

        try:
            self.server = start_server(self.model, self.run_dir, *self.flags(), host=HOST, port=self.port,
                                       env=self.env, cwd=self.work_dir, timeout=self.start_timeout)
        except ServerStartError as e:
            with open(self.log_path, "w") as log:
                log.write(str(e))
            raise RuntimeError(f"mlxsup start failed:\n{str(e)[-3000:]}") from None
        with open(self.log_path, "w") as log:
            log.write(self.server.start_output.stdout + self.server.start_output.stderr)
        self.root_pid = self.server.supervisor.pid if self.server.supervisor else None
        wait_http(self.base_url + "/health", 120)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=120)

    def logs(self) -> list[str]:
        if not os.path.isdir(self.run_dir):
            return [self.log_path]
        return [self.log_path] + [os.path.join(self.run_dir, n) for n in sorted(os.listdir(self.run_dir))
                                  if n.endswith(".log")]


class MlxLmServer(Server):
    kind = "mlx_lm"

    def __init__(self, name: str, model: str, max_tokens: int, env: dict, work_dir: str,
                 decode_concurrency: Optional[int] = None, prompt_concurrency: Optional[int] = None):
        self.name = name
        self.model = model
        self.max_tokens = max_tokens
        self.env = env
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.work_dir = work_dir
        self.log_path = os.path.join(work_dir, f"{name}.log")
        self.decode_concurrency = decode_concurrency
        self.prompt_concurrency = prompt_concurrency
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", self.model, "--host", HOST,
               "--port", str(self.port), "--max-tokens", str(self.max_tokens),
               "--log-level", "WARNING"]
        if self.decode_concurrency:
            cmd += ["--decode-concurrency", str(self.decode_concurrency)]
        if self.prompt_concurrency:
            cmd += ["--prompt-concurrency", str(self.prompt_concurrency)]
        return cmd

    def start(self) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.work_dir)
        self.root_pid = self.proc.pid
        wait_http(self.base_url + "/health", 300, self.proc)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def logs(self) -> list[str]:
        return [self.log_path]
