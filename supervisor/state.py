"""The committed-adapter state file, `adapter_state.json` in the run directory.

The supervisor is its only writer; it writes with `os.replace`, so a reader (a restarting
engine, `mlxsup status`) sees the old or the new state, never half of one. The file outlives
a run: versions continue from it at the next start, so they never repeat within a run dir.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from mlxsup.files import write_json_atomic

STATE_NAME = "adapter_state.json"


@dataclass(frozen=True)
class AdapterState:
    """What the engine serves: `adapter_path` (None: the base model) as `policy_version`.

    `max_issued_version` is the highest version ever sent to an engine to commit as. It is
    above `policy_version` only when an engine died in the middle of a swap, so nobody knows
    whether tokens went out under that number; the next swap skips past it.

    `weights` are the committed weight updates the engine replays at start, oldest first, before
    the adapter: `(directory in the run dir, tensor names)` pairs. An update whose tensors later
    ones all replace is dropped from the list (and its files deleted)."""

    adapter_path: Optional[str] = None
    policy_version: int = 0
    max_issued_version: int = 0
    committed_at: Optional[float] = field(default=None, compare=False)  # time.time() of the write
    weights: tuple = ()  # ((dir, tensor names), ...) of the committed weight updates, oldest first

    def __post_init__(self):
        if self.policy_version < 0:
            raise ValueError("policy_version must be >= 0")
        if self.max_issued_version < self.policy_version:
            object.__setattr__(self, "max_issued_version", self.policy_version)

    @property
    def next_version(self) -> int:
        return self.max_issued_version + 1


def state_path(run_dir: str) -> str:
    return os.path.join(run_dir, STATE_NAME)


def read_state(run_dir: str) -> Optional[AdapterState]:
    """The committed state, or None when the run dir has none (a first start); ValueError
    for a file that is unreadable or has fields of the wrong type. The one reader of the file:
    the supervisor, the engine (at start) and the API's GET /adapter use it."""
    try:
        with open(state_path(run_dir)) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{state_path(run_dir)} is unreadable: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{state_path(run_dir)} is not a JSON object")
    version = data.get("policy_version", 0)
    path = data.get("adapter_path")
    if not isinstance(version, int) or isinstance(version, bool) or (path is not None and not isinstance(path, str)):
        raise ValueError(f"{state_path(run_dir)} has fields of the wrong type")
    issued = data.get("max_issued_version", version)
    if not isinstance(issued, int) or isinstance(issued, bool):
        issued = version
    committed_at = data.get("committed_at")
    if not isinstance(committed_at, (int, float)) or isinstance(committed_at, bool):
        committed_at = None
    weights = data.get("weights") or []
    if not isinstance(weights, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("tensors"), list)
            for e in weights):
        raise ValueError(f"{state_path(run_dir)}: weights must be a list of {{path, tensors}}")
    return AdapterState(adapter_path=path, policy_version=version, max_issued_version=issued,
                        committed_at=committed_at,
                        weights=tuple((e["path"], tuple(e["tensors"])) for e in weights))


def write_state(run_dir: str, state: AdapterState) -> None:
    """Replace the state file atomically (write a temporary file, fsync, os.replace)."""
    path = state_path(run_dir)
    body = {
        "adapter_path": state.adapter_path,
        "policy_version": state.policy_version,
        "max_issued_version": state.max_issued_version,
        "weights": [{"path": p, "tensors": list(t)} for p, t in state.weights],
        "committed_at": time.time(),
    }
    write_json_atomic(path, body, indent=2)


def initial_state(previous: Optional[AdapterState], adapter_path: Optional[str]) -> AdapterState:
    """The state a new run starts in, serving `adapter_path` (None: the base model).

    Without a state file this is version 0. With one, versions continue from it: the same
    adapter keeps its version; a different one is committed as the next version, so a version
    number never names two different sets of weights within one run directory. A new run starts
    on the model of its command line: weight updates of the last run are not carried over (an
    engine restarted within a run replays them)."""
    if previous is None:
        return AdapterState(adapter_path=adapter_path, policy_version=0)
    if (previous.adapter_path == adapter_path and previous.max_issued_version == previous.policy_version
            and not previous.weights):
        return previous
    version = previous.next_version
    return AdapterState(adapter_path=adapter_path, policy_version=version, max_issued_version=version)
