"""Helpers of the reliability tests (tests/test_reliability_*.py); no tests of its own.

Servers are started and stopped with tests/e2e_support.py (the supervisor engineer's fixtures);
what is here is what the reliability tests add: a load generator that records every answer,
adapters built to make version attribution exact, broken adapters, and /dev/shm checks."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import httpx
from e2e_support import SHM, Server, instance_segments

from mlxsup.demo import write_random_adapter

# ---------------------------------------------------------------------- load


@dataclass
class Answer:
    """One HTTP exchange: what was sent and what came back (status None: no HTTP answer)."""

    body: dict
    status: Optional[int]
    headers: dict
    json: object
    error: Optional[str] = None
    started: float = 0.0
    ended: float = 0.0


@dataclass
class Load:
    """`threads` clients sending `make_body(thread, i)` to `path` one after another until
    stopped (or `per_thread` requests each). Every answer is recorded once; a request that
    hangs shows up as a thread still alive after `stop()`."""

    url: str
    make_body: Callable[[int, int], dict]
    threads: int = 4
    path: str = "/generate"
    per_thread: Optional[int] = None
    timeout: float = 90.0
    headers: dict = field(default_factory=dict)
    pause_after_503: float = 0.05
    answers: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.threads)]

    def _run(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=httpx.Timeout(self.timeout), headers=self.headers) as c:
            i = 0
            while not self._stop.is_set() and (self.per_thread is None or i < self.per_thread):
                body = self.make_body(k, i)
                i += 1
                t0 = time.monotonic()
                try:
                    r = c.post(self.path, json=body)
                    try:
                        payload = r.json()
                    except ValueError:
                        payload = r.text
                    a = Answer(body, r.status_code, dict(r.headers), payload, None, t0, time.monotonic())
                except Exception as e:  # noqa: BLE001 - recorded; the tests decide
                    a = Answer(body, None, {}, None, repr(e), t0, time.monotonic())
                with self._lock:
                    self.answers.append(a)
                if a.status == 503:
                    # A client backs off on a retryable refusal; spinning on it would only starve
                    # the restarting engine of CPU on a small machine.
                    self._stop.wait(self.pause_after_503)

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self, join_timeout: float = 120.0) -> list:
        self._stop.set()
        deadline = time.monotonic() + join_timeout
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        hung = [t for t in self._threads if t.is_alive()]
        assert not hung, f"{len(hung)} load threads still waiting for an answer: a request hangs"
        return list(self.answers)

    def join(self, join_timeout: float = 120.0) -> list:
        deadline = time.monotonic() + join_timeout
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        return self.stop(1.0)

    def count(self, status: Optional[int] = None) -> int:
        """Answers so far (of that HTTP status only, if given)."""
        with self._lock:
            if status is None:
                return len(self.answers)
            return sum(1 for a in self.answers if a.status == status)


def unique_id(prefix: str = "rel") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def metrics(server: Server) -> dict:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        return c.get("/metrics").json()


def wait_running(server: Server, at_least: int = 1, timeout: float = 30.0) -> None:
    """Until the engine reports `at_least` sequences decoding (the control block is published
    every 100 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics(server)["num_running"] >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine never ran {at_least} sequences at once")


# ---------------------------------------------------------------------- /dev/shm and processes


def my_segments(server: Server) -> set:
    """This instance's segments now in /dev/shm (other instances on the machine are ignored)."""
    names = server.segments | instance_segments(server.run_dir)
    return names & set(os.listdir(SHM))


# ---------------------------------------------------------------------- adapters


def model_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def make_last_mlp_adapter(directory, model_dir: str, seed: int, std: float = 0.5, rank: int = 4) -> str:
    """A LoRA adapter on the last block's `mlp.down_proj` only. It changes no key or value of
    any layer (both are computed before the last MLP), so a sequence whose KV was computed under
    another version still gets, after an `inflight` switch, exactly the logits a teacher-forced
    pass under this adapter gives: /score can check every token after the switch."""
    return write_random_adapter(directory, model_dir, seed, keys=("mlp.down_proj",), num_layers=1,
                                std=std, rank=rank, scale=10.0)


def safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


def raw_safetensors(header: dict, data: bytes) -> bytes:
    """A safetensors file with exactly this header (no validation by a library)."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data
