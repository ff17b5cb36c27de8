"""The engine process's links to its supervisor: the control socket (JSON lines, read by a
thread) and the control block's publisher (the engine region's only writer, a heartbeat
thread). Neither touches MLX."""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Optional

log = logging.getLogger("mlxsup.engine")

HEARTBEAT_S = 0.1
STALL_S = 60.0  # the publisher stops the heartbeat when the main loop made no progress this long
ADAPTER_STATE = "adapter_state.json"
RECEIVED_AT = "_received_at"  # added to each command: time.perf_counter() when the line was read


def read_adapter_state(run_dir: str) -> tuple[Optional[str], Optional[int]]:
    """(adapter_path, policy_version) committed in the run dir, or (None, None) without one."""
    try:
        with open(os.path.join(run_dir, ADAPTER_STATE)) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, None
    path, version = data.get("adapter_path"), data.get("policy_version", 0)
    if (path is not None and not isinstance(path, str)) or not isinstance(version, int):
        raise ValueError(f"{ADAPTER_STATE} has fields of the wrong type")
    return path, version


def read_weight_dirs(run_dir: str) -> tuple:
    """The committed weight updates' directories, oldest first (replayed at start)."""
    try:
        with open(os.path.join(run_dir, ADAPTER_STATE)) as f:
            data = json.load(f)
    except FileNotFoundError:
        return ()
    entries = data.get("weights") or []
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) for e in entries):
        raise ValueError(f"{ADAPTER_STATE}: weights must be a list of {{path, tensors}}")
    return tuple(e["path"] for e in entries)


class Publisher(threading.Thread):
    """Writes the engine's fields into the control block (its only writer)."""

    def __init__(self, control, fields: dict):
        super().__init__(name="engine-publisher", daemon=True)
        self.control = control
        self._fields = dict(fields)
        self._lock = threading.Lock()
        self._progress = time.monotonic()
        self._halt = threading.Event()
        self._write_lock = threading.Lock()  # one writer at a time, whichever thread

    def write_now(self) -> None:
        """Write the current fields at once (before telling the supervisor we are ready)."""
        with self._lock:
            fields = dict(self._fields)
        with self._write_lock:
            self.control.write(**fields)

    def update(self, **fields) -> None:
        """Called by the main loop every iteration: new values, and proof of progress."""
        with self._lock:
            self._fields.update(fields)
            self._progress = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set():
            with self._lock:
                fields, progress = dict(self._fields), self._progress
            if time.monotonic() - progress < STALL_S:
                try:
                    with self._write_lock:
                        self.control.write(**fields)
                except Exception:  # the segment went away: the supervisor is stopping us
                    log.exception("control block write failed")
            self._halt.wait(HEARTBEAT_S)

    def finish(self, **final) -> None:
        """Stop heartbeating after one last write of `final` fields."""
        self._halt.set()
        self.join(timeout=1)
        with self._lock:
            self._fields.update(final)
        try:
            self.control.write(**self._fields)
        except Exception:
            pass


class ControlLink:
    """JSON lines over the supervisor's socketpair. A reader thread queues incoming commands
    and rings `wake` so the main loop notices at once; the main thread sends replies."""

    def __init__(self, fd: int, wake):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self.inbox: "queue.Queue[dict]" = queue.Queue()
        self.closed = threading.Event()
        self._wake = wake
        self._thread = threading.Thread(target=self._read, name="engine-control", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        log.warning("unreadable control line: %r", line[:200])
                        continue
                    if isinstance(msg, dict):
                        msg[RECEIVED_AT] = time.perf_counter()
                        self.inbox.put(msg)
                        self._wake()
        except OSError:
            pass
        self.closed.set()
        self._wake()

    def send(self, msg: dict) -> None:
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            log.warning("control socket: %s", e)
