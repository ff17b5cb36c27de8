"""Layout validation and the lifecycle of segments: create, attach, destroy, crash cleanup."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_ipc_support import (  # noqa: F401  (fixtures)
    SPAWN,
    create_and_hang,
    make_ipc,
    no_leaked_segments,
    shm_names,
    spawn,
    test_instance_id,
)

from mlxsup.ipc import segments as segments_mod
from mlxsup.ipc.layout import IpcLayout
from mlxsup.ipc.segments import ShmSpaceError, create_ipc, remove_stale
from mlxsup.ipc.shm import shm_exists

pytestmark = pytest.mark.timeout(60)


def ours(layout: IpcLayout) -> set[str]:
    return {n for n in shm_names() if n.startswith(f"mxs_{layout.instance_id}_")}


# ---------------------------------------------------------------- layout


def test_layout_names_and_paths(tmp_path):
    layout = IpcLayout(str(tmp_path), "0123abcd", 256)
    assert layout.control_name == "mxs_0123abcd_c"
    assert layout.request_ring_name(255) == "mxs_0123abcd_q255"
    assert layout.response_ring_name(0) == "mxs_0123abcd_r0"
    assert max(len(n) for n in layout.segment_names()) <= 30  # macOS PSHMNAMLEN
    assert layout.slot_lock_path(3) == str(tmp_path / "slot-3.lock")
    assert layout.slot_bell_path(3) == str(tmp_path / "slot-3.bell")
    assert layout.engine_bell_path == str(tmp_path / "engine.bell")
    assert layout.manifest_path == str(tmp_path / "shm.manifest")
    with pytest.raises(ValueError):
        layout.request_ring_name(256)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"instance_id": "XYZ"},
        {"instance_id": "0123ABCD"},
        {"num_slots": 0},
        {"num_slots": 257},
        {"request_ring_bytes": 100},
        {"response_ring_bytes": 4096 + 8},
        {"run_dir": ""},
    ],
)
def test_layout_rejects_invalid_values(tmp_path, kwargs):
    args = {"run_dir": str(tmp_path), "instance_id": "0123abcd", "num_slots": 2, **kwargs}
    with pytest.raises(ValueError):
        IpcLayout(**args)


def test_layout_save_and_load(tmp_path):
    layout = IpcLayout(str(tmp_path), "0123abcd", 3, request_ring_bytes=8192, response_ring_bytes=16384)
    layout.save()
    assert IpcLayout.load(str(tmp_path)) == layout


# ---------------------------------------------------------------- create / destroy


def test_create_then_destroy_leaves_nothing(tmp_path):
    layout = IpcLayout(str(tmp_path / "run"), test_instance_id(), 3, request_ring_bytes=8192,
                       response_ring_bytes=8192)
    resources = create_ipc(layout)
    try:
        assert ours(layout) == set(layout.segment_names())
        assert stat.S_ISFIFO(os.stat(layout.engine_bell_path).st_mode)
        assert all(os.path.exists(layout.slot_lock_path(i)) for i in range(3))
        assert IpcLayout.load(layout.run_dir) == layout
        assert os.path.exists(layout.manifest_path)
    finally:
        resources.destroy()
    resources.destroy()  # idempotent
    assert ours(layout) == set()
    assert os.listdir(layout.run_dir) == []


def test_too_little_shm_space_is_a_clear_error_before_anything_is_created(tmp_path, monkeypatch):
    monkeypatch.setattr(segments_mod, "shm_free_bytes", lambda shm_dir=None: 1 << 20)
    layout = IpcLayout(str(tmp_path), test_instance_id(), 4)  # 4 x 5 MiB of rings
    with pytest.raises(ShmSpaceError, match=r"MiB free .* need"):
        create_ipc(layout)
    assert ours(layout) == set() and os.listdir(tmp_path) == []


def test_existing_segment_names_are_refused_without_touching_them(make_ipc):
    layout = make_ipc(1)
    manifest = Path(layout.manifest_path).read_text()
    with pytest.raises(FileExistsError, match="remove_stale"):
        create_ipc(layout)
    assert ours(layout) == set(layout.segment_names())
    assert Path(layout.manifest_path).read_text() == manifest


def test_segments_of_a_sigkilled_supervisor_are_removed_at_next_start(tmp_path, spawn):
    run_dir, instance_id = str(tmp_path / "run"), test_instance_id()
    ready = SPAWN.Event()
    proc = spawn(create_and_hang, run_dir, instance_id, ready)
    assert ready.wait(30)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    layout = IpcLayout.load(run_dir)
    assert ours(layout) == set(layout.segment_names())  # left behind by the killed run
    removed = remove_stale(run_dir)
    assert sorted(removed) == sorted(layout.segment_names())
    assert ours(layout) == set() and os.listdir(run_dir) == []
    assert remove_stale(run_dir) == []  # nothing left to do
    with create_ipc(IpcLayout(run_dir, instance_id, 2)) as fresh:  # the next start succeeds
        assert ours(fresh.layout) == set(fresh.layout.segment_names())


def test_remove_stale_ignores_files_outside_the_run_dir(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "shm.manifest").write_text(
        '{"segments": ["mxs_00000000_c", "not_ours"], "files": ["%s"]}' % outside
    )
    assert remove_stale(str(run_dir)) == []
    assert outside.read_text() == "keep me"


ATTACH_AND_EXIT = textwrap.dedent(
    """
    import sys
    from mlxsup.ipc.channel import EngineChannel
    from mlxsup.ipc.layout import IpcLayout
    channel = EngineChannel(IpcLayout.load(sys.argv[1]))
    channel.control.write(engine_state="ready")
    channel.close()
    """
)


def test_an_attacher_exiting_never_unlinks_segments(make_ipc):
    # A fresh interpreter (its own resource tracker, if anything started one): with plain
    # SharedMemory attachment on Python < 3.13 its tracker would unlink our rings at its exit.
    layout = make_ipc(2)
    for _ in range(2):
        subprocess.run([sys.executable, "-c", ATTACH_AND_EXIT, layout.run_dir], check=True, timeout=60)
    time.sleep(0.3)  # a resource tracker cleans up just after its process exits
    assert all(shm_exists(name) for name in layout.segment_names())
