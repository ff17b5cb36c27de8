"""Fixtures and child-process bodies shared by the tests/test_ipc_*.py modules.

Child processes are started with the 'spawn' context, so their targets live here at module
level (importable by name in the child). Each test module imports `no_leaked_segments`, an
autouse fixture asserting that no `mxs_*` segment outlives the test.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import struct
import time
import zlib

import pytest

from mlxsup.ipc.channel import EngineChannel, WorkerChannel
from mlxsup.ipc.control import ControlBlock
from mlxsup.ipc.doorbell import Doorbell
from mlxsup.ipc.framing import MessageProducer, wait_for_work
from mlxsup.ipc.layout import IpcLayout, new_instance_id
from mlxsup.ipc.messages import GenerateRequest, SamplingParams, SequenceDone, TokenChunk
from mlxsup.ipc.ring import Ring
from mlxsup.ipc.segments import create_ipc
from mlxsup.ipc.shm import attach_shm, close_shm, unlink_name

SPAWN = mp.get_context("spawn")
MSG_HEADER = struct.Struct("<IQII")  # producer id, sequence number, payload size, crc32
POOL_BYTES = 4 << 20


def shm_names() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("mxs_")}
    except FileNotFoundError:
        return set()


_instance_ids: set[str] = set()


def test_instance_id() -> str:
    """A fresh instance id that `no_leaked_segments` watches."""
    instance_id = new_instance_id()
    _instance_ids.add(instance_id)
    return instance_id


test_instance_id.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail a test that leaves an `mxs_*` segment of its own behind (and remove it, so the next
    test starts clean). Only instance ids made by `test_instance_id()` during the test count:
    other sessions may run their own servers on this machine at the same time."""
    _instance_ids.clear()
    before = shm_names()
    yield
    prefixes = tuple(f"mxs_{i}_" for i in _instance_ids)
    leaked = {n for n in shm_names() - before if n.startswith(prefixes)} if prefixes else set()
    for name in leaked:
        unlink_name(name)
    assert not leaked, f"segments left in /dev/shm: {sorted(leaked)}"


@pytest.fixture
def make_ipc(tmp_path):
    """make_ipc(num_slots=..., **sizes) -> IpcLayout with every object created; destroyed at
    teardown whatever the test did."""
    created = []

    def make(num_slots: int = 2, **sizes) -> IpcLayout:
        layout = IpcLayout(str(tmp_path / f"run{len(created)}"), test_instance_id(), num_slots, **sizes)
        created.append(create_ipc(layout))
        return layout

    yield make
    for resources in created:
        resources.destroy()


@pytest.fixture
def spawn():
    """spawn(target, *args) -> started daemon Process; every one is killed at teardown."""
    procs = []

    def start(target, *args):
        proc = SPAWN.Process(target=target, args=args, daemon=True)
        proc.start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


# ---------------------------------------------------------------- checksummed raw messages


def payload_pool(seed: int) -> memoryview:
    return memoryview(random.Random(seed).randbytes(POOL_BYTES))


def make_message(pool: memoryview, rng: random.Random, producer_id: int, seq: int, size: int) -> bytes:
    offset = rng.randrange(0, len(pool) - size + 1)
    payload = pool[offset : offset + size]
    return MSG_HEADER.pack(producer_id, seq, size, zlib.crc32(payload)) + payload


def check_message(msg: bytes) -> tuple[int, int]:
    """(producer id, seq) of an intact message; AssertionError for a torn one."""
    assert len(msg) >= MSG_HEADER.size, f"message of {len(msg)} bytes has no header"
    producer_id, seq, size, crc = MSG_HEADER.unpack_from(msg)
    payload = memoryview(msg)[MSG_HEADER.size :]
    assert len(payload) == size, f"producer {producer_id} seq {seq}: {len(payload)} bytes, want {size}"
    assert zlib.crc32(payload) == crc, f"producer {producer_id} seq {seq}: checksum mismatch"
    return producer_id, seq


def random_sizes(seed: int, count: int, num_large: int, ring_bytes: int) -> list[int]:
    """`count` sizes in [0, 64 KiB] (0 and 64 KiB included) plus `num_large` sizes above the
    ring's capacity, shuffled."""
    rng = random.Random(seed)
    sizes = [0, 65536] + [rng.randint(0, 65536) for _ in range(count - 2)]
    sizes += [rng.randint(ring_bytes + 1, 3 * ring_bytes) for _ in range(num_large)]
    rng.shuffle(sizes)
    return sizes


class RawProducer:
    """Producer side of slot `slot`'s request ring, raw bytes (what a worker does below the
    codec)."""

    def __init__(self, layout: IpcLayout, slot: int):
        self._shm = attach_shm(layout.request_ring_name(slot))
        self.ring = Ring(self._shm.buf)
        self.engine_bell = Doorbell(layout.engine_bell_path)
        self.bell = Doorbell(layout.slot_bell_path(slot))
        self.producer = MessageProducer(self.ring, consumer_bell=self.engine_bell)

    def send(self, msg) -> None:
        self.producer.send(msg)
        while not self.producer.flush():
            wait_for_work(self.bell, [], [self.producer], timeout=0.05)

    def close(self) -> None:
        self.ring.release()
        close_shm(self._shm)
        self.engine_bell.close()
        self.bell.close()


def produce_messages(run_dir: str, slot: int, producer_id: int, seed: int, sizes: list[int]) -> None:
    layout = IpcLayout.load(run_dir)
    producer = RawProducer(layout, slot)
    pool, rng = payload_pool(seed), random.Random(seed)
    for seq, size in enumerate(sizes):
        producer.send(make_message(pool, rng, producer_id, seq, size))
    producer.close()


def produce_until_killed(run_dir: str, slot: int, producer_id: int, seed: int, max_size: int) -> None:
    """Tight write loop, many messages spanning several frames, until SIGKILL."""
    layout = IpcLayout.load(run_dir)
    producer = RawProducer(layout, slot)
    pool, rng = payload_pool(seed), random.Random(seed)
    seq = 0
    while True:
        producer.send(make_message(pool, rng, producer_id, seq, rng.randint(0, max_size)))
        seq += 1


# ---------------------------------------------------------------- engine / worker bodies


def suppress_doorbells() -> None:
    """Make every Doorbell.ring() of this process a no-op (lost-doorbell tests)."""
    Doorbell.ring = lambda self: None


def engine_echo(run_dir: str, stop, wait_timeout: float, silent: bool) -> None:
    """A fake engine: answers each GenerateRequest with one TokenChunk and a SequenceDone
    echoing the prompt length; sleeps in wait(wait_timeout) when idle."""
    if silent:
        suppress_doorbells()
    channel = EngineChannel(IpcLayout.load(run_dir))
    channel.control.write(engine_state="ready", engine_pid=os.getpid())
    while not stop.is_set():
        requests = channel.poll()
        for slot, req in requests:
            if isinstance(req, GenerateRequest):
                n = len(req.prompt_ids)
                channel.send(slot, TokenChunk(req.request_id, 0, [7], [-0.25], [1]))
                done = SequenceDone(req.request_id, 0, "stop", req.prompt_ids[-3:], [], [], n, 1, 1)
                channel.send(slot, done)
        channel.flush()
        if not requests and not channel.has_backlog():
            channel.wait(wait_timeout)
        elif not requests:
            channel.wait(0.01)
    channel.close()


def worker_spam(run_dir: str, opened) -> None:
    """An API worker sending requests (some spanning many frames) as fast as it can."""

    async def main():
        channel = await WorkerChannel.open(IpcLayout.load(run_dir))
        opened.put((channel.slot, channel.generation))
        rng = random.Random(1)
        while True:
            prompt = list(range(rng.choice((1, 10, 5000, 40000))))
            await channel.send(GenerateRequest(channel.new_request_id(), prompt, SamplingParams()))

    asyncio.run(main())


def hammer_control(control_name: str, region: str, num_writes: int) -> None:
    """Write one region `num_writes` times as fast as possible; every field of write k holds k."""
    block = ControlBlock.attach(control_name)
    for k in range(1, num_writes + 1):
        if region == "engine":
            block.write(
                engine_epoch=k,
                engine_pid=k,
                policy_version=k,
                heartbeat_ns=k,
                queue_depth=k,
                num_running=k,
                tokens_generated=k,
                prefill_tokens=k,
                num_swaps=k,
                num_requests=k,
                engine_state=("starting", "ready", "draining")[k % 3],
                adapter_id=f"{k}:" + "a" * (k % 480),
            )
        else:
            block.write(engine_restarts=k, supervisor_pid=k, supervisor_state=f"s{k}")
    block.close()


def create_and_hang(run_dir: str, instance_id: str, ready) -> None:
    """A supervisor that creates its IPC objects and then waits to be SIGKILLed."""
    create_ipc(IpcLayout(run_dir, instance_id, 2, request_ring_bytes=8192, response_ring_bytes=8192))
    ready.set()
    time.sleep(600)
