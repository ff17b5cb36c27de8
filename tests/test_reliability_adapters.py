"""Adapters over real HTTP, real processes (docs/reliability.md):

- broken adapters (truncated or corrupt safetensors, wrong shapes, another model's adapter,
  missing or broken config, a path that is a file, an empty directory, a pickle, NaN weights):
  each refused with a 4xx naming the problem, through /load_adapter, /upload_adapter and the
  CLI, while the old adapter keeps serving the same tokens at the same version;
- concurrent reloads from many clients of every kind (HTTP on fresh connections, uploads, the
  CLI), mixed with refused ones and under generation load: serialised, each committed swap
  adds exactly one, none lost, none repeated;
- swaps under load in each mode, every token's reported version checked against /score under
  that version's weights: drain (one version per completion), abort (`finish_reason: abort`,
  tokens so far, old version), inflight (per-token versions; tokens after the switch are the
  new adapter's).

Complements tests/test_e2e_api.py (one truncated file, a missing path, four concurrent loads)
and tests/test_api_security.py (upload checks against a fake supervisor)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pickle
import time

import httpx
import numpy as np
import pytest
from e2e_support import make_adapter, mlxsup, running_server
from test_reliability_helpers import (
    Load,
    make_last_mlp_adapter,
    model_config,
    raw_safetensors,
    safetensors_bytes,
    unique_id,
    wait_running,
)

pytestmark = pytest.mark.timeout(120)

PROMPT = "The adapter test prompt"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("rel-adapters"), tiny_model_dir,
                        "--max-tokens", "16", "--max-batch", "8", workers=2) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def good(tiny_model_dir, tmp_path_factory):
    """Adapters that load: two on q/v of every layer, two on the last MLP only."""
    root = tmp_path_factory.mktemp("rel-good")
    return {
        "qv1": make_adapter(root / "qv1", tiny_model_dir, seed=21),
        "qv2": make_adapter(root / "qv2", tiny_model_dir, seed=22),
        "mlp1": make_last_mlp_adapter(root / "mlp1", tiny_model_dir, seed=31),
        "mlp2": make_last_mlp_adapter(root / "mlp2", tiny_model_dir, seed=32),
    }


def load(client, path, mode="drain") -> int:
    r = client.post("/load_adapter", json={"adapter_path": path, "mode": mode})
    assert r.status_code == 200, r.text
    return r.json()["policy_version"]


def version(client) -> int:
    return client.get("/adapter").json()["policy_version"]


def greedy(client, prompt=PROMPT, max_tokens=12) -> tuple[list, int]:
    r = client.post("/generate", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["completion_ids"], body["generated_by_version"]


def score(client, prompt_ids, completion_ids, **kw) -> list:
    r = client.post("/score", json={"prompt_ids": prompt_ids, "completion_ids": completion_ids, **kw})
    assert r.status_code == 200, r.text
    return r.json()["logprobs"]


# ---------------------------------------------------------------------- broken adapters


def _tensors(model_dir, rank=8, hidden=None, layers=None, leaves=("lora_a", "lora_b"), dtype=np.float32):
    cfg = model_config(model_dir)
    hidden = hidden or cfg["hidden_size"]
    out = cfg["num_attention_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])
    shapes = {"lora_a": (hidden, rank), "lora_b": (rank, out)}
    rng = np.random.default_rng(0)
    return {
        f"model.layers.{i}.self_attn.q_proj.{leaf}": rng.normal(0, 0.1, shapes[leaf]).astype(dtype)
        for i in range(layers if layers is not None else cfg["num_hidden_layers"])
        for leaf in leaves
    }


def _config(rank=8, **extra):
    return {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": rank, "scale": 2.0}, **extra}


def _write(d, weights: bytes = None, config=None) -> str:
    os.makedirs(d, exist_ok=True)
    if weights is not None:
        with open(os.path.join(d, "adapters.safetensors"), "wb") as f:
            f.write(weights)
    if config is not None:
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            f.write(config if isinstance(config, str) else json.dumps(config))
    return str(d)


def _other_model_adapter(d, model_dir):
    """A well-formed adapter for another model: hidden size 96 instead of the tiny model's."""
    other = os.path.join(d, "other-model")
    os.makedirs(other, exist_ok=True)
    cfg = dict(model_config(model_dir), hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(cfg, f)
    return make_adapter(os.path.join(d, "adapter"), other, seed=1)


def _valid_bytes(model_dir) -> bytes:
    return safetensors_bytes(_tensors(model_dir))


# name -> (builder(dir, model_dir) -> path, HTTP status, words the message must contain)
BROKEN = {
    "truncated_data": (lambda d, m: _write(d, _valid_bytes(m)[:-300], _config()), 422, ["adapters.safetensors"]),
    "truncated_in_header": (lambda d, m: _write(d, _valid_bytes(m)[:40], _config()), 422, ["adapters.safetensors"]),
    "empty_weights_file": (lambda d, m: _write(d, b"", _config()), 422, ["adapters.safetensors"]),
    "garbage_weights": (lambda d, m: _write(d, os.urandom(4096), _config()), 422, ["adapters.safetensors"]),
    "header_length_huge": (lambda d, m: _write(d, (2**62).to_bytes(8, "little") + b"{}", _config()), 422, ["header"]),
    "header_not_json": (lambda d, m: _write(d, (20).to_bytes(8, "little") + b"{not json at all!!!}", _config()), 422,
                        ["header"]),
    "offsets_outside_file": (lambda d, m: _write(d, raw_safetensors(
        {"model.layers.0.self_attn.q_proj.lora_a": {"dtype": "F32", "shape": [64, 8], "data_offsets": [0, 2048]}},
        b"\0" * 64), _config()), 422, ["model.layers.0.self_attn.q_proj.lora_a"]),
    "pickle_as_safetensors": (lambda d, m: _write(d, pickle.dumps({"a": [1, 2, 3]}), _config()), 422,
                              ["adapters.safetensors"]),
    "wrong_rank": (lambda d, m: _write(d, safetensors_bytes(_tensors(m, rank=4)), _config(rank=8)), 422,
                   ["shape", "lora_a"]),
    "wrong_dims": (lambda d, m: _write(d, safetensors_bytes(_tensors(m, hidden=40)), _config()), 422,
                   ["shape", "lora_a"]),
    "another_models_adapter": (_other_model_adapter, 422, ["shape"]),
    "layer_the_model_lacks": (lambda d, m: _write(d, safetensors_bytes(_tensors(m, layers=5)), _config()), 422,
                              ["no adaptable linear layer"]),
    "lora_b_missing": (lambda d, m: _write(d, safetensors_bytes(_tensors(m, leaves=("lora_a",))), _config()), 422,
                       ["lora_b"]),
    "integer_dtype": (lambda d, m: _write(d, safetensors_bytes(_tensors(m, dtype=np.int32)), _config()), 422,
                      ["dtype"]),
    "nan_weights": (lambda d, m: _write(d, safetensors_bytes(
        {k: np.full_like(v, np.nan) for k, v in _tensors(m).items()}), _config()), 422, ["finite"]),
    "missing_config": (lambda d, m: _write(d, _valid_bytes(m), None), 422, ["adapter_config.json"]),
    "config_not_json": (lambda d, m: _write(d, _valid_bytes(m), "{rank: 8,"), 422, ["adapter_config.json"]),
    "config_without_rank": (lambda d, m: _write(d, _valid_bytes(m), {"fine_tune_type": "lora"}), 422, ["rank"]),
    "missing_weights": (lambda d, m: _write(d, None, _config()), 422, ["adapters.safetensors"]),
    "path_is_a_file": (lambda d, m: _write(d, _valid_bytes(m), _config()) + "/adapters.safetensors", 422,
                       ["directory"]),
    "empty_directory": (lambda d, m: _write(d), 422, ["adapter_config.json"]),
}


@pytest.fixture(scope="module")
def serving(client, good):
    """The adapter being served while broken ones are offered, and its greedy tokens."""
    v = load(client, good["qv1"])
    ids, at = greedy(client)
    assert at == v
    return v, ids


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_adapter_is_refused_and_the_old_one_keeps_serving(case, client, serving, tiny_model_dir, tmp_path):
    v, ids = serving
    build, status, words = BROKEN[case]
    path = build(str(tmp_path / case), tiny_model_dir)
    r = client.post("/load_adapter", json={"adapter_path": path})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] and err["message"], err
    for word in words:
        assert word.lower() in err["message"].lower(), (case, err)
    assert version(client) == v
    assert greedy(client) == (ids, v)


@pytest.mark.parametrize("case, word", [("truncated_data", "truncated"), ("wrong_rank", "shape"),
                                        ("another_models_adapter", "shape"), ("nan_weights", "finite"),
                                        ("config_without_rank", "rank"), ("pickle_as_safetensors", "pickle")])
def test_broken_upload_is_refused_removed_and_the_old_one_keeps_serving(case, word, server, client, serving,
                                                                         tiny_model_dir, tmp_path):  # fmt: skip
    v, ids = serving
    build = BROKEN[case][0]
    path = build(str(tmp_path / case), tiny_model_dir)
    uploads = os.path.join(server.run_dir, "uploads")
    before = set(os.listdir(uploads)) if os.path.isdir(uploads) else set()
    with open(os.path.join(path, "adapters.safetensors"), "rb") as w, open(
        os.path.join(path, "adapter_config.json"), "rb"
    ) as c:
        r = client.post("/upload_adapter", files={"adapter_weights": ("adapters.safetensors", w),
                                                  "adapter_config": ("adapter_config.json", c)})  # fmt: skip
    assert 400 <= r.status_code < 500, r.text
    assert word in r.json()["error"]["message"].lower(), r.json()
    after = set(os.listdir(uploads)) if os.path.isdir(uploads) else set()
    after.discard(".lock")  # the lock that serialises uploads
    assert after <= before, f"a refused upload stayed on disk: {after - before}"
    assert version(client) == v
    assert greedy(client) == (ids, v)


def test_broken_adapter_from_the_cli_is_refused(server, client, serving, tiny_model_dir, tmp_path):
    v, ids = serving
    for case in ("wrong_rank", "empty_directory", "path_is_a_file"):
        path = BROKEN[case][0](str(tmp_path / case), tiny_model_dir)
        out = mlxsup("reload-adapter", path, "--run-dir", server.run_dir)
        assert out.returncode == 1 and "invalid_adapter" in out.stderr, (case, out.stdout, out.stderr)
        assert out.stdout.strip() == ""  # nothing a script could mistake for a version
    assert version(client) == v
    assert greedy(client) == (ids, v)


# ---------------------------------------------------------------------- concurrent reloads


def test_concurrent_reloads_from_every_kind_of_client(server, client, good, tiny_model_dir, tmp_path):
    v0 = version(client)
    bad = BROKEN["wrong_rank"][0](str(tmp_path / "bad"), tiny_model_dir)
    modes = ["drain", "abort", "inflight"]

    def http_load(k):
        path = [good["qv1"], good["qv2"], good["mlp1"], None][k % 4]
        with httpx.Client(base_url=server.url, timeout=120) as c:  # a fresh connection: any worker
            r = c.post("/load_adapter", json={"adapter_path": path, "mode": modes[k % 3]})
        return ("http", path, r.status_code, r.json())

    def upload(k):
        src = good["mlp2"]
        with open(os.path.join(src, "adapters.safetensors"), "rb") as w, open(
            os.path.join(src, "adapter_config.json"), "rb"
        ) as c, httpx.Client(base_url=server.url, timeout=120) as hc:
            r = hc.post("/upload_adapter", files={"adapter_weights": ("adapters.safetensors", w),
                                                  "adapter_config": ("adapter_config.json", c)})  # fmt: skip
        return ("upload", "upload", r.status_code, r.json())

    def cli(k):
        out = mlxsup("reload-adapter", good["qv2"], "--mode", modes[k % 3], "--run-dir", server.run_dir)
        return ("cli", good["qv2"], 200 if out.returncode == 0 else 422,
                {"policy_version": int(out.stdout)} if out.returncode == 0 else {"error": out.stderr})

    def refused(k):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post("/load_adapter", json={"adapter_path": bad})
        return ("bad", bad, r.status_code, r.json())

    jobs = [http_load] * 8 + [upload] * 2 + [cli] * 3 + [refused] * 3
    rng = np.random.default_rng(5)
    jobs = [jobs[i] for i in rng.permutation(len(jobs))]
    gen = Load(server.url, lambda t, i: {"prompt": f"under reloads {t} {i}", "max_tokens": 24,
                                         "temperature": 1.0, "seed": t * 100 + i}, threads=3).start()  # fmt: skip
    try:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda kj: kj[1](kj[0]), enumerate(jobs)))
    finally:
        answers = gen.stop()

    ok = [r for r in results if r[2] == 200]
    assert all(r[0] != "bad" for r in ok), "a broken adapter was accepted"
    assert all(r[2] == 422 for r in results if r[0] == "bad"), [r for r in results if r[0] == "bad"]
    assert len(ok) == len(jobs) - 3, [r for r in results if r[2] != 200]
    versions = sorted(r[3]["policy_version"] for r in ok)
    assert versions == list(range(v0 + 1, v0 + 1 + len(ok))), versions  # one each, none lost or repeated
    adapter = client.get("/adapter").json()
    assert adapter["policy_version"] == v0 + len(ok)
    last = max(ok, key=lambda r: r[3]["policy_version"])
    if last[0] != "upload":
        assert adapter["adapter_path"] == last[1]
    with open(os.path.join(server.run_dir, "adapter_state.json")) as f:
        assert json.load(f)["policy_version"] == v0 + len(ok)
    # Generation went on throughout; every answer names a version that was committed.
    assert answers and all(a.status == 200 for a in answers), [a for a in answers if a.status != 200][:3]
    committed = set(versions) | {v0}
    assert all(set(a.json["token_versions"]) <= committed for a in answers)


# ---------------------------------------------------------------------- swaps under load


def _long_body(t, i, max_tokens=240):
    """Sampled rows with raw log-probs (checkable by /score) and greedy rows (argmax checks)."""
    greedy_row = t % 2 == 1
    return {"prompt": f"Row {t} request {i}: tell a long story", "max_tokens": max_tokens,
            "temperature": 0.0 if greedy_row else 1.0, "seed": 1000 * t + i, "logprobs": 1,
            "logprobs_mode": "raw", "request_id": unique_id("swap")}  # fmt: skip


def _swap_under_load(server, client, old_path, new_path, mode, threads=6):
    """Serve `old_path`, start long requests, swap to `new_path` in `mode` while they run, keep
    the load a little longer; returns (answers, old version, new version)."""
    v_old = load(client, old_path)
    gen = Load(server.url, _long_body, threads=threads).start()
    try:
        wait_running(server, at_least=threads - 1)
        v_new = load(client, new_path, mode)
        assert v_new == v_old + 1
        n = gen.count()
        deadline = time.monotonic() + 30
        while gen.count() < n + threads and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        answers = gen.stop()
    bad = [a for a in answers if a.status != 200]
    assert not bad, [(a.status, a.json, a.error) for a in bad[:3]]
    ids = [a.json["request_id"] for a in answers]
    assert len(ids) == len(set(ids)) == len({a.body["request_id"] for a in answers})  # one answer each
    assert all(a.json["request_id"] == a.body["request_id"] for a in answers)
    return [a for a in answers], v_old, v_new


def _check_against_score(client, answers, weights: dict, pick):
    """For each answer, score it under the weights of each version that `pick(answer)` maps
    token positions to, and compare: the reported log-prob of every token must be the one the
    weights of its reported version give."""
    positions_by_version: dict = {}
    for a in answers:
        for v, positions in pick(a).items():
            positions_by_version.setdefault(v, []).append((a, positions))
    for v, items in positions_by_version.items():
        load(client, weights[v])  # the weights of version v (its number is new; the weights are the same)
        for a, positions in items:
            body = a.json
            scored = score(client, body["prompt_ids"], body["completion_ids"], logprobs_mode="raw")
            for p in positions:
                assert scored[p] == pytest.approx(body["logprobs"][p], abs=1e-4), (v, p, a.body)


def test_drain_swap_under_load(server, client, good):
    answers, v_old, v_new = _swap_under_load(server, client, good["qv1"], good["qv2"], "drain")
    for a in answers:
        tv = a.json["token_versions"]
        assert len(set(tv)) == 1 and tv[0] == a.json["generated_by_version"], tv  # one version per completion
        assert tv[0] in (v_old, v_new)
        assert a.json["finish_reason"] in ("length", "stop")
    seen = {a.json["generated_by_version"] for a in answers}
    assert seen == {v_old, v_new}, seen
    _check_against_score(client, answers, {v_old: good["qv1"], v_new: good["qv2"]},
                         lambda a: {a.json["generated_by_version"]: range(len(a.json["completion_ids"]))})  # fmt: skip


def test_abort_swap_under_load(server, client, good):
    answers, v_old, v_new = _swap_under_load(server, client, good["qv2"], good["mlp1"], "abort")
    aborted = [a for a in answers if a.json["finish_reason"] == "abort"]
    assert len(aborted) >= 4, [a.json["finish_reason"] for a in answers]  # those running at the swap
    for a in aborted:
        assert set(a.json["token_versions"]) <= {v_old}  # ended under the version that ran them
        assert len(a.json["completion_ids"]) < a.body["max_tokens"]
        assert len(a.json["logprobs"]) == len(a.json["completion_ids"]) == len(a.json["token_versions"])
    for a in answers:
        assert len(set(a.json["token_versions"])) <= 1
    assert any(a.json["generated_by_version"] == v_new for a in answers)
    _check_against_score(client, [a for a in answers if a.json["completion_ids"]],
                         {v_old: good["qv2"], v_new: good["mlp1"]},
                         lambda a: {a.json["generated_by_version"]: range(len(a.json["completion_ids"]))})  # fmt: skip


def test_inflight_swap_under_load(server, client, good):
    answers, v_old, v_new = _swap_under_load(server, client, good["mlp1"], good["mlp2"], "inflight")
    switched = []
    for a in answers:
        tv = a.json["token_versions"]
        assert tv == sorted(tv) and set(tv) <= {v_old, v_new}, tv  # one switch, old then new
        assert a.json["generated_by_version"] == tv[0]
        assert a.json["finish_reason"] in ("length", "stop")  # inflight ends nothing
        if len(set(tv)) == 2:
            switched.append(a)
    assert len(switched) >= 4, "the swap should land inside the running sequences"
    # The server's own account of the swap: the first tokens of the new weights came from the
    # step after the commit, while the load's rows were decoding.
    last = server.status()["last_swap"]
    assert last["policy_version"] == v_new and last["mode"] == "inflight"
    assert last["running_at_commit"] >= 4
    assert 0 < last["commit_to_first_token_ms"] <= last["first_token_ms"] < 30_000

    def split(a):
        tv = a.json["token_versions"]
        return {v_old: [p for p, v in enumerate(tv) if v == v_old], v_new: [p for p, v in enumerate(tv) if v == v_new]}

    # Every token's log-prob is the one its reported version's weights give (exact here: the
    # adapters touch only the last MLP, so the KV from before the switch is the same).
    _check_against_score(client, answers, {v_old: good["mlp1"], v_new: good["mlp2"]}, split)
    # Greedy rows: the tokens before the switch are the old adapter's argmax, those after it the
    # new adapter's (processed log-prob 0.0 at temperature 0), and the adapters disagree on some.
    greedy_rows = [a for a in switched if a.body["temperature"] == 0.0]
    assert greedy_rows
    load(client, good["mlp1"])
    under_old = [score(client, a.json["prompt_ids"], a.json["completion_ids"], temperature=0.0) for a in greedy_rows]
    load(client, good["mlp2"])
    under_new = [score(client, a.json["prompt_ids"], a.json["completion_ids"], temperature=0.0) for a in greedy_rows]
    differs = 0
    for a, old, new in zip(greedy_rows, under_old, under_new):
        parts = split(a)
        assert all(old[p] == 0.0 for p in parts[v_old]), "a token before the switch is not the old adapter's argmax"
        assert all(new[p] == 0.0 for p in parts[v_new]), "a token after the switch is not the new adapter's argmax"
        differs += sum(1 for p in parts[v_new] if old[p] != 0.0)
    assert differs > 0, "the two adapters agree on every token after the switch: the check proves nothing"
