"""The supervisor's process management with real processes, signals and shared memory, and
stand-ins for the engine and the API (tests/supervisor_fakes.py), so each case takes a second
rather than a model load."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from mlxsup.supervisor import protocol
from mlxsup.supervisor.children import orphans
from mlxsup.supervisor.launcher import free_port
from mlxsup.supervisor.rundir import is_owned

pytestmark = pytest.mark.timeout(120)

FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervisor_fakes.py")


def start(run_dir, port, env=None, foreground=False, **kw):
    argv = [sys.executable, FAKES, "start", "--run-dir", str(run_dir), "--port", str(port)]
    full_env = dict(os.environ, **(env or {}))
    if foreground:
        return subprocess.Popen(argv + ["--foreground"], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=60, **kw)


def mlxsup(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "mlxsup", *args], capture_output=True, text=True, timeout=timeout)


def status(run_dir) -> dict:
    return protocol.call(str(run_dir), {"op": "status"})


def children(run_dir) -> dict:
    with open(os.path.join(run_dir, "children.json")) as f:
        return {c["role"]: c["pid"] for c in json.load(f)}


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (protocol.ControlError, OSError, KeyError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def control_block(run_dir):
    from mlxsup.ipc.control import ControlBlock
    from mlxsup.ipc.layout import IpcLayout

    block = ControlBlock.attach(IpcLayout.load(str(run_dir)).control_name)
    try:
        return block.read()
    finally:
        block.close()


def segments_of(run_dir) -> set[str]:
    try:
        with open(os.path.join(run_dir, "ipc.json")) as f:
            instance = json.load(f)["instance_id"]
    except (OSError, ValueError, KeyError):
        return set()
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"mxs_{instance}_")}


def assert_nothing_left(run_dir, instance_segments=()):
    run_dir = str(run_dir)
    assert not is_owned(run_dir), "a supervisor still owns the run dir"
    assert orphans(run_dir) == [], "processes of the instance remain"
    left = set(os.listdir(run_dir))
    for name in ("control.sock", "supervisor.pid", "children.json", "ipc.json", "shm.manifest", "engine.bell"):
        assert name not in left, f"{name} remains"
    assert not [n for n in left if n.startswith("slot-")], "slot files remain"
    present = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not (set(instance_segments) & present), "shared-memory segments remain"


@pytest.fixture
def instance(tmp_path):
    """A running fake instance: (run_dir, port). Stopped and checked afterwards, pass or fail."""
    run_dir, port = tmp_path / "run", free_port()
    started = []

    def _start(env=None):
        out = start(run_dir, port, env)
        assert out.returncode == 0, out.stderr
        started.append(segments_of(run_dir))
        return run_dir, port

    yield _start
    mlxsup("stop", "--run-dir", str(run_dir))
    for proc in orphans(str(run_dir)):
        proc.kill()
    if started:
        assert_nothing_left(run_dir, set().union(*started))


def test_start_status_stop_leaves_nothing(instance):
    run_dir, port = instance()
    st = status(run_dir)
    assert st["state"] == "running" and st["healthy"] and st["port"] == port
    roles = [p["role"] for p in st["processes"]]
    assert roles[:3] == ["supervisor", "engine", "api-master"]
    for p in st["processes"]:
        assert p["rss_bytes"] > 0 and p["uptime_s"] >= 0 and p["cpu_percent"] >= 0
    assert st["engine"]["epoch"] == 1 and st["engine"]["restarts"] == 0 and st["engine"]["state"] == "ready"
    assert st["policy_version"] == 0 and st["adapter"] is None
    assert int((run_dir / "supervisor.pid").read_text()) == st["supervisor_pid"]
    segs = segments_of(run_dir)
    assert len(segs) == 1 + 2 * 2  # control block + a ring pair per slot (1 worker, 2 slots)

    out = mlxsup("status", "--run-dir", str(run_dir))
    assert out.returncode == 0 and "epoch 1, restarts 0" in out.stdout and "api-master" in out.stdout
    out = mlxsup("status", "--run-dir", str(run_dir), "--json")
    assert json.loads(out.stdout)["running"] is True

    pids = [p["pid"] for p in st["processes"]]
    out = mlxsup("stop", "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert_nothing_left(run_dir, segs)
    assert "stop drain=True" in (run_dir / "engine.log").read_text()  # the engine was asked to drain
    assert mlxsup("stop", "--run-dir", str(run_dir)).returncode == 1  # nothing to stop now


def test_second_start_in_the_same_run_dir_is_refused(instance):
    run_dir, port = instance()
    out = start(run_dir, free_port())
    assert out.returncode == 4
    assert "already runs" in out.stderr and "mlxsup stop" in out.stderr
    assert status(run_dir)["engine"]["epoch"] == 1  # the first one is untouched


def test_port_in_use_fails_before_detaching(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        out = start(tmp_path / "run", s.getsockname()[1])
    assert out.returncode == 1 and "cannot listen" in out.stderr
    assert not is_owned(str(tmp_path / "run"))


def test_killed_engine_restarts_on_the_committed_version(instance, tmp_path):
    run_dir, _ = instance()
    adapter = tmp_path / "adapter-1"
    adapter.mkdir()
    out = mlxsup("reload-adapter", str(adapter), "--run-dir", str(run_dir))
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    old = children(run_dir)["engine"]
    os.kill(old, signal.SIGKILL)
    st = wait_for(lambda: (s := status(run_dir))["engine"]["epoch"] == 2 and s["engine"]["ready"] and s, what="restart")
    assert st["engine"]["restarts"] == 1 and st["engine"]["pid"] != old
    assert st["policy_version"] == 1 and st["adapter"] == str(adapter)
    # The new engine read the committed state: it reports the same version and adapter.
    wait_for(lambda: status(run_dir)["engine"]["policy_version"] == 1, what="engine version")
    assert status(run_dir)["engine"]["adapter_id"] == str(adapter)
    assert "restarting in" in (run_dir / "supervisor.log").read_text()
    # The API workers read the supervisor's state from the control block: running again.
    assert control_block(run_dir).supervisor_state == "running"
    assert control_block(run_dir).engine_restarts == 1


def test_hung_engine_is_killed_and_restarted(instance):
    run_dir, _ = instance({"FAKE_ENGINE": "no_heartbeat", "FAKE_HEARTBEAT_TIMEOUT_S": "1.0"})
    wait_for(lambda: status(run_dir)["engine"]["epoch"] >= 2, what="restart of the silent engine")
    assert "sent no heartbeat" in (run_dir / "supervisor.log").read_text()


def test_engine_boot_failure_stops_with_the_reason(tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    out = start(run_dir, free_port(), {"FAKE_ENGINE": "boot_fail"})
    assert out.returncode == 3
    assert "engine failed to start" in out.stderr and "cannot load the model (on purpose)" in out.stderr
    assert time.monotonic() - t0 < 20  # no restart loop
    assert_nothing_left(run_dir)
    assert (run_dir / "engine.log").read_text().count("starting") == 1  # started once, not retried


def test_engine_that_cannot_restart_stops_the_server(instance):
    run_dir, _ = instance({"FAKE_ENGINE": "restart_fail", "FAKE_MAX_BOOT_FAILURES": "2"})
    pid = int((run_dir / "supervisor.pid").read_text())
    os.kill(children(run_dir)["engine"], signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, what="stop")
    log = (run_dir / "supervisor.log").read_text()
    assert "failed to restart 2 times in a row" in log


def test_stop_during_start(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    argv = [sys.executable, FAKES, "start", "--run-dir", str(run_dir), "--port", str(port)]
    starting = subprocess.Popen(argv, env=dict(os.environ, FAKE_ENGINE="slow_boot"), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: status(run_dir)["state"] == "starting", what="the supervisor to be up")
        assert mlxsup("stop", "--run-dir", str(run_dir)).returncode == 0
        _, err = starting.communicate(timeout=30)
    finally:
        if starting.poll() is None:
            starting.kill()
    assert starting.returncode == 1 and "stopped before it was healthy" in err
    assert_nothing_left(run_dir)


def test_api_boot_failure_stops_with_the_reason(tmp_path):
    run_dir = tmp_path / "run"
    out = start(run_dir, free_port(), {"FAKE_API": "boot_fail"})
    assert out.returncode == 3
    assert "API server failed to start" in out.stderr and "cannot import the app" in out.stderr
    assert_nothing_left(run_dir)


def test_killed_api_master_is_restarted(instance):
    run_dir, _ = instance()
    old = children(run_dir)["gunicorn"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: status(run_dir)["api_restarts"] == 1 and children(run_dir).get("gunicorn") not in (None, old), what="api restart")
    assert status(run_dir)["engine"]["epoch"] == 1  # the engine was not touched


def test_sighup_reloads_the_workers(instance):
    run_dir, _ = instance()
    os.kill(int((run_dir / "supervisor.pid").read_text()), signal.SIGHUP)
    wait_for(lambda: "fake api: SIGHUP" in (run_dir / "api.log").read_text(), what="SIGHUP to the API")
    assert status(run_dir)["state"] == "running"


def test_killed_supervisor_takes_its_children_and_the_next_start_cleans_up(instance):
    run_dir, port = instance()
    segs = segments_of(run_dir)
    kids = children(run_dir)
    os.kill(int((run_dir / "supervisor.pid").read_text()), signal.SIGKILL)

    def gone(pid):
        return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    wait_for(lambda: all(gone(p) for p in kids.values()), timeout=10, what="children to die with the supervisor")
    assert segs <= set(os.listdir("/dev/shm"))  # left behind by the killed supervisor
    assert (run_dir / "supervisor.pid").exists()
    instance()  # starts again in the same run dir and port
    assert not (segs & set(os.listdir("/dev/shm")))
    assert "a previous supervisor died" in (run_dir / "supervisor.log").read_text()


def test_foreground_stops_on_sigterm_and_sigint(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        run_dir = tmp_path / f"run-{sig}"
        proc = start(run_dir, free_port(), foreground=True)
        try:
            wait_for(lambda: status(run_dir)["healthy"], what="foreground server")
            segs = segments_of(run_dir)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert "graceful stop" in err and "stopped" in err  # logs go to the terminal too
            assert_nothing_left(run_dir, segs)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_reloads_over_the_socket_are_serialised(instance, tmp_path):
    run_dir, _ = instance()
    paths = []
    for i in range(4):
        (tmp_path / f"slow-{i}").mkdir()
        paths.append(str(tmp_path / f"slow-{i}"))
    procs = [
        subprocess.Popen([sys.executable, "-m", "mlxsup", "reload-adapter", p, "--run-dir", str(run_dir)], stdout=subprocess.PIPE, text=True)
        for p in paths
    ]  # fmt: skip
    versions = sorted(int(p.communicate(timeout=60)[0]) for p in procs)
    assert versions == [1, 2, 3, 4]
    (tmp_path / "bad-one").mkdir()
    out = mlxsup("reload-adapter", str(tmp_path / "bad-one"), "--run-dir", str(run_dir))
    assert out.returncode == 1 and "invalid_adapter" in out.stderr and "shapes" in out.stderr
    out = mlxsup("reload-adapter", "--base", "--run-dir", str(run_dir), "--json")
    reply = json.loads(out.stdout)
    assert reply["ok"] and reply["policy_version"] == 5 and reply["adapter"] is None


def test_control_socket_rejects_garbage(instance):
    run_dir, _ = instance()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(run_dir / "control.sock"))
        s.sendall(b"{nope\n")
        reply = json.loads(s.makefile().readline())
    assert reply["ok"] is False and reply["error"]["type"] == "bad_request"
    reply = protocol.call(str(run_dir), {"op": "dance"})
    assert reply["error"]["type"] == "bad_request" and "dance" in reply["error"]["message"]
    assert oct((run_dir / "control.sock").stat().st_mode & 0o777) == "0o600"
    assert status(run_dir)["state"] == "running"


def test_versions_continue_across_runs(instance, tmp_path):
    run_dir, port = instance()
    (tmp_path / "a").mkdir()
    assert mlxsup("reload-adapter", str(tmp_path / "a"), "--run-dir", str(run_dir)).stdout.strip() == "1"
    assert mlxsup("stop", "--run-dir", str(run_dir)).returncode == 0
    instance()  # the base model again, in the same run dir: not version 0 a second time
    st = status(run_dir)
    assert st["policy_version"] == 2 and st["adapter"] is None


def test_two_instances_do_not_interfere(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    segs = set()
    try:
        assert start(a, free_port()).returncode == 0
        assert start(b, free_port()).returncode == 0
        segs = segments_of(a) | segments_of(b)
        assert segments_of(a).isdisjoint(segments_of(b)) and len(segs) == 10
        os.kill(children(a)["engine"], signal.SIGKILL)
        wait_for(lambda: status(a)["engine"]["epoch"] == 2 and status(a)["engine"]["ready"], what="restart in a")
        assert status(b)["engine"]["epoch"] == 1 and status(b)["engine"]["restarts"] == 0
        assert mlxsup("stop", "--run-dir", str(a)).returncode == 0
        assert status(b)["state"] == "running"
    finally:
        mlxsup("stop", "--run-dir", str(a))
        mlxsup("stop", "--run-dir", str(b))
    assert_nothing_left(a, segs)
    assert_nothing_left(b, segs)
