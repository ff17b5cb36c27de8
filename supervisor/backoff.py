"""Exponential backoff for restarting a child that keeps dying."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    """Delay before the next restart: `initial_s`, doubled at each failure up to `max_s`.

    A child that stayed up for `stable_s` is considered healthy again: its next death restarts
    it after `initial_s` once more. Times are monotonic seconds supplied by the caller, so the
    policy is testable without sleeping."""

    initial_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 30.0
    num_failures: int = 0

    def __post_init__(self):
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.stable_s < 0:
            raise ValueError("need 0 < initial_s <= max_s and stable_s >= 0")

    def next_delay(self, uptime_s: float) -> float:
        """Record a death after `uptime_s` seconds of life; return the delay before restarting."""
        if uptime_s >= self.stable_s:
            self.num_failures = 0
        delay = min(self.max_s, self.initial_s * (2 ** self.num_failures))
        self.num_failures += 1
        return delay

    def reset(self) -> None:
        self.num_failures = 0
