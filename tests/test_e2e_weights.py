"""Weight updates end to end: real `mlxsup start`, real HTTP, real engine processes.

POST /update_weights, `mlxsup update-weights` and POST /upload_weights (the Python client,
streamed shards) commit on the adapters' version counter; /score then equals, within 1e-4, a
teacher-forced pass of a model loaded here with the same weights. The server keeps its own copy
of each update, so a trainer overwriting its directory changes nothing, and an engine killed
with SIGKILL comes back on the updated weights and version. Bad files are refused whole (4xx
naming the problem) with the old weights serving and no copy left; an update while an adapter
is loaded is refused (409)."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import mlx.core as mx
import numpy as np
import pytest
from e2e_support import is_healthy, make_adapter, mlxsup, running_server, wait_for

from mlxsup.client import InferenceClient
from mlxsup.engine.weights import write_weights

pytestmark = pytest.mark.timeout(240)

PROMPT_IDS = [5, 17, 33, 2, 101, 7, 9]
COMPLETION_IDS = [44, 45, 46, 3, 250, 11, 12, 13]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("e2e-weights"), tiny_model_dir,
                        "--max-tokens", "16", workers=1) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def base_params(model_dir) -> dict:
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(model_dir)
    return dict(tree_flatten(model.parameters()))


def perturbed(params: dict, select=None, seed=1) -> dict:
    rng = np.random.default_rng(seed)
    return {n: a + mx.array(rng.standard_normal(a.shape).astype(np.float32) * 0.05)
            for n, a in params.items() if not select or any(s in n for s in select)}


def reference_logprobs(model_dir, weights: dict) -> np.ndarray:
    """Raw log-probs of COMPLETION_IDS, teacher-forced, under the base model + `weights`."""
    from mlx_lm import load

    model, _ = load(model_dir)
    model.load_weights(list(weights.items()), strict=False)
    logits = model(mx.array([PROMPT_IDS + COMPLETION_IDS]))[0].astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    p = len(PROMPT_IDS)
    return np.array(lp)[np.arange(p - 1, p - 1 + len(COMPLETION_IDS)), COMPLETION_IDS]


def served_logprobs(client) -> tuple[np.ndarray, int]:
    r = client.post("/score", json={"prompt_ids": PROMPT_IDS, "completion_ids": COMPLETION_IDS,
                                    "logprobs_mode": "raw"})
    assert r.status_code == 200, r.text
    return np.array(r.json()["logprobs"]), r.json()["policy_version"]


def copies(server) -> list:
    d = os.path.join(server.run_dir, "weights")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def committed(server) -> dict:
    with open(os.path.join(server.run_dir, "adapter_state.json")) as f:
        return json.load(f)


def test_updates_commit_survive_an_engine_kill_and_ignore_later_writes(server, client, tiny_model_dir,
                                                                       tmp_path):
    base = base_params(tiny_model_dir)
    v0 = server.version()
    lp0, _ = served_logprobs(client)
    np.testing.assert_allclose(lp0, reference_logprobs(tiny_model_dir, {}), atol=1e-4)

    full = perturbed(base, seed=1)
    trainer_dir = write_weights(str(tmp_path / "trainer"), full)
    r = client.post("/update_weights", json={"weight_dir": trainer_dir, "mode": "drain"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["policy_version"] == v0 + 1 and body["num_tensors"] == len(base)
    lp1, v = served_logprobs(client)
    assert v == v0 + 1
    np.testing.assert_allclose(lp1, reference_logprobs(tiny_model_dir, full), atol=1e-4)
    g = client.post("/generate", json={"prompt_ids": PROMPT_IDS, "max_tokens": 6, "logprobs": 1})
    assert g.status_code == 200 and set(g.json()["token_versions"]) == {v0 + 1}

    # The trainer writes its next weights into the same directory: the server kept its copy.
    write_weights(trainer_dir, perturbed(base, seed=99))
    np.testing.assert_allclose(served_logprobs(client)[0], lp1, atol=0)

    # A subset (the last layer's MLP) through the CLI, inflight.
    part = perturbed({n: full[n] for n in full if "layers.1.mlp" in n}, seed=2)
    part_dir = write_weights(str(tmp_path / "part"), part)
    out = mlxsup("update-weights", part_dir, "--mode", "inflight", "--run-dir", server.run_dir)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == v0 + 2
    want = reference_logprobs(tiny_model_dir, {**full, **part})
    np.testing.assert_allclose(served_logprobs(client)[0], want, atol=1e-4)
    state = committed(server)
    assert state["policy_version"] == v0 + 2 and len(state["weights"]) == 2
    assert all(e["path"].startswith(os.path.join(server.run_dir, "weights")) for e in state["weights"])

    # SIGKILL the engine: the new one replays both updates, in order, at the same version.
    epoch = server.status()["engine"]["epoch"]
    os.kill(server.pids("engine")[0], signal.SIGKILL)
    wait_for(lambda: server.status()["engine"]["epoch"] == epoch + 1 and is_healthy(server),
             timeout=120, what="the engine restart")
    lp, v = served_logprobs(client)
    assert v == v0 + 2
    np.testing.assert_allclose(lp, want, atol=1e-4)

    # A full update supersedes both: the state keeps one entry and the older copies are gone.
    full2 = perturbed(base, seed=3)
    r = client.post("/update_weights", json={"weight_dir": write_weights(str(tmp_path / "f2"), full2)})
    assert r.status_code == 200, r.text
    state = committed(server)
    assert [e["path"] for e in state["weights"]] == [os.path.join(server.run_dir, "weights", f"v{v0 + 3}")]
    assert copies(server) == [f"v{v0 + 3}"]
    np.testing.assert_allclose(served_logprobs(client)[0], reference_logprobs(tiny_model_dir, full2),
                               atol=1e-4)


def test_upload_streams_shards_from_the_client(server, client, tiny_model_dir, tmp_path):
    base = base_params(tiny_model_dir)
    v0 = server.version()
    lp_before = served_logprobs(client)[0]
    update = perturbed(base, select=["layers.0"], seed=4)
    names = sorted(update)
    d = str(tmp_path / "shards")
    write_weights(d, {n: update[n] for n in names[:3]}, "model-00001-of-00002.safetensors")
    write_weights(d, {n: update[n] for n in names[3:]}, "model-00002-of-00002.safetensors")

    async def upload():
        async with InferenceClient(server.url) as c:
            return await c.upload_weights(d, mode="abort")

    reply = asyncio.run(upload())
    assert reply["policy_version"] == v0 + 1 and reply["num_tensors"] == len(update)
    assert not os.listdir(os.path.join(server.run_dir, "uploads")) or all(
        n == ".lock" for n in os.listdir(os.path.join(server.run_dir, "uploads")))
    lp = served_logprobs(client)[0]
    assert not np.allclose(lp, lp_before)
    # What the server serves is its previous weights with these tensors replaced.
    state = committed(server)
    applied = {}
    for e in state["weights"]:
        for name in os.listdir(e["path"]):
            applied.update(mx.load(os.path.join(e["path"], name)))
    np.testing.assert_allclose(lp, reference_logprobs(tiny_model_dir, applied), atol=1e-4)


def _bad_dirs(tmp_path, base) -> dict:
    w = "model.layers.0.mlp.up_proj.weight"
    good = {w: base[w]}
    cases = {}
    d = write_weights(str(tmp_path / "truncated"), good)
    f = os.path.join(d, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 64)
    cases["truncated"] = (d, 422, "truncated")
    cases["shape"] = (write_weights(str(tmp_path / "shape"), {w: mx.zeros((3, 4))}), 422, "shape (3, 4)")
    cases["dtype"] = (write_weights(str(tmp_path / "dtype"), {w: base[w].astype(mx.float16)}), 422,
                      "dtype float16")
    cases["unknown"] = (write_weights(str(tmp_path / "unknown"), {"model.layers.5.mlp.up_proj.weight":
                                                                  base[w]}), 422, "no parameter")
    os.makedirs(tmp_path / "empty")
    cases["empty"] = (str(tmp_path / "empty"), 422, "no .safetensors")
    cases["missing"] = (str(tmp_path / "nope"), 404, "does not exist")
    return cases


def test_bad_weights_are_refused_whole_and_the_old_weights_keep_serving(server, client, tiny_model_dir,
                                                                        tmp_path):
    base = base_params(tiny_model_dir)
    v0 = server.version()
    lp0 = served_logprobs(client)[0]
    kept = copies(server)
    for name, (path, status, needle) in _bad_dirs(tmp_path, base).items():
        r = client.post("/update_weights", json={"weight_dir": path})
        assert r.status_code == status, (name, r.text)
        err = r.json()["error"]
        assert needle in err["message"] and err["field"] == "weight_dir", (name, err)
        if name in ("truncated", "shape"):  # the same file uploaded: refused, field `weights`
            with open(os.path.join(path, "model.safetensors"), "rb") as f:
                u = client.post("/upload_weights", files={"weights": ("m.safetensors", f.read())})
            assert u.status_code == 422 and u.json()["error"]["field"] == "weights", (name, u.text)
    r = client.post("/update_weights", json={"weight_dir": "x", "mode": "sideways"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "mode"
    r = client.post("/update_weights", json={"weight_dir": "x", "weights_dir": "typo"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "weights_dir"
    assert server.version() == v0
    np.testing.assert_array_equal(served_logprobs(client)[0], lp0)
    assert copies(server) == kept  # no copy of a refused update left


def test_an_update_while_an_adapter_is_loaded_is_refused(server, client, tiny_model_dir, tmp_path):
    base = base_params(tiny_model_dir)
    adapter = make_adapter(tmp_path / "a", tiny_model_dir, seed=5)
    wdir = write_weights(str(tmp_path / "w"), perturbed(base, select=["norm"], seed=6))
    assert client.post("/load_adapter", json={"adapter_path": adapter}).status_code == 200
    v = server.version()
    r = client.post("/update_weights", json={"weight_dir": wdir})
    assert r.status_code == 409 and r.json()["error"]["type"] == "adapter_loaded", r.text
    assert server.version() == v
    assert client.post("/load_adapter", json={"adapter_path": None}).status_code == 200
    r = client.post("/update_weights", json={"weight_dir": wdir})
    assert r.status_code == 200 and r.json()["policy_version"] == v + 2, r.text
