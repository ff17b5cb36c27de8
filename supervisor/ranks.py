"""The ranks of a sharded engine: where each runs and how it is started, the way `mlx.launch`
starts them (mlx/_distributed_utils/launch.py in the installed mlx).

`mlx.launch` is a process that owns its ranks and copies their output; the supervisor must own
them itself (reap each, kill the group when one dies, know each pid), so it starts them the same
way instead of running `mlx.launch`: the same hostfile, the same environment per backend
(`MLX_RANK`; ring: `MLX_HOSTFILE`, a JSON list of each rank's `ip:port`s; JACCL:
`MLX_JACCL_COORDINATOR` and `MLX_IBV_DEVICES`; NCCL: `NCCL_HOST_IP`, `NCCL_PORT`,
`MLX_WORLD_SIZE`, `CUDA_VISIBLE_DEVICES`), and for a remote host the same `ssh -tt` with a
shell script that exports those and execs the rank.

Rank 0 is always this machine (it attaches the API workers' shared memory). A rank started
over ssh is the local ssh process to the supervisor: ssh's `-tt` gives the remote rank a
terminal, so killing ssh hangs the remote rank up.

Nothing here imports mlx.core (the supervisor forks): the hostfile is read with mlx's own
parser from `mlx._distributed_utils.common`, which imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import sys
from dataclasses import dataclass
from typing import Optional

from mlxsup.config import ServerConfig
from mlxsup.supervisor.launcher import free_port

# mlx.launch's defaults (--starting-port, --nccl-port), for the ranks of a hostfile: the
# supervisor cannot ask a remote host which ports are free.
RING_START_PORT = 32323
NCCL_PORT = 12345
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
RING_HOSTS_FILE = "ring_hosts.json"
IBV_DEVICES_FILE = "ibv_devices.json"
RANK_FILES = (RING_HOSTS_FILE, IBV_DEVICES_FILE)  # written into the run dir, removed on stop


class RankError(ValueError):
    """A --ranks / --hostfile / --distributed-backend combination that cannot start."""


@dataclass(frozen=True)
class Host:
    name: str  # what ssh is given ("127.0.0.1" for --ranks)
    ips: tuple  # addresses the other ranks reach it at (ring, JACCL's coordinator, NCCL's)
    rdma: tuple  # JACCL: this host's RDMA device towards each rank (None towards itself)
    is_local: bool


@dataclass(frozen=True)
class RankGroup:
    """Every rank of a sharded engine, rank 0 first, and the backend they join over."""

    backend: str  # as mlx.launch names it: ring, jaccl, jaccl-ring, nccl
    hosts: tuple
    envs: tuple = ()  # the hostfile's "envs" ("NAME=value")
    is_from_hostfile: bool = False

    @property
    def size(self) -> int:
        return len(self.hosts)

    @property
    def mlx_backend(self) -> str:
        """The name `mx.distributed.init` takes (JACCL's ring is JACCL with MLX_JACCL_RING)."""
        return "jaccl" if self.backend == "jaccl-ring" else self.backend


@dataclass(frozen=True)
class RankLaunch:
    """How to start one rank: `argv` with `env` added to the supervisor's children's environment."""

    rank: int
    host: str
    argv: tuple
    env: dict
    is_local: bool


def group_of(config: ServerConfig) -> Optional[RankGroup]:
    """The ranks `config` asks for; None for a one-rank engine. Raises RankError saying why a
    hostfile or backend cannot work, before anything starts."""
    backend = config.distributed_backend
    if config.ranks > 1 and config.hostfile:
        raise RankError("give --ranks N (ranks on this machine) or --hostfile FILE (one rank per "
                        "host), not both")
    if config.hostfile:
        return _hostfile_group(config.hostfile, backend)
    if config.ranks <= 1:
        return None
    if backend == "auto":
        backend = "ring"
    if backend not in ("ring", "nccl"):
        raise RankError(f"--ranks runs every rank on this machine, over ring (TCP on loopback) or "
                        f"nccl (CUDA); {backend} needs a --hostfile with each host's RDMA devices")
    hosts = tuple(Host("127.0.0.1", ("127.0.0.1",), (), True) for _ in range(config.ranks))
    return RankGroup(backend, hosts)


def _hostfile_group(path: str, backend: str) -> RankGroup:
    try:  # mlx.launch's own parser of its hostfile format
        from mlx._distributed_utils.common import Hostfile
    except ImportError as e:
        raise RankError(f"--hostfile needs mlx.launch's hostfile parser, missing from the "
                        f"installed mlx ({e})") from e
    try:
        parsed = Hostfile.from_file(path)
    except ValueError as e:
        raise RankError(f"--hostfile: {e}") from e
    if backend == "auto":
        backend = parsed.backend or "ring"
    if backend == "mpi":
        raise RankError("--hostfile: the mpi backend is not supported (mpirun starts the ranks "
                        "itself, so the supervisor could neither hand rank 0 its control socket "
                        "nor watch each rank); use ring, jaccl or nccl")
    if backend not in ("ring", "jaccl", "jaccl-ring", "nccl"):
        raise RankError(f"--hostfile: unknown backend {backend!r}; expected ring, jaccl, "
                        "jaccl-ring or nccl")
    if len(parsed.hosts) < 2:
        raise RankError(f"--hostfile {path} lists {len(parsed.hosts)} host(s); a sharded engine "
                        "needs at least 2")
    hosts = tuple(Host(h.ssh_hostname, tuple(h.ips), tuple(h.rdma), _is_this_machine(h))
                  for h in parsed.hosts)
    if not hosts[0].is_local:
        raise RankError(f"--hostfile: rank 0 ({hosts[0].name}, the first host) must be this "
                        "machine: it serves the API workers through shared memory")
    if not all(isinstance(e, str) for e in parsed.envs):
        raise RankError('--hostfile: "envs" must be a list of "NAME=value" strings')
    _check_backend(backend, hosts)
    return RankGroup(backend, hosts, tuple(parsed.envs), True)


def _check_backend(backend: str, hosts: tuple) -> None:
    """mlx.launch's checks of a hostfile for `backend`, as errors before anything starts."""
    if backend == "ring" and any(not h.ips for h in hosts):
        raise RankError('--hostfile: the ring backend needs "ips" for every host')
    if backend in ("nccl", "jaccl", "jaccl-ring") and not hosts[0].ips:
        raise RankError('--hostfile: rank 0 needs "ips" reachable from every other rank')
    if backend.startswith("jaccl"):
        n = len(hosts)
        if not all(len(h.rdma) == n for h in hosts):
            raise RankError("--hostfile: the number of RDMA devices does not match the hosts")
        if not all(h.rdma[i] is None for i, h in enumerate(hosts)):
            raise RankError("--hostfile: the RDMA device of a host towards itself must be null")
        ring = backend == "jaccl-ring"
        missing = [(i, j) for i, h in enumerate(hosts)
                   for j in (((i - 1) % n, (i + 1) % n) if ring else range(n))
                   if i != j and h.rdma[j] is None]
        if missing:
            i, j = missing[0]
            raise RankError(f"--hostfile: no RDMA device is listed from {hosts[i].name} to "
                            f"{hosts[j].name}")


def _is_this_machine(host) -> bool:
    """Whether a hostfile entry is this machine: a loopback or this host's name, or an "ips"
    address that belongs to one of its interfaces (it can be bound)."""
    name = host.ssh_hostname
    this = socket.gethostname()
    if name in LOCAL_NAMES or name.split(".")[0] == this.split(".")[0]:
        return True
    for ip in [name, *host.ips]:
        try:
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((ip, 0))
            return True
        except (OSError, ValueError):
            continue
    return False


# ---------------------------------------------------------------------- launching


def follower_argv(run_dir: str, epoch: int, backend: str) -> list[str]:
    """A follower rank's command line (rank 0's is the engine's, plus `--distributed`)."""
    return [sys.executable, "-m", "mlxsup.engine", "--run-dir", run_dir, "--epoch", str(epoch),
            "--follower", "--distributed", backend]


def plan(group: RankGroup, rank0_argv: list[str], config: ServerConfig, epoch: int,
         state_json: str) -> list[RankLaunch]:
    """How to start every rank of `group` for engine `epoch`, rank 0 first. Writes the
    backend's files (ring addresses, RDMA devices) into the run dir for the local ranks.
    `state_json` is the committed adapter state, which a remote rank gets as a file."""
    run_dir = config.run_dir
    common, files = _backend_env(group)
    local_files = {}
    for var, (name, content) in files.items():
        path = os.path.join(run_dir, name)
        with open(path, "w") as f:
            f.write(content)
        local_files[var] = path
    launches = []
    counts: dict = {}  # ranks so far per host, for CUDA_VISIBLE_DEVICES
    for rank, host in enumerate(group.hosts):
        env = dict(common, MLX_RANK=str(rank))
        if group.backend == "nccl":
            env["CUDA_VISIBLE_DEVICES"] = str(counts.get(host.name, 0))
        counts[host.name] = counts.get(host.name, 0) + 1
        if rank == 0:
            argv = list(rank0_argv) + ["--distributed", group.mlx_backend]
        else:
            argv = follower_argv(run_dir, epoch, group.mlx_backend)
        if host.is_local:
            launches.append(RankLaunch(rank, host.name, tuple(argv), {**env, **local_files}, True))
        else:
            script = _remote_script(argv, env, {v: c for v, (_, c) in files.items()},
                                    _remote_config(config), state_json)
            ssh = ["ssh", "-tt", "-o", "LogLevel=QUIET", host.name, script]
            launches.append(RankLaunch(rank, host.name, tuple(ssh), {}, False))
    return launches


def _backend_env(group: RankGroup) -> tuple[dict, dict]:
    """(variables every rank gets, {variable: (file name, content)} of the files named by a
    variable), as mlx.launch's launch_ring / launch_jaccl / launch_nccl set them."""
    env = dict(e.split("=", 1) for e in group.envs if "=" in e)
    files = {}
    if group.backend == "ring":
        if group.is_from_hostfile:  # mlx.launch's ports, one per rank and ip
            port, addresses = RING_START_PORT, []
            for h in group.hosts:
                addresses.append([f"{ip}:{port + i}" for i, ip in enumerate(h.ips)])
                port += len(h.ips)
        else:  # all on loopback: ports free now, so two servers on one machine never collide
            addresses = [[f"127.0.0.1:{free_port()}"] for _ in group.hosts]
        files["MLX_HOSTFILE"] = (RING_HOSTS_FILE, json.dumps(addresses))
    elif group.backend == "nccl":
        env["NCCL_HOST_IP"] = group.hosts[0].ips[0]
        env["NCCL_PORT"] = str(NCCL_PORT if group.is_from_hostfile else free_port())
        env["MLX_WORLD_SIZE"] = str(group.size)
    else:  # jaccl, jaccl-ring
        env["MLX_JACCL_COORDINATOR"] = f"{group.hosts[0].ips[0]}:{RING_START_PORT}"
        if group.backend == "jaccl-ring":
            env["MLX_JACCL_RING"] = "1"
        files["MLX_IBV_DEVICES"] = (IBV_DEVICES_FILE, json.dumps([list(h.rdma) for h in group.hosts]))
    return env, files


def _remote_config(config: ServerConfig) -> str:
    """config.json for a remote rank: without the keys (a follower serves no HTTP, and the
    script's text is visible to `ps` on that host)."""
    return dataclasses.replace(config, api_key=None, admin_key=None).to_json()


def _remote_script(argv: list[str], env: dict, files: dict, config_json: str, state_json: str) -> str:
    """The shell script ssh runs on a remote host (after mlx.launch's make_launch_script): the
    backend's variables and files, a run dir of its own holding config.json and the adapter
    state, then exec the rank (so ssh's hang-up reaches it). The working directory is the
    supervisor's home directory on that host (ssh's default)."""
    words = []
    for key, value in env.items():
        words.append(f"export {key}={shlex.quote(value)};")
    for var, content in files.items():
        words.append(f'f=$(mktemp); printf %s {shlex.quote(content)} >"$f"; export {var}="$f";')
    words.append('d=$(mktemp -d);')
    words.append(f'printf %s {shlex.quote(config_json)} >"$d/config.json";')
    if state_json:
        words.append(f'printf %s {shlex.quote(state_json)} >"$d/adapter_state.json";')
    # the rank's run dir is the one just made: replace the supervisor's
    i = argv.index("--run-dir")
    rest = argv[:i] + argv[i + 2:]
    words.append(f'exec {shlex.join(rest)} --run-dir "$d"')
    return " ".join(words)
