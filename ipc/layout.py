"""Where every IPC object of one server instance lives: segment names, ring sizes, run-dir paths.

The supervisor builds an `IpcLayout`, creates the objects (`mlxsup.ipc.segments.create_ipc`)
and saves the layout to `<run_dir>/ipc.json`; the engine and the API workers attach knowing only
the run directory (`IpcLayout.load(run_dir)`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass

from mlxsup.files import write_json_atomic
from mlxsup.ipc.ring import HEADER_BYTES as RING_HEADER_BYTES

LAYOUT_FILE = "ipc.json"
MANIFEST_FILE = "shm.manifest"
CONTROL_BLOCK_BYTES = 4096
MAX_SLOTS = 256  # request ids keep the slot in 8 bits
MIN_RING_BYTES = 4096
MAX_RING_BYTES = 1 << 30
MAX_SEGMENT_NAME = 30  # macOS: PSHMNAMLEN is 31 including the leading slash

_INSTANCE_ID = re.compile(r"^[0-9a-f]{8}$")


def new_instance_id() -> str:
    """A random instance id (8 lowercase hex characters)."""
    return os.urandom(4).hex()


@dataclass(frozen=True)
class IpcLayout:
    """Names, sizes and paths of one instance's rings, control block and doorbells.

    `request_ring_bytes` / `response_ring_bytes` are the data capacity of each ring (multiples
    of 64); each segment is that plus a small header. Raises `ValueError` on invalid values.
    """

    run_dir: str
    instance_id: str  # 8 lowercase hex chars, part of every segment name
    num_slots: int
    request_ring_bytes: int = 1 << 20
    response_ring_bytes: int = 4 << 20

    def __post_init__(self):
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError("run_dir must be a non-empty path")
        if not isinstance(self.instance_id, str) or not _INSTANCE_ID.match(self.instance_id):
            raise ValueError("instance_id must be 8 lowercase hex characters")
        if not isinstance(self.num_slots, int) or not (1 <= self.num_slots <= MAX_SLOTS):
            raise ValueError(f"num_slots must be an integer in [1, {MAX_SLOTS}]")
        for name in ("request_ring_bytes", "response_ring_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or not (MIN_RING_BYTES <= value <= MAX_RING_BYTES):
                raise ValueError(f"{name} must be an integer in [{MIN_RING_BYTES}, {MAX_RING_BYTES}]")
            if value % 64:
                raise ValueError(f"{name} must be a multiple of 64")
        longest = self.response_ring_name(self.num_slots - 1)
        if len(longest) > MAX_SEGMENT_NAME:  # cannot happen with the checks above; kept as a guard
            raise ValueError(f"segment name {longest!r} exceeds {MAX_SEGMENT_NAME} characters")

    # ---------------------------------------------------------------- shared-memory names

    @property
    def control_name(self) -> str:
        return f"mxs_{self.instance_id}_c"

    def request_ring_name(self, slot: int) -> str:
        return f"mxs_{self.instance_id}_q{self._check_slot(slot)}"

    def response_ring_name(self, slot: int) -> str:
        return f"mxs_{self.instance_id}_r{self._check_slot(slot)}"

    def segment_names(self) -> list[str]:
        """Every segment of this instance, control block first."""
        names = [self.control_name]
        for slot in range(self.num_slots):
            names += [self.request_ring_name(slot), self.response_ring_name(slot)]
        return names

    @property
    def total_shm_bytes(self) -> int:
        """Bytes of shared memory all segments take together."""
        per_slot = 2 * RING_HEADER_BYTES + self.request_ring_bytes + self.response_ring_bytes
        return CONTROL_BLOCK_BYTES + self.num_slots * per_slot

    # ---------------------------------------------------------------- run-dir paths

    @property
    def engine_bell_path(self) -> str:
        return os.path.join(self.run_dir, "engine.bell")

    def slot_bell_path(self, slot: int) -> str:
        return os.path.join(self.run_dir, f"slot-{self._check_slot(slot)}.bell")

    def slot_lock_path(self, slot: int) -> str:
        return os.path.join(self.run_dir, f"slot-{self._check_slot(slot)}.lock")

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.run_dir, MANIFEST_FILE)

    @property
    def layout_path(self) -> str:
        return os.path.join(self.run_dir, LAYOUT_FILE)

    def run_files(self) -> list[str]:
        """Every file the IPC objects occupy in the run directory (manifest excluded)."""
        files = [self.engine_bell_path, self.layout_path]
        for slot in range(self.num_slots):
            files += [self.slot_bell_path(slot), self.slot_lock_path(slot)]
        return files

    # ---------------------------------------------------------------- persistence

    def save(self) -> None:
        """Write `<run_dir>/ipc.json` atomically (os.replace) so other processes can attach."""
        data = asdict(self)
        del data["run_dir"]  # the directory itself is where the file lives; it may be moved
        write_json_atomic(self.layout_path, data)

    @classmethod
    def load(cls, run_dir: str) -> "IpcLayout":
        """Read the layout saved by the supervisor in `run_dir`."""
        with open(os.path.join(run_dir, LAYOUT_FILE), encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{run_dir}/{LAYOUT_FILE} is not a JSON object")
        data.pop("run_dir", None)
        return cls(run_dir=run_dir, **data)

    def _check_slot(self, slot: int) -> int:
        if not (0 <= slot < self.num_slots):
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")
        return slot

