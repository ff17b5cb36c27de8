"""The systems under test: start, identify the processes to measure, stop.

- `MlxsupServer`: `python -m mlxsup start` (a daemon that returns once healthy), stopped with
  `python -m mlxsup stop`; its process tree is the supervisor's.
- `MlxLmServer`: `python -m mlx_lm server`, one process.
- the raw loop runs through `rawloop.py` (see bench_server.py).

Every server listens on 127.0.0.1 only, on a free port, with the same environment (the one
`mlxsup.blas.engine_env` builds) so the same BLAS does the matrix products everywhere.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


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

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlxsup", "start", "--model", self.model,
               "--host", HOST, "--port", str(self.port), "--run-dir", self.run_dir,
               "--max-batch", str(self.max_batch), "--max-tokens", str(self.max_tokens),
               "--log-level", "WARNING"]
        if self.workers:
            cmd += ["--workers", str(self.workers)]
        max_queue = max(256, 4 * self.max_batch)
        cmd += ["--max-queue", str(max_queue)] + self.extra_args
        return cmd

    def start(self) -> None:
        with open(self.log_path, "w") as log:
            done = subprocess.run(self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=self.start_timeout, cwd=self.work_dir)
        if done.returncode != 0:
            with open(self.log_path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"mlxsup start exited {done.returncode}:\n{tail}")
        self.root_pid = _read_pid(os.path.join(self.run_dir, "supervisor.pid"))
        wait_http(self.base_url + "/health", 120)

    def stop(self) -> None:
        try:
            subprocess.run([sys.executable, "-m", "mlxsup", "stop", "--run-dir", self.run_dir],
                           env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           stdin=subprocess.DEVNULL, timeout=120, cwd=self.work_dir)
        except subprocess.TimeoutExpired:
            pass
        _wait_gone(self.root_pid, 60)

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


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_gone(pid: Optional[int], timeout: float) -> None:
    if not pid:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.2)
    try:  # it is the supervisor this benchmark started: stop it for good
        os.kill(pid, signal.SIGTERM)
        time.sleep(5)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
