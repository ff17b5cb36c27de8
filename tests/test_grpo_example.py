"""examples/grpo.py: its pieces (rewards, advantages, version bookkeeping, the loss, adapters
in mlx-lm's format) on their own, then short runs end to end against a real `mlxsup start`
server on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO_PY = os.path.join(ROOT, "examples", "grpo.py")


def _load_grpo():
    spec = importlib.util.spec_from_file_location("mlxsup_example_grpo", GRPO_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


grpo = _load_grpo()


# ------------------------------------------------------------------ pieces


def test_group_advantages_are_normalised_within_the_group():
    adv = grpo.group_advantages([0.0, 1.0, 0.5, 0.5])
    assert abs(np.mean(adv)) < 1e-9
    assert abs(np.std(adv) - 1.0) < 1e-3
    assert adv[1] > adv[2] > adv[0]
    assert grpo.group_advantages([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]


def test_number_reward_counts_distinct_number_tokens(tiny_model_dir):
    from pathlib import Path

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(Path(tiny_model_dir))
    targets = grpo.number_token_ids(tok)
    assert targets and all(tok.decode([t]).strip().isdigit() for t in targets)
    some = sorted(targets)[:3]
    word = next(i for i in range(len(tok.get_vocab())) if tok.decode([i]).strip().isalpha())
    assert grpo.number_reward(some, targets, 6) == 0.5
    assert grpo.number_reward([some[0]] * 6, targets, 6) == pytest.approx(1 / 6)
    assert grpo.number_reward([word] * 6, targets, 6) == 0.0


def _group(versions, n=2):
    return grpo.Group(0, [grpo.Rollout([1], [2], [-0.1], v, "length", "") for v in versions for _ in range(n // len(versions))])


def test_partition_keeps_current_and_one_stale_version_drops_the_rest():
    groups = [_group([7]), _group([6]), _group([5]), _group([6, 7]), _group([grpo.MIXED])]
    part = grpo.partition_by_version(groups, trainer_version=7, max_staleness=1, known_versions={6, 7})
    assert [g.rollouts[0].version for g in part.kept] == [7, 6]
    assert (part.num_on_policy, part.num_off_policy, part.num_dropped_stale, part.num_dropped_mixed) == (2, 2, 2, 4)
    # a version whose weights the trainer no longer holds cannot be checked or corrected
    part = grpo.partition_by_version([_group([6])], 7, 1, known_versions={7})
    assert part.kept == [] and part.num_dropped_stale == 2
    with pytest.raises(RuntimeError, match="newer"):
        grpo.partition_by_version([_group([8])], 7, 1, {7})


def test_result_version_prefers_the_generating_version():
    res = {"generated_by_version": 3, "token_versions": [3, 3], "metadata": {"current_policy_version": 4}}
    assert grpo.result_version(res) == 3
    assert grpo.result_version({"metadata": {"current_policy_version": 4}}) == 4
    with pytest.raises(ValueError):
        grpo.result_version({"metadata": {}})


def test_loss_gradient_and_adapter_round_trip_through_mlx_lm(tiny_model_dir, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    cfg = grpo.GRPOConfig(start=True, out=str(tmp_path), lr=1e-4, max_tokens=6)
    policy = grpo.Policy(tiny_model_dir, cfg)
    prompt = list(policy.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True))
    rng = np.random.default_rng(0)
    rollouts = [grpo.Rollout(prompt, [int(t) for t in rng.integers(5, 500, size=k)], [], 0, "length", "") for k in (6, 3, 5, 6)]
    for r, lp in zip(rollouts, policy.logprobs_under(policy.weights(), rollouts)):
        r.logprobs = [float(x) for x in lp]
    for r, a in zip(rollouts, (1.0, -1.0, 0.5, -0.5)):
        r.advantage = a
    before = policy.weights()
    stats = policy.train_step(rollouts)
    assert stats["mean_abs_log_ratio_vs_behaviour"] < 1e-6  # on-policy: ratio 1 before the step
    assert stats["grad_norm"] > 0
    after = policy.weights()
    assert any(not mx.array_equal(before[k], after[k]) for k in before)
    # a small step goes uphill on the GRPO objective: sum of advantage x mean token log-prob
    def objective(logprobs):
        return sum(r.advantage * float(np.mean(lp)) for r, lp in zip(rollouts, logprobs))

    assert objective(policy.logprobs_under(after, rollouts)) > objective([r.logprobs for r in rollouts])

    path = policy.save_adapter(str(tmp_path / "adapter"))
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapters.safetensors"]
    model, _ = load(tiny_model_dir, adapter_path=path)
    inputs, targets, mask, _ = grpo._pack(rollouts)
    a = grpo.token_logprobs(model, inputs, targets, 1.0)
    b = grpo.token_logprobs(policy.model, inputs, targets, 1.0)
    assert (mx.abs(a - b) * mask).max().item() < 1e-5


def test_text_chart_draws_every_step():
    chart = grpo.text_chart([0.1, 0.2, 0.15, 0.4], width=10, height=4)
    assert chart.count("\n") == 6 and "0.400" in chart and "0.100" in chart


# ------------------------------------------------------------------ end to end


def _run_grpo(tmp_path, *args, timeout=150) -> dict:
    out = tmp_path / "out"
    cmd = [sys.executable, GRPO_PY, *args, "--steps", "3", "--group-size", "4", "--prompts-per-step", "3",
           "--max-tokens", "8", "--lr", "1e-3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "grpo_log.json") as f:
        log = json.load(f)
    assert os.path.exists(log["summary"]["curve"])
    return log


def _check_log(log: dict, prompts: int = 3, group: int = 4) -> None:
    steps = log["steps"]
    assert [s["step"] for s in steps] == list(range(len(steps)))
    first = steps[0]["trainer_version"]
    for i, s in enumerate(steps):
        # one swap per step, each bumping the server's version by exactly one
        assert s["trainer_version"] == first + i
        assert s["new_version"] == s["trainer_version"] + 1
        # every rollout accounted for; each group from one version, current or one behind
        assert sum(s["rollout_versions"].values()) == prompts * group
        assert s["num_on_policy"] + s["num_off_policy"] + s["num_dropped_stale"] + s["num_dropped_mixed"] == prompts * group
        assert s["num_dropped_mixed"] == 0
        for versions in s["group_versions"]:
            assert len(versions) == 1 and s["trainer_version"] - 1 <= versions[0] <= s["trainer_version"]
        # the server's log-probs equal the trainer's under the same version's weights
        assert s["per_version_abs_log_ratio"], "no rollout was checked"
        assert s["same_version_max_abs_log_ratio"] < 1e-3
        assert 0.0 <= s["mean_reward"] <= 1.0
        assert s["rollout_tokens_per_s"] > 0 and s["swap_ms"] > 0
    # one step off-policy: rollouts of step k+1 were requested before step k's swap
    assert any(s["num_off_policy"] > 0 for s in steps[1:])


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from e2e_support import running_server

    with running_server(tmp_path_factory.mktemp("grpo-e2e"), tiny_model_dir, "--max-batch", "16", workers=1) as srv:
        yield srv


@pytest.mark.timeout(200)
def test_grpo_end_to_end_load_adapter(server, tiny_model_dir, tmp_path):
    log = _run_grpo(tmp_path, "--url", server.url, "--model", tiny_model_dir)
    _check_log(log)
    assert log["summary"]["max_same_version_abs_log_ratio"] < 1e-3
    assert server.version() == log["steps"][-1]["new_version"]


@pytest.mark.timeout(200)
def test_grpo_end_to_end_upload_adapter(server, tiny_model_dir, tmp_path):
    before = server.version()
    log = _run_grpo(tmp_path, "--url", server.url, "--model", tiny_model_dir, "--upload")
    _check_log(log)
    # the initial adapter took version before + 1; then one version per step
    assert log["steps"][0]["trainer_version"] == before + 1
    assert server.version() == before + 1 + len(log["steps"])


@pytest.mark.timeout(240)
def test_grpo_start_runs_and_stops_its_own_server(tiny_model_dir, tmp_path):
    from e2e_support import Server, assert_nothing_left, stop_server

    run_dir = str(tmp_path / "run")
    log = None
    try:
        log = _run_grpo(tmp_path, "--start", "--model", tiny_model_dir, "--server-run-dir", run_dir,
                        "--server-max-batch", "16")
    finally:
        stop_server(Server(run_dir=run_dir, port=0, model=tiny_model_dir))  # a no-op if grpo.py stopped it
    _check_log(log)
    port = int(log["summary"]["url"].rsplit(":", 1)[1])
    assert_nothing_left(Server(run_dir=run_dir, port=port, model=tiny_model_dir))
