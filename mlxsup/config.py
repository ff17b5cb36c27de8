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


@dataclass(frozen=True)
class ServerConfig:
    """Everything `mlxsup start` accepts. Defaults of the seed's flags are the seed's."""

    model: Optional[str] = None  # None: the built-in demo model
    adapter_path: Optional[str] = None
    host: str = "0.0.0.0"
    port: int = 8000
    max_batch: int = 5
    flush_interval_ms: float = 10.0
    max_tokens: int = 128
    trust_remote_code: bool = False
    log_level: str = "INFO"
    workers: int = 2
    run_dir: str = ""  # "" means default_run_dir(port)
    max_queue: int = 256
    api_key: Optional[str] = None
    admin_key: Optional[str] = None
    adapter_root: Optional[str] = None
    max_upload_mb: int = 512
    blas: str = "auto"  # "auto": preload an optimized BLAS into the engine on Linux; "off"
    request_timeout_s: float = 600.0
    min_policy_wait_s: float = 60.0  # longest a request may wait for min_policy_version
    header_timeout_s: float = 15.0  # longest a new connection may take to send its request head
    # "on": queue each decode step before reading the last (the host's work overlaps the
    # device's); "off": each step runs to its end first (a swap reaches new tokens one step
    # sooner); "auto": on for a GPU, by step length on the CPU (see EngineConfig.pipeline).
    pipeline: str = "auto"
    # Prompt tokens prefilled per engine step at most, the rest in later steps (0: no limit).
    prefill_chunk: int = 0
    # One KV budget (GiB) for the running batch and the prefix cache (0: the engine's default,
    # half the memory the weights leave); no_prefix_cache: no KV reuse across requests.
    kv_cache_gb: float = 0.0
    no_prefix_cache: bool = False

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
        if self.prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0")

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
