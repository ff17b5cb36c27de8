"""The run directory: who owns it, what a dead owner left behind, and its log files.

A live supervisor holds an exclusive `flock` on the run directory itself for its whole life.
The kernel drops the lock when the process dies, however it dies, so "is a supervisor alive
here?" never depends on a pid file that may be stale or on a pid that was reused.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from typing import Optional

from mlxsup.files import write_atomic
from mlxsup.supervisor import protocol
from mlxsup.supervisor.children import CHILDREN_NAME, kill_all, orphans

log = logging.getLogger("mlxsup.supervisor")

PID_NAME = "supervisor.pid"
SUPERVISOR_LOG = "supervisor.log"


def lock_run_dir(run_dir: str) -> Optional[int]:
    """Take the run dir's lock; return its fd (keep it open to keep the lock), or None when a
    live supervisor holds it. Creates the directory (mode 0700) if needed."""
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def is_owned(run_dir: str) -> bool:
    """True when a live supervisor holds the run dir."""
    if not os.path.isdir(run_dir):
        return False
    fd = lock_run_dir(run_dir)
    if fd is None:
        return True
    os.close(fd)  # closing drops the lock we just took
    return False


def read_pid(run_dir: str) -> Optional[int]:
    try:
        with open(os.path.join(run_dir, PID_NAME)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def write_pid(run_dir: str) -> None:
    write_atomic(os.path.join(run_dir, PID_NAME), f"{os.getpid()}\n")


def cleanup_stale(run_dir: str) -> list[str]:
    """Remove what a dead supervisor left: its children, shared-memory segments, doorbells,
    control socket and pid files. Call only while holding the run dir's lock. Returns a list
    of what was cleaned, for the log."""
    cleaned = []
    leftovers = orphans(run_dir)
    if leftovers:
        cleaned.append("killed leftover processes " + ", ".join(str(p.pid) for p in leftovers))
        kill_all(leftovers)
    try:
        from mlxsup.ipc.segments import remove_stale
    except ImportError:  # the IPC package is not installed in this tree
        remove_stale = None
    if remove_stale is not None:
        removed = remove_stale(run_dir)
        if removed:
            cleaned.append(f"removed stale IPC objects: {removed}")
    for name in (protocol.SOCKET_NAME, PID_NAME, CHILDREN_NAME):
        path = os.path.join(run_dir, name)
        if os.path.lexists(path):
            os.unlink(path)
            cleaned.append(f"removed {name}")
    return cleaned


def log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def log_tail(path: str, num_lines: int = 20, since: int = 0, max_bytes: int = 16384) -> str:
    """The last lines of a log file written after offset `since` (for error messages)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(since, size - max_bytes, 0))
            data = f.read()
    except OSError:
        return f"({path} is missing)"
    lines = data.decode("utf-8", "replace").splitlines()[-num_lines:]
    return "\n".join(lines) if lines else f"({path} is empty)"
