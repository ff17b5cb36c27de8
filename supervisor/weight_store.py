"""The run directory's copies of committed weight updates, `<run_dir>/weights/v<version>/`.

A trainer overwrites its weight directory every step, so the supervisor keeps its own copy of
each update it hands to the engine: a restarted engine replays these copies, in order, and gets
the weights it served. Local directories are copied (`shutil.copyfile`: the kernel's
copy_file_range where it has one); uploads, already in the run dir, are moved. Only the
`*.safetensors` files of a directory are taken.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable

WEIGHTS_DIR = "weights"


def weights_root(run_dir: str) -> str:
    return os.path.join(run_dir, WEIGHTS_DIR)


def safetensors_in(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and not f.startswith("."))


def take(run_dir: str, source: str, version: int, move: bool) -> str:
    """Copy (or move) the safetensors files of `source` into the run dir as `v<version>`;
    return that directory. Written under a temporary name and renamed when complete."""
    root = weights_root(run_dir)
    os.makedirs(root, mode=0o700, exist_ok=True)
    final = os.path.join(root, f"v{version}")
    tmp = os.path.join(root, f".tmp-v{version}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)  # a version issued to an engine that died
    if move:
        os.rename(source, tmp)
        for name in os.listdir(tmp):
            if name not in safetensors_in(tmp):
                _remove(os.path.join(tmp, name))
    else:
        os.mkdir(tmp, 0o700)
        for name in safetensors_in(source):
            shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
    os.rename(tmp, final)
    return final


def superseded(entries: Iterable[tuple]) -> tuple[tuple, list[str]]:
    """(entries to keep, directories to delete): an update is dropped once the updates after
    it replace every tensor it holds."""
    entries = list(entries)
    keep, drop, later = [], [], set()
    for path, tensors in reversed(entries):
        if set(tensors) <= later:
            drop.append(path)
        else:
            keep.append((path, tuple(tensors)))
        later.update(tensors)
    return tuple(reversed(keep)), drop


def remove(paths: Iterable[str]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def remove_unlisted(run_dir: str, listed: Iterable[str]) -> list[str]:
    """Delete every directory under weights/ that the state file does not list (copies of a
    killed supervisor's half-done update, or of a previous run)."""
    root = weights_root(run_dir)
    if not os.path.isdir(root):
        return []
    keep = {os.path.realpath(p) for p in listed}
    removed = []
    for name in os.listdir(root):
        full = os.path.join(root, name)
        if os.path.realpath(full) not in keep:
            _remove(full)
            removed.append(full)
    return removed


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
