"""What `mlxsup start` and `mlxsup stop` do around the supervisor process.

`start` checks everything it can before detaching (a live supervisor in the run dir, a port
in use, paths that do not exist), builds the demo model if needed, then double-forks the
daemon and waits on a pipe until the daemon reports the server healthy or gives the reason it
failed. Nothing here imports mlx: the supervisor forks, and a process must never fork after
MLX has run.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Callable, Optional

from mlxsup.blas import blas_warning
from mlxsup.config import EXIT_BOOT_ERROR, EXIT_ERROR, EXIT_IN_USE, EXIT_OK, ServerConfig
from mlxsup.supervisor import protocol
from mlxsup.supervisor.children import kill_all, orphans
from mlxsup.supervisor.rundir import (
    SUPERVISOR_LOG,
    cleanup_stale,
    is_owned,
    lock_run_dir,
    log_size,
    log_tail,
    read_pid,
)

log = logging.getLogger("mlxsup.supervisor")

START_WAIT_S = 2000.0  # the supervisor itself gives up on an engine not ready after 1800 s
STOP_WAIT_S = 120.0


class StartError(Exception):
    """`mlxsup start` cannot go ahead; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------- checks before start


def prepare_config(config: ServerConfig, demo_builder: Optional[Callable[[], str]] = None) -> ServerConfig:
    """Make every path absolute (the daemon runs from /) and fill in the demo model's path.

    `--model` may also be a Hugging Face repo id; it is kept as given when no such path
    exists here."""
    changes: dict = {"run_dir": os.path.abspath(os.path.expanduser(config.run_dir))}
    if config.port == 0:
        raise StartError("--port 0 is not supported: give the port clients will use")
    if config.model is None:
        changes["model"] = (demo_builder or ensure_demo_model)()
    elif os.path.exists(os.path.expanduser(config.model)):
        changes["model"] = os.path.abspath(os.path.expanduser(config.model))
    elif config.model.startswith((".", "/", "~")):
        raise StartError(f"--model {config.model}: no such file or directory")
    if config.adapter_path is not None:
        path = os.path.abspath(os.path.expanduser(config.adapter_path))
        if not os.path.isdir(path):
            raise StartError(f"--adapter-path {config.adapter_path}: no such directory")
        changes["adapter_path"] = path
    if config.adapter_root is not None:
        root = os.path.realpath(os.path.expanduser(config.adapter_root))
        if not os.path.isdir(root):
            raise StartError(f"--adapter-root {config.adapter_root}: no such directory")
        changes["adapter_root"] = root
    if config.hostfile is not None:
        changes["hostfile"] = os.path.abspath(os.path.expanduser(config.hostfile))
    config = dataclasses.replace(config, **changes)
    from mlxsup.supervisor.ranks import RankError, group_of  # (it imports free_port from here)

    try:
        group_of(config)  # a hostfile or backend that cannot work fails here, in the terminal
    except RankError as e:
        raise StartError(str(e)) from e
    return config


def ensure_demo_model() -> str:
    """The cached demo model's path, built first if missing. Built in a child process so
    that this process (which forks the daemon next) never loads numpy's thread pools."""
    code = "from mlxsup.demo import ensure_demo_model; print(ensure_demo_model())"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=600
        )
    except subprocess.CalledProcessError as e:
        raise StartError(f"could not build the demo model:\n{e.stderr.strip()}") from e
    except subprocess.TimeoutExpired as e:
        raise StartError("building the demo model took more than 10 minutes") from e
    return out.stdout.strip().splitlines()[-1]


def check_port(host: str, port: int) -> None:
    """Raise StartError if (host, port) cannot be bound, as gunicorn would bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as e:
            raise StartError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at `host` now (for the tests, scripts and examples that
    start servers of their own)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_loopback_host(host: str) -> bool:
    """Whether listening on `host` (a name or address from --host) stays on this machine."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(config: ServerConfig) -> Optional[str]:
    """What anyone who can reach the port may do, when the server listens beyond loopback
    without keys; None when nothing is exposed."""
    if is_loopback_host(config.host):
        return None
    open_routes = []
    if config.api_key is None:
        open_routes.append(
            "generation and scoring (/generate, /score, /v1/*) and the server's metrics are open "
            "to anyone who can reach this port (set --api-key)"
        )
    if config.admin_key is None:
        open_routes.append(
            "adapter routes (/load_adapter, /upload_adapter) accept loopback clients only; "
            "set --admin-key to allow remote trainers"
        )
    if config.api_key is None:
        where = "all interfaces" if config.host in ("0.0.0.0", "::", "") else config.host
        lines = [f"WARNING: mlxsup listens on {where} port {config.port} WITHOUT an API key."]
        lines += [f"WARNING:   {line}" for line in open_routes]
        lines.append("WARNING: bind to 127.0.0.1 (--host 127.0.0.1) to keep it on this machine.")
        return "\n".join(lines)
    return None


# ---------------------------------------------------------------------- logging


def configure_logging(config: ServerConfig, to_stderr: bool, to_file: bool) -> None:
    root = logging.getLogger("mlxsup")
    root.setLevel(config.log_level)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s [%(process)d] %(levelname)s supervisor: %(message)s")
    if to_stderr:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    if to_file:
        handler = logging.FileHandler(os.path.join(config.run_dir, SUPERVISOR_LOG))
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


# ---------------------------------------------------------------------- start


def start(config: ServerConfig, foreground: bool = False, out=None, err=None, **arbiter_options) -> int:
    """Start a server for `config`; in the background unless `foreground`. Returns the exit
    code: 0 healthy (daemon) or stopped cleanly (foreground), 1 error, 3 boot failure, 4 the
    run dir is in use. `arbiter_options` go to `Arbiter` (tests replace the children)."""
    out = out if out is not None else sys.stdout  # (looked up per call: a default bound at import
    err = err if err is not None else sys.stderr  # outlives a redirected sys.stderr)
    try:
        if is_owned(config.run_dir):
            pid = read_pid(config.run_dir)
            raise StartError(
                f"a supervisor (pid {pid}) already runs in {config.run_dir}; "
                f"stop it with `mlxsup stop --run-dir {config.run_dir}` or pick another --port/--run-dir",
                EXIT_IN_USE,
            )
        config = prepare_config(config)
        check_port(config.host, config.port)
    except StartError as e:
        print(f"mlxsup start: {e}", file=err)
        return e.exit_code
    warning = "\n".join(w for w in (exposure_warning(config), blas_warning(config.blas)) if w) or None
    if warning:
        print(warning, file=err)
    if foreground:
        return _run_supervisor(config, None, True, warning, arbiter_options)
    return _start_daemon(config, out, err, warning, arbiter_options)


def _run_supervisor(
    config: ServerConfig, notify_fd: Optional[int], foreground: bool, warning: Optional[str], arbiter_options: dict
) -> int:
    """Become the supervisor of `config.run_dir` (in this process) and run until stopped."""
    from mlxsup.supervisor.arbiter import Arbiter

    lock_fd = None
    for _ in range(20):  # a concurrent `status` holds the lock for microseconds
        lock_fd = lock_run_dir(config.run_dir)
        if lock_fd is not None:
            break
        time.sleep(0.05)
    if lock_fd is None:
        message = f"another supervisor took {config.run_dir} first"
        if notify_fd is not None:
            os.write(notify_fd, json.dumps({"ok": False, "error": message, "exit_code": EXIT_IN_USE}).encode() + b"\n")
        else:
            print(f"mlxsup start: {message}", file=sys.stderr)
        return EXIT_IN_USE
    configure_logging(config, to_stderr=True, to_file=foreground)
    if warning:
        for line in warning.splitlines():
            log.warning(line.removeprefix("WARNING: "))
    for note in cleanup_stale(config.run_dir):
        log.warning("a previous supervisor died: %s", note)
    return Arbiter(config, notify_fd=notify_fd, lock_fd=lock_fd, **arbiter_options).run()


def _start_daemon(config: ServerConfig, out, err, warning: Optional[str], arbiter_options: dict) -> int:
    os.makedirs(config.run_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(config.run_dir, SUPERVISOR_LOG)
    log_at = log_size(log_path)
    read_fd, write_fd = os.pipe()
    out.flush()
    err.flush()
    pid = os.fork()
    if pid == 0:  # first child: leave the terminal's session, fork the daemon, exit
        code = EXIT_ERROR
        try:
            os.close(read_fd)
            os.setsid()
            if os.fork() == 0:
                _daemon_main(config, write_fd, log_path, warning, arbiter_options)  # never returns
            code = EXIT_OK
        finally:
            os._exit(code)
    os.close(write_fd)
    os.waitpid(pid, 0)
    reply = _read_notification(read_fd, START_WAIT_S)
    os.close(read_fd)
    if reply is None:
        print(
            "mlxsup start: the supervisor exited before the server was healthy; "
            f"last lines of {log_path}:\n{log_tail(log_path, since=log_at)}",
            file=err,
        )
        return EXIT_ERROR
    if reply.get("ok"):
        print(
            f"mlxsup: serving {config.model} at {reply.get('url')} "
            f"(supervisor pid {reply.get('pid')}, run dir {config.run_dir})",
            file=out,
        )
        return EXIT_OK
    print(f"mlxsup start: {reply.get('error')}", file=err)
    print(f"mlxsup start: logs are in {config.run_dir}", file=err)
    return int(reply.get("exit_code") or EXIT_BOOT_ERROR)


def _daemon_main(
    config: ServerConfig, notify_fd: int, log_path: str, warning: Optional[str], arbiter_options: dict
) -> None:
    """The daemon: detached from the terminal, output into supervisor.log, cwd /."""
    code = EXIT_ERROR
    try:
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(null)
        os.close(logfd)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        code = _run_supervisor(config, notify_fd, False, warning, arbiter_options)
    except BaseException:
        traceback.print_exc()
        try:
            os.write(notify_fd, json.dumps({"ok": False, "error": "the supervisor crashed; see supervisor.log", "exit_code": EXIT_ERROR}).encode() + b"\n")
        except OSError:
            pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _read_notification(fd: int, timeout: float) -> Optional[dict]:
    """One JSON line from the daemon, or None if it closed the pipe without one."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return {"ok": False, "error": f"the server was not healthy after {timeout:.0f}s"}
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    if not buf.strip():
        return None
    try:
        return json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        return None


# ---------------------------------------------------------------------- stop


def stop(run_dir: str, timeout: float = STOP_WAIT_S, out=sys.stdout, err=sys.stderr) -> int:
    """Stop the server of `run_dir` gracefully and wait until nothing of it remains. Returns 0
    when a server was stopped, 1 when none was running (leftovers of a dead one are removed
    either way)."""
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    if not is_owned(run_dir):
        notes = _clean_if_free(run_dir)
        print(f"mlxsup: no server is running in {run_dir}", file=err)
        for note in notes:
            print(f"mlxsup: {note}", file=err)
        return EXIT_ERROR
    pid = read_pid(run_dir)
    try:
        protocol.call(run_dir, {"op": "stop"}, timeout=10.0)
    except protocol.ControlError:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while is_owned(run_dir):
        if time.monotonic() > deadline:
            print(f"mlxsup stop: the supervisor (pid {pid}) did not stop within {timeout:.0f}s; killing it", file=err)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
            break
        time.sleep(0.1)
    for note in _clean_if_free(run_dir):
        print(f"mlxsup stop: {note}", file=err)
    print(f"mlxsup: stopped the server in {run_dir}", file=out)
    return EXIT_OK


def _clean_if_free(run_dir: str) -> list[str]:
    if not os.path.isdir(run_dir):
        return []
    fd = lock_run_dir(run_dir)
    if fd is None:
        return []
    try:
        return cleanup_stale(run_dir)
    finally:
        os.close(fd)


def leftovers(run_dir: str) -> list[int]:
    """Pids of processes that still belong to `run_dir` (for checks and tests)."""
    return [p.pid for p in orphans(run_dir)]


__all__ = ["start", "stop", "prepare_config", "exposure_warning", "StartError", "kill_all", "leftovers"]
