"""Doorbells: named FIFOs that say "look at the ring again", awaitable by asyncio and by poll().

Every user opens the FIFO `O_RDWR | O_NONBLOCK`: holding both ends means opening never blocks
or fails with ENXIO (no reader yet) and reading never sees EOF (no writer left). A doorbell
carries no data: any number of rings collapse into "at least one byte is waiting", and a write
that finds the FIFO full (EAGAIN) is already rung. The rings, not the bells, are the truth, so
a lost ring only delays a wake-up until the waiter's bounded re-check.
"""

from __future__ import annotations

import errno
import os
import select
import stat

_DRAIN_BYTES = 4096


def make_fifo(path: str) -> None:
    """Create the FIFO at `path`, replacing whatever a killed earlier run left there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.mkfifo(path, 0o600)


class Doorbell:
    """One end of a FIFO doorbell; the same object can ring, wait and drain."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"{path} is not a FIFO")
        self.path = path
        self._fd = fd
        self._poller = None

    def fileno(self) -> int:
        return self._fd

    def ring(self) -> None:
        """Wake whoever waits on this bell. Never blocks, never raises for a full or gone peer."""
        try:
            os.write(self._fd, b"\x01")
        except BlockingIOError:
            pass  # the FIFO is full: the bell is already rung
        except BrokenPipeError:
            pass  # no reader (cannot happen while we hold O_RDWR; tolerated anyway)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EPIPE):
                raise

    def drain(self) -> bool:
        """Consume every pending ring; True if there was any."""
        rung = False
        while True:
            try:
                chunk = os.read(self._fd, _DRAIN_BYTES)
            except BlockingIOError:
                return rung
            except InterruptedError:
                continue
            if not chunk:  # EOF cannot happen with O_RDWR; do not spin if it ever does
                return rung
            rung = True
            if len(chunk) < _DRAIN_BYTES:
                return rung

    def wait(self, timeout: float | None) -> bool:
        """Block until rung or `timeout` seconds passed; drain; True if it was rung."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._fd, select.POLLIN)
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        if self._poller.poll(ms):
            return self.drain()
        return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
