"""A server this process starts and stops itself: `mlxsup start` on a free loopback port (the
daemon returns once the server is healthy), `mlxsup stop`, and what an instance left behind.

The tests (tests/e2e_support.py), the load, soak and benchmark scripts and `examples/grpo.py
--start` all start their servers with `start_server`:

    with start_server(model_dir, run_dir, "--workers", "2") as server:
        httpx.post(server.url + "/generate", json={"prompt": "hi"})

Leaving the `with` block stops the server whatever happened and kills anything of the
instance still running; `stop()` also says what was left (processes, /dev/shm segments, run
directory files), which the tests and the soak require to be nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import psutil

from mlxsup.supervisor import protocol
from mlxsup.supervisor.children import orphans
from mlxsup.supervisor.launcher import free_port
from mlxsup.supervisor.rundir import read_pid

SHM = "/dev/shm"
HOST = "127.0.0.1"
# What a stopped instance must have removed from its run directory (slot-* files besides).
RUNTIME_FILES = ("control.sock", "supervisor.pid", "children.json", "ipc.json", "shm.manifest", "engine.bell")
LOG_FILES = ("supervisor.log", "engine.log", "api.log")


class ServerStartError(RuntimeError):
    """`mlxsup start` failed; the message holds its output and the tails of the instance's logs."""


def run_mlxsup(*args: str, timeout: float = 120.0, env: Optional[dict] = None,
               cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """`python -m mlxsup ARGS` in a child (output captured as text); `env` is added to this
    process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "mlxsup", *args], capture_output=True, text=True, timeout=timeout,
        env=None if env is None else dict(os.environ, **env), cwd=cwd, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def instance_id(run_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(run_dir, "ipc.json")) as f:
            return json.load(f)["instance_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def instance_segments(run_dir: str) -> set[str]:
    """The instance's shared-memory segments now in /dev/shm, and the name of its control block."""
    iid = instance_id(run_dir)
    if iid is None or not os.path.isdir(SHM):
        return set()
    return {n for n in os.listdir(SHM) if n.startswith(f"mxs_{iid}_")} | {f"mxs_{iid}_c"}


def log_tails(run_dir: str, tail: int = 40) -> str:
    """The last `tail` lines of each of the instance's logs, for a failure's message."""
    parts = []
    for name in LOG_FILES:
        with contextlib.suppress(OSError):
            with open(os.path.join(run_dir, name), errors="replace") as f:
                lines = f.read().splitlines()[-tail:]
            parts.append(f"--- {name}\n" + "\n".join(lines))
    return "\n".join(parts)


@dataclass
class LocalServer:
    """One instance started by `start_server` (a daemon: this process is not its parent)."""

    run_dir: str
    port: int
    host: str = HOST
    model: Optional[str] = None
    start_output: Optional[subprocess.CompletedProcess] = None
    segments: set = field(default_factory=set)  # seen at start: checked again after the stop
    env: Optional[dict] = None  # for `mlxsup stop` as for `mlxsup start`
    cwd: Optional[str] = None
    supervisor: Optional[psutil.Process] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, timeout: float = 60.0):
        import httpx  # the `client` extra: only the tests and scripts that talk HTTP need it

        return httpx.Client(base_url=self.url, timeout=timeout)

    def status(self) -> dict:
        """The supervisor's status (control socket): processes, policy version, last swap."""
        return protocol.call(self.run_dir, {"op": "status"})

    def pids(self, role: str) -> list[int]:
        return [p["pid"] for p in self.status()["processes"] if p["role"] == role]

    def version(self) -> int:
        return self.status()["policy_version"]

    def instance_id(self) -> Optional[str]:
        return instance_id(self.run_dir)

    def live_segments(self) -> set[str]:
        """The instance's segments (those seen at start included) still in /dev/shm."""
        names = self.segments | instance_segments(self.run_dir)
        return names & set(os.listdir(SHM)) if os.path.isdir(SHM) else set()

    def logs(self, tail: int = 40) -> str:
        return log_tails(self.run_dir, tail)

    def leftovers(self) -> dict:
        """What of the instance exists now: processes (pids), segments and run-dir files."""
        procs = {p.pid for p in orphans(self.run_dir)}
        with contextlib.suppress(psutil.Error, AttributeError):  # a zombie is gone (unreaped: not our child)
            if self.supervisor.is_running() and self.supervisor.status() != psutil.STATUS_ZOMBIE:
                procs.add(self.supervisor.pid)
        left = set(os.listdir(self.run_dir)) if os.path.isdir(self.run_dir) else set()
        return {
            "processes": sorted(procs),
            "segments": sorted(self.live_segments()),
            "files": sorted(n for n in left if n in RUNTIME_FILES or n.startswith("slot-")),
        }

    def stop(self, timeout: float = 120.0) -> dict:
        """`mlxsup stop`, then kill whatever of the instance still runs. Returns what was left
        once `mlxsup stop` returned, with its exit code (None: it timed out)."""
        try:
            code = run_mlxsup("stop", "--run-dir", self.run_dir, timeout=timeout, env=self.env, cwd=self.cwd).returncode
        except subprocess.TimeoutExpired:
            code = None
        left = dict(self.leftovers(), stop_exit_code=code)
        for proc in orphans(self.run_dir) + ([self.supervisor] if self.supervisor else []):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return left

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(model: Optional[str], run_dir: str, *flags: str, host: str = HOST, port: Optional[int] = None,
                 env: Optional[dict] = None, cwd: Optional[str] = None, timeout: float = 300.0) -> LocalServer:
    """`mlxsup start --model MODEL --host HOST --port PORT --run-dir RUN_DIR FLAGS...` (no
    --model for None: the demo model), on a free port unless `port` is given; returns once the
    server is healthy. On failure it stops what was started and raises ServerStartError."""
    port = port or free_port(host)
    run_dir = os.path.abspath(run_dir)
    args = ["start", *(["--model", model] if model else []), "--host", host, "--port", str(port),
            "--run-dir", run_dir, *flags]  # fmt: skip
    try:
        out = run_mlxsup(*args, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        said = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        out = subprocess.CompletedProcess(e.cmd, -1, said, f"timed out after {timeout:.0f} s")
    server = LocalServer(run_dir=run_dir, port=port, host=host, model=model, start_output=out,
                         segments=instance_segments(run_dir), env=env, cwd=cwd)
    pid = read_pid(run_dir)
    with contextlib.suppress(psutil.Error, TypeError):
        server.supervisor = psutil.Process(pid)
    if out.returncode != 0:
        server.stop()
        raise ServerStartError(f"mlxsup {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n"
                               f"{log_tails(run_dir)}")
    return server
