"""Handing freed heap memory back to the operating system.

MLX on the CPU allocates its buffers with malloc. When a buffer is freed, glibc raises its
*dynamic mmap threshold* to that size, so later buffers of the size come from the heap and stay
resident after they are freed: an idle engine keeps the pages of the largest batch it ever
ran (a 10-minute soak: idle RSS +11.6%). A fixed `MALLOC_MMAP_THRESHOLD_` avoids that but
costs 10-13% of decode throughput here (every step maps and faults in fresh pages), so the
engine keeps the default allocator while busy and calls `malloc_trim(0)` when it goes idle,
after `mx.clear_cache()` has freed MLX's own buffer cache.
"""

from __future__ import annotations

import ctypes
import sys
import time
from typing import Callable, Optional

# At most one trim per this many seconds: a lightly loaded engine goes idle after every request.
MIN_INTERVAL_S = 1.0


def _malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc; musl and others have none
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class HeapTrimmer:
    """`trim()` gives free heap pages back, at most once per `min_interval_s`."""

    def __init__(self, min_interval_s: float = MIN_INTERVAL_S):
        self._fn = _malloc_trim()
        self.min_interval_s = min_interval_s
        self._last = float("-inf")
        self.num_trims = 0

    def trim(self) -> bool:
        """Trim now unless the last trim was less than `min_interval_s` ago; True if trimmed."""
        if self._fn is None:
            return False
        now = time.monotonic()
        if now - self._last < self.min_interval_s:
            return False
        self._last = now
        self._fn(0)
        self.num_trims += 1
        return True
