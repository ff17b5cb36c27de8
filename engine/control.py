"""The engine process's links to its supervisor: the control socket (JSON lines, read by a
thread) and the control block's publisher (the engine region's only writer, a heartbeat
thread). Neither touches MLX."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time

from mlxsup.ipc import jsonlines

log = logging.getLogger("mlxsup.engine")

HEARTBEAT_S = 0.1
STALL_S = 60.0  # the publisher stops the heartbeat when the main loop made no progress this long
RECEIVED_AT = "_received_at"  # added to each command: time.perf_counter() when the line was read


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
        try:
            for line in jsonlines.iter_lines(self.sock):
                try:
                    msg = jsonlines.decode(line)
                except ValueError:
                    log.warning("unreadable control line: %r", line[:200])
                    continue
                msg[RECEIVED_AT] = time.perf_counter()
                self.inbox.put(msg)
                self._wake()
        except OSError:
            pass
        self.closed.set()
        self._wake()

    def send(self, msg: dict) -> None:
        try:
            self.sock.sendall(jsonlines.encode(msg))
        except OSError as e:
            log.warning("control socket: %s", e)
