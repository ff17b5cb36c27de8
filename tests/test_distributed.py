"""A sharded engine (two ranks over mlx.launch's ring backend on loopback, CPU) against one
rank: the same workload - greedy and seeded sampling, n>1 admitted over several steps, a swap
in each mode, /score raw and processed - gives identical tokens and log-probs within 1e-4.

Run under `flock /tmp/mlxsup-heavy.lock` (it starts processes)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mlxsup.engine import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "sharded_check.py")


def _run(cmd, timeout):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=ROOT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # mlx.launch and its ranks are one session
        proc.communicate()
        pytest.fail(f"{cmd[0]} did not finish in {timeout} s")
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


@pytest.mark.timeout(400)
def test_two_ranks_equal_one(tiny_model_dir, tmp_path):
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, SCRIPT, tiny_model_dir, str(one)], timeout=150)
    _run([launcher, "-n", "2", "--backend", "ring", "--python", sys.executable, SCRIPT,
          tiny_model_dir, str(two)], timeout=200)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["plans"] > 10  # the followers really ran rank 0's steps
    assert a["versions"] == b["versions"] and a["versions"][-1] == 3  # every swap committed
    assert sorted(a["done"]) == sorted(b["done"])
    assert any(isinstance(v, dict) and v["reason"] == "abort" for v in a["done"].values())
    for key, x in a["done"].items():
        y = b["done"][key]
        if isinstance(x, str):
            assert x == y
            continue
        assert x["tokens"] == y["tokens"], key
        assert x["reason"] == y["reason"], key
        assert len(x["logprobs"]) == len(x["tokens"]) == len(y["logprobs"]), key
        assert max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])) <= 1e-4, key
    assert sorted(a["scores"]) == sorted(b["scores"]) == ["100", "101"]
    for key, x in a["scores"].items():
        assert max(abs(p - q) for p, q in zip(x, b["scores"][key])) <= 1e-4, key
