"""Peak memory and CPU time of each process tree under test, sampled with psutil.

One background thread samples every `interval` seconds the resident set size of every process
in the watched trees (the root and all its descendants) and keeps peaks per section (one
section per measured cell), per role (engine, api, supervisor, ...) and for the whole tree.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import psutil

MB = 1024 * 1024


def default_role(proc: psutil.Process, root_pid: int) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return "other"
    if "mlxsup.engine" in cmd or " engine" in cmd:
        return "engine"
    if "gunicorn" in cmd or "mlxsup.api" in cmd:
        return "api"
    if proc.pid == root_pid:
        return "main"
    return "other"


class TreeMonitor:
    def __init__(self, interval: float = 0.2, role_of: Callable = default_role):
        self.interval = interval
        self.role_of = role_of
        self._roots: dict[str, int] = {}
        self._lock = threading.Lock()
        self._section: Optional[str] = None
        self._peaks: dict[str, dict[str, float]] = {}  # section -> role/total -> peak MB
        self._tree_peaks: dict[str, dict[str, float]] = {}  # tree -> role/total -> peak MB, lifetime
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)
        self._roles_cache: dict[int, str] = {}
        self._thread.start()

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self._roots[name] = pid

    def unwatch(self, name: str) -> None:
        with self._lock:
            self._roots.pop(name, None)

    def begin(self, section: str) -> None:
        with self._lock:
            self._section = section
            self._peaks.setdefault(section, {})
        self.sample()

    def end(self) -> Optional[str]:
        self.sample()
        with self._lock:
            section, self._section = self._section, None
        return section

    def peaks(self, section: str) -> dict[str, float]:
        with self._lock:
            return dict(self._peaks.get(section, {}))

    def tree_peaks(self, name: str) -> dict[str, float]:
        """Peaks of tree `name` over everything sampled while it was watched."""
        with self._lock:
            return dict(self._tree_peaks.get(name, {}))

    def _procs(self, root: int) -> list[psutil.Process]:
        try:
            p = psutil.Process(root)
            return [p] + p.children(recursive=True)
        except psutil.Error:
            return []

    def sample(self) -> None:
        with self._lock:
            roots = dict(self._roots)
            section = self._section
        by_role: dict[str, float] = {}
        total = 0.0
        per_tree: dict[str, dict[str, float]] = {}
        for name, root in roots.items():
            tree = per_tree.setdefault(name, {"total": 0.0})
            for proc in self._procs(root):
                try:
                    rss = proc.memory_info().rss / MB
                except psutil.Error:
                    continue
                role = self._roles_cache.get(proc.pid)
                if role is None:
                    role = self._roles_cache[proc.pid] = self.role_of(proc, root)
                by_role[role] = by_role.get(role, 0.0) + rss
                tree[role] = tree.get(role, 0.0) + rss
                tree["total"] += rss
                total += rss
        with self._lock:
            for name, tree in per_tree.items():
                _raise(self._tree_peaks.setdefault(name, {}), tree.items())
            if section is None:
                return
            peaks = self._peaks.setdefault(section, {})
            _raise(peaks, list(by_role.items()) + [("total", total)])
            peaks["samples"] = peaks.get("samples", 0) + 1

    def cpu_seconds(self, name: str) -> dict[str, float]:
        """User + system CPU seconds so far of the live processes of tree `name`, per role and
        in total (subtract two readings for an interval: where the time went)."""
        root = self._roots.get(name)
        out = {"total": 0.0}
        for proc in self._procs(root) if root else []:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            role = self._roles_cache.get(proc.pid) or self.role_of(proc, root)
            out[role] = out.get(role, 0.0) + t.user + t.system
            out["total"] += t.user + t.system
        return out


    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a process vanishing between calls: next sample
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _raise(peaks: dict, items) -> None:
    for key, mb in items:
        if mb > peaks.get(key, 0.0):
            peaks[key] = mb


def wait_idle(pids: list[int], max_wait: float = 60.0, threshold_pct: float = 20.0,
              window: float = 0.5) -> float:
    """Wait until the trees of `pids` use less than `threshold_pct` of one core over `window`
    seconds (work left from a cut request finished), at most `max_wait`; returns the wait."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_wait:
        procs = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                procs += [p] + p.children(recursive=True)
            except psutil.Error:
                pass
        before = {}
        for p in procs:
            try:
                t = p.cpu_times()
                before[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        time.sleep(window)
        used = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                used += t.user + t.system - before.get(p.pid, t.user + t.system)
            except psutil.Error:
                pass
        if used / window * 100 < threshold_pct:
            break
    return time.monotonic() - t0


def cpu_delta(after: dict, before: dict) -> dict:
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items()}
