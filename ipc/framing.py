"""Messages over ring frames: chunking, reassembly, and the doorbell handshake of each end.

A message is one or more frames. The first carries FIRST, the last LAST (a small message is
one frame with both). A frame with FIRST drops any half-received message: that is how a
message cut short by a dead producer is discarded once the next owner of the ring writes.
A frame without FIRST while no message is open is an orphan and is dropped too.

Doorbells are rung only when the other side said it may sleep (a Dekker handshake): the waiter
stores its flag, fences, then re-checks the ring; the other side stores its index, fences,
then reads the flag. With both fences at least one of them sees the other's store, so a wake-up
is never needed-and-skipped. Waiters still re-check on a timer in case a bell is lost.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from mlxsup.ipc.doorbell import Doorbell
from mlxsup.ipc.ring import FRAME_HEADER_BYTES, Ring, RingCorrupt, fence, frame_bytes

log = logging.getLogger(__name__)

FIRST = 1
LAST = 2
MIN_CHUNK = 64


def default_chunk_bytes(ring: Ring) -> int:
    """Largest payload per frame: a quarter of the ring, so both sides work on it at once."""
    return max(MIN_CHUNK, ring.capacity // 4 - FRAME_HEADER_BYTES)


def split(payload, max_chunk: int) -> list[tuple[int, object]]:
    """Frames (flags, bytes-like) carrying `payload`; never copies the payload."""
    n = len(payload)
    if n <= max_chunk:
        return [(FIRST | LAST, payload)]
    view = memoryview(payload).cast("B")
    frames = []
    for offset in range(0, n, max_chunk):
        flags = (FIRST if offset == 0 else 0) | (LAST if offset + max_chunk >= n else 0)
        frames.append((flags, view[offset : offset + max_chunk]))
    return frames


class Assembler:
    """Joins frames back into messages (see the module docstring for the rules)."""

    def __init__(self):
        self._parts: list | None = None
        self.num_discarded = 0  # partial messages and orphan frames dropped

    @property
    def is_idle(self) -> bool:
        """True when no message is half-received."""
        return self._parts is None

    def push(self, flags: int, data: bytes) -> bytes | None:
        """Add one frame; return the message it completes, if any."""
        if flags & FIRST:
            if self._parts is not None:
                self.num_discarded += 1
            self._parts = []
        elif self._parts is None:
            self.num_discarded += 1
            return None
        self._parts.append(data)
        if not flags & LAST:
            return None
        parts, self._parts = self._parts, None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def reset(self) -> None:
        if self._parts is not None:
            self.num_discarded += 1
        self._parts = None


class MessageProducer:
    """Producer end of one ring: never blocks; what does not fit waits in an outbox.

    `send` writes frames (unpublished) or queues them; `flush` pushes the outbox, publishes,
    rings the consumer's bell if it may be asleep, and when frames remain, announces that it
    waits so the consumer rings the producer's bell once it frees space.
    """

    def __init__(self, ring: Ring, consumer_bell: Doorbell, max_chunk: int | None = None):
        self.ring = ring
        self.consumer_bell = consumer_bell
        self.max_chunk = max_chunk or default_chunk_bytes(ring)
        if not (0 < self.max_chunk <= ring.max_payload):
            raise ValueError("max_chunk must fit in one frame of the ring")
        self._outbox: deque = deque()
        self._is_waiting = False
        ring.rewind_producer()  # whatever a dead predecessor left unpublished is overwritten
        ring.set_producer_waiting(False)

    @property
    def pending(self) -> bool:
        """True while frames wait in the outbox for ring space."""
        return bool(self._outbox)

    def send(self, payload) -> None:
        """Queue one message; visible to the consumer after the next `flush`."""
        if len(payload) <= self.max_chunk:  # the common case: one frame, no list
            if self._outbox or not self.ring.try_put(payload, FIRST | LAST):
                self._outbox.append((FIRST | LAST, payload))
            return
        frames = split(payload, self.max_chunk)
        if self._outbox:
            self._outbox.extend(frames)
            return
        put = self.ring.try_put
        for i, (flags, chunk) in enumerate(frames):
            if not put(chunk, flags):
                self._outbox.extend(frames[i:])
                return

    def flush(self) -> bool:
        """Publish what can be published; True when the outbox is empty."""
        ring = self.ring
        announced = False
        while True:
            self._push()
            if ring.publish():
                fence()  # Dekker: our head store before our load of consumer_waiting
                if ring.take_consumer_wakeup():
                    self.consumer_bell.ring()
            if not self._outbox:
                if self._is_waiting:
                    ring.set_producer_waiting(False)
                    self._is_waiting = False
                return True
            if announced:
                return False
            # A new wait each call: the consumer rings once per announced wait.
            ring.set_producer_waiting(True)
            self._is_waiting = announced = True
            fence()  # Dekker: our flag store before re-reading tail (next loop's _push)

    def can_progress(self) -> bool:
        """True if the outbox's next frame fits now."""
        if not self._outbox:
            return False
        return frame_bytes(len(self._outbox[0][1])) <= self.ring.free_bytes()

    def drop_outbox(self) -> None:
        """Forget queued frames (their consumer is gone)."""
        self._outbox.clear()
        if self._is_waiting:
            self.ring.set_producer_waiting(False)
            self._is_waiting = False

    def _push(self) -> None:
        outbox = self._outbox
        put = self.ring.try_put
        while outbox:
            flags, chunk = outbox[0]
            if not put(chunk, flags):
                return
            outbox.popleft()


class MessageConsumer:
    """Consumer end of one ring: returns complete messages, rings the producer when it waits
    for the space just freed."""

    def __init__(self, ring: Ring, producer_bell: Doorbell):
        self.ring = ring
        self.producer_bell = producer_bell
        self.assembler = Assembler()

    def receive(self) -> list[bytes]:
        """Every message completed by the frames published so far (non-blocking)."""
        ring = self.ring
        try:
            frames = ring.get_frames()
        except RingCorrupt:
            log.exception("ring corrupt; discarding its contents")
            ring.discard()
            self.assembler.reset()
            return []
        if not frames:
            return []
        fence()  # Dekker: our tail store before our load of producer_waiting
        if ring.take_producer_wakeup():
            self.producer_bell.ring()
        messages = []
        assembler = self.assembler
        for flags, data in frames:
            if flags == FIRST | LAST and assembler.is_idle:
                messages.append(data)  # fast path: a whole message in one frame
                continue
            message = assembler.push(flags, data)
            if message is not None:
                messages.append(message)
        return messages

    def discard(self) -> None:
        """Skip everything unread (a new owner of the consumer side)."""
        self.ring.discard()
        self.assembler.reset()


def wait_for_work(
    bell: Doorbell,
    consumers,
    producers=(),
    timeout: float | None = None,
    spin_s: float = 0.0,
) -> None:
    """Block until a consumer's ring is readable, a producer's outbox can progress, the bell
    rings, or `timeout` passes. `spin_s`: first poll the rings that long without sleeping."""
    if spin_s > 0:
        deadline = time.perf_counter() + spin_s
        while time.perf_counter() < deadline:
            for c in consumers:
                if c.ring.readable():
                    return
    # Rings left from before (we found the data without sleeping) only cost one spurious wake:
    # cheaper than draining the FIFO before every sleep.
    for c in consumers:
        c.ring.set_consumer_waiting(True)
    fence()  # Dekker: our flag stores before our loads of head
    try:
        if any(c.ring.readable() for c in consumers):
            return
        if any(p.can_progress() for p in producers):
            return
        bell.wait(timeout)
    finally:
        for c in consumers:
            c.ring.set_consumer_waiting(False)
