"""The server's configuration: one frozen dataclass, built from the CLI at the edge and written
to the run directory (`config.json`) so the engine and the API workers read the same values."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

from mlxsup.files import write_atomic

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SWAP_DRAIN, SWAP_ABORT, SWAP_INFLIGHT = "drain", "abort", "inflight"
SWAP_MODES = (SWAP_DRAIN, SWAP_ABORT, SWAP_INFLIGHT)
MAX_N = 1024  # samples per request, for the API and the engine alike
RUN_DIR_ENV = "MLXSUP_RUN_DIR"  # set by the supervisor on the engine and the API workers
# The supervisor kills an engine whose heartbeat is older than this; API workers stop sending
# to it as soon as it is.
ENGINE_HEARTBEAT_TIMEOUT_S = 10.0
# Exit codes of `mlxsup start` and of the supervisor.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BOOT_ERROR = 3  # the engine or the API never came up; restarting would only spin
EXIT_IN_USE = 4  # the port or the run directory is taken
PIPELINE_MODES = ("auto", "on", "off")
# Where a swap's time went, as the engine's swap_done and /load_adapter's answer report it:
# reading the files (another thread), receipt to ready (read + MLX arrays), waiting for the
# step boundary (drain: for in-flight sequences), the commit itself.
SWAP_TIMINGS = ("read_ms", "prepare_ms", "wait_ms", "commit_ms")
# When the new weights first produced tokens, as the engine's swap_first_token and the
# supervisor's status `last_swap` report it: from the engine's receipt of the swap, and from the
# commit, to the end of the first step under the new weights; the rows decoding at the commit.
FIRST_TOKEN_FIELDS = ("first_token_ms", "commit_to_first_token_ms", "running_at_commit")


def default_run_dir(port: int) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mlxsup", f"run-{port}")


def flag(default, help: str, *, group: str, name: str = "", **argparse_kwargs):
    """A ServerConfig field that `mlxsup start` accepts as a flag (supervisor/cli.py builds the
    parser from these): `--<field-name>` unless `name` is given; `help` may say `{default}`
    (formatted with the field's default, e.g. `{default:g}`); `group` is the --help section.
    `argparse_kwargs` go to `add_argument` (choices, type, metavar); `env` names an environment
    variable that supplies the default; `path=True` makes a given value an absolute path. A bool
    field is a store_true switch, an int or float field parses as one."""
    meta = {"flag": name, "help": help, "group": group, **argparse_kwargs}
    return dataclasses.field(default=default, metadata={"cli": meta})


def no_flag(default, why: str):
    """A ServerConfig field with no `mlxsup start` flag (yet); `why` says so where it is declared."""
    return dataclasses.field(default=default, metadata={"cli": None, "why": why})


SEED, SERVER, SHARDING, SECURITY = "the seed's flags", "server", "sharded engine", "security"
# mx.distributed backends a sharded engine may use, as `mlx.launch --backend` names them ("auto":
# the hostfile's "backend", else ring). MPI is not one: mpirun starts the ranks itself, so the
# supervisor could neither pass rank 0 its control socket nor watch each rank's process.
DISTRIBUTED_BACKENDS = ("auto", "ring", "jaccl", "jaccl-ring", "nccl")


@dataclass(frozen=True)
class ServerConfig:
    """Everything `mlxsup start` accepts, one field per flag (in --help's order). Defaults of the
    seed's flags are the seed's. Adding a flag is adding a field here: the parser and the
    conversion from its namespace are derived from these fields."""

    model: Optional[str] = flag(
        None, "MLX model directory or Hugging Face repo id (default: the built-in demo model)", group=SEED)
    adapter_path: Optional[str] = flag(
        None, "LoRA adapter to serve from the start (policy version 0)", group=SEED)
    host: str = flag("0.0.0.0", "address to listen on (default: {default})", group=SEED)
    port: int = flag(8000, "port to listen on (default: {default})", group=SEED)
    max_batch: int = flag(5, "most sequences decoding at once (default: {default})", group=SEED)
    flush_interval_ms: float = flag(
        10.0, "how long an idle engine waits to gather arrivals (default: {default:g})", group=SEED)
    max_tokens: int = flag(128, "default max_tokens of a request (default: {default})", group=SEED)
    trust_remote_code: bool = flag(False, "let the tokenizer run code shipped with the model", group=SEED)
    log_level: str = flag(
        "INFO", "logging level (default: {default})", group=SEED, type=str.upper, choices=LOG_LEVELS)
    workers: int = flag(2, "API worker processes (default: {default})", group=SERVER)
    # "" means default_run_dir(port); a given directory is made absolute.
    run_dir: str = flag("", "run directory (default: ~/.cache/mlxsup/run-<port>)", group=SERVER, path=True)
    max_queue: int = flag(256, "requests waiting in the engine before 503 (default: {default})", group=SERVER)
    blas: str = flag(
        "auto", "preload an optimized BLAS into the engine on Linux (default: {default})",
        group=SERVER, choices=("auto", "off"))
    # "on": queue each decode step before reading the last (the host's work overlaps the
    # device's); "off": each step runs to its end first (a swap reaches new tokens one step
    # sooner); "auto": on for a GPU, by step length on the CPU (see EngineConfig.pipeline).
    pipeline: str = flag(
        "auto",
        "on: queue each decode step before reading the last (host and device overlap); off: "
        "finish each step first (an adapter swap reaches new tokens one step sooner); "
        "auto (default): on for a GPU; on the CPU off while decode steps take over 25 ms, "
        "on while they take under 15 ms",
        group=SERVER, choices=PIPELINE_MODES)
    # Run made-up requests through the engine before it reports ready (Engine.warm_up).
    warm_up: str = flag(
        "auto",
        "run a few made-up requests through the engine's paths before reporting ready, so "
        "the first real ones do not wait for kernels built on first use; auto (default): on "
        "a GPU (on CUDA every kernel compiles the first time), off on the CPU",
        group=SERVER, choices=("auto", "on", "off"))
    # Prompt tokens of the requests one engine step admits (the first request always passes).
    max_prefill_tokens: int = flag(
        4096,
        "prompt tokens of the requests one engine step admits (at least one request): the "
        "rest wait for the next steps, while those admitted already decode (default: {default})",
        group=SERVER, metavar="TOKENS")
    # Prompt tokens prefilled per engine step at most, the rest in later steps (0: no limit).
    prefill_chunk: int = flag(
        0,
        "prefill at most this many prompt tokens per engine step and the rest in the next "
        "steps, while running sequences keep decoding: bounds how long one step (and the "
        "wait for a swap's step boundary) can take (default: 0, whole prompts at once)",
        group=SERVER, metavar="TOKENS")
    # One KV budget (GiB) for the running batch and the prefix cache (0: the engine's default,
    # half the memory the weights leave); no_prefix_cache: no KV reuse across requests.
    kv_cache_gb: float = flag(
        0.0,
        "one KV memory budget (GiB) for the running batch and the prefix cache: admission "
        "waits while it is full, a request that can never fit is refused (default: 0, half "
        "of the memory the weights leave: Metal's recommended working set on a Mac)",
        group=SERVER, metavar="GB")
    no_prefix_cache: bool = flag(
        False, "keep no prompt KV for later requests (every prompt is prefilled whole)", group=SERVER)
    # A sharded engine (docs/scaling.md): the model split over several mx.distributed ranks,
    # started the way mlx.launch starts them; rank 0 is the engine the supervisor talks to.
    ranks: int = flag(
        1, "run the engine as N ranks on this machine, the model sharded over them "
        "(mx.distributed; ring backend over loopback) (default: {default})",
        group=SHARDING, metavar="N")
    hostfile: Optional[str] = flag(
        None, "run the engine as one rank per host of this mlx.launch hostfile (JSON); rank 0, "
        "the first host, must be this machine, the others are started over ssh",
        group=SHARDING, path=True, metavar="FILE")
    distributed_backend: str = flag(
        "auto", "mx.distributed backend of a sharded engine, as mlx.launch names them "
        "(default: auto, the hostfile's \"backend\", else ring)",
        group=SHARDING, choices=DISTRIBUTED_BACKENDS)
    # The environment variables keep keys out of the command line, which any local user can
    # read with ps.
    api_key: Optional[str] = flag(
        None, "required as a Bearer token on every route but /health (or env MLXSUP_API_KEY)",
        group=SECURITY, env="MLXSUP_API_KEY")
    admin_key: Optional[str] = flag(
        None, "required on adapter routes (default: loopback clients only; or env MLXSUP_ADMIN_KEY)",
        group=SECURITY, env="MLXSUP_ADMIN_KEY")
    adapter_root: Optional[str] = flag(
        None, "/load_adapter paths must resolve inside this directory", group=SECURITY)
    # Longest a new connection may take to send its request head.
    header_timeout_s: float = flag(
        15.0,
        "seconds a new connection may take to send its request line and headers "
        "before it is closed (default: {default:g})",
        group=SECURITY, name="--header-timeout")
    max_upload_mb: int = flag(512, "largest /upload_adapter body (default: {default})", group=SECURITY)
    request_timeout_s: float = no_flag(600.0, "not exposed yet: an API worker's wait for the engine")
    min_policy_wait_s: float = no_flag(
        60.0, "not exposed yet: longest a request may wait for min_policy_version")

    def __post_init__(self):
        if not self.run_dir:
            object.__setattr__(self, "run_dir", default_run_dir(self.port))
        if not (0 <= self.port < 65536):
            raise ValueError("port must be in [0, 65535]")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.flush_interval_ms < 0:
            raise ValueError("flush_interval_ms must be >= 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}")
        object.__setattr__(self, "log_level", self.log_level.upper())
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if self.max_upload_mb < 1:
            raise ValueError("max_upload_mb must be >= 1")
        if not self.header_timeout_s > 0:
            raise ValueError("header_timeout_s must be > 0")
        if self.blas not in ("auto", "off"):
            raise ValueError("blas must be 'auto' or 'off'")
        if self.pipeline not in PIPELINE_MODES:
            raise ValueError(f"pipeline must be one of {PIPELINE_MODES}")
        if not self.kv_cache_gb >= 0:
            raise ValueError("kv_cache_gb must be >= 0")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0")
        if self.ranks < 1:
            raise ValueError("ranks must be >= 1")
        if self.distributed_backend not in DISTRIBUTED_BACKENDS:
            raise ValueError(f"distributed_backend must be one of {DISTRIBUTED_BACKENDS}")

    @property
    def is_sharded(self) -> bool:
        """Whether the engine runs as several ranks (--ranks N > 1 or --hostfile)."""
        return self.ranks > 1 or bool(self.hostfile)

    @property
    def num_slots(self) -> int:
        """IPC slots: two per worker, so a replaced worker finds a free slot at once."""
        return 2 * self.workers

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ServerConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self) -> str:
        """Write config.json into the run directory atomically; return its path."""
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.run_dir, "config.json")
        # Owner-only: the file holds --api-key and --admin-key, and a run directory made
        # beforehand (or by an older version) may be readable by other local users.
        write_atomic(path, self.to_json(), private=True)
        return path

    @classmethod
    def load(cls, run_dir: str) -> "ServerConfig":
        with open(os.path.join(run_dir, "config.json")) as f:
            return cls.from_json(f.read())
