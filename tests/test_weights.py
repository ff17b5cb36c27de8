"""Full and partial weight updates in the engine: numerics against a fresh model holding the
new weights in every swap mode, version tags of tokens in flight, every kind of bad file refused
with nothing changed, subset updates, checkpoint (Hugging Face) names, quantized models, and
adapters on top of updated weights."""

from __future__ import annotations

import json
import os
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from _engine_helpers import check_fidelity, done_by_request, drive, make_engine
from mlxsup.engine import Engine, EngineConfig
from mlxsup.engine.weights import WeightError, write_weights
from mlxsup.ipc.messages import GenerateRequest, SamplingParams

pytestmark = pytest.mark.timeout(240)

_ids = iter(range(1, 10**9))
PROMPTS = [[5, 17, 33, 2], [101, 7, 9], [44, 45, 46, 47, 48], [3, 250, 11]]


def params_of(model) -> dict:
    return dict(tree_flatten(model.parameters()))


def perturbed(model, select=None, seed=1, scale=0.5) -> dict:
    """New values for the parameters whose names contain one of `select` (all: None)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, arr in params_of(model).items():
        if select and not any(s in name for s in select):
            continue
        noise = rng.standard_normal(arr.shape).astype(np.float32) * scale * float(
            mx.abs(arr).mean().item() or 1.0)
        out[name] = (arr + mx.array(noise)).astype(arr.dtype)
    return out


def reference(model_dir, update: dict):
    """A fresh model loaded by mlx_lm with `update` on top: what the engine must compute."""
    from mlx_lm import load

    ref, _ = load(model_dir)
    ref.load_weights(list(update.items()), strict=False)
    mx.eval(ref.parameters())
    return ref


def logits_of(model, ids=(5, 17, 33, 2, 101, 7)):
    out = model(mx.array([list(ids)]))
    mx.eval(out)
    return np.array(out[0])


def req(prompt, **params):
    return GenerateRequest(next(_ids), prompt, SamplingParams(**params))


# ------------------------------------------------------------------ numerics in every mode


@pytest.mark.parametrize("mode", ["drain", "abort", "inflight"])
@pytest.mark.parametrize("pipeline", [False, True], ids=["stepwise", "pipelined"])
def test_update_serves_the_new_weights_in_every_mode(tiny_model_dir, tmp_path, mode, pipeline):
    eng = make_engine(tiny_model_dir, pipeline=pipeline)
    old = reference(tiny_model_dir, {})
    update = perturbed(eng.model)
    new = reference(tiny_model_dir, update)
    prepared = eng.prepare_weights(write_weights(str(tmp_path / "w"), update))
    running = [req(p, max_tokens=30, temperature=1.0, logprobs_mode="processed") for p in PROMPTS]
    for r in running:
        eng.submit(r)
    events = drive(eng, [], steps=5)
    ticket = eng.request_swap(prepared, mode, 1)
    later = [req(p, max_tokens=12, temperature=0.8, logprobs_mode="processed") for p in PROMPTS]
    for r in later:
        eng.submit(r)
    done = done_by_request(drive(eng, events))
    assert ticket.done and eng.policy_version == 1
    for r in running:
        d = done[r.request_id]
        v = d.versions
        assert v == sorted(v) and v[0] == 0
        if mode == "drain":
            assert set(v) == {0} and d.finish_reason == "length"
        elif mode == "abort":
            assert set(v) == {0} and d.finish_reason == "abort" and len(v) < 30
        else:
            assert v[-1] == 1 and d.finish_reason == "length"
        k = v.index(1) if 1 in v else len(v)
        check_fidelity(old, r.prompt_ids, d.token_ids[:k], d.logprobs[:k], r.params, "processed")
        # Inflight tokens after the switch came from the new weights on KV the old ones
        # computed: no single set of weights reproduces them (as for adapters).
    for r in later:
        d = done[r.request_id]
        assert set(d.versions) == {1} and d.policy_version == 1
        check_fidelity(new, r.prompt_ids, d.token_ids, d.logprobs, r.params, "processed")
    np.testing.assert_allclose(logits_of(eng.model), logits_of(new), atol=1e-5, rtol=1e-5)


def test_score_after_an_update_is_the_new_weights(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir)
    update = perturbed(eng.model, seed=3)
    eng.request_swap(eng.prepare_weights(write_weights(str(tmp_path / "w"), update)), "drain", 1)
    [[d]] = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.0,
                                                       logprobs_mode="raw"))
    assert d.versions == [1] * 10
    check_fidelity(reference(tiny_model_dir, update), PROMPTS[0], d.token_ids, d.logprobs,
                   SamplingParams(temperature=0.0, logprobs_mode="raw"), "raw")


@pytest.mark.parametrize("mode", ["drain", "abort", "inflight"])
def test_the_prefix_cache_serves_no_kv_of_the_old_weights(tiny_model_dir, tmp_path, mode):
    """The same prompt before and after an update: the second is computed under the new weights
    (nothing of the cache's old-weight KV is reused), then cached again under them."""
    eng = make_engine(tiny_model_dir, pipeline=False)
    assert eng.runner.prefix_cache is not None
    prompt = [int(t) for t in np.random.default_rng(4).integers(3, 500, 60)]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, logprobs_mode="raw", ignore_eos=True)

    def one():
        r = GenerateRequest(next(_ids), list(prompt), params)
        eng.submit(r)
        return done_by_request(drive(eng, []))[r.request_id]

    before = one()
    assert one().num_cached_tokens == len(prompt) - 1  # the cache serves this prompt
    update = perturbed(eng.model, seed=6)
    running = req(prompt + [7, 8, 9], max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    eng.submit(running)  # a row on the cached prompt, running across the commit
    drive(eng, [], steps=3)
    ticket = eng.request_swap(eng.prepare_weights(write_weights(str(tmp_path / "w"), update)), mode, 1)
    while not ticket.done:
        eng.step()
    got = one()
    assert got.num_cached_tokens == 0 and got.versions == [1] * 8
    check_fidelity(reference(tiny_model_dir, update), prompt, got.token_ids, got.logprobs, params, "raw",
                   tol=1e-5)
    assert got.logprobs != before.logprobs
    again = one()  # now cached under the new weights
    assert again.num_cached_tokens == len(prompt) - 1
    np.testing.assert_allclose(again.logprobs, got.logprobs, atol=1e-5)


# ------------------------------------------------------------------ subsets and names


def test_a_subset_update_touches_only_those_tensors(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir)
    before = params_of(eng.model)
    update = perturbed(eng.model, select=["layers.1.mlp", "model.norm"])
    assert 0 < len(update) < len(before)
    eng.request_swap(eng.prepare_weights(write_weights(str(tmp_path / "w"), update)), "drain", 1)
    eng.step()
    after = params_of(eng.model)
    assert after.keys() == before.keys()
    for name in before:
        if name in update:
            assert after[name] is not before[name]
            np.testing.assert_array_equal(np.array(after[name]), np.array(update[name]))
        else:
            assert after[name] is before[name], name  # the very same array, not a copy
    np.testing.assert_allclose(logits_of(eng.model), logits_of(reference(tiny_model_dir, update)),
                               atol=1e-5, rtol=1e-5)


def test_checkpoint_names_are_sanitized_as_mlx_lm_load_does(tiny_model_dir, tmp_path):
    """A Hugging Face checkpoint of a tied Llama: lm_head.weight and rotary inv_freq entries
    that mlx-lm's Llama.sanitize drops, sharded into two files."""
    eng = make_engine(tiny_model_dir)
    update = perturbed(eng.model, seed=5)
    names = sorted(update)
    half = len(names) // 2
    shard1 = {n: update[n] for n in names[:half]}
    shard1["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones((8,))
    shard2 = {n: update[n] for n in names[half:]}
    shard2["lm_head.weight"] = update["model.embed_tokens.weight"]
    d = str(tmp_path / "hf")
    write_weights(d, shard1, "model-00001-of-00002.safetensors")
    write_weights(d, shard2, "model-00002-of-00002.safetensors")
    prepared = eng.prepare_weights(d)
    assert sorted(prepared.names) == names
    eng.request_swap(prepared, "drain", 1)
    eng.step()
    np.testing.assert_allclose(logits_of(eng.model), logits_of(reference(tiny_model_dir, update)),
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ bad files


def _raw_file(path, header: dict, data: bytes) -> str:
    os.makedirs(path, exist_ok=True)
    blob = json.dumps(header).encode()
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


def bad_cases(eng, tmp, other_model_dir):
    good = perturbed(eng.model, select=["layers.0.mlp"], seed=9)
    w = "model.layers.0.mlp.up_proj.weight"
    cases = {}

    d = write_weights(str(tmp / "truncated"), good)
    f = os.path.join(d, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    cases["truncated"] = (d, "truncated")

    cases["wrong_shape"] = (write_weights(str(tmp / "shape"), {**good, w: mx.zeros((64, 128))}),
                            "shape (64, 128) does not match the model's (128, 64)")
    cases["wrong_dtype"] = (write_weights(str(tmp / "dtype"), {**good, w: good[w].astype(mx.float16)}),
                            "dtype float16 does not match the model's float32")
    cases["unknown_name"] = (write_weights(str(tmp / "unknown"), {**good, "model.layers.7.mlp.up_proj.weight":
                                                                  good[w]}),
                             "model.layers.7.mlp.up_proj.weight")
    other = dict(tree_flatten(Engine(EngineConfig(model=other_model_dir)).model.parameters()))
    cases["another_model"] = (write_weights(str(tmp / "other"), other), "problem")
    nan = np.array(good[w])
    nan[3, 4] = np.nan
    cases["nan"] = (write_weights(str(tmp / "nan"), {**good, w: mx.array(nan)}), "NaN")
    cases["header_not_json"] = (_corrupt_header(tmp / "hdr"),
                                "not JSON")
    cases["data_past_end"] = (_raw_file(tmp / "past", {w: {"dtype": "F32", "shape": [128, 64],
                                                            "data_offsets": [0, 128 * 64 * 4]}}, b"\0" * 64),
                              "truncated")
    cases["pickle"] = (_pickle_dir(tmp / "pickle"), "is a pickle/zip checkpoint")
    os.makedirs(tmp / "empty", exist_ok=True)
    cases["no_files"] = (str(tmp / "empty"), "holds no .safetensors files")
    cases["missing_dir"] = (str(tmp / "does-not-exist"), "does not exist")
    return cases


def _corrupt_header(path) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", 10) + b"{not json}")
    return str(path)


def _pickle_dir(path) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x80\x04\x95" + b"\0" * 200)
    return str(path)


def test_every_bad_file_is_refused_and_the_old_weights_keep_serving(tiny_model_dir, demo_model_dir,
                                                                    tmp_path):
    eng = make_engine(tiny_model_dir)
    before = params_of(eng.model)
    logits0 = logits_of(eng.model)
    cases = bad_cases(eng, tmp_path, demo_model_dir)
    for name, (path, needle) in cases.items():
        with pytest.raises(WeightError) as e:
            eng.prepare_weights(path)
        assert needle in str(e.value), (name, str(e.value))
        assert (e.value.kind == "not_found") == (name == "missing_dir"), name
    assert eng.policy_version == 0 and eng.pending_swap is None
    after = params_of(eng.model)
    assert all(after[n] is before[n] for n in before)
    np.testing.assert_array_equal(logits_of(eng.model), logits0)
    [[d]] = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=4))
    assert d.versions == [0] * 4


def test_all_mismatches_are_named_in_one_error(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir)
    update = perturbed(eng.model, select=["layers.0"], seed=2)
    update["model.layers.0.mlp.up_proj.weight"] = mx.zeros((3, 3))
    update["model.layers.0.self_attn.q_proj.weight"] = mx.zeros((64, 64), dtype=mx.bfloat16)
    update["model.layers.9.mlp.up_proj.weight"] = mx.zeros((3,))
    with pytest.raises(WeightError) as e:
        eng.prepare_weights(write_weights(str(tmp_path / "w"), update))
    msg = str(e.value)
    assert "3 problem(s)" in msg
    for needle in ("model.layers.0.mlp.up_proj.weight", "dtype bfloat16",
                   "model.layers.9.mlp.up_proj.weight"):
        assert needle in msg, msg


# ------------------------------------------------------------------ quantized models


def quantized_engine(model_dir):
    from mlx_lm import load

    model, tok = load(model_dir)
    nn.quantize(model, group_size=32, bits=4)
    return Engine(EngineConfig(model=model_dir, max_batch=4, flush_interval_ms=0), model=model,
                  tokenizer=tok)


def test_a_quantized_model_takes_quantized_tensors_and_refuses_float_ones(tiny_model_dir, tmp_path):
    eng = quantized_engine(tiny_model_dir)
    layer = "model.layers.1.mlp.up_proj"
    dense = mx.random.normal((128, 64), key=mx.random.key(4)) * 0.05
    with pytest.raises(WeightError) as e:
        eng.prepare_weights(write_weights(str(tmp_path / "float"), {layer + ".weight": dense}))
    assert "is quantized (affine, 4 bits, group size 32)" in str(e.value)
    assert "mx.quantize(w, group_size=32, bits=4)" in str(e.value)
    wq, scales, biases = mx.quantize(dense, group_size=32, bits=4)
    with pytest.raises(WeightError) as e:
        eng.prepare_weights(write_weights(str(tmp_path / "part"), {layer + ".weight": wq}))
    assert "go together" in str(e.value)

    update = {layer + ".weight": wq, layer + ".scales": scales, layer + ".biases": biases}
    eng.request_swap(eng.prepare_weights(write_weights(str(tmp_path / "q"), update)), "drain", 1)
    eng.step()
    from mlx_lm import load

    ref, _ = load(tiny_model_dir)
    nn.quantize(ref, group_size=32, bits=4)
    ref.load_weights(list(update.items()), strict=False)
    np.testing.assert_allclose(logits_of(eng.model), logits_of(ref), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ adapters and updates


def test_an_update_is_refused_while_an_adapter_is_loaded_and_an_adapter_applies_on_top(
        tiny_model_dir, tmp_path):
    from mlx_lm.tuner.utils import load_adapters

    from test_adapters import make_adapter

    eng = make_engine(tiny_model_dir)
    adapter = make_adapter(eng, tmp_path / "a", rank=4)
    update = perturbed(eng.model, seed=7)
    wdir = write_weights(str(tmp_path / "w"), update)
    eng.request_swap(eng.prepare_adapter(adapter), "drain", 1)
    eng.step()
    with pytest.raises(WeightError, match="an adapter is loaded"):
        eng.prepare_weights(wdir)
    eng.request_swap(eng.prepare_adapter(None), "drain", 2)
    eng.step()
    eng.request_swap(eng.prepare_weights(wdir), "drain", 3)
    eng.step()
    eng.request_swap(eng.prepare_adapter(adapter), "drain", 4)
    eng.step()
    ref = reference(tiny_model_dir, update)
    load_adapters(ref, adapter)
    np.testing.assert_allclose(logits_of(eng.model), logits_of(ref), atol=1e-5, rtol=1e-5)
    eng.request_swap(eng.prepare_adapter(None), "drain", 5)  # the adapter off: the updated base
    eng.step()
    np.testing.assert_allclose(logits_of(eng.model), logits_of(reference(tiny_model_dir, update)),
                               atol=1e-5, rtol=1e-5)


def test_a_new_engine_replays_committed_updates_in_order(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir)
    first = perturbed(eng.model, seed=11)
    second = perturbed(eng.model, select=["layers.0"], seed=12)
    dirs = (write_weights(str(tmp_path / "1"), first), write_weights(str(tmp_path / "2"), second))
    restarted = make_engine(tiny_model_dir, weight_dirs=dirs)
    np.testing.assert_allclose(logits_of(restarted.model),
                               logits_of(reference(tiny_model_dir, {**first, **second})),
                               atol=1e-5, rtol=1e-5)
