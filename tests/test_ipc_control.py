"""The seqlock control block: field round trips, region ownership, hammering writers."""

from __future__ import annotations

import struct
import time

import pytest
from test_ipc_support import (  # noqa: F401  (fixtures)
    hammer_control,
    make_ipc,
    no_leaked_segments,
    spawn,
    test_instance_id,
)

from mlxsup.ipc import control as control_mod
from mlxsup.ipc.control import ControlBlock, ControlSnapshot

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def block():
    name = f"mxs_{test_instance_id()}_c"
    owner = ControlBlock.create(name)
    try:
        yield owner
    finally:
        owner.close()
        owner.unlink()


def test_fresh_block_reads_as_engine_down(block):
    snap = block.read()
    assert snap == ControlSnapshot(heartbeat_ns=0)
    assert snap.engine_state == "down" and snap.heartbeat_age_s() == float("inf")


def test_fields_round_trip_and_regions_are_independent(block):
    reader = ControlBlock.attach(block.name)
    try:
        before = time.time_ns()
        block.write(engine_epoch=3, engine_state="ready", policy_version=7, adapter_id="lora-ü" * 10)
        block.write(supervisor_pid=42, supervisor_state="running", engine_restarts=2)
        block.write(queue_depth=5)  # a partial write keeps the other engine fields
        snap = reader.read()
        assert (snap.engine_epoch, snap.engine_state, snap.policy_version) == (3, "ready", 7)
        assert snap.adapter_id == "lora-ü" * 10 and snap.queue_depth == 5
        assert (snap.supervisor_pid, snap.supervisor_state, snap.engine_restarts) == (42, "running", 2)
        assert before <= snap.heartbeat_ns <= time.time_ns()
    finally:
        reader.close()


@pytest.mark.parametrize(
    "fields",
    [
        {"engine_state": "sleepy"},
        {"adapter_id": "x" * 513},
        {"supervisor_state": "y" * 33},
        {"queue_depth": -1},
        {"no_such_field": 1},
        {"queue_depth": 1, "supervisor_pid": 2},  # two regions in one write
    ],
)
def test_invalid_writes_raise_value_error_and_change_nothing(block, fields):
    block.write(queue_depth=9)
    with pytest.raises(ValueError):
        block.write(**fields)
    assert block.read().queue_depth == 9


def test_attach_refuses_a_foreign_segment():
    from mlxsup.ipc.shm import close_shm, create_shm, unlink_shm

    shm = create_shm(f"mxs_{test_instance_id()}_c", 4096)
    try:
        with pytest.raises(ValueError, match="not an mlxsup control block"):
            ControlBlock.attach(shm.name.lstrip("/"))
    finally:
        unlink_shm(shm)
        close_shm(shm)


def test_attached_block_cannot_unlink(block):
    reader = ControlBlock.attach(block.name)
    try:
        with pytest.raises(PermissionError):
            reader.unlink()
    finally:
        reader.close()


def test_reader_never_sees_mixed_fields_under_hammering_writers(block, spawn):
    # A fixed number of writes, not a duration: how many the reader races depends on the
    # machine's load; that every read is whole and the last write wins does not.
    num_writes = 20_000
    engine = spawn(hammer_control, block.name, "engine", num_writes)
    sup = spawn(hammer_control, block.name, "supervisor", num_writes)
    deadline = time.monotonic() + 120  # a bound for a hung writer only
    while True:
        running = engine.is_alive() or sup.is_alive()
        s = block.read()
        k = s.engine_epoch
        if k:
            numbers = (s.engine_pid, s.policy_version, s.heartbeat_ns, s.queue_depth, s.num_running,
                       s.tokens_generated, s.prefill_tokens, s.num_swaps, s.num_requests)
            assert numbers == (k,) * 9, f"mixed engine fields: {s}"
            assert s.adapter_id == f"{k}:" + "a" * (k % 480), f"mixed adapter id at {k}"
            assert s.engine_state == ("starting", "ready", "draining")[k % 3]
        j = s.engine_restarts
        if j:
            assert (s.supervisor_pid, s.supervisor_state) == (j, f"s{j}"), f"mixed supervisor fields: {s}"
        if not running or time.monotonic() > deadline:
            break
    engine.join(10)
    sup.join(10)
    assert engine.exitcode == 0 and sup.exitcode == 0
    # Once both writers are done, the block holds each region's last write whole.
    assert (s.engine_epoch, s.num_requests, s.engine_restarts, s.supervisor_state) == (
        num_writes, num_writes, num_writes, f"s{num_writes}")


def test_writer_killed_mid_write_reads_as_down_then_recovers(block, monkeypatch):
    monkeypatch.setattr(control_mod, "STUCK_WRITER_S", 0.05)
    block.write(engine_state="ready", policy_version=4)
    seq_off = control_mod._ENGINE_SEQ_OFF
    (seq,) = struct.unpack_from("=Q", block._buf, seq_off)
    struct.pack_into("=Q", block._buf, seq_off, seq + 1)  # odd: a writer died mid-write
    t0 = time.monotonic()
    snap = block.read()
    assert snap.engine_state == "down" and snap.policy_version == 4
    assert time.monotonic() - t0 < 10  # gave up on the dead writer (STUCK_WRITER_S), no spin forever
    block.write(engine_state="starting", engine_epoch=2)  # the next engine completes the word
    snap = block.read()
    assert (snap.engine_state, snap.engine_epoch, snap.policy_version) == ("starting", 2, 4)


def test_token_rate_over_a_window_and_after_a_restart():
    from mlxsup.ipc.control import TokenRate

    rate = TokenRate(window_s=10.0)
    assert rate.sample(100.0, 1, 0) == 0.0
    assert rate.sample(100.2, 1, 50) == 0.0  # under min_span_s: no figure yet
    assert rate.sample(102.0, 1, 500) == pytest.approx(250.0)
    for t in range(3, 30):
        rate.sample(100.0 + t, 1, 500 + 100 * (t - 2))  # 100 tokens/s from here on
    assert rate.tokens_per_s == pytest.approx(100.0)  # the early 250 tokens/s left the window
    assert rate.sample(130.0, 2, 10) == 0.0  # a new engine: its counter starts again
    step = TokenRate(window_s=0.0, min_span_s=0.0)  # the supervisor's: sample to sample
    step.sample(0.0, 1, 0)
    step.sample(2.0, 1, 100)
    assert step.sample(4.0, 1, 500) == pytest.approx(200.0)
