"""Security over real HTTP, real processes (docs/reliability.md), complementing
tests/test_api_security.py (the app through falcon's TestClient, with a simulated peer address)
and tests/test_e2e_lifecycle.py (the 0.0.0.0 warning without keys):

- --api-key on every route but /health, over gunicorn, with the headers clients really send;
- without --admin-key, adapter routes refuse a client on a real non-loopback address, whatever
  forwarded headers it sends; with it, a remote trainer with the admin key may swap and the API
  key may not;
- paths that spell an adapter route differently (trailing slash, percent-encoding, dot
  segments, case) never reach it past the checks;
- --adapter-root over real HTTP (symlink escape, dot-dot, outside paths not probed);
- uploads: size cap on a real streamed body, private directories and files, one kept;
- the secrets are not readable by other local users from the run directory, and the start-up
  output says nothing alarming once keys are set."""

from __future__ import annotations

import os
import socket
import stat

import httpx
import psutil
import pytest
from e2e_support import make_adapter, running_server

pytestmark = pytest.mark.timeout(120)

API_KEY = "api-key-0123456789"
ADMIN_KEY = "admin-key-9876543210"


def _external_ipv4():
    """An address of this machine that is not loopback, or None."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


EXTERNAL = _external_ipv4()
needs_external = pytest.mark.skipif(EXTERNAL is None, reason="no non-loopback IPv4 address on this machine")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rel-sec-root")
    inside = make_adapter(root / "inside", tiny_model_dir, seed=1)
    outside = make_adapter(tmp_path_factory.mktemp("rel-sec-outside") / "outside", tiny_model_dir, seed=2)
    os.symlink(outside, root / "escape")
    return {"root": str(root), "inside": inside, "outside": outside, "escape": str(root / "escape")}


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory, adapters):
    """0.0.0.0 with an API key and an adapter root, no admin key (adapter routes: loopback only)."""
    with running_server(tmp_path_factory.mktemp("rel-sec-keyed"), tiny_model_dir, "--api-key", API_KEY,
                        "--adapter-root", adapters["root"], "--max-tokens", "4", workers=1, host="0.0.0.0") as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def admin(tiny_model_dir, tmp_path_factory):
    """0.0.0.0 with both keys and a 1 MiB upload cap."""
    # keys through the environment, so they never appear on a command line
    with running_server(tmp_path_factory.mktemp("rel-sec-admin"), tiny_model_dir, "--max-upload-mb", "1",
                        "--max-tokens", "4", workers=1, host="0.0.0.0",
                        env={"MLXSUP_API_KEY": API_KEY, "MLXSUP_ADMIN_KEY": ADMIN_KEY}) as srv:  # fmt: skip
        yield srv


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def raw_request(port: int, request: bytes, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send bytes as they are (no client normalises the path); return (status, body)."""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# ---------------------------------------------------------------------- keys


ROUTES = [("GET", "/metrics"), ("GET", "/adapter"), ("GET", "/openapi.json"), ("GET", "/v1/models"),
          ("POST", "/generate"), ("POST", "/score"), ("POST", "/abort"), ("POST", "/v1/completions"),
          ("POST", "/v1/chat/completions"), ("POST", "/load_adapter"), ("POST", "/upload_adapter"),
          ("GET", "/no-such-route")]  # fmt: skip


def test_api_key_over_real_http(keyed):
    body = {"prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        for method, path in ROUTES:
            for headers in ({}, bearer("wrong"), bearer(API_KEY[:-1]), bearer(API_KEY + "x"), {"Authorization": "Bearer"},
                            {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"},
                            {"X-API-Key": "wrong"}, {"Authorization": b"Bearer \xc3\xa9\xff"}):  # fmt: skip
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.json()["error"]["type"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/health").status_code == 200
        for headers in (bearer(API_KEY), {"authorization": f"bearer  {API_KEY}"}, {"X-API-Key": API_KEY}):
            assert c.get("/metrics", headers=headers).status_code == 200, headers
            r = c.post("/generate", json=body, headers=headers)
            assert r.status_code == 200, r.text
        # The OpenAI SDK sends the key its own way.
        openai = pytest.importorskip("openai")
        sdk = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
        assert sdk.completions.create(model="m", prompt="hi", max_tokens=2).choices
        bad = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="m", prompt="hi", max_tokens=2)


def test_keys_set_means_no_exposure_warning_and_secrets_stay_private(keyed, admin):
    for srv in (keyed, admin):
        assert "WARNING" not in srv.start_output.stderr, srv.start_output.stderr
        assert stat.S_IMODE(os.stat(srv.run_dir).st_mode) & 0o077 == 0
        for name in os.listdir(srv.run_dir):
            path = os.path.join(srv.run_dir, name)
            if os.path.isfile(path) and API_KEY.encode() in open(path, "rb").read():
                assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, f"{name} holds the key and others may read it"
        for name in os.listdir(srv.run_dir):  # nor do the logs hold it
            if name.endswith(".log"):
                text = open(os.path.join(srv.run_dir, name), errors="replace").read()
                assert API_KEY not in text and ADMIN_KEY not in text, name


# ---------------------------------------------------------------------- adapter routes


@needs_external
def test_without_admin_key_adapter_routes_refuse_remote_clients(keyed, adapters):
    remote = f"http://{EXTERNAL}:{keyed.port}"
    spoofs = [{}, {"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"}, {"X-Real-IP": "127.0.0.1"},
              {"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http", "Host": "127.0.0.1"}]
    with httpx.Client(base_url=remote, timeout=30, headers=bearer(API_KEY)) as c:
        v = c.get("/adapter").json()["policy_version"]
        assert c.post("/generate", json={"prompt": "hi", "max_tokens": 2}).status_code == 200  # exposed, keyed
        for headers in spoofs:
            r = c.post("/load_adapter", json={"adapter_path": adapters["inside"]}, headers=headers)
            assert r.status_code == 403 and "loopback" in r.json()["error"]["message"], (headers, r.text)
            r = c.post("/upload_adapter", files={"adapter_weights": ("a", b"x"), "adapter_config": ("c", b"{}")},
                       headers=headers)  # fmt: skip
            assert r.status_code == 403, (headers, r.text)
        assert c.get("/adapter").json()["policy_version"] == v
    with httpx.Client(base_url=keyed.url, timeout=60, headers=bearer(API_KEY)) as c:  # loopback may
        r = c.post("/load_adapter", json={"adapter_path": adapters["inside"]})
        assert r.status_code == 200 and r.json()["policy_version"] == v + 1, r.text


def test_adapter_root_over_real_http(keyed, adapters):
    with httpx.Client(base_url=keyed.url, timeout=60, headers=bearer(API_KEY)) as c:
        v = c.get("/adapter").json()["policy_version"]
        root = adapters["root"]
        for path in (adapters["outside"], adapters["escape"], os.path.join(root, "..", "x"),
                     os.path.join(root, "inside", "..", "..", os.path.basename(os.path.dirname(adapters["outside"]))),
                     "/etc", "/nonexistent-outside-the-root", "../../etc"):  # fmt: skip
            r = c.post("/load_adapter", json={"adapter_path": path})
            assert r.status_code == 403, (path, r.text)  # outside, and nothing is probed (no 404)
        r = c.post("/load_adapter", json={"adapter_path": "inside"})  # relative: against the root
        assert r.status_code == 200, r.text
        r = c.post("/load_adapter", json={"adapter_path": os.path.join(root, "missing")})
        assert r.status_code == 404
        assert c.get("/adapter").json()["policy_version"] == v + 1


@needs_external
def test_admin_key_lets_remote_trainers_swap_and_the_api_key_does_not(admin, tiny_model_dir, tmp_path):
    adapter = make_adapter(tmp_path / "a", tiny_model_dir, seed=5)
    remote = f"http://{EXTERNAL}:{admin.port}"
    with httpx.Client(base_url=remote, timeout=60) as c:
        v = c.get("/adapter", headers=bearer(API_KEY)).json()["policy_version"]
        r = c.post("/load_adapter", json={"adapter_path": adapter}, headers=bearer(API_KEY))
        assert r.status_code == 403 and "admin key" in r.json()["error"]["message"], r.text
        for headers in ({}, bearer("wrong"), {"X-Admin-Key": API_KEY}):
            r = c.post("/load_adapter", json={"adapter_path": adapter}, headers=headers)
            assert r.status_code in (401, 403), (headers, r.text)
        r = c.post("/load_adapter", json={"adapter_path": adapter}, headers={"X-Admin-Key": ADMIN_KEY})
        assert r.status_code == 200 and r.json()["policy_version"] == v + 1, r.text
        r = c.post("/load_adapter", json={"adapter_path": None}, headers=bearer(ADMIN_KEY))
        assert r.status_code == 200 and r.json()["policy_version"] == v + 2, r.text
        # The admin key opens every other route too.
        assert c.post("/generate", json={"prompt": "hi", "max_tokens": 2}, headers=bearer(ADMIN_KEY)).status_code == 200


PATH_VARIANTS = ["/load_adapter/", "//load_adapter", "/load_adapter//", "/./load_adapter", "/x/../load_adapter",
                 "/%6coad_adapter", "/load%5fadapter", "/LOAD_ADAPTER", "/load_adapter;x", "/load_adapter%00",
                 "/load_adapter%2f", "/health/../load_adapter", "/health%2f..%2fload_adapter",
                 "/v1/../load_adapter", "/upload_adapter/", "/%75pload_adapter"]  # fmt: skip


@pytest.mark.parametrize("variant", PATH_VARIANTS)
def test_other_spellings_of_adapter_routes_do_not_get_past_the_checks(admin, variant):
    """With the API key (not the admin key), no spelling of an adapter route may reach it: the
    answer is 401/403 (the check saw the route) or 404/400 (no route), never the route itself."""
    body = b'{"adapter_path": null}'
    request = (f"POST {variant} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    v = httpx.get(f"{admin.url}/adapter", headers=bearer(API_KEY)).json()["policy_version"]
    status, answer = raw_request(admin.port, request + body)
    assert status in (400, 401, 403, 404, 405), (variant, status, answer[:300])
    assert httpx.get(f"{admin.url}/adapter", headers=bearer(API_KEY)).json()["policy_version"] == v
    # and /health's openness does not leak to what comes after it
    status, _ = raw_request(admin.port, "GET /health/../metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status in (400, 401, 404), status


def _upload_too_large(port: int, chunked: bool, size: int = 2_600_000) -> bytes:
    b = "rel-boundary"
    payload = (f"--{b}\r\nContent-Disposition: form-data; name=\"adapter_weights\"; filename=\"adapters.safetensors\""
               f"\r\n\r\n").encode() + b"\0" * size + f"\r\n--{b}--\r\n".encode()  # fmt: skip
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(payload)}"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /upload_adapter HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
                  f"Content-Type: multipart/form-data; boundary={b}\r\n{framing}\r\n\r\n".encode())  # fmt: skip
        try:
            for i in range(0, len(payload), 65536):
                part = payload[i:i + 65536]
                s.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            if chunked:
                s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed before the end of the body
        return s.recv(4096)


def test_uploads_over_real_http(admin, tiny_model_dir, tmp_path):
    src = make_adapter(tmp_path / "up", tiny_model_dir, seed=6, rank=4)
    weights = open(os.path.join(src, "adapters.safetensors"), "rb").read()
    config = open(os.path.join(src, "adapter_config.json"), "rb").read()
    files = {"adapter_weights": ("adapters.safetensors", weights), "adapter_config": ("adapter_config.json", config)}
    uploads = os.path.join(admin.run_dir, "uploads")
    with httpx.Client(base_url=admin.url, timeout=60, headers=bearer(ADMIN_KEY)) as c:
        v = c.get("/adapter").json()["policy_version"]
        for k in range(2):
            r = c.post("/upload_adapter", files=files)
            assert r.status_code == 200 and r.json()["policy_version"] == v + 1 + k, r.text
        kept = [d for d in os.listdir(uploads) if not d.startswith(".")]
        assert len(kept) == 1, kept  # the one being served
        assert stat.S_IMODE(os.stat(uploads).st_mode) == 0o700
        d = os.path.join(uploads, kept[0])
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert {stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) for f in os.listdir(d)} == {0o600}
        # Over the cap (1 MiB), with a length and streamed in chunks: 413 (read off a raw
        # socket: the server answers and closes before the body ends, which httpx reports as a
        # disconnect), and nothing stays on disk.
        for chunked in (False, True):
            assert _upload_too_large(admin.port, chunked).startswith(b"HTTP/1.1 413"), chunked
        assert [d for d in os.listdir(uploads) if not d.startswith(".")] == kept
        # Something that would unpickle is refused as such.
        r = c.post("/upload_adapter", files={"adapter_weights": ("adapters.safetensors", b"\x80\x04\x95" + b"\0" * 64),
                                             "adapter_config": ("adapter_config.json", config)})  # fmt: skip
        assert r.status_code == 422 and "pickle" in r.json()["error"]["message"].lower(), r.text
        assert c.get("/adapter").json()["policy_version"] == v + 2


def test_keys_given_by_environment_are_on_no_command_line(admin):
    # `--api-key K` itself stays readable with ps (docs/cli.md says so); MLXSUP_API_KEY does not
    for role in ("supervisor", "engine", "api-master", "api-worker"):
        for pid in admin.pids(role):
            cmdline = " ".join(psutil.Process(pid).cmdline())
            assert API_KEY not in cmdline and ADMIN_KEY not in cmdline, (role, cmdline)
