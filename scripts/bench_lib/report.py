"""Figures from request records, the summary table, the targets of docs/benchmarks.md, and the plot."""

from __future__ import annotations

import math
from typing import Optional

WORKLOAD_TITLES = {
    "single": "(a) one sample per request",
    "grpo": "(b) GRPO (prompts x n samples)",
    "mixed": "(c) mixed prompt lengths",
    "swap": "(d) adapter swaps under load",
}


def percentile(values: list, q: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default), None when empty."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def summarize(records: list[dict], elapsed: float, max_tokens: int) -> dict:
    ok = [r for r in records if r.get("ok")]
    timeouts = [r for r in records if r.get("timeout")]
    cut = [r for r in records if r.get("cut")]
    errors = [r for r in records if r.get("error") and not r.get("timeout") and not r.get("ok")]
    tokens = sum(r.get("tokens", 0) for r in records)
    latency = [r["t_end"] - r["t_start"] for r in ok if r.get("t_end") is not None]
    ttft = [r["t_first"] - r["t_start"] for r in records if r.get("t_first") is not None]
    sources = sorted({r.get("ttft_source", "") for r in records if r.get("t_first") is not None})
    short = sum(1 for r in ok if r.get("tokens", 0) < r.get("n", 1) * max_tokens)
    error_samples = []
    for r in errors[:3]:
        error_samples.append(str(r.get("error"))[:160])
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(errors),
        "timeouts": len(timeouts),
        "cut": len(cut),
        "error_samples": error_samples,
        "completion_tokens": tokens,
        "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in ok),
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "latency_mean_s": sum(latency) / len(latency) if latency else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_source": ",".join(s for s in sources if s) or "",
        "short_completions": short,
    }


def _fmt(v, digits=2, scale=1.0) -> str:
    if v is None:
        return "-"
    v = v * scale
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def _ref(cells: list[dict], cell: dict, system: str) -> Optional[float]:
    for c in cells:
        if (c["system"] == system and c["workload"] == cell["workload"]
                and c.get("concurrency") == cell.get("concurrency")):
            return c["stats"]["tokens_per_s"] or None
    return None


def table(cells: list[dict]) -> str:
    """The summary table (markdown), one row per measured cell."""
    head = ("| workload | conc | system | tok/s | x raw | x mlx_lm | p50 s | p99 s | TTFT p50 s "
            "| ok/err/tmo/cut | short | peak RSS MB |")
    lines = [head, "|" + "---|" * 12]
    for c in cells:
        if c["workload"] in ("swap", "burst"):  # their own tables (below; bench_lib/burst.py)
            continue
        s = c["stats"]
        tps = s["tokens_per_s"]
        raw = _ref(cells, c, "raw")
        peer = _ref(cells, c, "mlx_lm")
        ttft = _fmt(s["ttft_p50_s"]) + ("*" if s.get("ttft_source") == "server" else "")
        lines.append(
            f"| {c['workload']} | {c.get('concurrency', '-')} | {c['system']} | {_fmt(tps, 1)} "
            f"| {_fmt(tps / raw) if raw and c['system'] != 'raw' else '-'} "
            f"| {_fmt(tps / peer) if peer and c['system'] != 'mlx_lm' else '-'} "
            f"| {_fmt(s['latency_p50_s'])} | {_fmt(s['latency_p99_s'])} | {ttft} "
            f"| {s['ok']}/{s['errors']}/{s['timeouts']}/{s['cut']} | {s['short_completions']} "
            f"| {_fmt(c.get('peak_rss_mb', {}).get('total'), 0)} |"
        )
    turns = [c for c in cells if c.get("by_turn")]
    if turns:
        n = max(len(c["by_turn"]) for c in turns)
        lines += ["", "| multiturn system | " + " | ".join(f"turn {t} TTFT / latency p50 s" for t in range(1, n + 1))
                  + " | turn-last / turn-1 TTFT | prefix cache hit rate |",
                  "|---|" + "---|" * (n + 2)]
        for c in turns:
            bt = c["by_turn"]
            first, last = bt.get("1", {}).get("ttft_p50_s"), bt.get(str(n), {}).get("ttft_p50_s")
            pc = c.get("prefix_cache") or {}
            lines.append(f"| {c['system']} | " + " | ".join(
                f"{_fmt(bt.get(str(t), {}).get('ttft_p50_s'))} / {_fmt(bt.get(str(t), {}).get('latency_p50_s'))}"
                for t in range(1, n + 1))
                + f" | {_fmt(last / first) if first and last else '-'} | "
                + (f"{pc['hit_rate']:.2f}" if "hit_rate" in pc else "-") + " |")
    swaps = [c for c in cells if c["workload"] == "swap"]
    if swaps:
        lines += ["", "| swap mode | conc | system | swaps ok | swap->probe token p50 / max ms "
                      "| swap->first new token in flight p50 / max ms (est.) "
                      "| engine: swap->first new token p50 / max ms (commit->, p50) "
                      "| ack p50 / max ms | engine read / ready / wait ms p50 "
                      "| load ok/err/tmo/cut | multi-version (drain: must be 0) | tok/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in swaps:
            w = c["swap"]
            s = c["stats"]
            lines.append(
                f"| {c['mode']} | {c.get('concurrency', '-')} | {c['system']} | {w['swaps_ok']}/{w['swaps']} "
                f"| {_fmt(w['probe_p50_ms'], 0)} / {_fmt(w['probe_max_ms'], 0)} "
                f"| {_fmt(w['inflight_p50_ms'], 0)} / {_fmt(w['inflight_max_ms'], 0)} "
                f"| {_fmt(w.get('engine_first_token_p50_ms'), 0)} / "
                f"{_fmt(w.get('engine_first_token_max_ms'), 0)} "
                f"({_fmt(w.get('commit_to_first_token_p50_ms'), 0)}) "
                f"| {_fmt(w['ack_p50_ms'], 0)} / {_fmt(w['ack_max_ms'], 0)} "
                f"| {_fmt(w.get('read_p50_ms'), 1)} / {_fmt(w.get('prepare_p50_ms'), 1)} / "
                f"{_fmt(w.get('wait_p50_ms'), 1)} "
                f"| {s['ok']}/{s['errors']}/{s['timeouts']}/{s['cut']} | {w['multi_version_completions']} "
                f"| {_fmt(s['tokens_per_s'], 1)} |"
            )
    return "\n".join(lines)


def targets(cells: list[dict], gpu: bool) -> list[str]:
    """Issue 7's targets, checked against this run's cells (only those it measured)."""
    out = []

    def get(system, workload, conc=None):
        for c in cells:
            if c["system"] == system and c["workload"] == workload and (
                    conc is None or c.get("concurrency") == conc):
                return c
        return None

    mlxsup_systems = sorted({c["system"] for c in cells if c["system"].startswith("mlxsup")})
    concs = sorted({c["concurrency"] for c in cells if c["workload"] == "single"})
    raw_floor = 0.9 if gpu else 0.95
    for sysname in mlxsup_systems:
        ratios = []
        for conc in concs:
            a, r = get(sysname, "single", conc), get("raw", "single", conc)
            if a and r and r["stats"]["tokens_per_s"]:
                ratios.append((conc, a["stats"]["tokens_per_s"] / r["stats"]["tokens_per_s"]))
        if ratios:
            want = [x for x in ratios if not gpu or x[0] >= 128]
            ok = all(v >= raw_floor for _, v in want)
            out.append(f"{sysname}: x raw on (a) " + ", ".join(f"c={c}: {v:.2f}" for c, v in ratios)
                       + f"  [target >= {raw_floor}{' at c>=128' if gpu else ''}: "
                       + ("met" if ok else "MISSED") + "]")
        if not gpu:
            peer = []
            for conc in concs:
                a, p = get(sysname, "single", conc), get("mlx_lm", "single", conc)
                if a and p and p["stats"]["tokens_per_s"]:
                    peer.append((conc, a["stats"]["tokens_per_s"] / p["stats"]["tokens_per_s"]))
            if peer:
                ok = all(v >= 1.0 for _, v in peer)
                out.append(f"{sysname}: x mlx_lm on (a) " + ", ".join(f"c={c}: {v:.2f}" for c, v in peer)
                           + f"  [target >= 1.0: {'met' if ok else 'MISSED'}]")
        top = max(concs) if concs else None
        a = get(sysname, "single", top) if top else None
        if a:
            s = a["stats"]
            bad = s["errors"] + s["timeouts"]
            out.append(f"{sysname}: errors+timeouts at c={top}: {bad} (cut {s['cut']})  "
                       f"[target 0: {'met' if bad == 0 else 'MISSED'}]")
        m, mp = get(sysname, "multiturn"), get("mlx_lm", "multiturn")
        if m and mp and mp["stats"]["tokens_per_s"]:
            v = m["stats"]["tokens_per_s"] / mp["stats"]["tokens_per_s"]
            out.append(f"{sysname}: x mlx_lm on (e) multiturn: {v:.2f}  [target >= 1.5: "
                       f"{'met' if v >= 1.5 else 'MISSED'}]")
        if m and m.get("by_turn"):
            bt = m["by_turn"]
            first, last = bt.get("1", {}).get("ttft_p50_s"), bt.get(str(len(bt)), {}).get("ttft_p50_s")
            if first and last:
                out.append(f"{sysname}: (e) turn-{len(bt)} TTFT / turn-1 TTFT: {last / first:.2f}  "
                           f"[target <= 2: {'met' if last / first <= 2 else 'MISSED'}]")
        f, fp = get(sysname, "shared-prefix"), get("mlx_lm", "shared-prefix")
        if f and fp and fp["stats"]["tokens_per_s"]:
            out.append(f"{sysname}: x mlx_lm on (f) shared-prefix: "
                       f"{f['stats']['tokens_per_s'] / fp['stats']['tokens_per_s']:.2f}")
        g, gp = get(sysname, "grpo"), get("mlx_lm", "grpo")
        if g and gp and gp["stats"]["tokens_per_s"]:
            v = g["stats"]["tokens_per_s"] / gp["stats"]["tokens_per_s"]
            out.append(f"{sysname}: x mlx_lm on (b) GRPO: {v:.2f}  [target >= 1.5: {'met' if v >= 1.5 else 'MISSED'}]")
        for c in cells:
            if c["system"] == sysname and c["workload"] == "swap":
                w, s = c["swap"], c["stats"]
                # The first token generated under the new version: the engine's exact figure
                # where the server reports it, else the client-side estimate.
                exact = w.get("engine_first_token_max_ms")
                lat = exact if exact is not None else w["inflight_max_ms"]
                failed = s["errors"] + s["timeouts"] + (w["swaps"] - w["swaps_ok"]) + w["probe_failed"]
                good = lat is not None and lat < 100 and failed == 0
                out.append(f"{sysname}: swap ({c['mode']}, c={c.get('concurrency')}): swap->first token "
                           f"under the new version p50 {_fmt(w.get('engine_first_token_p50_ms'), 0)} / "
                           f"worst {_fmt(lat, 0)} ms ({'engine, exact' if exact is not None else 'est.'}; "
                           f"a new request's first token: p50 {_fmt(w['probe_p50_ms'], 0)} / worst "
                           f"{_fmt(w['probe_max_ms'], 0)} ms), failed {failed}  "
                           f"[target < 100 ms, 0 failed: {'met' if good else 'MISSED'}]")
    if gpu:
        for sysname in mlxsup_systems:
            one, peer1 = get(sysname, "single", 1), get("mlx_lm", "single", 1)
            if one:
                out.append(f"{sysname}: c=1 {one['stats']['tokens_per_s']:.0f} tok/s "
                           f"(target: >= single-stream generate_step of the same model; "
                           f"mlx_lm.server {peer1['stats']['tokens_per_s']:.0f} tok/s)" if peer1 else "")
    return [line for line in out if line]


def plot(cells: list[dict], path: str, title: str) -> Optional[str]:
    """A PNG of the run; None (and no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    systems = []
    for c in cells:
        if c["system"] not in systems:
            systems.append(c["system"])
    if not cells:
        return None
    color = {name: f"C{i % 10}" for i, name in enumerate(systems)}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax_tps, ax_lat, ax_bars, ax_swap = axes.flat
    for sysname in systems:
        pts = sorted(((c["concurrency"], c["stats"]) for c in cells
                      if c["system"] == sysname and c["workload"] == "single"), key=lambda p: p[0])
        if not pts:
            continue
        xs = [p[0] for p in pts]
        col = color[sysname]
        ax_tps.plot(xs, [p[1]["tokens_per_s"] for p in pts], marker="o", color=col, label=sysname)
        ax_lat.plot(xs, [p[1]["latency_p50_s"] for p in pts], marker="o", color=col, label=f"{sysname} p50")
        ax_lat.plot(xs, [p[1]["latency_p99_s"] for p in pts], marker="x", linestyle="--", color=col,
                    alpha=0.5, label=f"{sysname} p99")
    for ax, ylabel in ((ax_tps, "completion tokens/s"), (ax_lat, "latency s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_tps.set_title(WORKLOAD_TITLES["single"])
    ax_lat.set_title("(a) latency")
    groups = [w for w in ("grpo", "mixed") if any(c["workload"] == w for c in cells)]
    barred = [s for s in systems if any(c["system"] == s and c["workload"] in groups for c in cells)]
    width = 0.8 / max(1, len(barred))
    for i, sysname in enumerate(barred):
        vals = []
        for w in groups:
            c = next((c for c in cells if c["system"] == sysname and c["workload"] == w), None)
            vals.append(c["stats"]["tokens_per_s"] if c else 0)
        ax_bars.bar([g + i * width for g in range(len(groups))], vals, width, label=sysname,
                    color=color[sysname])
    ax_bars.set_xticks([g + width * (len(barred) - 1) / 2 for g in range(len(groups))])
    ax_bars.set_xticklabels([WORKLOAD_TITLES[w] for w in groups], fontsize=8)
    ax_bars.set_ylabel("completion tokens/s")
    if barred:
        ax_bars.legend(fontsize=7)
    ax_bars.set_title("(b), (c)")
    swaps = [c for c in cells if c["workload"] == "swap"]
    for c in swaps:
        tag = f"{c['system']} {c['mode']} c={c.get('concurrency')}"
        vals = c["swap"].get("probe_ms") or []
        ax_swap.plot(range(len(vals)), vals, marker="o", label=f"{tag} (new request)")
        exact = c["swap"].get("engine_first_token_ms") or []
        if exact:  # the server's own figure; the client-side estimate only without it
            ax_swap.plot(range(len(exact)), exact, marker="x", linestyle="--",
                         label=f"{tag} (first new token, engine)")
        else:
            vals = c["swap"].get("inflight_ms") or []
            ax_swap.plot(range(len(vals)), vals, marker="x", linestyle="--",
                         label=f"{tag} (in flight, est.)")
    from matplotlib.ticker import MaxNLocator

    ax_swap.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_swap.set_xlabel("swap #")
    ax_swap.set_ylabel("swap request -> first token of new version, ms")
    ax_swap.set_title(WORKLOAD_TITLES["swap"])
    ax_swap.grid(True, alpha=0.3)
    if swaps:
        ax_swap.set_yscale("log")  # a drain waits for whole completions: seconds beside ms
        ax_swap.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
