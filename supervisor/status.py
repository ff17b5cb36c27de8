"""Per-process figures for `mlxsup status` (psutil), and the human-readable report."""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import psutil


class ProcessSampler:
    """Keeps a psutil handle per process so that CPU % covers the time since the last sample
    (a fresh handle can only say 0.0)."""

    def __init__(self, table: Callable[[], Iterable[tuple[str, int]]]):
        self._table = table
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int, float] = {}

    def _process(self, pid: int) -> Optional[psutil.Process]:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
                proc.cpu_percent(None)
            except psutil.Error:
                return None
            self._procs[pid] = proc
        return proc

    def sample(self) -> None:
        live = set()
        for _, pid in self._table():
            proc = self._process(pid)
            if proc is None:
                continue
            live.add(pid)
            try:
                self._cpu[pid] = proc.cpu_percent(None)
            except psutil.Error:
                pass
        for pid in set(self._procs) - live:
            self._procs.pop(pid, None)
            self._cpu.pop(pid, None)

    def rows(self) -> list[dict]:
        now = time.time()
        rows = []
        for role, pid in self._table():
            proc = self._process(pid)
            if proc is None:
                continue
            try:
                with proc.oneshot():
                    rows.append(
                        {
                            "role": role,
                            "pid": pid,
                            "rss_bytes": proc.memory_info().rss,
                            "cpu_percent": round(self._cpu.get(pid, 0.0), 1),
                            "uptime_s": round(now - proc.create_time(), 1),
                        }
                    )
            except psutil.Error:
                continue
        return rows


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_bytes(num: int) -> str:
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{num} B"


def format_status(status: dict) -> str:
    """The report `mlxsup status` prints for one supervisor's `status` reply."""
    engine = status.get("engine", {})
    lines = [
        f"mlxsup {status.get('state')} at http://{status.get('host')}:{status.get('port')} "
        f"(instance {status.get('instance_id')}, up {format_duration(status.get('uptime_s', 0))})",
        f"  run dir:        {status.get('run_dir')}",
        f"  model:          {status.get('model')}",
        f"  policy version: {status.get('policy_version')}  adapter: {status.get('adapter') or '(base model)'}"
        f"  swaps: {status.get('num_swaps', 0)}",
        f"  engine:         epoch {engine.get('epoch')}, restarts {engine.get('restarts')}, "
        f"{engine.get('state', 'unknown')}",
        f"  load:           queue {engine.get('queue_depth', 0)}, running {engine.get('running', 0)}, "
        f"{engine.get('tokens_per_s', 0.0):.1f} tokens/s, {engine.get('tokens_generated', 0)} tokens generated",
    ]
    rank_rows = engine.get("ranks") or []
    if len(rank_rows) > 1:
        lines.append(f"  ranks:          {len(rank_rows)} over {engine.get('distributed_backend')}: " + ", ".join(
            f"{r['rank']} {r['host']} pid {r['pid'] if r['pid'] is not None else '-'}"
            f"{' (ssh)' if r.get('via') == 'ssh' else ''} {'alive' if r['alive'] else 'DOWN'}"
            for r in rank_rows))
    cache = engine.get("prefix_cache")
    if cache:
        lines.append(
            f"  prefix cache:   {cache['entries']} entries, {format_bytes(cache['bytes'])} of "
            f"{format_bytes(cache['kv_budget_bytes'])} KV budget, {cache['hits']}/{cache['lookups']} "
            f"hits, {100 * cache['hit_rate']:.1f}% of prompt tokens")
    last = status.get("last_swap")
    if last:
        first = last.get("first_token_ms")
        lines.append(
            f"  last swap:      version {last.get('policy_version')} ({last.get('mode')}), "
            f"prepare {last.get('prepare_ms') or 0:.1f} ms, wait {last.get('wait_ms') or 0:.1f} ms, "
            + (f"first new token {first:.1f} ms after receipt" if first is not None
               else "no token under it yet"))
    lines += [
        "",
        f"  {'ROLE':<12}{'PID':>8}{'RSS':>12}{'CPU%':>8}{'UPTIME':>10}",
    ]
    for row in status.get("processes", []):
        lines.append(
            f"  {row['role']:<12}{row['pid']:>8}{format_bytes(row['rss_bytes']):>12}"
            f"{row['cpu_percent']:>8.1f}{format_duration(row['uptime_s']):>10}"
        )
    return "\n".join(lines)
