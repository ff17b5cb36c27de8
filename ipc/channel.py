"""The two ends of the worker <-> engine link: typed messages over a slot's ring pair.

`EngineChannel` (engine, synchronous, one thread) reads requests from every slot's request
ring and writes events to the response rings, waking on `engine.bell`. `WorkerChannel` (API
worker, asyncio) owns one slot: it claims it with a non-blocking flock on `slot-<i>.lock`,
writes requests, and routes incoming events to one asyncio.Queue per request id, waking on
`slot-<i>.bell`.

A new owner of a slot (after a worker died, even by SIGKILL) skips unread responses, bumps the
slot generation kept in the request ring's header, and sends Hello first. Hello's FIRST frame
makes the engine drop any half-received message of the dead worker; request ids embed the
generation, so late events for the dead worker's requests match no queue and are dropped.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os

from mlxsup.ipc.codec import CodecError, decode, encode
from mlxsup.ipc.control import ControlBlock
from mlxsup.ipc.doorbell import Doorbell
from mlxsup.ipc.framing import MessageConsumer, MessageProducer, wait_for_work
from mlxsup.ipc.layout import IpcLayout
from mlxsup.ipc.messages import Event, Hello, Request
from mlxsup.ipc.ring import Ring, fence
from mlxsup.ipc.shm import attach_shm, close_shm

log = logging.getLogger(__name__)

RECHECK_S = 0.05  # a worker with work outstanding re-checks its rings this often, bell or not


class NoFreeSlotError(RuntimeError):
    """Every slot's lock is held by a live worker."""


class ChannelClosed(RuntimeError):
    """The channel was closed while a call was using it."""


class _RingPair:
    """Attached request + response rings of one slot."""

    def __init__(self, layout: IpcLayout, slot: int):
        self._shms = []
        try:
            self.request = Ring(self._attach(layout.request_ring_name(slot)))
            self.response = Ring(self._attach(layout.response_ring_name(slot)))
        except BaseException:
            self.close()
            raise

    def _attach(self, name: str) -> memoryview:
        shm = attach_shm(name)
        self._shms.append(shm)
        return shm.buf

    def close(self) -> None:
        for ring in (getattr(self, "request", None), getattr(self, "response", None)):
            if ring is not None:
                ring.release()
        for shm in self._shms:
            close_shm(shm)
        self._shms.clear()


class EngineChannel:
    """Engine end of every slot. Single thread; nothing here blocks except `wait`.

    `discard_pending=True` skips requests published before this engine attached (their
    workers will have seen the epoch change); by default a restarted engine serves them.
    `spin_s` makes `wait` poll the request rings that long before sleeping (lower latency,
    more CPU).
    """

    def __init__(self, layout: IpcLayout, *, discard_pending: bool = False, spin_s: float = 0.0):
        self.layout = layout
        self.spin_s = spin_s
        self.num_bad_messages = 0  # requests that failed to decode (a bug or a foreign writer)
        self._pairs: list[_RingPair] = []
        self._slot_bells: list[Doorbell] = []
        self._bell = None
        self.control = ControlBlock.attach(layout.control_name)
        try:
            self._bell = Doorbell(layout.engine_bell_path)
            self._consumers: list[MessageConsumer] = []
            self._producers: list[MessageProducer] = []
            for slot in range(layout.num_slots):
                bell = Doorbell(layout.slot_bell_path(slot))
                self._slot_bells.append(bell)
                pair = _RingPair(layout, slot)
                self._pairs.append(pair)
                consumer = MessageConsumer(pair.request, producer_bell=bell)
                if discard_pending:
                    consumer.discard()
                self._consumers.append(consumer)
                self._producers.append(MessageProducer(pair.response, consumer_bell=bell))
        except BaseException:
            self.close()
            raise
        self._dirty: set[int] = set()

    def poll(self) -> list[tuple[int, Request]]:
        """Every complete request of every slot, in order per slot (non-blocking). A Hello also
        drops the slot's outbox: the events in it were for the previous worker."""
        received = []
        for slot, consumer in enumerate(self._consumers):
            if not consumer.ring.readable():
                continue
            for payload in consumer.receive():
                try:
                    msg = decode(payload)
                except CodecError as e:
                    self.num_bad_messages += 1
                    log.warning("slot %d: dropping undecodable request: %s", slot, e)
                    continue
                if type(msg) is Hello:
                    if msg.slot != slot:
                        log.warning("slot %d: Hello claims slot %d", slot, msg.slot)
                    self.drop_slot(slot)
                received.append((slot, msg))
        return received

    def send(self, slot: int, event: Event) -> None:
        """Queue one event for `slot`'s worker; visible after the next `flush`. Never blocks:
        what does not fit in the response ring waits in the slot's outbox."""
        self._producers[slot].send(encode(event))
        self._dirty.add(slot)

    def flush(self) -> None:
        """Publish what was sent, push outboxes, ring each slot's bell at most once."""
        producers = self._producers
        for slot in self._dirty:
            producers[slot].flush()
        self._dirty = {slot for slot in self._dirty if producers[slot].pending}

    def has_backlog(self) -> bool:
        """True while some outbox holds events the response ring had no room for."""
        return bool(self._dirty)

    def wait(self, timeout: float | None) -> None:
        """Sleep until a worker rings `engine.bell` (a request, or room freed for an outbox),
        or `timeout` seconds pass. Returns at once if a request is already waiting."""
        wait_for_work(
            self._bell,
            self._consumers,
            [self._producers[s] for s in self._dirty],
            timeout=timeout,
            spin_s=self.spin_s,
        )

    def drop_slot(self, slot: int) -> None:
        """Forget the events still queued for `slot` (its worker is gone)."""
        self._producers[slot].drop_outbox()
        self._dirty.discard(slot)

    def close(self) -> None:
        """Detach from everything (idempotent). Never unlinks."""
        for bell in self._slot_bells + ([self._bell] if self._bell else []):
            bell.close()
        for pair in self._pairs:
            pair.close()
        self._pairs = []
        self.control.close()


class WorkerChannel:
    """API-worker end of one slot (asyncio). Build it with `await WorkerChannel.open(layout)`."""

    def __init__(self, layout: IpcLayout, slot: int, lock_fd: int, loop):
        self.layout = layout
        self.slot = slot
        self._lock_fd = lock_fd
        self._loop = loop
        self._closed = False
        self._queues: dict[int, asyncio.Queue] = {}
        self._space_waiters: list[asyncio.Future] = []
        self._repoll = None
        self._counter = 0
        self.num_bad_messages = 0
        self._engine_bell = self._bell = self._pair = self.control = None
        try:  # on failure _release() also closes lock_fd: the caller must not
            self.control = ControlBlock.attach(layout.control_name)
            self._engine_bell = Doorbell(layout.engine_bell_path)
            self._bell = Doorbell(layout.slot_bell_path(slot))
            self._pair = _RingPair(layout, slot)
        except BaseException:
            self._release()
            raise
        self._consumer = MessageConsumer(self._pair.response, producer_bell=self._engine_bell)
        self._consumer.discard()  # responses for the previous owner of the slot
        self._producer = MessageProducer(self._pair.request, consumer_bell=self._engine_bell)
        self.generation = self._pair.request.generation + 1
        self._pair.request.generation = self.generation
        self._bell.drain()
        self._pair.response.set_consumer_waiting(True)
        loop.add_reader(self._bell.fileno(), self._on_bell)

    @classmethod
    async def open(cls, layout: IpcLayout, *, loop=None) -> "WorkerChannel":
        """Claim a free slot (`NoFreeSlotError` if none), reset it, and say Hello."""
        loop = loop or asyncio.get_running_loop()
        slot, lock_fd = _claim_slot(layout)
        channel = cls(layout, slot, lock_fd, loop)
        await channel.send(Hello(slot=slot, generation=channel.generation, pid=os.getpid()))
        return channel

    def new_request_id(self) -> int:
        """A u64 unique to this slot generation: slot (8 bits), generation (24), counter (32)."""
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        return (self.slot << 56) | ((self.generation & 0xFFFFFF) << 32) | self._counter

    def register(self, request_id: int) -> asyncio.Queue:
        """The queue that will receive every event for `request_id` (register before send)."""
        queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._schedule_repoll()
        return queue

    def unregister(self, request_id: int) -> None:
        self._queues.pop(request_id, None)

    async def send(self, request: Request) -> None:
        """Write one request, waiting (asynchronously) for ring space as long as needed; large
        requests go in chunks. Once it returns the whole request is published. A cancelled
        send still delivers the whole request (it stays in the outbox), never a part."""
        if self._closed:
            raise ChannelClosed("channel is closed")
        self._producer.send(encode(request))
        while not self._producer.flush():
            waiter = self._loop.create_future()
            self._space_waiters.append(waiter)
            self._schedule_repoll()
            try:
                await asyncio.wait_for(waiter, RECHECK_S)
            except asyncio.TimeoutError:
                pass
            if self._closed:
                raise ChannelClosed("channel closed while sending")

    async def close(self) -> None:
        """Stop listening, detach, and release the slot (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._bell.fileno())
        if self._repoll is not None:
            self._repoll.cancel()
            self._repoll = None
        self._wake_space_waiters()
        self._queues.clear()
        self._release()

    # ---------------------------------------------------------------- internals

    def _release(self) -> None:
        for bell in (self._bell, self._engine_bell):
            if bell is not None:
                bell.close()
        if self._pair is not None:
            self._pair.close()
        if self.control is not None:
            self.control.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock: the slot is free
            self._lock_fd = -1

    def _on_bell(self) -> None:
        self._bell.drain()
        self._drain()

    def _drain(self) -> None:
        if self._closed:
            return
        ring = self._pair.response
        ring.set_consumer_waiting(False)  # busy: the engine need not ring while we read
        while True:
            for payload in self._consumer.receive():
                self._dispatch(payload)
            ring.set_consumer_waiting(True)
            fence()  # Dekker: our flag store before our load of head
            if not ring.readable():
                break
            ring.set_consumer_waiting(False)
        if self._producer.pending:
            self._producer.flush()  # the engine may have freed room for a waiting send
        self._wake_space_waiters()

    def _dispatch(self, payload: bytes) -> None:
        try:
            event = decode(payload)
        except CodecError as e:
            self.num_bad_messages += 1
            log.warning("slot %d: dropping undecodable event: %s", self.slot, e)
            return
        queue = self._queues.get(getattr(event, "request_id", None))
        if queue is not None:
            queue.put_nowait(event)

    def _wake_space_waiters(self) -> None:
        waiters, self._space_waiters = self._space_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _schedule_repoll(self) -> None:
        if self._repoll is None and not self._closed:
            if self._queues or self._producer.pending or self._space_waiters:
                self._repoll = self._loop.call_later(RECHECK_S, self._on_repoll)

    def _on_repoll(self) -> None:
        # Covers a lost doorbell: while anything is outstanding we look every RECHECK_S.
        self._repoll = None
        self._drain()
        self._schedule_repoll()


def _claim_slot(layout: IpcLayout) -> tuple[int, int]:
    for slot in range(layout.num_slots):
        fd = os.open(layout.slot_lock_path(slot), os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        return slot, fd
    raise NoFreeSlotError(
        f"all {layout.num_slots} IPC slots of {layout.run_dir} are held by live workers; "
        "start the server with more slots (at least 2 x workers)"
    )
