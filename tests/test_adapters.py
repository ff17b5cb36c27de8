"""Adapters: validation of mlx-lm-format files, numerics against mlx-lm's own LoRA/DoRA,
swaps in each mode under running sequences, switching ranks and layer sets and back to the
base model, commit latency and flat memory."""

from __future__ import annotations

import json
import os
import random
import struct

import mlx.core as mx
import numpy as np
import pytest

from _engine_helpers import check_fidelity, done_by_request, drive, make_engine
from mlxsup.engine import AdapterError, Engine, EngineConfig
from mlxsup.demo import write_adapter
from mlxsup.ipc.messages import GenerateRequest, SamplingParams, SequenceDone, TokenChunk

pytestmark = pytest.mark.timeout(180)

_ids = iter(range(1, 10**9))


def make_adapter(engine, path, rank=8, select=None, dora=False, scale=2.0, seed=0,
                 dtype=np.float32, extra_config=None):
    """Random LoRA/DoRA tensors for the layers whose names contain one of `select`."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, spec in engine.adapters.layer_specs.items():
        if select and not any(s in name for s in select):
            continue
        tensors[name + ".lora_a"] = (rng.standard_normal((spec.input_dims, rank)) * 0.1).astype(dtype)
        tensors[name + ".lora_b"] = (rng.standard_normal((rank, spec.output_dims)) * 0.1).astype(dtype)
        if dora:
            tensors[name + ".m"] = (1.0 + rng.random(spec.output_dims)).astype(dtype)
    return write_adapter(str(path), tensors, rank, scale, "dora" if dora else "lora",
                         extra_config=extra_config)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


def logits_of(model, ids=(5, 17, 33, 2, 101, 7)):
    out = model(mx.array([list(ids)]))
    mx.eval(out)
    return np.array(out[0])


def req(prompt, stream=False, **params):
    return GenerateRequest(next(_ids), prompt, SamplingParams(**params), stream=stream)


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_logits_match_mlx_lm(engine, tiny_model_dir, tmp_path, dora):
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    path = make_adapter(engine, tmp_path / "a", rank=8, select=["q_proj", "down_proj", "v_proj"],
                        dora=dora)
    ref_model, _ = load(tiny_model_dir)
    load_adapters(ref_model, path)
    base = logits_of(engine.model)
    engine.adapters.commit(engine.prepare_adapter(path))
    try:
        got = logits_of(engine.model)
    finally:
        engine.adapters.commit(engine.prepare_adapter(None))
    np.testing.assert_allclose(got, logits_of(ref_model), atol=2e-5, rtol=1e-5)
    assert np.abs(got - base).max() > 1e-2  # the adapter does something
    np.testing.assert_array_equal(logits_of(engine.model), base)  # and base is back exactly


def test_initial_adapter_and_tolerated_config_keys(tiny_model_dir, tmp_path, engine):
    path = make_adapter(engine, tmp_path / "a", rank=4, extra_config={
        "model_type": "llama", "target_modules": ["q_proj"], "trainable": True,
        "lora_parameters_extra": 1})
    eng = make_engine(tiny_model_dir, adapter_path=path)
    assert eng.adapter_path == path and eng.policy_version == 0
    eng2 = make_engine(tiny_model_dir)
    eng2.adapters.commit(eng2.prepare_adapter(path))
    np.testing.assert_array_equal(logits_of(eng.model), logits_of(eng2.model))


def test_switch_ranks_layer_sets_dora_and_back_to_base(engine, tmp_path):
    base = logits_of(engine.model)
    specs = [
        dict(rank=4, select=["self_attn"]),
        dict(rank=16, select=["mlp"]),
        dict(rank=8, dora=True),
        dict(rank=2, select=["layers.0.self_attn.o_proj"], dtype=np.float16),
    ]
    seen = []
    for i, spec in enumerate(specs):
        prep = engine.prepare_adapter(make_adapter(engine, tmp_path / f"a{i}", seed=i, **spec))
        engine.adapters.commit(prep)
        seen.append(logits_of(engine.model))
        # A fresh engine-free check: the same adapter committed again gives the same logits.
        engine.adapters.commit(engine.prepare_adapter(None))
        np.testing.assert_array_equal(logits_of(engine.model), base)
        engine.adapters.commit(prep)
        np.testing.assert_array_equal(logits_of(engine.model), seen[-1])
    engine.adapters.commit(engine.prepare_adapter(None))
    np.testing.assert_array_equal(logits_of(engine.model), base)
    for a in range(len(seen)):
        for b in range(a):
            assert np.abs(seen[a] - seen[b]).max() > 1e-3


# ------------------------------------------------------------------ validation


def corrupt_cases(engine, tmp):
    good = make_adapter(engine, tmp / "good", rank=4, select=["q_proj"])
    names = sorted(n for n in engine.adapters.layer_specs if "q_proj" in n)
    first = names[0] if names else None
    cases = {}

    def clone(name):
        import shutil
        dst = tmp / name
        shutil.copytree(good, dst)
        return dst

    d = clone("no_config")
    os.remove(d / "adapter_config.json")
    cases["no_config"] = (d, "adapter_config.json is missing")

    d = clone("no_weights")
    os.remove(d / "adapters.safetensors")
    cases["no_weights"] = (d, "adapters.safetensors is missing")

    d = clone("bad_json")
    (d / "adapter_config.json").write_text("{not json")
    cases["bad_json"] = (d, "not valid JSON")

    d = clone("alpha")
    (d / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 4, "alpha": 8}}))
    cases["alpha"] = (d, "not 'alpha'")

    d = clone("truncated")
    data = (d / "adapters.safetensors").read_bytes()
    (d / "adapters.safetensors").write_bytes(data[:-10])
    cases["truncated"] = (d, "truncated")

    d = clone("garbage")
    (d / "adapters.safetensors").write_bytes(b"\xff" * 64)
    cases["garbage"] = (d, "corrupt")

    rng = np.random.default_rng(0)
    spec = engine.adapters.layer_specs[first]
    d = tmp / "wrong_shape"
    write_adapter(str(d), {first + ".lora_a": rng.standard_normal((spec.input_dims, 8)).astype(np.float32),
                           first + ".lora_b": rng.standard_normal((8, spec.output_dims)).astype(np.float32)},
                  rank=4, scale=1.0)
    cases["wrong_shape"] = (d, f"tensor '{first}.lora_a': shape")

    d = tmp / "unknown_layer"
    write_adapter(str(d), {"model.layers.99.self_attn.q_proj.lora_a": np.zeros((4, 4), np.float32)},
                  rank=4, scale=1.0)
    cases["unknown_layer"] = (d, "'model.layers.99.self_attn.q_proj.lora_a': the model has no")

    d = tmp / "missing_b"
    write_adapter(str(d), {first + ".lora_a": np.zeros((spec.input_dims, 4), np.float32)},
                  rank=4, scale=1.0)
    cases["missing_b"] = (d, f"'{first}.lora_b' is missing")

    d = tmp / "nan"
    a = np.zeros((spec.input_dims, 4), np.float32)
    a[0, 0] = np.nan
    write_adapter(str(d), {first + ".lora_a": a,
                           first + ".lora_b": np.zeros((4, spec.output_dims), np.float32)},
                  rank=4, scale=1.0)
    cases["nan"] = (d, "NaN")

    d = tmp / "int_dtype"
    write_adapter(str(d), {first + ".lora_a": np.zeros((spec.input_dims, 4), np.float32)},
                  rank=4, scale=1.0)
    raw = bytearray((d / "adapters.safetensors").read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n].replace(b'"F32"', b'"I32"')
    (d / "adapters.safetensors").write_bytes(bytes(raw[:8]) + header + bytes(raw[8 + n :]))
    cases["int_dtype"] = (d, "dtype 'I32' is not supported")

    d = tmp / "m_in_lora"
    write_adapter(str(d), {first + ".m": np.ones((spec.output_dims,), np.float32)}, rank=4,
                  scale=1.0)
    cases["m_in_lora"] = (d, "DoRA magnitude")

    d = clone("full")
    (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full"}))
    cases["full"] = (d, "not an adapter")
    return good, cases


def test_bad_adapters_refused_with_clear_message_and_old_version_serving(engine, tmp_path):
    good, cases = corrupt_cases(engine, tmp_path)
    prepared = engine.prepare_adapter(good)
    engine.request_swap(prepared, "inflight", engine.policy_version + 1)
    engine.step()
    version, logits = engine.policy_version, logits_of(engine.model)
    for name, (path, expected) in cases.items():
        with pytest.raises(AdapterError) as e:
            engine.prepare_adapter(str(path))
        assert expected in str(e.value), (name, str(e.value))
        assert e.value.kind == "invalid"
        assert engine.policy_version == version and engine.adapter_path == good
        np.testing.assert_array_equal(logits_of(engine.model), logits)
    with pytest.raises(AdapterError) as e:
        engine.prepare_adapter(str(tmp_path / "does-not-exist"))
    assert e.value.kind == "not_found"
    [[done]] = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=4))
    assert done.versions == [version] * 4
    engine.request_swap(engine.prepare_adapter(None), "inflight", engine.policy_version + 1)
    engine.step()


# ------------------------------------------------------------------ swaps under load


def start(engine, n=4, max_tokens=24, **params):
    rng = random.Random(len(engine._requests))
    reqs = [req([rng.randrange(3, 500) for _ in range(rng.randrange(2, 12))],
                max_tokens=max_tokens, logprobs_mode="processed", **params) for _ in range(n)]
    for r in reqs:
        engine.submit(r)
    return reqs


@pytest.mark.parametrize("pipeline", [False, True], ids=["stepwise", "pipelined"])
def test_inflight_swap_tags_each_token(tiny_model_dir, tmp_path, pipeline):
    eng = make_engine(tiny_model_dir, pipeline=pipeline)
    prep = eng.prepare_adapter(make_adapter(eng, tmp_path / "a", rank=8))
    reqs = start(eng, temperature=1.0)
    events = drive(eng, [], steps=6)
    ticket = eng.request_swap(prep, "inflight", 1)
    events = drive(eng, events, steps=1)
    assert ticket.done and eng.policy_version == 1  # committed at the first step boundary
    later = start(eng, temperature=0.7)
    done = done_by_request(drive(eng, events))
    switch_points = set()
    for r in reqs:
        v = done[r.request_id].versions
        assert v == sorted(v) and v[0] == 0 and v[-1] == 1
        switch_points.add(v.index(1))
        base_part = done[r.request_id].token_ids[: v.index(1)]
        eng.adapters.commit(eng.prepare_adapter(None))
        check_fidelity(eng.model, r.prompt_ids, base_part, done[r.request_id].logprobs[: len(base_part)],
                       r.params, "processed")
        eng.adapters.commit(prep)
    assert len(switch_points) == 1  # every running sequence switched at the same step
    for r in later:
        d = done[r.request_id]
        assert set(d.versions) == {1} and d.policy_version == 1
        check_fidelity(eng.model, r.prompt_ids, d.token_ids, d.logprobs, r.params, "processed")


@pytest.mark.parametrize("pipeline", [False, True], ids=["stepwise", "pipelined"])
def test_inflight_swap_reaches_new_tokens_one_step_sooner_stepwise(tiny_model_dir, tmp_path,
                                                                      pipeline):
    """Swap latency in steps: run to their end, the step that commits an inflight swap already
    returns new-version tokens; pipelined, that step returns the tokens of the step queued
    before the commit (old weights) and the new version shows one step later."""
    eng = make_engine(tiny_model_dir, pipeline=pipeline)
    prep = eng.prepare_adapter(make_adapter(eng, tmp_path / "a", rank=8))
    reqs = [req([7, 8, 9, 10 + i], max_tokens=40, temperature=1.0, stream=True) for i in range(3)]
    for r in reqs:
        eng.submit(r)
    drive(eng, [], steps=4)
    ticket = eng.request_swap(prep, "inflight", 1)

    def versions_of(events):
        return [v for e in events if isinstance(e, TokenChunk) for v in e.versions]

    first = versions_of(eng.step())
    assert ticket.done and len(first) == 3
    if pipeline:
        assert first == [0, 0, 0]
        assert versions_of(eng.step()) == [1, 1, 1]
    else:
        assert first == [1, 1, 1]
    eng.abort_all()
    eng.step()


def test_first_token_of_a_swap_is_reported_once_from_the_step_that_made_it(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir, pipeline=False)
    prep = eng.prepare_adapter(make_adapter(eng, tmp_path / "a", rank=8))
    calls = []
    for i in range(2):
        eng.submit(req([7, 8, 9, 10 + i], max_tokens=30, temperature=1.0, stream=True))
    drive(eng, [], steps=3)
    ticket = eng.request_swap(prep, "inflight", 1, on_first_token=calls.append)
    events = eng.step()  # commits, then runs the new weights (stepwise)
    assert ticket.done and calls == [ticket] and ticket.running_at_commit == 2
    assert ticket.committed_at <= ticket.first_token_at
    assert {v for e in events if isinstance(e, TokenChunk) for v in e.versions} == {1}
    drive(eng, [], steps=3)
    assert calls == [ticket]  # once
    # Committed with nothing running: the first token is the next request's.
    ticket2 = eng.request_swap(eng.prepare_adapter(None), "inflight", 2, on_first_token=calls.append)
    eng.abort_all()
    eng.step()
    assert ticket2.done and ticket2.running_at_commit == 0 and calls == [ticket]
    r = req([3, 4, 5], max_tokens=2)
    eng.submit(r)
    drive(eng, [])
    assert calls == [ticket, ticket2] and ticket2.first_token_at >= ticket2.committed_at


def test_a_failing_first_token_callback_fails_nothing(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir)
    prep = eng.prepare_adapter(make_adapter(eng, tmp_path / "a", rank=8))
    r = req([7, 8, 9], max_tokens=8, temperature=1.0)
    eng.submit(r)
    drive(eng, [], steps=2)

    def boom(ticket):
        raise RuntimeError("the supervisor is gone")

    eng.request_swap(prep, "inflight", 1, on_first_token=boom)
    done = done_by_request(drive(eng, []))
    assert done[r.request_id].finish_reason == "length" and len(done[r.request_id].token_ids) == 8


def test_drain_swap_never_mixes_versions(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir, max_batch=3)
    prep = eng.prepare_adapter(make_adapter(eng, tmp_path / "a", rank=8, dora=True))
    first = start(eng, n=2, temperature=1.0)
    group = GenerateRequest(next(_ids), [4, 5, 6], SamplingParams(max_tokens=10, temperature=1.0), n=4)
    eng.submit(group)  # 4 samples, 1 row left: the group is admitted in parts
    events = drive(eng, [], steps=3)
    ticket = eng.request_swap(prep, "drain", 1)
    newcomer = start(eng, n=2, temperature=1.0)
    events = drive(eng, events)
    assert ticket.done
    done = done_by_request(events)
    for r in first:
        assert set(done[r.request_id].versions) == {0}
    group_dones = [e for e in events if isinstance(e, SequenceDone) and e.request_id == group.request_id]
    assert len(group_dones) == 4 and all(set(d.versions) == {0} for d in group_dones)
    for r in newcomer:
        d = done[r.request_id]
        assert set(d.versions) == {1}
        check_fidelity(eng.model, r.prompt_ids, d.token_ids, d.logprobs, r.params, "processed")


def test_abort_swap_ends_running_sequences(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir)
    prep = eng.prepare_adapter(make_adapter(eng, tmp_path / "a", rank=8))
    running = start(eng, n=3, max_tokens=100, temperature=1.0)
    events = drive(eng, [], steps=5)
    ticket = eng.request_swap(prep, "abort", 7)
    events += eng.step()
    assert ticket.done and eng.policy_version == 7
    done = done_by_request(events)
    for r in running:
        d = done[r.request_id]
        assert d.finish_reason == "abort" and 0 < len(d.token_ids) < 100
        assert set(d.versions) == {0}
    after = start(eng, n=2, temperature=1.0, max_tokens=5)
    done = done_by_request(drive(eng, events))
    assert all(set(done[r.request_id].versions) == {7} for r in after)
    with pytest.raises(ValueError):
        eng.request_swap(prep, "drain", 7)  # versions never repeat


def test_group_prefix_not_reused_across_versions(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir, max_batch=2)
    prep = eng.prepare_adapter(make_adapter(eng, tmp_path / "a", rank=8))
    group = GenerateRequest(next(_ids), list(range(3, 20)), SamplingParams(
        max_tokens=6, temperature=1.0, logprobs_mode="raw"), n=4)
    eng.submit(group)
    events = drive(eng, [], steps=2)
    eng.request_swap(prep, "inflight", 1)
    events = drive(eng, events)
    dones = [e for e in events if isinstance(e, SequenceDone)]
    late = [d for d in dones if set(d.versions) == {1}]
    assert late, "some samples started after the swap"
    assert eng.stats()["prefill_tokens"] == 2 * len(group.prompt_ids)  # re-prefilled once
    for d in late:
        check_fidelity(eng.model, group.prompt_ids, d.token_ids, d.logprobs, group.params, "raw")


def test_chunked_prefill_across_a_swap_keeps_no_two_version_prefix(tiny_model_dir, tmp_path):
    """A prompt prefilled 8 tokens a step is half done when an inflight swap commits: its KV
    holds both versions, so its state is not kept for the group's later samples, which
    prefill again under the new version; every token comes from the new weights."""
    eng = make_engine(tiny_model_dir, max_batch=3, prefill_chunk_tokens=8)
    prep = eng.prepare_adapter(make_adapter(eng, tmp_path / "a", rank=8))
    busy = GenerateRequest(next(_ids), [5, 6, 7], SamplingParams(max_tokens=60, temperature=0.0))
    eng.submit(busy)  # a row decodes, so prefill is chunked
    events = drive(eng, [], steps=1)
    group = GenerateRequest(next(_ids), list(range(3, 60)), SamplingParams(
        max_tokens=4, temperature=1.0, logprobs_mode="raw"), n=4)
    eng.submit(group)
    events = drive(eng, events, steps=2)
    assert eng.runner.num_prefilling == 2  # the first two samples, mid-prompt
    eng.request_swap(prep, "inflight", 1)
    events = drive(eng, events)
    dones = [e for e in events if isinstance(e, SequenceDone) and e.request_id == group.request_id]
    assert len(dones) == 4 and all(set(d.versions) == {1} for d in dones)
    # re-prefilled once
    assert eng.stats()["prefill_tokens"] == len(busy.prompt_ids) + 2 * len(group.prompt_ids)
    late = dones[2:]  # the two prefilled under version 1 alone
    for d in late:
        check_fidelity(eng.model, group.prompt_ids, d.token_ids, d.logprobs, group.params, "raw")


def test_drain_swap_waits_for_a_prompt_still_prefilling(tiny_model_dir, tmp_path):
    """Chunked prefill: a sequence admitted and still prefilling when a drain swap is asked
    for is in flight, so it finishes under the old version before the commit."""
    eng = make_engine(tiny_model_dir, prefill_chunk_tokens=8)
    prep = eng.prepare_adapter(make_adapter(eng, tmp_path / "a", rank=8))
    busy = GenerateRequest(next(_ids), [5, 6, 7], SamplingParams(max_tokens=20, temperature=0.0))
    eng.submit(busy)  # a row decodes, so prefill is chunked
    events = drive(eng, [], steps=1)
    long = GenerateRequest(next(_ids), list(range(3, 80)), SamplingParams(
        max_tokens=5, temperature=1.0), n=2)
    eng.submit(long)
    events = drive(eng, events, steps=2)
    assert eng.runner.num_prefilling == 2
    ticket = eng.request_swap(prep, "drain", 1)
    later = GenerateRequest(next(_ids), [4, 5, 6], SamplingParams(max_tokens=3, temperature=1.0))
    eng.submit(later)
    events = drive(eng, events)
    done = done_by_request(events)
    assert ticket.done and eng.policy_version == 1
    firsts = [e for e in events if isinstance(e, SequenceDone) and e.request_id == long.request_id]
    assert len(firsts) == 2 and all(set(d.versions) == {0} for d in firsts)
    assert set(done[later.request_id].versions) == {1}


# ------------------------------------------------------------------ latency and memory


def test_prepared_rank16_commit_is_fast(engine, tmp_path):
    prep = engine.prepare_adapter(make_adapter(engine, tmp_path / "a", rank=16))
    assert prep.rank == 16 and prep.num_layers == len(engine.adapters.layer_specs)
    times = []
    for v in range(3):
        t = engine.request_swap(prep if v % 2 == 0 else engine.prepare_adapter(None), "inflight",
                                engine.policy_version + 1)
        engine.step()
        times.append(t.commit_ms)
    assert max(times) < 5.0


def test_memory_flat_over_swaps_and_requests(tiny_model_dir, tmp_path):
    import gc

    import psutil

    eng = make_engine(tiny_model_dir, max_batch=16)
    paths = [make_adapter(eng, tmp_path / f"a{i}", rank=r, seed=i)
             for i, r in enumerate((4, 16, 8))]
    proc = psutil.Process()

    def cycle(k):
        for i in range(10):
            prep = eng.prepare_adapter(paths[(k + i) % 3] if i % 4 else None)
            eng.request_swap(prep, ("inflight", "drain", "abort")[i % 3], eng.policy_version + 1)
            eng.generate([[3 + i, 4, 5]] * 5, SamplingParams(max_tokens=8, temperature=1.0), n=2)
        gc.collect()
        mx.clear_cache()
        return mx.get_active_memory(), proc.memory_info().rss

    cycle(0)  # warm up allocator pools and caches
    mem0, rss0 = cycle(1)
    for k in range(2, 6):
        mem, rss = cycle(k)
    assert eng.stats()["num_swaps"] == 60
    assert mem <= mem0 + 64 * 1024, (mem0, mem)
    assert rss <= rss0 + 32 * 2**20, (rss0, rss)


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_on_a_quantized_model_match_mlx_lm(tiny_model_dir, tmp_path, dora):
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    model, tok = load(tiny_model_dir)
    nn.quantize(model, group_size=32, bits=4)
    eng = Engine(EngineConfig(model=tiny_model_dir, max_batch=4, flush_interval_ms=0),
                 model=model, tokenizer=tok)
    assert eng.adapters.layer_specs  # quantized linears are adaptable too
    path = make_adapter(eng, tmp_path / "a", rank=4, select=["o_proj", "up_proj"], dora=dora)
    ref, _ = load(tiny_model_dir)
    nn.quantize(ref, group_size=32, bits=4)
    load_adapters(ref, path)
    eng.adapters.commit(eng.prepare_adapter(path))
    np.testing.assert_allclose(logits_of(eng.model), logits_of(ref), atol=2e-5, rtol=1e-5)
