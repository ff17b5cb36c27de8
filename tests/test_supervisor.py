"""Unit tests of the supervisor's parts that need no child process: backoff, the adapter state
file, swap serialisation, the start checks, the CLI's parsing and the status report."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys

import pytest

from mlxsup.config import ServerConfig, default_run_dir
from mlxsup.engine.config import EngineConfig
from mlxsup.supervisor import cli as sup_cli
from mlxsup.supervisor.backoff import Backoff
from mlxsup.supervisor.engine_link import EngineGone
from mlxsup.supervisor.health import _unchunk, probe_host
from mlxsup.supervisor.launcher import StartError, check_port, exposure_warning, prepare_config
from mlxsup.supervisor.rundir import is_owned, lock_run_dir, log_tail
from mlxsup.supervisor.state import AdapterState, initial_state, read_state, write_state
from mlxsup.supervisor.status import format_bytes, format_duration, format_status
from mlxsup.supervisor import swaps
from mlxsup.supervisor.swaps import SwapCoordinator

# ---------------------------------------------------------------------- backoff


def test_backoff_doubles_up_to_the_cap():
    b = Backoff(initial_s=0.5, max_s=4.0, stable_s=30.0)
    assert [b.next_delay(uptime_s=1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_resets_after_a_stable_run():
    b = Backoff(initial_s=1.0, max_s=60.0, stable_s=10.0)
    b.next_delay(0.1)
    b.next_delay(0.1)
    assert b.next_delay(0.1) == 4.0
    assert b.next_delay(uptime_s=11.0) == 1.0  # it had stayed up: start over
    assert b.next_delay(0.1) == 2.0


def test_backoff_rejects_nonsense():
    with pytest.raises(ValueError):
        Backoff(initial_s=0)
    with pytest.raises(ValueError):
        Backoff(initial_s=2, max_s=1)


# ---------------------------------------------------------------------- state file


def test_state_roundtrip_and_atomic_write(tmp_path):
    run_dir = str(tmp_path)
    assert read_state(run_dir) is None
    write_state(run_dir, AdapterState("/a", 3))
    assert read_state(run_dir) == AdapterState("/a", 3, 3)
    write_state(run_dir, AdapterState(None, 4, 6))
    state = read_state(run_dir)
    assert state == AdapterState(None, 4, 6) and state.next_version == 7
    assert sorted(os.listdir(run_dir)) == ["adapter_state.json"]  # no temporary file left
    data = json.loads((tmp_path / "adapter_state.json").read_text())
    assert data["adapter_path"] is None and data["policy_version"] == 4
    assert state.committed_at == data["committed_at"]  # what GET /adapter reports as loaded_at


def test_state_file_unreadable_is_an_error(tmp_path):
    (tmp_path / "adapter_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        read_state(str(tmp_path))
    (tmp_path / "adapter_state.json").write_text('{"policy_version": "3"}')
    with pytest.raises(ValueError, match="wrong type"):
        read_state(str(tmp_path))


def test_initial_state_continues_versions():
    assert initial_state(None, None) == AdapterState(None, 0)
    assert initial_state(None, "/a") == AdapterState("/a", 0)
    prev = AdapterState("/a", 5)
    assert initial_state(prev, "/a") == prev  # same adapter: same version
    assert initial_state(prev, None) == AdapterState(None, 6, 6)  # other weights: a new number
    assert initial_state(AdapterState("/a", 5, 7), "/a").policy_version == 8  # 6 and 7 may be used


# ---------------------------------------------------------------------- swaps


class FakeLink:
    def __init__(self, fail_names=(), die_names=(), delay=0.0):
        self.calls = []
        self.active = 0
        self.max_active = 0
        self.fail_names, self.die_names, self.delay = fail_names, die_names, delay

    async def swap(self, path, mode, version):
        self.calls.append((path, mode, version))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            name = os.path.basename(path or "")
            if name in self.die_names:
                raise EngineGone("killed")
            if name in self.fail_names:
                return {"op": "swap_done", "ok": False, "error": {"type": "invalid_adapter", "message": "bad shapes"}}
            return {"op": "swap_done", "ok": True, "policy_version": version, "prepare_ms": 1.0, "commit_ms": 1.0}
        finally:
            self.active -= 1


def _coordinator(tmp_path, link, state=None):
    state = state or AdapterState()
    write_state(str(tmp_path), state)
    coord = SwapCoordinator(str(tmp_path), state)

    async def ready():
        return link

    return coord, ready


def test_concurrent_swaps_are_serialised_and_each_adds_one(tmp_path):
    adapters = [tmp_path / f"a{i}" for i in range(5)]
    for a in adapters:
        a.mkdir()
    link = FakeLink(delay=0.02)
    coord, ready = _coordinator(tmp_path, link)

    async def main():
        return await asyncio.gather(*(coord.reload(str(a), "drain", ready) for a in adapters))

    replies = asyncio.run(main())
    assert all(r["ok"] for r in replies)
    assert sorted(r["policy_version"] for r in replies) == [1, 2, 3, 4, 5]
    assert link.max_active == 1
    assert read_state(str(tmp_path)).policy_version == 5


def test_failed_swap_keeps_the_version(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    link = FakeLink(fail_names=("bad",))
    coord, ready = _coordinator(tmp_path, link, AdapterState(None, 2))
    reply = asyncio.run(coord.reload(str(tmp_path / "bad"), "drain", ready))
    assert reply["ok"] is False and reply["error"]["type"] == "invalid_adapter"
    assert reply["policy_version"] == 2 and read_state(str(tmp_path)).policy_version == 2
    reply = asyncio.run(coord.reload(str(tmp_path / "good"), "abort", ready))
    assert reply["ok"] and reply["policy_version"] == 3  # exactly one more, no gap
    assert link.calls[-1] == (str(tmp_path / "good"), "abort", 3)


def test_path_checks_happen_before_the_engine(tmp_path):
    link = FakeLink()
    coord, ready = _coordinator(tmp_path, link)
    (tmp_path / "file").write_text("x")
    r = asyncio.run(coord.reload(str(tmp_path / "missing"), "drain", ready))
    assert r["error"]["type"] == "not_found"
    r = asyncio.run(coord.reload(str(tmp_path / "file"), "drain", ready))
    assert r["error"]["type"] == "invalid_adapter"
    r = asyncio.run(coord.reload(str(tmp_path), "sideways", ready))
    assert r["error"]["type"] == "bad_request" and r["error"]["field"] == "mode"
    r = asyncio.run(coord.reload(42, "drain", ready))
    assert r["error"]["type"] == "bad_request"
    assert link.calls == []


def test_base_model_swap(tmp_path):
    link = FakeLink()
    coord, ready = _coordinator(tmp_path, link, AdapterState("/x", 4))
    r = asyncio.run(coord.reload(None, "drain", ready))
    assert r["ok"] and r["adapter"] is None and r["policy_version"] == 5
    assert read_state(str(tmp_path)) == AdapterState(None, 5)


def test_engine_death_mid_swap_burns_the_version(tmp_path):
    (tmp_path / "die").mkdir()
    (tmp_path / "ok").mkdir()
    link = FakeLink(die_names=("die",))
    coord, ready = _coordinator(tmp_path, link, AdapterState(None, 1))
    r = asyncio.run(coord.reload(str(tmp_path / "die"), "drain", ready))
    assert r["error"]["type"] == "engine_restarted"
    state = read_state(str(tmp_path))
    assert state.policy_version == 1 and state.max_issued_version == 2
    r = asyncio.run(coord.reload(str(tmp_path / "ok"), "drain", ready))
    assert r["policy_version"] == 3  # 2 may have tagged tokens of the dead engine: never reused


def test_last_swap_reports_the_engine_first_token_of_its_version(tmp_path):
    (tmp_path / "a").mkdir()
    coord, ready = _coordinator(tmp_path, FakeLink())
    assert coord.last_swap() is None
    r = asyncio.run(coord.reload(str(tmp_path / "a"), "inflight", ready))
    last = coord.last_swap()
    assert last["policy_version"] == r["policy_version"] == 1 and last["mode"] == "inflight"
    assert last["adapter"] == str(tmp_path / "a") and last["first_token_ms"] is None
    coord.note_first_token({"op": "swap_first_token", "policy_version": 0, "first_token_ms": 5.0})
    assert coord.last_swap()["first_token_ms"] is None  # another version's
    coord.note_first_token({"op": "swap_first_token", "policy_version": 1, "first_token_ms": 80.5,
                            "commit_to_first_token_ms": 61.0, "running_at_commit": 4})
    last = coord.last_swap()
    assert (last["first_token_ms"], last["commit_to_first_token_ms"], last["running_at_commit"]) == (80.5, 61.0, 4)
    assert last["commit_ms"] == 1.0  # the engine's swap_done timings stay
    refused = asyncio.run(coord.reload(str(tmp_path / "missing"), "inflight", ready))
    assert not refused["ok"] and coord.last_swap()["policy_version"] == 1  # only commits count


def test_no_engine_means_unavailable(tmp_path):
    (tmp_path / "a").mkdir()
    coord = SwapCoordinator(str(tmp_path), AdapterState())

    async def none():
        return None

    r = asyncio.run(coord.reload(str(tmp_path / "a"), "drain", none))
    assert r["error"]["type"] == "engine_unavailable"


# ---------------------------------------------------------------------- run dir


def test_run_dir_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    run_dir = str(tmp_path / "run")
    fd = lock_run_dir(run_dir)
    assert fd is not None and is_owned(run_dir)
    assert lock_run_dir(run_dir) is None
    os.close(fd)
    assert not is_owned(run_dir)
    # A process that holds the lock and is killed releases it.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from mlxsup.supervisor.rundir import lock_run_dir; "
         "fd=lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)", run_dir],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert is_owned(run_dir)
    finally:
        holder.kill()
        holder.wait()
    assert not is_owned(run_dir)


def test_log_tail_only_shows_new_lines(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text("old run\n")
    since = log.stat().st_size
    with open(log, "a") as f:
        f.write("line 1\nline 2\n")
    assert log_tail(str(log), since=since) == "line 1\nline 2"
    assert "missing" in log_tail(str(tmp_path / "nope.log"))


# ---------------------------------------------------------------------- start checks


def test_exposure_warning_is_loud_without_keys():
    warning = exposure_warning(ServerConfig(host="0.0.0.0", port=8123))
    assert warning and "WITHOUT an API key" in warning and "8123" in warning
    assert "--api-key" in warning and "loopback" in warning
    assert exposure_warning(ServerConfig(host="127.0.0.1")) is None
    assert exposure_warning(ServerConfig(host="::1")) is None
    assert exposure_warning(ServerConfig(host="0.0.0.0", api_key="k", admin_key="a")) is None


def test_prepare_config_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "adapter").mkdir()
    config = ServerConfig(model="model", adapter_path="adapter", run_dir="run", port=8001)
    out = prepare_config(config)
    assert out.model == str(tmp_path / "model")
    assert out.adapter_path == str(tmp_path / "adapter")
    assert out.run_dir == str(tmp_path / "run")
    # A Hugging Face repo id is kept as it is.
    assert prepare_config(ServerConfig(model="mlx-community/Foo-4bit", port=8001)).model == "mlx-community/Foo-4bit"
    # No --model: the demo model's path.
    assert prepare_config(ServerConfig(port=8001), demo_builder=lambda: "/demo").model == "/demo"


def test_prepare_config_refuses_missing_paths(tmp_path):
    with pytest.raises(StartError, match="--adapter-path"):
        prepare_config(ServerConfig(model=str(tmp_path), adapter_path=str(tmp_path / "nope")))
    with pytest.raises(StartError, match="--model"):
        prepare_config(ServerConfig(model=str(tmp_path / "nope")))
    with pytest.raises(StartError, match="--port 0"):
        prepare_config(ServerConfig(model=str(tmp_path), port=0))


def test_check_port_reports_a_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(StartError, match=f"127.0.0.1:{port}"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again


# ---------------------------------------------------------------------- CLI


def _parser():
    from mlxsup.cli import build_parser

    return build_parser()


def test_start_defaults_are_the_seeds():
    args = _parser().parse_args(["start"])
    config = sup_cli.config_from_args(args)
    assert config.model is None and config.adapter_path is None
    assert (config.host, config.port, config.max_batch) == ("0.0.0.0", 8000, 5)
    assert (config.flush_interval_ms, config.max_tokens, config.log_level) == (10.0, 128, "INFO")
    assert config.trust_remote_code is False
    assert config.run_dir == default_run_dir(8000)
    assert args.foreground is False


def test_start_flags_map_to_the_config(tmp_path):
    args = _parser().parse_args(
        ["start", "--model", "m", "--adapter-path", "a", "--host", "127.0.0.1", "--port", "9001",
         "--max-batch", "7", "--flush-interval-ms", "2.5", "--max-tokens", "64", "--trust-remote-code",
         "--log-level", "debug", "--workers", "3", "--run-dir", str(tmp_path), "--max-queue", "9",
         "--foreground", "--api-key", "k", "--admin-key", "ak", "--adapter-root", "/srv",
         "--max-upload-mb", "5", "--blas", "off", "--pipeline", "on"]
    )  # fmt: skip
    c = sup_cli.config_from_args(args)
    assert (c.model, c.adapter_path, c.host, c.port) == ("m", "a", "127.0.0.1", 9001)
    assert (c.max_batch, c.flush_interval_ms, c.max_tokens, c.trust_remote_code) == (7, 2.5, 64, True)
    assert (c.log_level, c.workers, c.run_dir, c.max_queue) == ("DEBUG", 3, str(tmp_path), 9)
    assert (c.api_key, c.admin_key, c.adapter_root, c.max_upload_mb, c.blas) == ("k", "ak", "/srv", 5, "off")
    assert args.foreground is True
    assert c.pipeline == "on" and EngineConfig.from_server_config(c).pipeline is True


# `mlxsup start --help` on main before the flags were derived from ServerConfig (issue 14):
# the same flags, in the same order. A new flag is a new ServerConfig field and goes here.
START_FLAGS = [
    "--model", "--adapter-path", "--host", "--port", "--max-batch", "--flush-interval-ms",
    "--max-tokens", "--trust-remote-code", "--log-level", "--workers", "--run-dir", "--max-queue",
    "--foreground", "--blas", "--pipeline", "--warm-up", "--max-prefill-tokens", "--prefill-chunk", "--kv-cache-gb", "--no-prefix-cache",
    "--ranks", "--hostfile", "--distributed-backend", "--api-key", "--admin-key", "--adapter-root", "--header-timeout", "--max-upload-mb",
]  # fmt: skip


def _start_parser():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["start"]


def test_start_help_lists_the_flags_it_always_had():
    start = _start_parser()
    flags = [s for a in start._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert flags == START_FLAGS
    text = start.format_help()
    assert "(default: 10)" in text and "(default: 15)" in text  # floats read as the docs say
    assert "--header-timeout HEADER_TIMEOUT" in text and "--prefill-chunk TOKENS" in text


def _non_default(f, tmp_path):
    """A value for field `f` other than its default, as a command-line word and as parsed."""
    meta = f.metadata["cli"]
    if meta.get("choices"):
        value = next(c for c in meta["choices"] if c != f.default)
        return value.lower(), value
    if meta.get("path"):
        return str(tmp_path), str(tmp_path)
    if f.type == "int":
        return str(f.default + 3), f.default + 3
    if f.type == "float":
        return str(f.default + 1.5), f.default + 1.5
    return "v-" + f.name, "v-" + f.name


def test_every_config_field_is_a_flag_that_round_trips(tmp_path, monkeypatch):
    monkeypatch.delenv("MLXSUP_API_KEY", raising=False)
    monkeypatch.delenv("MLXSUP_ADMIN_KEY", raising=False)
    import dataclasses

    fields = dataclasses.fields(ServerConfig)
    # Every field says whether it is a flag; the ones that are not are named here on purpose.
    assert all("cli" in f.metadata for f in fields)
    assert {f.name for f in fields if f.metadata["cli"] is None} == {"request_timeout_s", "min_policy_wait_s"}
    argv, expected = ["start"], {}
    for f, meta in sup_cli.config_flags():
        flag = sup_cli.flag_name(f, meta)
        assert flag in START_FLAGS
        if f.type == "bool":
            argv.append(flag)
            expected[f.name] = True
        else:
            word, value = _non_default(f, tmp_path)
            argv += [flag, word]
            expected[f.name] = value
    config = sup_cli.config_from_args(_parser().parse_args(argv))
    assert {name: getattr(config, name) for name in expected} == expected
    # ... and the defaults of no flag at all are the dataclass's (run_dir: derived from the port).
    defaults = sup_cli.config_from_args(_parser().parse_args(["start"]))
    assert dataclasses.replace(defaults, run_dir="") == dataclasses.replace(ServerConfig(), run_dir="")


def test_key_flags_default_to_the_environment(monkeypatch):
    monkeypatch.setenv("MLXSUP_API_KEY", "from-env")
    monkeypatch.setenv("MLXSUP_ADMIN_KEY", "admin-env")
    config = sup_cli.config_from_args(_parser().parse_args(["start"]))
    assert (config.api_key, config.admin_key) == ("from-env", "admin-env")
    assert sup_cli.config_from_args(_parser().parse_args(["start", "--api-key", "cli"])).api_key == "cli"


def test_a_field_must_say_whether_it_is_a_flag():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Undeclared:
        x: int = 1

    with pytest.raises(TypeError, match="flag"):
        sup_cli.config_flags(Undeclared)


def test_pipeline_flag_reaches_the_engine_config():
    auto = sup_cli.config_from_args(_parser().parse_args(["start"]))
    assert auto.pipeline == "auto" and EngineConfig.from_server_config(auto, model="m").pipeline is None
    off = ServerConfig(pipeline="off")
    assert EngineConfig.from_server_config(off, model="m").pipeline is False
    assert ServerConfig.from_json(off.to_json()).pipeline == "off"  # what the engine reads
    with pytest.raises(ValueError, match="pipeline"):
        ServerConfig(pipeline="sometimes")
    with pytest.raises(SystemExit):
        _parser().parse_args(["start", "--pipeline", "sometimes"])


def test_start_rejects_invalid_values(capsys):
    args = _parser().parse_args(["start", "--max-batch", "0"])
    assert args.func(args) == 2
    assert "max_batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["start", "--log-level", "LOUD"])


def test_instance_commands_find_the_run_dir(tmp_path):
    args = _parser().parse_args(["status", "--port", "8123"])
    assert sup_cli.run_dir_of(args) == default_run_dir(8123)
    args = _parser().parse_args(["stop", "--run-dir", str(tmp_path)])
    assert sup_cli.run_dir_of(args) == str(tmp_path)
    args = _parser().parse_args(["reload-adapter", "/x", "--mode", "inflight", "--port", "9"])
    assert (args.path, args.mode, args.base) == ("/x", "inflight", False)
    args = _parser().parse_args(["reload-adapter", "--base"])
    assert args.path is None and args.base and args.mode == "drain"


def test_reload_adapter_needs_a_path_or_base(tmp_path):
    args = _parser().parse_args(["reload-adapter", "--run-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        args.func(args)


def test_commands_on_a_stopped_instance(tmp_path, capsys):
    p = _parser()
    args = p.parse_args(["status", "--run-dir", str(tmp_path), "--json"])
    assert args.func(args) == 1
    assert json.loads(capsys.readouterr().out) == {"running": False, "run_dir": str(tmp_path)}
    args = p.parse_args(["stop", "--run-dir", str(tmp_path)])
    assert args.func(args) == 1
    args = p.parse_args(["reload-adapter", str(tmp_path), "--run-dir", str(tmp_path)])
    assert args.func(args) == 1
    assert "no supervisor is listening" in capsys.readouterr().err


# ---------------------------------------------------------------------- status and health


def test_format_status():
    text = format_status(
        {
            "state": "running", "host": "0.0.0.0", "port": 8000, "instance_id": "ab12cd34",
            "uptime_s": 75, "run_dir": "/r", "model": "/m", "policy_version": 3, "adapter": "/a",
            "num_swaps": 3,
            "engine": {"epoch": 2, "restarts": 1, "state": "ready", "queue_depth": 4, "running": 5,
                       "tokens_per_s": 123.45, "tokens_generated": 1000},
            "processes": [{"role": "engine", "pid": 42, "rss_bytes": 3 << 20, "cpu_percent": 99.5, "uptime_s": 3700}],
        }
    )  # fmt: skip
    assert "policy version: 3" in text and "epoch 2, restarts 1" in text
    assert "queue 4, running 5, 123.5 tokens/s" in text
    assert "engine" in text and "3.0 MiB" in text and "99.5" in text and "1h01m" in text
    assert format_duration(59) == "59s" and format_duration(90061) == "1d01h"
    assert format_bytes(512) == "512 B"


def test_probe_host_and_chunked_bodies():
    assert probe_host("0.0.0.0") == "127.0.0.1"
    assert probe_host("::") == "::1"
    assert probe_host("10.1.2.3") == "10.1.2.3"
    assert _unchunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n") == b"hello world"


def test_supervisor_never_imports_mlx():
    code = (
        "import sys; import mlxsup.cli, mlxsup.supervisor.cli, mlxsup.supervisor.launcher, "
        "mlxsup.supervisor.arbiter; "
        "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_argparse_namespace_stays_at_the_edge():
    assert isinstance(sup_cli.config_from_args(_parser().parse_args(["start"])), ServerConfig)
    assert not any(isinstance(v, argparse.Namespace) for v in vars(ServerConfig()).values())


def test_gunicorn_command_line_is_valid_for_gunicorn():
    from gunicorn.config import Config

    from mlxsup.supervisor.commands import gunicorn_argv

    argv = gunicorn_argv(ServerConfig(host="0.0.0.0", port=8123, workers=3, log_level="DEBUG"))
    assert argv[1:3] == ["-m", "gunicorn"]
    cfg = Config()
    args = cfg.parser().parse_args(argv[3:])
    for key, value in vars(args).items():
        if key != "args" and value is not None:
            cfg.set(key.lower(), value)
    assert cfg.workers == 3 and cfg.bind == ["0.0.0.0:8123"]
    assert cfg.worker_class_str == "mlxsup.api.worker.ASGIWorker" and cfg.control_socket_disable is True
    from gunicorn.workers.gasgi import ASGIWorker

    assert issubclass(cfg.worker_class, ASGIWorker)  # gunicorn resolves and loads it
    assert cfg.settings["asgi_loop"].get() == "uvloop"
    assert args.args == ["mlxsup.api.asgi:app"]
    assert gunicorn_argv(ServerConfig(host="::1", port=9))[argv.index("--bind") + 1] == "[::1]:9"


def test_every_engine_setting_of_start_reaches_the_engine_config():
    """Each `mlxsup start` flag the engine uses arrives in its EngineConfig, converted where the
    engine holds it in another form (pipeline, prefill chunk, KV budget, prefix cache)."""
    cfg = ServerConfig(model="m", adapter_path="a", trust_remote_code=True, max_batch=7,
                       flush_interval_ms=3.0, max_queue=9, max_tokens=11, min_policy_wait_s=5.0,
                       pipeline="on", prefill_chunk=64, kv_cache_gb=2.5, no_prefix_cache=True)
    e = EngineConfig.from_server_config(cfg)
    assert (e.model, e.adapter_path, e.trust_remote_code, e.max_batch, e.flush_interval_ms, e.max_queue,
            e.max_tokens, e.min_policy_wait_s) == ("m", "a", True, 7, 3.0, 9, 11, 5.0)
    assert (e.pipeline, e.prefill_chunk_tokens, e.kv_cache_gb, e.prefix_cache) == (True, 64, 2.5, False)
    default = EngineConfig.from_server_config(ServerConfig(), model="demo")
    assert default.model == "demo"
    assert (default.pipeline, default.prefill_chunk_tokens, default.kv_cache_gb, default.prefix_cache) == (
        None, None, None, True)


class HoldingLink(FakeLink):
    """A FakeLink whose engine holds prepared swaps (two-phase swaps), of one epoch."""

    def __init__(self, epoch=1):
        super().__init__()
        self.epoch, self.closed, self.held, self.dropped = epoch, False, {}, []

    async def swap(self, path, mode, version, hold=None, prepared=None):
        if hold is not None:
            self.held[hold] = path
            return {"op": "swap_done", "ok": True, "held": True, "read_ms": 1.0, "prepare_ms": 2.0}
        if prepared is not None:
            if prepared not in self.held:
                return {"op": "swap_done", "ok": False, "error": {"type": "not_found", "message": "none"}}
            path = self.held.pop(prepared)
            self.calls.append(("held", path, version))
            return {"op": "swap_done", "ok": True, "policy_version": version}
        return await super().swap(path, mode, version)

    async def drop_prepared(self, hold):
        self.dropped.append(hold)
        return {"ok": True, "dropped": self.held.pop(hold, None) is not None}


def test_two_phase_swap_commits_what_the_engine_holds_as_the_version_asked(tmp_path):
    (tmp_path / "a").mkdir()
    link = HoldingLink()
    coord, ready = _coordinator(tmp_path, link, AdapterState(None, 2))

    async def main():
        p = await coord.prepare(str(tmp_path / "a"), ready)
        assert p["ok"] and p["policy_version"] == 2 and p["next_policy_version"] == 3
        assert read_state(str(tmp_path)).policy_version == 2  # nothing committed
        low = await coord.commit_prepared(p["prepared_id"], "drain", ready, version=2)
        assert low["error"]["type"] == "version_conflict" and p["prepared_id"] in coord.prepared
        c = await coord.commit_prepared(p["prepared_id"], "drain", ready, version=7)
        assert c["ok"] and c["policy_version"] == 7 and c["prepared_id"] == p["prepared_id"]
        assert link.calls == [("held", str(tmp_path / "a"), 7)]
        assert read_state(str(tmp_path)) == AdapterState(str(tmp_path / "a"), 7)
        again = await coord.commit_prepared(p["prepared_id"], "drain", ready)
        assert again["error"]["type"] == "not_found" and again["error"]["field"] == "prepared_id"

    asyncio.run(main())


def test_a_prepared_swap_survives_an_engine_restart_by_preparing_again(tmp_path):
    """The engine that held it is gone (another epoch): the commit reads the files again."""
    (tmp_path / "a").mkdir()
    old, new = HoldingLink(epoch=1), HoldingLink(epoch=2)
    coord, ready = _coordinator(tmp_path, old)

    async def main():
        p = await coord.prepare(str(tmp_path / "a"), ready)

        async def restarted():
            return new

        c = await coord.commit_prepared(p["prepared_id"], "abort", restarted)
        assert c["ok"] and c["policy_version"] == 1
        assert new.calls == [(str(tmp_path / "a"), "abort", 1)]  # a whole swap, not the held one

    asyncio.run(main())


def test_prepared_swaps_are_bounded_cancelled_and_expire(tmp_path, monkeypatch):
    link = HoldingLink()
    coord, ready = _coordinator(tmp_path, link)

    async def main():
        ids = [(await coord.prepare(None, ready))["prepared_id"] for _ in range(swaps.MAX_PREPARED)]
        full = await coord.prepare(None, ready)
        assert full["error"]["type"] == "too_many_prepared"
        cancelled = await coord.cancel_prepared(ids[0], link)
        assert cancelled["ok"] and link.dropped == [ids[0]] and ids[0] not in link.held
        assert (await coord.cancel_prepared(ids[0], link))["error"]["type"] == "not_found"
        short = await coord.prepare(None, ready, ttl_s=0.05)
        assert short["ok"]
        await asyncio.sleep(0.1)
        assert coord.has_expired()
        await coord.drop_expired(link)
        assert short["prepared_id"] in link.dropped and short["prepared_id"] not in coord.prepared
        bad_ttl = await coord.prepare(None, ready, ttl_s=0)
        assert bad_ttl["error"]["field"] == "ttl_s"

    asyncio.run(main())
