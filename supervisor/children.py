"""Spawning children that die with the supervisor, and the record of them in the run dir.

The supervisor's child table lives in `Arbiter`; this module only knows how to start one child
and how to find and kill the children of a supervisor that was itself killed (`children.json`
in the run dir, written whenever the table changes, and the MLXSUP_RUN_DIR each child carries
in its environment).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import psutil

from mlxsup.config import RUN_DIR_ENV
from mlxsup.files import write_json_atomic

CHILDREN_NAME = "children.json"
# Set only by the supervisor on its children, to find their leftovers; a user's shell may
# well export MLXSUP_RUN_DIR, and must never be taken for a leftover.
MARK_ENV = "MLXSUP_SUPERVISED_RUN_DIR"

_PR_SET_PDEATHSIG = 1

# Resolved before any fork: the code between fork and exec must not load libraries or allocate.
_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        _prctl = None


def _die_with_parent(sig: int, parent_pid: int):
    """A preexec_fn: the kernel sends `sig` to the child when the supervisor dies (Linux)."""

    def preexec():
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        # The parent may have died before prctl took effect.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


@dataclass
class Child:
    """One running child of the supervisor."""

    role: str  # "engine" or "gunicorn"
    proc: subprocess.Popen
    started_at: float = field(default_factory=time.monotonic)
    epoch: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def uptime_s(self, now: Optional[float] = None) -> float:
        return (now if now is not None else time.monotonic()) - self.started_at


def spawn(
    role: str,
    argv: Sequence[str],
    env: dict,
    log_path: str,
    pass_fds: Sequence[int] = (),
    death_signal: int = signal.SIGKILL,
    epoch: int = 0,
) -> Child:
    """Start `argv` with stdout and stderr appended to `log_path`, in its own process group,
    receiving `death_signal` if the supervisor dies."""
    with open(log_path, "ab", buffering=0) as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            start_new_session=True,  # a Ctrl-C in a foreground terminal reaches only the supervisor
            preexec_fn=_die_with_parent(death_signal, os.getpid()),
        )
    return Child(role=role, proc=proc, epoch=epoch)


def child_env(base, run_dir: str) -> dict:
    """`base` plus the run dir, for a child of the supervisor of `run_dir`."""
    env = dict(base)
    env[RUN_DIR_ENV] = run_dir
    env[MARK_ENV] = run_dir
    return env


def write_children(run_dir: str, children: Sequence[Child]) -> None:
    """Record pid and start time of every child, so a later start can kill orphans."""
    records = []
    for child in children:
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.Error:
            continue
        records.append({"role": child.role, "pid": child.pid, "create_time": create_time})
    write_json_atomic(os.path.join(run_dir, CHILDREN_NAME), records, indent=None)


def orphans(run_dir: str) -> list[psutil.Process]:
    """Processes left by a dead supervisor of `run_dir`: those recorded in children.json
    (matched by pid and start time, so a reused pid is never hit) and any process carrying
    the supervisor's mark for this run dir in its environment (gunicorn workers, which are
    not recorded). Never this process or its ancestors."""
    found: dict[int, psutil.Process] = {}
    run_dir = os.path.realpath(run_dir)
    try:
        with open(os.path.join(run_dir, CHILDREN_NAME)) as f:
            records = json.load(f)
    except (OSError, ValueError):
        records = []
    for rec in records if isinstance(records, list) else []:
        try:
            proc = psutil.Process(int(rec["pid"]))
            if abs(proc.create_time() - float(rec["create_time"])) < 0.01:
                found[proc.pid] = proc
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue
    spared = {os.getpid()}
    try:
        spared |= {p.pid for p in psutil.Process().parents()}
    except psutil.Error:
        pass
    for pid in spared:
        found.pop(pid, None)
    for proc in psutil.process_iter():
        if proc.pid in spared or proc.pid in found:
            continue
        try:
            value = proc.environ().get(MARK_ENV)
        except (psutil.Error, OSError):
            continue
        if value and os.path.realpath(value) == run_dir:
            found[proc.pid] = proc
    return [p for p in found.values() if _is_alive(p)]


def _is_alive(proc: psutil.Process) -> bool:
    """Running, not a zombie (a zombie is dead; whoever adopted it has yet to reap it)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_all(procs: Sequence[psutil.Process], timeout: float = 5.0) -> None:
    """SIGKILL every process and wait for them to be gone."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(procs), timeout=timeout)


def remove_children_file(run_dir: str) -> None:
    try:
        os.unlink(os.path.join(run_dir, CHILDREN_NAME))
    except FileNotFoundError:
        pass
