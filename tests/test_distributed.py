"""A sharded engine (two ranks over mlx.launch's ring backend on loopback, CPU) against one
rank: the same workload - greedy and seeded sampling, n>1 admitted over several steps, a swap
in each mode (a LoRA adapter on every linear layer, the base model, a full-weight update of
layers split either way, the adapter on top of the update), /score raw and processed - gives
identical tokens and log-probs within 1e-4; a swap a follower cannot prepare fails on every
rank and leaves them all on the same weights.

Run under `flock /tmp/mlxsup-heavy.lock` (it starts processes)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxsup.engine import sharding

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


@pytest.fixture(scope="module")
def quantized_tiny_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama in 4 bits, groups of 32 (so an input split of 64 still holds whole
    groups): sharded quantized layers, their LoRA factors and quantized updates."""
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("tiny-q") / "model"
    convert(tiny_model_dir, str(out), quantize=True, q_group_size=32, q_bits=4)
    return str(out)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_two_ranks_equal_one(tiny_model_dir, tmp_path, quantized, request):
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    model_dir = request.getfixturevalue("quantized_tiny_dir") if quantized else tiny_model_dir
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, SCRIPT, model_dir, str(one)], timeout=150)
    _run([launcher, "-n", "2", "--backend", "ring", "--python", sys.executable, SCRIPT,
          model_dir, str(two)], timeout=200)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["plans"] > 10  # the followers really ran rank 0's steps
    assert a["versions"] == b["versions"] and a["versions"][-1] == 4  # every swap committed
    # tokens were generated under each version: adapter, base, the update, adapter on it
    seen = {v for x in a["done"].values() if isinstance(x, dict) for v in x["versions"]}
    assert seen == {0, 1, 2, 3, 4}
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

    # Swaps that cannot be prepared everywhere: a missing path fails alike; a directory removed
    # (or rewritten) after rank 0 read it prepares on one rank but fails on two - everywhere,
    # naming the rank - and the last request (6.0, compared above) shows the ranks still agree.
    assert a["probes"]["missing"] == ["not_found", b["probes"]["missing"][1].replace(
        "two-swaps", "one-swaps")]
    assert a["probes"]["removed"] == a["probes"]["rewritten"] == "prepared"
    kind, message = b["probes"]["removed"]
    assert kind == "not_found" and message.startswith("rank 1 of 2: adapter path ") and message.endswith(" does not exist")
    kind, message = b["probes"]["rewritten"]
    assert kind == "invalid" and "ranks 0 and 1 read different contents" in message
    assert a["final_version"] == b["final_version"] == 4


class _Group:  # what MLX's `_shard` asks of a group
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.mark.parametrize("axis,segments", [(0, 1), (1, 1), (0, 3), (0, (4, 12)),
                                           (1, (0.25, 0.5)), (0, (0.5,))])
def test_splits_cut_full_tensors_as_mlx_cuts_parameters(axis, segments):
    """What each rank keeps of an update or a LoRA factor is what `model.shard()` kept."""
    from mlx.nn.layers.distributed import _shard

    full = np.arange(24 * 16, dtype=np.float32).reshape(24, 16)
    for size in (2, 4):
        for rank in range(size):
            seg = list(segments) if isinstance(segments, tuple) else segments
            want = _shard({"w": mx.array(full)}, lambda p, w: (axis, seg), _Group(rank, size))["w"]
            got = sharding.take(full, sharding.Split(axis, segments, full.shape), rank, size)
            np.testing.assert_array_equal(got, np.array(want))
            np.testing.assert_array_equal(
                np.array(sharding.take(mx.array(full), sharding.Split(axis, segments, ()), rank,
                                       size, mx)), got)


def _sharded_tiny(model_dir, rank, size):
    """The tiny Llama as `load_sharded` leaves rank `rank` of `size` (no collective runs)."""
    from mlx_lm.utils import load_model

    model, _ = load_model(pathlib.Path(model_dir), lazy=True)
    with sharding.recording() as notes:
        model.shard(_Group(rank, size))
    sharding.attach(model, notes, _Group(rank, size))
    mx.eval(model.parameters())
    return model


def test_recording_names_every_split_of_a_sharded_llama(tiny_model_dir):
    """Attention and MLP projections are split on the output or input axis, norms and
    embeddings are not."""
    from mlx_lm.utils import load_model

    full = {n: tuple(a.shape) for n, a in
            tree_flatten(load_model(pathlib.Path(tiny_model_dir), lazy=True)[0].parameters())}
    model = _sharded_tiny(tiny_model_dir, 1, 2)
    plan = sharding.plan_of(model)
    assert plan.splits["model.layers.0.self_attn.q_proj.weight"] == sharding.Split(0, 1, full[
        "model.layers.0.self_attn.q_proj.weight"])
    assert plan.splits["model.layers.1.mlp.down_proj.weight"].axis == 1
    assert "model.norm.weight" not in plan.splits and "model.embed_tokens.weight" not in plan.splits
    assert {n for n in plan.splits} == {n for n in full if "proj" in n}
    assert not plan.pipelined and (plan.rank, plan.size) == (1, 2)


def test_each_rank_keeps_its_slice_of_full_updates_and_factors(tiny_model_dir, tmp_path):
    """Full tensors are checked against the full shapes and cut as the layer was: a weight
    update's slices, and LoRA factors (lora_b's columns for an output split, lora_a's rows for
    an input split) whose slices over the ranks make up the whole factor. DoRA is refused on
    an input-split layer, on every rank alike."""
    from mlxsup.demo import write_adapter
    from mlxsup.engine.adapter_files import AdapterError
    from mlxsup.engine.adapters import AdapterManager
    from mlxsup.engine.weights import WeightError, WeightManager, write_weights

    q, o = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    rng = np.random.default_rng(0)
    update = {q + ".weight": rng.normal(size=(64, 64)).astype(np.float32),
              o + ".weight": rng.normal(size=(64, 128)).astype(np.float32),
              "model.norm.weight": rng.normal(size=(64,)).astype(np.float32)}
    wdir = write_weights(str(tmp_path / "w"), {n: mx.array(a) for n, a in update.items()})
    factors = {q + ".lora_a": rng.normal(size=(64, 4)), q + ".lora_b": rng.normal(size=(4, 64)),
               o + ".lora_a": rng.normal(size=(128, 4)), o + ".lora_b": rng.normal(size=(4, 64))}
    adir = write_adapter(str(tmp_path / "a"), {n: a.astype(np.float32) for n, a in factors.items()},
                         rank=4, scale=1.0)
    dora = write_adapter(str(tmp_path / "d"), {o + ".lora_a": factors[o + ".lora_a"].astype(
        np.float32), o + ".lora_b": factors[o + ".lora_b"].astype(np.float32),
        o + ".m": np.ones(64, np.float32)}, rank=4, scale=1.0, fine_tune_type="dora")
    kept = {}
    for rank in (0, 1):
        model = _sharded_tiny(tiny_model_dir, rank, 2)
        weights = WeightManager(model).prepare(wdir)
        assert weights.arrays["model.norm.weight"].shape == (64,)
        adapters = AdapterManager(model)
        assert adapters.layer_specs[q].output_dims == 64 and adapters.layer_specs[o].input_dims == 128
        layers = adapters.prepare(adir).layers
        kept[rank] = (weights.arrays, layers)
        with pytest.raises(AdapterError, match="DoRA on a layer whose input is split"):
            adapters.prepare(dora)
        with pytest.raises(WeightError, match="does not match the model's"):  # a slice is not
            WeightManager(model).prepare(write_weights(str(tmp_path / f"s{rank}"), {
                q + ".weight": mx.zeros((32, 64))}))
    (w0, l0), (w1, l1) = kept[0], kept[1]
    np.testing.assert_array_equal(np.concatenate([w0[q + ".weight"], w1[q + ".weight"]], 0),
                                  update[q + ".weight"])
    np.testing.assert_array_equal(np.concatenate([w0[o + ".weight"], w1[o + ".weight"]], 1),
                                  update[o + ".weight"])
    f32 = {n: a.astype(np.float32) for n, a in factors.items()}
    np.testing.assert_array_equal(np.concatenate([l0[q].lora_b, l1[q].lora_b], 1), f32[q + ".lora_b"])
    np.testing.assert_array_equal(np.array(l0[q].lora_a), f32[q + ".lora_a"])
    np.testing.assert_array_equal(np.concatenate([l0[o].lora_a, l1[o].lora_a], 0), f32[o + ".lora_a"])
    np.testing.assert_array_equal(np.array(l1[o].lora_b), f32[o + ".lora_b"])
