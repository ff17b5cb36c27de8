"""How the supervisor plans a sharded engine's ranks (supervisor/ranks.py): mlx.launch's hostfile
and per-backend environment, the checks that refuse a group before anything starts, and the
shell script a remote rank runs (executed here by a real shell, as ssh would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlxsup.config import ServerConfig
from mlxsup.supervisor import ranks
from mlxsup.supervisor.launcher import StartError, prepare_config


def _hostfile(tmp_path, hosts, **extra) -> str:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"hosts": hosts, **extra}))
    return str(path)


def _config(tmp_path, **kw) -> ServerConfig:
    return ServerConfig(model=str(tmp_path), run_dir=str(tmp_path / "run"), **kw)


def test_the_hostfile_parser_imports_no_mlx_core():
    code = ("import sys; from mlxsup.supervisor import ranks; ranks.group_of; "
            "from mlx._distributed_utils.common import Hostfile; print('mlx.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr  # the supervisor forks: it must never load MLX


def test_local_ranks_get_mlx_launch_ring_environment(tmp_path):
    config = _config(tmp_path, ranks=3)
    group = ranks.group_of(config)
    assert group.size == 3 and group.backend == "ring" and all(h.is_local for h in group.hosts)
    os.makedirs(config.run_dir)
    launches = ranks.plan(group, ["python", "-m", "mlxsup.engine", "--control-fd", "7"], config, 4, "")
    assert [launch.rank for launch in launches] == [0, 1, 2]
    assert launches[0].argv[-2:] == ("--distributed", "ring") and "--control-fd" in launches[0].argv
    for launch in launches[1:]:
        assert "--follower" in launch.argv and "--control-fd" not in launch.argv
        assert launch.argv[launch.argv.index("--epoch") + 1] == "4"
    assert [launch.env["MLX_RANK"] for launch in launches] == ["0", "1", "2"]
    hostfile = launches[0].env["MLX_HOSTFILE"]
    assert all(launch.env["MLX_HOSTFILE"] == hostfile for launch in launches)
    addresses = json.loads(open(hostfile).read())  # mlx's ring format: each rank's ip:port list
    assert len(addresses) == 3 and all(len(a) == 1 and a[0].startswith("127.0.0.1:") for a in addresses)
    assert len({a[0] for a in addresses}) == 3


def test_nccl_ranks_get_one_gpu_each(tmp_path):
    config = _config(tmp_path, ranks=2, distributed_backend="nccl")
    os.makedirs(config.run_dir)
    launches = ranks.plan(ranks.group_of(config), ["e"], config, 1, "")
    assert [x.env["CUDA_VISIBLE_DEVICES"] for x in launches] == ["0", "1"]
    assert {x.env["MLX_WORLD_SIZE"] for x in launches} == {"2"}
    assert {x.env["NCCL_HOST_IP"] for x in launches} == {"127.0.0.1"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(ranks=2, distributed_backend="jaccl"), "RDMA"),
    (dict(ranks=2, hostfile="HOSTS"), "not both"),
])  # fmt: skip
def test_impossible_local_groups_are_refused(tmp_path, kwargs, message):
    if kwargs.get("hostfile"):
        kwargs["hostfile"] = _hostfile(tmp_path, [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2)
    with pytest.raises(ranks.RankError, match=message):
        ranks.group_of(_config(tmp_path, **kwargs))


@pytest.mark.parametrize("content, message", [
    ("not json", "Failed to parse hostfile"),
    ({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]}, "at least 2"),
    ({"hosts": [{"ssh": "far.example", "ips": ["203.0.113.7"]}, {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]},
     "rank 0"),
    ({"backend": "mpi", "hosts": [{"ssh": "127.0.0.1"}, {"ssh": "h2"}]}, "mpi backend is not supported"),
    ({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "h2"}]}, "needs \"ips\""),
    ({"backend": "jaccl", "hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "rdma": [None, None]},
                                    {"ssh": "h2", "rdma": [None, None]}]}, "no RDMA device"),
    ({"envs": [3], "hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "h2", "ips": ["10.9.9.9"]}]},
     "envs"),
])  # fmt: skip
def test_a_bad_hostfile_fails_mlxsup_start_with_the_reason(tmp_path, content, message):
    path = tmp_path / "hosts.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(StartError, match=message):
        prepare_config(_config(tmp_path, hostfile=str(path)), demo_builder=lambda: "unused")
    with pytest.raises(StartError, match="doesn't exist"):
        prepare_config(_config(tmp_path, hostfile=str(tmp_path / "missing.json")))


def test_a_hostfile_group_starts_remote_ranks_over_ssh_with_mlx_launch_ports(tmp_path):
    hosts = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "mac2.example", "ips": ["10.9.9.9", "10.8.8.8"]},
             {"ssh": "mac3.example", "ips": ["10.9.9.10"]}]  # fmt: skip
    config = _config(tmp_path, hostfile=_hostfile(tmp_path, hosts, envs=["MLX_METAL_FAST_SYNCH=1"]),
                     api_key="secret-api", admin_key="secret-admin")
    group = ranks.group_of(config)
    assert group.backend == "ring" and [h.is_local for h in group.hosts] == [True, False, False]
    os.makedirs(config.run_dir)
    launches = ranks.plan(group, ["e", "--run-dir", config.run_dir], config, 2, '{"policy_version": 5}')
    local = launches[0]
    assert local.is_local and local.env["MLX_METAL_FAST_SYNCH"] == "1"
    assert json.loads(open(local.env["MLX_HOSTFILE"]).read()) == [
        ["127.0.0.1:32323"], ["10.9.9.9:32324", "10.8.8.8:32325"], ["10.9.9.10:32326"]]
    remote = launches[1]
    assert not remote.is_local and remote.argv[:5] == ("ssh", "-tt", "-o", "LogLevel=QUIET", "mac2.example")
    script = remote.argv[5]
    assert "MLX_RANK=1" in script and "secret" not in script  # ps on that host shows the script


def test_the_remote_script_sets_up_the_rank_and_execs_it(tmp_path):
    """The script ssh would run, run by sh here with a stand-in for the engine command that
    reports what it was given."""
    report = tmp_path / "report.json"
    probe = ("import json, os, sys, shutil; d = sys.argv[sys.argv.index('--run-dir') + 1]; "
             "env = {k: os.environ.get(k) for k in ('MLX_RANK', 'MLX_METAL_FAST_SYNCH')}; "
             "env['hostfile'] = json.load(open(os.environ['MLX_HOSTFILE'])); os.unlink(os.environ['MLX_HOSTFILE']); "
             "env['config'] = json.load(open(os.path.join(d, 'config.json'))); "
             "env['state'] = json.load(open(os.path.join(d, 'adapter_state.json'))); shutil.rmtree(d); "
             f"env['argv'] = sys.argv[1:]; json.dump(env, open({str(report)!r}, 'w'))")
    argv = [sys.executable, "-c", probe, "--run-dir", "/supervisor/run", "--follower"]
    env = {"MLX_RANK": "1", "MLX_METAL_FAST_SYNCH": "it's quoted"}
    config = _config(tmp_path, api_key="k1", admin_key="k2", max_batch=7)
    script = ranks._remote_script(argv, env, {"MLX_HOSTFILE": json.dumps([["a:1"], ["b:2"]])},
                                  ranks._remote_config(config), '{"policy_version": 5}')
    subprocess.run(["sh", "-c", script], check=True, timeout=60)
    got = json.loads(report.read_text())
    assert got["MLX_RANK"] == "1" and got["MLX_METAL_FAST_SYNCH"] == "it's quoted"
    assert got["hostfile"] == [["a:1"], ["b:2"]] and got["state"] == {"policy_version": 5}
    assert got["config"]["max_batch"] == 7 and got["config"]["api_key"] is None
    assert got["config"]["admin_key"] is None
    assert got["argv"][0] == "--follower" and got["argv"][1] == "--run-dir"
