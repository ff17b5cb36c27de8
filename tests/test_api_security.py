"""Security of the API: keys (constant-time), loopback-only adapter routes without an admin key,
--adapter-root (symlinks resolved), and uploads (size cap, only the expected files, safetensors
only, private directories, old uploads removed when replaced)."""

from __future__ import annotations

import json
import os
import stat
import struct

import numpy as np
import pytest
from falcon import testing

from mlxsup.api.adapters import SupervisorAdapters
from mlxsup import demo
from mlxsup.api.testing import FakeAdapters, fake_codec, make_app

ADAPTER_CONFIG = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 1.0},
                  "model_type": "llama", "target_modules": ["q_proj"], "trainable": True}


@pytest.fixture(scope="module")
def codec():
    return fake_codec()


def client_for(codec, tmp_path, **config):
    app, link, adapters = make_app(codec, str(tmp_path / "run"), **config)
    return testing.TestClient(app), link, adapters


# ---------------------------------------------------------------------- keys


def test_api_key_on_every_route_but_health(codec, tmp_path):
    client, _, _ = client_for(codec, tmp_path, api_key="s3cret")
    routes = [("GET", "/metrics"), ("GET", "/adapter"), ("GET", "/openapi.json"), ("GET", "/v1/models"),
              ("POST", "/generate"), ("POST", "/score"), ("POST", "/abort"), ("POST", "/v1/completions"),
              ("POST", "/v1/chat/completions"), ("POST", "/load_adapter"), ("GET", "/no-such-route")]
    for method, path in routes:
        r = client.simulate_request(method, path, json={})
        assert r.status_code == 401, (path, r.text)
        assert r.json["error"]["type"] == "unauthorized" and r.headers["WWW-Authenticate"].startswith("Bearer")
        r = client.simulate_request(method, path, json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "wrong key" in r.json["error"]["message"], path
    assert client.simulate_get("/health").status_code == 200
    ok = [{"Authorization": "Bearer s3cret"}, {"authorization": "bearer s3cret"}, {"X-API-Key": "s3cret"}]
    for headers in ok:
        assert client.simulate_get("/metrics", headers=headers).status_code == 200
    assert client.simulate_post("/generate", json={"prompt": "x"}, headers=ok[0]).status_code == 200
    r = client.simulate_get("/metrics", headers={"Authorization": "Basic czNjcmV0"})
    assert r.status_code == 401


def test_keys_are_compared_in_constant_time(codec, tmp_path, monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr("mlxsup.api.middleware.hmac.compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    client, _, _ = client_for(codec, tmp_path, api_key="s3cret")
    client.simulate_get("/metrics", headers={"Authorization": "Bearer guess"})
    assert (b"guess", b"s3cret") in calls


def test_admin_key_guards_the_adapter_routes(codec, tmp_path):
    client, _, adapters = client_for(codec, tmp_path, api_key="user", admin_key="admin")
    body = {"adapter_path": None}
    assert client.simulate_post("/load_adapter", json=body).status_code == 401
    r = client.simulate_post("/load_adapter", json=body, headers={"Authorization": "Bearer user"})
    assert r.status_code == 403 and "admin" in r.json["error"]["message"]
    assert not adapters.calls
    for headers in ({"Authorization": "Bearer admin"}, {"X-Admin-Key": "admin"}):
        r = client.simulate_post("/load_adapter", json=body, headers=headers, remote_addr="203.0.113.9")
        assert r.status_code == 200, r.text  # with an admin key, any address
    r = client.simulate_post("/upload_adapter", body=b"", headers={"Authorization": "Bearer user"})
    assert r.status_code == 403
    r = client.simulate_post("/load_adapter", json=body, headers={"Authorization": "Bearer guess"})
    assert r.status_code == 401
    # the admin key also opens the ordinary routes (the Python client sends only it there)
    assert client.simulate_get("/adapter", headers={"Authorization": "Bearer admin"}).status_code == 200
    assert client.simulate_get("/adapter", headers={"Authorization": "Bearer user"}).status_code == 200


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/pause?mode=keep", None), ("POST", "/resume", None), ("POST", "/abort_requests", {}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"})])
def test_admin_key_guards_vllms_control_routes(codec, tmp_path, method, path, body):
    client, link, _ = client_for(codec, tmp_path, api_key="user", admin_key="admin")
    r = client.simulate_request(method, path, json=body, headers={"Authorization": "Bearer user"})
    assert r.status_code == 403 and "admin" in r.json["error"]["message"]
    assert not link.controls
    r = client.simulate_request(method, path, json=body, headers={"Authorization": "Bearer admin"},
                                remote_addr="203.0.113.9")
    assert r.status_code == 200, r.text
    # reading the pause state needs only the API key
    assert client.simulate_get("/is_paused", headers={"Authorization": "Bearer user"}).status_code == 200


@pytest.mark.parametrize("addr,allowed", [("127.0.0.1", True), ("127.0.0.53", True), ("::1", True),
                                          ("::ffff:127.0.0.1", True), ("10.0.0.5", False),
                                          ("192.168.1.20", False), ("2001:db8::1", False)])
def test_without_admin_key_adapter_routes_are_loopback_only(codec, tmp_path, addr, allowed):
    client, _, adapters = client_for(codec, tmp_path, api_key="user")
    headers = {"Authorization": "Bearer user"}
    r = client.simulate_post("/load_adapter", json={"adapter_path": None}, headers=headers, remote_addr=addr)
    assert (r.status_code == 200) == allowed, r.text
    if not allowed:
        assert r.status_code == 403 and "loopback" in r.json["error"]["message"]
        # a forwarded header does not make a remote client local
        r = client.simulate_post("/load_adapter", json={"adapter_path": None}, remote_addr=addr,
                                 headers={**headers, "X-Forwarded-For": "127.0.0.1", "Forwarded": "for=127.0.0.1"})
        assert r.status_code == 403
    # the other routes do not care where the client is
    assert client.simulate_post("/generate", json={"prompt": "x"}, headers=headers, remote_addr=addr).status_code == 200


# ---------------------------------------------------------------------- /load_adapter paths


def test_adapter_root_confines_paths_even_through_symlinks(codec, tmp_path):
    root = tmp_path / "adapters"
    (root / "good").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "sneaky")
    os.symlink(root / "good", root / "alias")
    (root / "afile").write_text("x")
    client, _, adapters = client_for(codec, tmp_path, adapter_root=str(root))

    def load(path):
        return client.simulate_post("/load_adapter", json={"adapter_path": path})

    r = load(str(root / "good"))
    assert r.status_code == 200 and adapters.calls[-1][0] == str(root / "good")
    assert load("good").status_code == 200 and adapters.calls[-1][0] == str(root / "good")  # relative to the root
    assert load(str(root / "alias")).status_code == 200 and adapters.calls[-1][0] == str(root / "good")
    num_calls = len(adapters.calls)
    for escape in (str(root / "sneaky"), str(outside), str(root / ".." / "outside"), "../outside", "/etc",
                   str(root) + "-evil"):
        r = load(escape)
        assert r.status_code == 403 and r.json["error"]["field"] == "adapter_path", escape
    assert load(str(root / "missing")).status_code == 404
    assert load("/nonexistent-outside").status_code == 403  # outside: refused before looking
    r = load(str(root / "afile"))
    assert r.status_code == 422 and "not a directory" in r.json["error"]["message"]
    assert load("a\x00b").status_code == 422
    assert len(adapters.calls) == num_calls


def test_missing_adapter_path_is_404(codec, tmp_path):
    client, _, adapters = client_for(codec, tmp_path)
    r = client.simulate_post("/load_adapter", json={"adapter_path": str(tmp_path / "nope")})
    assert r.status_code == 404 and r.json["error"]["type"] == "not_found" and not adapters.calls


def test_load_adapter_answers_the_seed_shape_and_passes_mode(codec, tmp_path):
    client, _, adapters = client_for(codec, tmp_path)
    (tmp_path / "a").mkdir()
    r = client.simulate_post("/load_adapter", json={"adapter_path": str(tmp_path / "a"), "mode": "inflight"})
    body = r.json
    assert r.status_code == 200 and list(body)[:3] == ["status", "policy_version", "message"]
    assert body["status"] == "success" and body["policy_version"] == 1
    assert body["message"] == f"Loaded adapter from {tmp_path / 'a'}"
    assert adapters.calls == [(str(tmp_path / "a"), "inflight", True)]


@pytest.mark.parametrize("reply,status,retry", [
    ({"ok": False, "error": {"type": "not_found", "message": "gone", "field": "path"}}, 404, False),
    ({"ok": False, "error": {"type": "invalid_adapter", "message": "shape mismatch"}}, 422, False),
    ({"ok": False, "error": {"type": "engine_unavailable", "message": "restarting"}}, 503, True),
    ({"ok": False, "error": {"type": "engine_restarted", "message": "died"}}, 503, True),
    ({"ok": False, "error": {"type": "bad_request", "message": "mode"}}, 422, False),
])
def test_supervisor_refusals_map_to_http(codec, tmp_path, reply, status, retry):
    client, _, adapters = client_for(codec, tmp_path)
    adapters.reply = reply
    r = client.simulate_post("/load_adapter", json={"adapter_path": None})
    assert r.status_code == status and ("Retry-After" in r.headers) == retry
    assert r.json["error"]["message"] == reply["error"]["message"]
    if status == 404:
        assert r.json["error"]["field"] == "adapter_path"


def test_no_supervisor_is_503(codec, tmp_path):
    from mlxsup.config import ServerConfig
    from mlxsup.api.app import create_app
    from mlxsup.api.testing import FakeEngineLink

    run_dir = str(tmp_path / "run")
    app = create_app(ServerConfig(run_dir=run_dir, model="m"), engine_link=FakeEngineLink(), codec=codec,
                     adapters=SupervisorAdapters(run_dir, timeout_s=2))
    r = testing.TestClient(app).simulate_post("/load_adapter", json={"adapter_path": None})
    assert r.status_code == 503 and r.json["error"]["type"] == "supervisor_unavailable" and r.headers["Retry-After"]


# ---------------------------------------------------------------------- /upload_adapter


def safetensors_bytes(tensors=None) -> bytes:
    return demo.safetensors_bytes(tensors or {"layers.0.lora_a": np.arange(8, dtype=np.float32).reshape(2, 4)})


def multipart(parts) -> tuple[bytes, str]:
    boundary = "----mlxsup-test-boundary"
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def good_parts(weights=None, config=None):
    return [("adapter_weights", "adapters.safetensors", weights if weights is not None else safetensors_bytes()),
            ("adapter_config", "adapter_config.json", config if config is not None else json.dumps(ADAPTER_CONFIG).encode())]


def upload(client, parts, query=None, **kw):
    body, ctype = multipart(parts)
    return client.simulate_post("/upload_adapter", body=body, headers={"Content-Type": ctype},
                                query_string=query, **kw)


def test_upload_stores_privately_asks_the_supervisor_and_removes_what_it_replaced(codec, tmp_path):
    client, _, adapters = client_for(codec, tmp_path)
    uploads = tmp_path / "run" / "uploads"
    r = upload(client, good_parts())
    assert r.status_code == 200, r.text
    assert r.json["status"] == "success" and r.json["policy_version"] == 1
    first, mode, was_dir = adapters.calls[0]
    assert was_dir and mode == "drain" and os.path.dirname(first) == str(uploads)
    assert sorted(os.listdir(first)) == ["adapter_config.json", "adapters.safetensors"]
    assert stat.S_IMODE(os.stat(uploads).st_mode) == 0o700 and stat.S_IMODE(os.stat(first).st_mode) == 0o700
    for name in os.listdir(first):
        assert stat.S_IMODE(os.stat(os.path.join(first, name)).st_mode) == 0o600
    with open(os.path.join(first, "adapters.safetensors"), "rb") as f:
        assert f.read() == safetensors_bytes()
    r = upload(client, good_parts() + [("mode", None, b"abort")])
    assert r.status_code == 200 and r.json["policy_version"] == 2
    second = adapters.calls[1][0]
    assert adapters.calls[1][1] == "abort"
    assert not os.path.exists(first) and os.path.isdir(second)  # the replaced upload is gone
    assert [n for n in os.listdir(uploads) if not n.startswith(".")] == [os.path.basename(second)]
    r = upload(client, good_parts(), query="mode=inflight")
    assert r.status_code == 200 and adapters.calls[2][1] == "inflight"


def test_refused_upload_is_removed_and_the_served_one_kept(codec, tmp_path):
    client, _, adapters = client_for(codec, tmp_path)
    assert upload(client, good_parts()).status_code == 200
    served = adapters.calls[0][0]
    adapters.reply = {"ok": False, "error": {"type": "invalid_adapter", "message": "wrong shapes for this model"}}
    r = upload(client, good_parts())
    assert r.status_code == 422 and "wrong shapes" in r.json["error"]["message"]
    refused = adapters.calls[1][0]
    assert not os.path.exists(refused) and os.path.isdir(served)


@pytest.mark.parametrize("parts,status,field", [
    (good_parts()[:1], 422, "adapter_config"),
    (good_parts()[1:], 422, "adapter_weights"),
    (good_parts() + [("extra", "evil.py", b"import os")], 422, "extra"),
    (good_parts() + [("adapter_weights", "again.safetensors", b"x")], 422, "adapter_weights"),
    (good_parts(weights=b"\x80\x04\x95" + b"\x00" * 64), 422, "adapter_weights"),  # a pickle
    (good_parts(weights=b"PK\x03\x04" + b"\x00" * 64), 422, "adapter_weights"),  # a torch zip
    (good_parts(weights=safetensors_bytes()[:-7]), 422, "adapter_weights"),  # truncated
    (good_parts(weights=b""), 422, "adapter_weights"),
    (good_parts(weights=struct.pack("<Q", 4) + b"[1]\x20"), 422, "adapter_weights"),
    (good_parts(config=b"{not json"), 422, "adapter_config"),
    (good_parts(config=b"[1, 2]"), 422, "adapter_config"),
    (good_parts(config=b"[" * 100000), 422, "adapter_config"),
    (good_parts() + [("mode", None, b"whenever")], 422, "mode"),
])
def test_upload_checks(codec, tmp_path, parts, status, field):
    client, _, adapters = client_for(codec, tmp_path)
    r = upload(client, parts)
    assert r.status_code == status, r.text
    assert r.json["error"]["field"] == field
    assert not adapters.calls
    uploads = tmp_path / "run" / "uploads"
    assert not uploads.exists() or [n for n in os.listdir(uploads) if n != ".lock"] == []


def test_upload_size_cap(codec, tmp_path, monkeypatch):
    client, _, adapters = client_for(codec, tmp_path, max_upload_mb=1)
    big = safetensors_bytes({"w": np.zeros((300, 1024), np.float32)})  # 1.2 MB
    r = upload(client, good_parts(weights=big))
    assert r.status_code == 413 and "max-upload-mb" in r.json["error"]["message"]
    # without a Content-Length (chunked), the cap is enforced while streaming
    import falcon.asgi

    monkeypatch.setattr(falcon.asgi.Request, "content_length", property(lambda self: None))
    r = upload(client, good_parts(weights=big))
    assert r.status_code == 413 and r.json["error"]["field"] == "adapter_weights"
    assert not adapters.calls
    assert [n for n in os.listdir(tmp_path / "run" / "uploads") if n != ".lock"] == []


def test_upload_needs_multipart(codec, tmp_path):
    client, _, _ = client_for(codec, tmp_path)
    r = client.simulate_post("/upload_adapter", json={"adapter_weights": "x"})
    assert r.status_code == 415 and r.json["error"]["type"] == "unsupported_media_type"
    r = client.simulate_post("/upload_adapter", body=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert 400 <= r.status_code < 500 and "error" in r.json


def test_fake_supervisor_helper_is_loopback_default():
    assert FakeAdapters().committed() == {}
