"""POSIX shared memory without multiprocessing's resource tracker.

`multiprocessing.shared_memory.SharedMemory` (Python < 3.13) registers every segment it opens,
even one it only attaches to, with a resource-tracker process that unlinks it when the process
exits: an API worker exiting would delete the engine's rings, and every process would start a
tracker. Our segments have an explicit owner (the supervisor) and a manifest for crash
recovery, so no process registers them: on 3.13+ we pass `track=False`; before, registration
is skipped for calls made inside `_untracked()` (thread-local, other callers unaffected).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

_HAS_TRACK = sys.version_info >= (3, 13)
_local = threading.local()
_install_lock = threading.Lock()
_installed = False


def _install_filter() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        register, unregister = resource_tracker.register, resource_tracker.unregister

        def filtered_register(name, rtype):
            if rtype == "shared_memory" and getattr(_local, "untracked", False):
                return None
            return register(name, rtype)

        def filtered_unregister(name, rtype):
            if rtype == "shared_memory" and getattr(_local, "untracked", False):
                return None
            return unregister(name, rtype)

        resource_tracker.register = filtered_register
        resource_tracker.unregister = filtered_unregister
        _installed = True


@contextlib.contextmanager
def _untracked():
    _install_filter()
    _local.untracked = True
    try:
        yield
    finally:
        _local.untracked = False


def create_shm(name: str, size: int) -> SharedMemory:
    """Create a new segment (FileExistsError if the name is taken)."""
    if _HAS_TRACK:
        return SharedMemory(name, create=True, size=size, track=False)
    with _untracked():
        return SharedMemory(name, create=True, size=size)


def attach_shm(name: str) -> SharedMemory:
    """Open an existing segment (FileNotFoundError if absent). The caller never unlinks it."""
    if _HAS_TRACK:
        return SharedMemory(name, track=False)
    with _untracked():
        return SharedMemory(name)


def close_shm(shm: SharedMemory) -> None:
    """Unmap; every memoryview derived from `shm.buf` must have been released."""
    shm.close()


def unlink_shm(shm: SharedMemory) -> bool:
    """Remove the segment's name (owner only); mappings stay valid until closed. False if the
    name was already gone."""
    with _untracked():
        try:
            shm.unlink()
        except FileNotFoundError:
            return False
    return True


def unlink_name(name: str) -> bool:
    """Remove the segment called `name` if it exists; True if it did."""
    try:
        shm = attach_shm(name)
    except FileNotFoundError:
        return False
    try:
        return unlink_shm(shm)
    finally:
        close_shm(shm)


def shm_exists(name: str) -> bool:
    try:
        close_shm(attach_shm(name))
    except FileNotFoundError:
        return False
    return True
