"""The `burst` workload and the `raw-static` system of issue 17.

An RL round submits all of its prompts at once. `burst` sends a shape's requests together (one
connection each, all released at the same instant), waits for every answer, and repeats for
`--burst-rounds` rounds with fresh prompts each round. Round 0 of a shape is reported apart
from the later (warm) rounds: the first time a server meets a batch shape it may build kernels
(on CUDA, seconds), which an RL trainer pays on its first round after the server is ready.

A shape is `R` (R requests of one sample) or `RxN` (R requests of N samples: the GRPO shape;
a server without `n` gets R*N one-sample requests, as a trainer would send them).

`raw-static` is the limit the issue compares against: one plain mlx-lm BatchGenerator with
every sequence of the round inserted at once (rawloop.py, job kind "static").
"""

from __future__ import annotations

from typing import Optional


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'128,256,16x8' -> [(128, 1), (256, 1), (16, 8)]."""
    shapes = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        reqs, _, n = part.partition("x")
        shape = (int(reqs), int(n) if n else 1)
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"bad burst shape {part!r}: want R or RxN with R, N >= 1")
        shapes.append(shape)
    return shapes


def label(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def round_stats(rounds: list[dict], summarize, max_tokens: int) -> dict:
    """Rounds (each {"records", "elapsed_s"}) pooled: records together, elapsed summed."""
    records = [r for rnd in rounds for r in rnd["records"]]
    stats = summarize(records, sum(rnd["elapsed_s"] for rnd in rounds), max_tokens)
    stats["makespan_s"] = [rnd["elapsed_s"] for rnd in rounds]
    return stats


def make_cell(system: str, shape: tuple[int, int], rounds: list[dict], summarize, max_tokens: int,
              **extra) -> dict:
    """One cell per system and shape: `stats` of the warm rounds (1..), `first` of round 0."""
    per_round = []
    for i, rnd in enumerate(rounds):
        s = summarize(rnd["records"], rnd["elapsed_s"], max_tokens)
        per_round.append({"round": i, "elapsed_s": s["elapsed_s"], "tokens_per_s": s["tokens_per_s"],
                          "ok": s["ok"], "errors": s["errors"] + s["timeouts"] + s["cut"],
                          "ttft_p50_s": s["ttft_p50_s"], "latency_p50_s": s["latency_p50_s"]})
    warm = rounds[1:] or rounds  # one round only: it is both
    cell = {"system": system, "workload": "burst", "concurrency": shape[0] * shape[1],
            "mode": label(shape), "requests": shape[0], "n": shape[1],
            "stats": round_stats(warm, summarize, max_tokens),
            "first": per_round[0] if per_round else None, "rounds": per_round, **extra}
    return cell


def _get(cells, system, mode) -> Optional[dict]:
    for c in cells:
        if c["workload"] == "burst" and c["system"] == system and c.get("mode") == mode:
            return c
    return None


def _fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def _modes(cells) -> list[str]:
    modes = []
    for c in cells:
        if c["workload"] == "burst" and c["mode"] not in modes:
            modes.append(c["mode"])
    return sorted(modes, key=lambda m: (int(m.split("x")[1]) > 1, int(m.split("x")[0]) * int(m.split("x")[1])))


def table(cells: list[dict]) -> str:
    """The burst table (markdown): per shape and system, first round, warm rounds, ratios."""
    rows = [c for c in cells if c["workload"] == "burst"]
    if not rows:
        return ""
    lines = ["| burst shape (requests x n) | system | first round tok/s | warm tok/s | first / warm "
             "| warm x raw-static | first x raw-static warm | warm TTFT p50 s | warm latency p50 s "
             "| ok/err/tmo/cut (warm) |",
             "|" + "---|" * 10]
    for mode in _modes(cells):
        ref = _get(cells, "raw-static", mode)
        ref_tps = ref["stats"]["tokens_per_s"] if ref else None
        for c in sorted((c for c in rows if c["mode"] == mode), key=lambda c: c["system"] != "raw-static"):
            s, first = c["stats"], c.get("first") or {}
            warm = s["tokens_per_s"]
            f = first.get("tokens_per_s")
            other = c["system"] != "raw-static"
            lines.append(
                f"| {mode} | {c['system']} | {_fmt(f, 1)} | {_fmt(warm, 1)} "
                f"| {_fmt(f / warm) if f and warm else '-'} "
                f"| {_fmt(warm / ref_tps) if ref_tps and other else '-'} "
                f"| {_fmt(f / ref_tps) if ref_tps and f and other else '-'} "
                f"| {_fmt(s['ttft_p50_s'])} | {_fmt(s['latency_p50_s'])} "
                f"| {s['ok']}/{s['errors']}/{s['timeouts']}/{s['cut']} |")
    return "\n".join(lines)


def targets(cells: list[dict], gpu: bool) -> list[str]:
    """Issue 17's burst targets: >= 0.9x raw-static (GPU: at 128, 256 and the GRPO shape), no
    drop from the smaller to the larger one-sample shape, first round within 20% of warm."""
    out = []
    modes = _modes(cells)
    systems = sorted({c["system"] for c in cells if c["workload"] == "burst" and c["system"] != "raw-static"})
    singles = [m for m in modes if m.endswith("x1")]
    for sysname in systems:
        ratios = []
        for mode in modes:
            c, r = _get(cells, sysname, mode), _get(cells, "raw-static", mode)
            if c and r and r["stats"]["tokens_per_s"]:
                ratios.append((mode, c["stats"]["tokens_per_s"] / r["stats"]["tokens_per_s"]))
        if ratios:
            # On the GPU the target names 128, 256 and 16x8; the CPU case is its own (c=32).
            want = [v for m, v in ratios if not gpu or c_of(m) >= 128]
            ok = bool(want) and all(v >= 0.9 for v in want)
            out.append(f"{sysname}: burst warm x raw-static " + ", ".join(f"{m}: {v:.2f}" for m, v in ratios)
                       + f"  [target >= 0.9{' at 128+ sequences' if gpu else ''}: {'met' if ok else 'MISSED'}]")
        peer = [(m, _get(cells, sysname, m), _get(cells, "mlx_lm", m)) for m in modes]
        peer = [(m, c["stats"]["tokens_per_s"] / p["stats"]["tokens_per_s"]) for m, c, p in peer
                if c and p and p["stats"]["tokens_per_s"] and sysname != "mlx_lm"]
        if peer:
            out.append(f"{sysname}: burst warm x mlx_lm " + ", ".join(f"{m}: {v:.2f}" for m, v in peer))
        pts = [(c_of(m), _get(cells, sysname, m)) for m in singles]
        pts = [(k, c["stats"]["tokens_per_s"]) for k, c in pts if c]
        if len(pts) >= 2:
            pts.sort()
            drops = [(a, b) for (a, ta), (b, tb) in zip(pts, pts[1:]) if tb < ta]
            out.append(f"{sysname}: burst warm tok/s by size " + ", ".join(f"{k}: {t:.0f}" for k, t in pts)
                       + f"  [target no drop with size: {'met' if not drops else 'MISSED'}]")
        firsts = []
        for mode in modes:
            c = _get(cells, sysname, mode)
            if c and c.get("first") and c["stats"]["tokens_per_s"] and len(c.get("rounds", ())) > 1:
                firsts.append((mode, c["first"]["tokens_per_s"] / c["stats"]["tokens_per_s"]))
        if firsts:
            ok = all(v >= 0.8 for _, v in firsts)
            out.append(f"{sysname}: burst first round / warm " + ", ".join(f"{m}: {v:.2f}" for m, v in firsts)
                       + f"  [target >= 0.8 (within 20%): {'met' if ok else 'MISSED'}]")
        for mode in modes:
            c = _get(cells, sysname, mode)
            if c:
                bad = sum(r["errors"] for r in c.get("rounds", ()))
                if bad:
                    out.append(f"{sysname}: burst {mode}: {bad} requests failed, timed out or were cut "
                               f"[target 0: MISSED]")
    return out


def c_of(mode: str) -> int:
    reqs, n = mode.split("x")
    return int(reqs) * int(n)
