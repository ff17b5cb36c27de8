"""Lifecycle of one instance's IPC objects: create (supervisor), destroy, clean up after a crash.

Order on creation: check `/dev/shm` has room, write the manifest naming every segment and file,
create them, then save `ipc.json` (its presence tells attachers the objects are ready). The
manifest exists before any segment does, so segments of a supervisor killed at any point are
found by `remove_stale` at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field

from mlxsup.ipc.control import ControlBlock
from mlxsup.ipc.doorbell import make_fifo
from mlxsup.files import write_json_atomic
from mlxsup.ipc.layout import IpcLayout
from mlxsup.ipc.ring import Ring
from mlxsup.ipc.shm import close_shm, create_shm, shm_exists, unlink_name, unlink_shm

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SHM_HEADROOM = 1.10  # keep 10% spare: a tmpfs that fills up gives SIGBUS, not an error


class ShmSpaceError(OSError):
    """`/dev/shm` has less free space than the rings need."""


@dataclass
class IpcResources:
    """Everything `create_ipc` made; `destroy()` removes it all (idempotent)."""

    layout: IpcLayout
    control: ControlBlock
    _segments: list = field(default_factory=list)  # SharedMemory of the rings
    _destroyed: bool = False

    def destroy(self) -> None:
        """Unlink every segment, remove FIFOs, lock files, ipc.json and the manifest."""
        if self._destroyed:
            return
        self._destroyed = True
        for shm in self._segments:
            _quietly(unlink_shm, shm)
            _quietly(close_shm, shm)
        self._segments.clear()
        _quietly(self.control.unlink)
        _quietly(self.control.close)
        for path in self.layout.run_files() + [self.layout.manifest_path]:
            _remove_file(path)

    def __enter__(self) -> "IpcResources":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


def create_ipc(layout: IpcLayout) -> IpcResources:
    """Create the control block, every ring pair, the doorbell FIFOs and the slot lock files of
    `layout`, then save the layout to `run_dir/ipc.json`. Raises `ShmSpaceError` when /dev/shm
    is too small and `FileExistsError` when a segment name is taken (call `remove_stale`
    first); both before anything is written. On a later failure, whatever was created is
    removed again."""
    os.makedirs(layout.run_dir, mode=0o700, exist_ok=True)
    check_shm_space(layout.total_shm_bytes)
    taken = [name for name in layout.segment_names() if shm_exists(name)]
    if taken:  # checked before the manifest is replaced: it may be the only record of them
        raise FileExistsError(
            f"shared-memory segments {', '.join(taken)} already exist (left by a killed run? "
            f"call remove_stale({layout.run_dir!r}) first, or use another instance id)"
        )
    _write_manifest(layout)
    resources = None
    try:
        control = ControlBlock.create(layout.control_name)
        resources = IpcResources(layout=layout, control=control)
        for slot in range(layout.num_slots):
            for name, capacity in (
                (layout.request_ring_name(slot), layout.request_ring_bytes),
                (layout.response_ring_name(slot), layout.response_ring_bytes),
            ):
                shm = create_shm(name, Ring.segment_bytes(capacity))
                resources._segments.append(shm)
                Ring.format(shm.buf, capacity).release()
        make_fifo(layout.engine_bell_path)
        for slot in range(layout.num_slots):
            make_fifo(layout.slot_bell_path(slot))
            _create_lock_file(layout.slot_lock_path(slot))
        layout.save()
    except BaseException:
        if resources is not None:
            resources.destroy()
        else:  # the control block itself failed: only the manifest exists
            _remove_file(layout.manifest_path)
        raise
    return resources


def remove_stale(run_dir: str) -> list[str]:
    """Remove the IPC objects a killed earlier run left in `run_dir` (its manifest, or failing
    that its ipc.json, names them). Returns the segment names that were unlinked. The caller
    must know that run is over (e.g. its supervisor pid is gone)."""
    segments, files = _read_leftovers(run_dir)
    removed = [name for name in segments if unlink_name(name)]
    for path in files:
        _remove_file(path)
    if removed:
        log.info("removed %d stale shared-memory segments: %s", len(removed), ", ".join(removed))
    return removed


def check_shm_space(needed: int, shm_dir: str = SHM_DIR) -> None:
    """Raise `ShmSpaceError` unless `shm_dir` has `needed` bytes (plus headroom) free."""
    if not os.path.isdir(shm_dir):  # macOS: POSIX shm lives in kernel memory, no tmpfs
        return
    free = shm_free_bytes(shm_dir)
    if free < needed * SHM_HEADROOM:
        raise ShmSpaceError(
            f"{shm_dir} has {free / 2**20:.1f} MiB free but the IPC rings need "
            f"{needed / 2**20:.1f} MiB (+10% headroom). Enlarge it (docker run --shm-size=1g, "
            "or remount the tmpfs) or lower the number of slots / ring sizes."
        )


def shm_free_bytes(shm_dir: str = SHM_DIR) -> int:
    return shutil.disk_usage(shm_dir).free


def _write_manifest(layout: IpcLayout) -> None:
    write_json_atomic(
        layout.manifest_path,
        {
            "pid": os.getpid(),
            "instance_id": layout.instance_id,
            "segments": layout.segment_names(),
            "files": layout.run_files(),
        },
    )


def _read_leftovers(run_dir: str) -> tuple[list[str], list[str]]:
    manifest = os.path.join(run_dir, "shm.manifest")
    try:
        with open(manifest, encoding="utf-8") as f:
            data = json.load(f)
        segments = [s for s in data["segments"] if isinstance(s, str) and s.startswith("mxs_")]
        # Only ever delete inside run_dir, whatever a damaged manifest says.
        files = [os.path.join(run_dir, os.path.basename(p)) for p in data["files"] if isinstance(p, str)]
        return segments, files + [manifest]
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable %s: %s", manifest, e)
    try:
        layout = IpcLayout.load(run_dir)
    except FileNotFoundError:
        return [], [manifest]
    except (ValueError, TypeError) as e:
        log.warning("ignoring unreadable ipc.json in %s: %s", run_dir, e)
        return [], [manifest]
    return layout.segment_names(), layout.run_files() + [manifest]


def _create_lock_file(path: str) -> None:
    # A fresh inode: a stale worker of an earlier run may still hold a flock on the old file.
    _remove_file(path)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except (OSError, BufferError, PermissionError):
        log.warning("cleanup step %s failed", getattr(fn, "__name__", fn), exc_info=True)
