"""An optional per-iteration trace of the engine's main loop, for profiling where a burst's
time goes (scripts/profile_burst.py reads it). Off unless `MLXSUP_STEP_TRACE` names a file;
then each loop iteration appends one line of numbers (see FIELDS) to it, buffered, written
every `FLUSH_EVERY` lines and at exit. Nothing here touches MLX.

Written by hand: the phases are the loop's own (IPC poll, engine step split into the
runner's model work and the postprocessor, routing events, the ring flush, the wait), which
no sampling profiler separates without symbol names of MLX's native frames."""

from __future__ import annotations

import os
import time
from typing import Optional

ENV = "MLXSUP_STEP_TRACE"
FLUSH_EVERY = 256
# One line per loop iteration, space separated, in this order. Times are seconds
# (`t` a time.monotonic() stamp, the others durations); counts are integers.
FIELDS = ("t", "poll_s", "msgs", "step_s", "runner_s", "post_s", "route_s", "events",
          "flush_s", "wait_s", "rows", "admitted", "admitted_tokens", "waiting")


class StepTrace:
    def __init__(self, path: str):
        self.path = path
        self._lines: list[str] = []
        with open(path, "w") as f:
            f.write(" ".join(FIELDS) + "\n")

    @classmethod
    def from_env(cls) -> Optional["StepTrace"]:
        path = os.environ.get(ENV)
        return cls(path) if path else None

    def record(self, *values) -> None:
        self._lines.append(" ".join(f"{v:.6f}" if isinstance(v, float) else str(v)
                                    for v in values))
        if len(self._lines) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            with open(self.path, "a") as f:
                f.write("\n".join(self._lines) + "\n")
            self._lines = []


def read(path: str) -> list[dict]:
    """The lines of a trace file as dicts of FIELDS."""
    with open(path) as f:
        names = f.readline().split()
        return [dict(zip(names, (float(v) for v in line.split()))) for line in f if line.strip()]


now = time.perf_counter
