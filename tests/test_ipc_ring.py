"""The SPSC frame ring and the message framing above it, in one process and across processes."""

from __future__ import annotations

import os
import signal
import time

import pytest
from test_ipc_support import (  # noqa: F401  (no_leaked_segments is an autouse fixture)
    check_message,
    make_ipc,
    no_leaked_segments,
    produce_messages,
    produce_until_killed,
    random_sizes,
    spawn,
)

from mlxsup.ipc.doorbell import Doorbell
from mlxsup.ipc.framing import FIRST, LAST, Assembler, MessageConsumer, MessageProducer, split, wait_for_work
from mlxsup.ipc.ring import HEADER_BYTES, Ring, RingCorrupt, frame_bytes
from mlxsup.ipc.shm import attach_shm, close_shm

pytestmark = pytest.mark.timeout(120)


class CountingBell:
    def __init__(self):
        self.rings = 0

    def ring(self):
        self.rings += 1


def local_ring(capacity: int) -> tuple[Ring, Ring]:
    """(producer view, consumer view) of one ring in private memory."""
    buf = memoryview(bytearray(Ring.segment_bytes(capacity)))
    return Ring.format(buf, capacity), Ring(buf)


# ---------------------------------------------------------------- ring


def test_frames_wrap_around_and_keep_order():
    prod, cons = local_ring(256)
    seen = []
    for i in range(200):  # sizes that straddle the end of the data area in every position
        payload = bytes([i % 251]) * (i % 61)
        assert prod.try_put(payload, i & 3)
        prod.publish()
        frames = cons.get_frames()
        assert frames == [(i & 3, payload)]
        seen.append(len(frames))
    assert prod.free_bytes() == 256


def test_full_ring_refuses_then_accepts_after_consume():
    prod, cons = local_ring(128)
    assert prod.try_put(b"x" * 56)  # 64 bytes
    assert prod.try_put(b"y" * 56)  # 128: full
    assert not prod.try_put(b"")
    prod.publish()
    assert [len(p) for _, p in cons.get_frames()] == [56, 56]
    assert prod.try_put(b"z" * 120)  # the largest frame: the whole capacity
    with pytest.raises(ValueError):
        prod.try_put(b"w" * 121)


def test_unpublished_frames_are_invisible_and_overwritten_by_the_next_owner():
    buf = memoryview(bytearray(Ring.segment_bytes(1024)))
    dead = Ring.format(buf, 1024)
    assert dead.try_put(b"A" * 100)
    cons = Ring(buf)
    assert not cons.readable() and cons.get_frames() == []
    # The producer dies here; a new owner starts at the published head.
    heir = Ring(buf)
    assert heir.try_put(b"B" * 10)
    heir.publish()
    assert cons.get_frames() == [(0, b"B" * 10)]


def test_corrupt_header_is_detected_not_followed():
    buf = memoryview(bytearray(Ring.segment_bytes(256)))
    prod = Ring.format(buf, 256)
    cons = Ring(buf)
    prod.try_put(b"abc")
    prod.publish()
    buf[HEADER_BYTES : HEADER_BYTES + 4] = (10_000).to_bytes(4, "little")
    with pytest.raises(RingCorrupt):
        cons.get_frames()
    consumer = MessageConsumer(cons, CountingBell())
    assert consumer.receive() == []  # logged and discarded
    assert not cons.readable()


def test_frame_bytes_alignment():
    assert [frame_bytes(n) for n in (0, 1, 8, 9)] == [8, 16, 16, 24]


# ---------------------------------------------------------------- framing


def test_split_and_assemble_large_message():
    payload = os.urandom(10_000)
    frames = split(payload, 1000)
    assert len(frames) == 10 and frames[0][0] == FIRST and frames[-1][0] == LAST
    assembler = Assembler()
    results = [assembler.push(flags, bytes(chunk)) for flags, chunk in frames]
    assert results[:-1] == [None] * 9 and results[-1] == payload


def test_partial_message_is_discarded_when_a_new_message_starts():
    assembler = Assembler()
    assert assembler.push(FIRST, b"dead-1") is None
    assert assembler.push(0, b"dead-2") is None
    assert assembler.push(FIRST | LAST, b"fresh") == b"fresh"
    assert assembler.push(0, b"orphan") is None  # continuation with nothing open
    assert assembler.push(LAST, b"orphan-end") is None
    assert assembler.num_discarded == 3


def test_producer_outbox_never_blocks_and_drains_in_order():
    prod_ring, cons_ring = local_ring(4096)
    consumer_bell, producer_bell = CountingBell(), CountingBell()
    producer = MessageProducer(prod_ring, consumer_bell)  # chunks of 1016 bytes
    consumer = MessageConsumer(cons_ring, producer_bell)
    messages = [os.urandom(n) for n in (10, 5000, 0, 20_000, 3)]
    for m in messages:
        producer.send(m)  # far more than the ring holds: returns at once
    got = []
    for _ in range(100):
        done = producer.flush()
        got += consumer.receive()
        if done and not cons_ring.readable():
            break
    assert got == messages
    assert producer_bell.rings > 0  # the consumer woke the waiting producer


def test_doorbell_is_rung_only_when_the_consumer_may_sleep():
    prod_ring, cons_ring = local_ring(4096)
    bell = CountingBell()
    producer = MessageProducer(prod_ring, bell)
    producer.send(b"a")
    producer.flush()
    assert bell.rings == 0  # consumer busy (flag down): no wake-up needed
    cons_ring.set_consumer_waiting(True)
    for _ in range(3):
        producer.send(b"b")
        producer.flush()
    assert bell.rings == 1  # once per sleep, however many frames follow
    cons_ring.set_consumer_waiting(False)
    cons_ring.set_consumer_waiting(True)  # a new sleep
    producer.send(b"c")
    producer.flush()
    assert bell.rings == 2


def test_a_blocked_producer_is_rung_again_for_each_of_its_waits():
    prod_ring, cons_ring = local_ring(256)
    producer_bell = CountingBell()
    producer = MessageProducer(prod_ring, CountingBell(), max_chunk=120)
    consumer = MessageConsumer(cons_ring, producer_bell)
    for _ in range(6):
        producer.send(b"x" * 120)  # 128-byte frames: the ring holds two
    assert not producer.flush() and prod_ring.producer_waiting
    for expected_rings in (1, 2):  # a wake-up per wait, not one for the first wait only
        assert len(consumer.receive()) == 2
        assert producer_bell.rings == expected_rings
        producer.flush()
    assert producer.flush() and not prod_ring.producer_waiting
    assert len(consumer.receive()) == 2


# ---------------------------------------------------------------- across processes


def consume(layout, expected_counts: dict, deadline_s: float, on_message=None):
    """Read slot rings 0..P-1 until each producer's count arrived; check order and checksums."""
    bell = Doorbell(layout.engine_bell_path)
    shms = [attach_shm(layout.request_ring_name(s)) for s in range(len(expected_counts))]
    slot_bells = [Doorbell(layout.slot_bell_path(s)) for s in range(len(expected_counts))]
    rings = [Ring(shm.buf) for shm in shms]
    consumers = [MessageConsumer(r, b) for r, b in zip(rings, slot_bells)]
    next_seq = {pid: 0 for pid in expected_counts}
    deadline = time.monotonic() + deadline_s
    try:
        while next_seq != expected_counts:
            assert time.monotonic() < deadline, f"timed out; got {next_seq} of {expected_counts}"
            got_any = False
            for slot, consumer in enumerate(consumers):
                for msg in consumer.receive():
                    got_any = True
                    pid, seq = check_message(msg)
                    assert pid == slot, f"message of producer {pid} in ring {slot}"
                    assert seq == next_seq[pid], f"producer {pid}: seq {seq} after {next_seq[pid] - 1}"
                    next_seq[pid] += 1
            if not got_any:
                wait_for_work(bell, consumers, timeout=0.05)
        return [c.assembler.num_discarded for c in consumers]
    finally:
        for r in rings:
            r.release()
        for shm in shms:
            close_shm(shm)
        for b in slot_bells + [bell]:
            b.close()


def test_many_producers_100k_messages_none_lost_duplicated_or_torn(make_ipc, spawn):
    num_producers, per_producer, large_per_producer = 3, 33_334, 100
    ring_bytes = 256 << 10
    layout = make_ipc(num_producers, request_ring_bytes=ring_bytes)
    sizes = {p: random_sizes(p, per_producer, large_per_producer, ring_bytes) for p in range(num_producers)}
    assert sum(len(s) for s in sizes.values()) >= 100_000 + 300
    t0 = time.monotonic()
    procs = [spawn(produce_messages, layout.run_dir, p, p, p, sizes[p]) for p in range(num_producers)]
    discarded = consume(layout, {p: len(sizes[p]) for p in sizes}, deadline_s=100)
    elapsed = time.monotonic() - t0
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    assert discarded == [0] * num_producers
    total = sum(sum(s) for s in sizes.values())
    print(f"\n{sum(map(len, sizes.values()))} messages, {total / 1e9:.2f} GB in {elapsed:.1f} s")


def test_producer_sigkilled_mid_write_never_shows_a_torn_message(make_ipc, spawn):
    ring_bytes = 64 << 10  # chunks of 16 KiB: most messages below span several frames
    layout = make_ipc(1, request_ring_bytes=ring_bytes)
    shm = attach_shm(layout.request_ring_name(0))
    ring = Ring(shm.buf)
    consumer = MessageConsumer(ring, Doorbell(layout.slot_bell_path(0)))
    bell = Doorbell(layout.engine_bell_path)
    try:
        for round_ in range(4):
            proc = spawn(produce_until_killed, layout.run_dir, 0, 100 + round_, round_, 3 * ring_bytes)
            received, expected_seq = 0, 0
            deadline = time.monotonic() + 30
            while received < 200 + 150 * round_:  # kill at a different moment each round
                assert time.monotonic() < deadline
                msgs = consumer.receive()
                for msg in msgs:
                    pid, seq = check_message(msg)
                    assert (pid, seq) == (100 + round_, expected_seq)
                    expected_seq += 1
                received += len(msgs)
                if not msgs:
                    wait_for_work(bell, [consumer], timeout=0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            for msg in consumer.receive():  # whatever it published before dying: intact
                pid, seq = check_message(msg)
                assert (pid, seq) == (100 + round_, expected_seq)
                expected_seq += 1
        # The slot is reclaimed by a clean producer: everything arrives, nothing torn.
        heir = spawn(produce_messages, layout.run_dir, 0, 7, 7, [5, 100_000, 0, 70_000, 1])
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 5:
            assert time.monotonic() < deadline
            got += [check_message(m) for m in consumer.receive()]
            wait_for_work(bell, [consumer], timeout=0.05)
        assert got == [(7, i) for i in range(5)]
        heir.join(10)
        assert consumer.assembler.num_discarded <= 4  # at most one cut message per kill
    finally:
        ring.release()
        close_shm(shm)
        bell.close()
        consumer.producer_bell.close()
