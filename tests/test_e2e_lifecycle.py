"""Instances end to end: two side by side never interfere; `mlxsup stop` leaves nothing; a
SIGKILLed supervisor takes its children along and the next start cleans up after it; a model
that cannot load is a boot failure with the reason, not a restart loop."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
from e2e_support import (
    Server,
    assert_nothing_left,
    free_port,
    instance_segments,
    is_healthy,
    mlxsup,
    start_server,
    stop_server,
    wait_for,
)

from mlxsup.supervisor.children import orphans

pytestmark = pytest.mark.timeout(300)


def _port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_two_instances_stop_and_supervisor_kill(tiny_model_dir, tmp_path):
    a = start_server(tmp_path, tiny_model_dir, workers=1, host="0.0.0.0", name="a")
    b = None
    try:
        b = start_server(tmp_path, tiny_model_dir, workers=1, name="b")
        # The seed's host 0.0.0.0 without keys: a loud warning of what is exposed.
        assert "WARNING" in a.start_output.stderr and "WITHOUT an API key" in a.start_output.stderr
        assert "WITHOUT an API key" in open(os.path.join(a.run_dir, "supervisor.log")).read()
        assert a.segments and b.segments and a.segments.isdisjoint(b.segments)
        for srv in (a, b):
            with srv.client() as c:
                assert c.post("/generate", json={"prompt": "hello", "max_tokens": 4}).status_code == 200

        # Killing a's engine does not touch b.
        os.kill(a.pids("engine")[0], signal.SIGKILL)
        wait_for(lambda: a.status()["engine"]["epoch"] == 2 and is_healthy(a), what="a's engine restart")
        st = b.status()
        assert st["engine"]["epoch"] == 1 and st["engine"]["restarts"] == 0 and is_healthy(b)

        # mlxsup stop: nothing of a remains, b carries on.
        out = mlxsup("stop", "--run-dir", a.run_dir)
        assert out.returncode == 0, out.stderr
        assert_nothing_left(a)
        assert is_healthy(b)

        # SIGKILL of b's supervisor: its children die with it and let go of the port ...
        segs = instance_segments(b.run_dir)
        os.kill(b.status()["supervisor_pid"], signal.SIGKILL)
        wait_for(lambda: not orphans(b.run_dir) and _port_is_closed(b.port), timeout=30, what="b's children to die")
        assert segs <= set(os.listdir("/dev/shm"))  # left for the next start to remove
        # ... and the next start in the same run dir cleans up and serves again.
        out = mlxsup("start", "--model", tiny_model_dir, "--host", "127.0.0.1", "--port", str(b.port),
                     "--run-dir", b.run_dir, "--workers", "1", timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert not (segs & set(os.listdir("/dev/shm")))
        assert "a previous supervisor died" in open(os.path.join(b.run_dir, "supervisor.log")).read()
        with b.client() as c:
            assert c.post("/generate", json={"prompt": "again", "max_tokens": 4}).status_code == 200
        b.segments |= instance_segments(b.run_dir)
        assert mlxsup("stop", "--port", str(b.port), "--run-dir", b.run_dir).returncode == 0
        assert_nothing_left(b)
        assert mlxsup("status", "--run-dir", b.run_dir).returncode == 1
    finally:
        stop_server(a)
        if b is not None:
            stop_server(b)


def test_demo_model_by_default_and_a_second_start_is_refused(tmp_path):
    # No --model: the demo model, built into the (here private) cache on first use.
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    port = free_port()
    out = mlxsup("start", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", env=env, timeout=300)
    srv = Server(run_dir=str(tmp_path / "cache" / "mlxsup" / f"run-{port}"), port=port, model="demo")
    srv.segments = instance_segments(srv.run_dir)
    try:
        assert out.returncode == 0, out.stderr
        assert os.path.join(str(tmp_path / "cache"), "mlxsup", "demo-model") in out.stdout
        with srv.client() as c:
            assert c.post("/generate", json={"prompt": "1 + 2 =", "max_tokens": 4}).status_code == 200
        out = mlxsup("start", "--model", str(tmp_path), "--host", "127.0.0.1", "--port", str(port), env=env)
        assert out.returncode == 4 and "already runs" in out.stderr
        out = mlxsup("start", "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(tmp_path / "other"), env=env)
        assert out.returncode == 1 and "cannot listen" in out.stderr  # the port is taken
        assert is_healthy(srv)
        out = mlxsup("stop", "--port", str(port), env=env)  # found by its port
        assert out.returncode == 0, out.stderr
        assert_nothing_left(srv)
    finally:
        stop_server(srv)


def test_model_that_cannot_load_is_a_boot_failure(tmp_path):
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    out = mlxsup("start", "--model", str(model), "--host", "127.0.0.1", "--port", str(free_port()),
                 "--run-dir", str(run_dir), timeout=300)  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "engine failed to start" in out.stderr and "engine.log" in out.stderr
    assert time.monotonic() - t0 < 120
    assert orphans(str(run_dir)) == []
    assert not os.path.exists(run_dir / "control.sock") and not os.path.exists(run_dir / "supervisor.pid")
