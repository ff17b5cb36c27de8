"""scripts/bench_server.py runs end to end on the tiny model in bounded time and writes its
results (no timing asserts: the figures are the benchmark's business, not the tests')."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "bench_server.py")


@pytest.mark.timeout(420)
def test_quick_run_writes_results_for_every_system(tiny_model_dir, tmp_path):
    pytest.importorskip("httpx")
    out = tmp_path / "bench"
    systems = ["raw", "mlx_lm", "mlxsup-tuned"]
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--model", tiny_model_dir, "--systems", ",".join(systems),
         "--out", str(out), "--settle", "5"],
        capture_output=True, text=True, timeout=400, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["model"] == tiny_model_dir
    assert data["meta"]["model_info"]["parameters"] > 0
    # Every system started and was measured (a system that fails to start is reported in
    # results.json and the run goes on: for the benchmark's user, not a pass here).
    for name in systems:
        assert name in data["systems"], name
        assert data["systems"][name]["error"] is None, (name, data["systems"][name]["error"])
        assert [c for c in data["cells"] if c["system"] == name], name
    raw = {(c["workload"], c["concurrency"]) for c in data["cells"] if c["system"] == "raw"}
    assert {("single", 1), ("single", 4), ("grpo", 8), ("mixed", 4)} <= raw
    for cell in data["cells"]:
        s = cell["stats"]
        assert s["ok"] + s["errors"] + s["timeouts"] + s["cut"] == s["requests"]
        if cell["system"] in ("raw", "generate_step"):
            assert s["ok"] == s["requests"] and s["completion_tokens"] > 0
    # Requests are on disk, and the summary table is the last thing printed.
    assert (out / "records.jsonl").stat().st_size > 0
    assert proc.stdout.rstrip().splitlines()[-1].startswith("|")
    assert "| single | 1 | raw |" in proc.stdout


def test_profiles_and_flags_parse():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import bench_server
    finally:
        sys.path.pop(0)
    cpu = bench_server.parse_args(["--out", "/tmp/x"])
    assert cpu.preset == "bench75m" and cpu.concurrency == [1, 8, 32, 128] and cpu.max_tokens == 128
    assert cpu.tuned_max_batch == 128 and cpu.max_batch == 5
    gpu = bench_server.parse_args(["--gpu", "--out", "/tmp/x"])
    assert gpu.preset == "bench1b" and gpu.concurrency == [1, 32, 128, 256] and gpu.tuned_max_batch == 256
    quick = bench_server.parse_args(["--quick", "--concurrency", "2", "--out", "/tmp/x"])
    assert quick.preset == "tiny" and quick.concurrency == [2]
    with pytest.raises(SystemExit):
        bench_server.parse_args(["--systems", "vllm"])


def test_the_prefix_cache_workloads_build_their_conversations():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import bench_server
        from bench_lib.multiturn import make_conversations, shared_prefix_items, turn_prompt
    finally:
        sys.path.pop(0)
    args = bench_server.parse_args(["--gpu", "--workloads", "multiturn,shared-prefix", "--out", "/tmp/x"])
    assert args.workloads == ["multiturn", "shared-prefix"] and args.conversations == 8 and args.turns == 4
    assert args.system_words == 300 and args.turn_tokens == 32 and args.shared_concurrency == 8
    assert bench_server.parse_args(["--out", "/tmp/x"]).workloads == ["single", "grpo", "mixed", "swap"]
    conv = make_conversations(1, 8, 4, 300)
    assert len(conv.system.split()) == 301 and len(conv.users) == 8 and len(conv.users[0]) == 4
    second = turn_prompt(conv, 2, ["an answer"], 1)
    assert second.startswith(turn_prompt(conv, 2, [], 0)) and second.endswith("\nAssistant:")
    items = shared_prefix_items(conv, 32, 2, 32)
    assert len(items) == 32 and all(it.text.startswith(conv.system) for it in items)
    assert len({it.text for it in items}) == 32


def test_burst_shapes_and_verdicts():
    """Issue 17's `burst`: shapes parse, the tuned server fits the largest round, round 0 is
    reported apart from the warm rounds, and the targets' verdicts follow the figures."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import bench_server
        from bench_lib import burst, report
    finally:
        sys.path.pop(0)
    args = bench_server.parse_args(["--gpu", "--workloads", "burst", "--systems", "raw-static,mlxsup-tuned",
                                    "--out", "/tmp/x"])
    assert args.burst_shapes == [(128, 1), (256, 1), (16, 8)] and args.burst_rounds == 3
    big = bench_server.parse_args(["--workloads", "burst", "--burst-shapes", "64x8", "--out", "/tmp/x"])
    assert big.tuned_max_batch == 512
    with pytest.raises(SystemExit):
        bench_server.parse_args(["--workloads", "burst", "--burst-shapes", "0x8", "--out", "/tmp/x"])

    def rounds(seconds, reqs=4, tokens=32):
        return [{"elapsed_s": s, "records": [{"ok": True, "tokens": tokens, "t_start": 0.0, "t_first": 0.1,
                                              "t_end": s, "n": 1} for _ in range(reqs)]} for s in seconds]

    cells = [burst.make_cell("raw-static", (128, 1), rounds([1.0, 1.0, 1.0]), report.summarize, 32),
             burst.make_cell("raw-static", (256, 1), rounds([1.0, 1.0]), report.summarize, 32),
             burst.make_cell("mlxsup-tuned", (128, 1), rounds([4.0, 1.0, 1.0]), report.summarize, 32),
             burst.make_cell("mlxsup-tuned", (256, 1), rounds([1.0, 2.0]), report.summarize, 32)]
    first = cells[2]
    assert first["first"]["tokens_per_s"] == 32.0 and first["stats"]["tokens_per_s"] == 128.0
    lines = "\n".join(burst.targets(cells, gpu=True))
    assert "128x1: 1.00, 256x1: 0.50  [target >= 0.9 at 128+ sequences: MISSED]" in lines
    assert "[target no drop with size: MISSED]" in lines
    assert "first round / warm 128x1: 0.25, 256x1: 2.00  [target >= 0.8 (within 20%): MISSED]" in lines
    assert "| 128x1 | mlxsup-tuned | 32.0 | 128 | 0.25 | 1.00 | 0.25 |" in burst.table(cells)
