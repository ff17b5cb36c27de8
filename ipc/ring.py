"""Single-producer single-consumer ring of variable-length frames in shared memory.

Segment layout: each header word on its own 128-byte line (Apple silicon's cache line; two on
x86), so a store by one side never invalidates a word the other side reads for another reason:

    0    head              producer: bytes ever published (monotonic u64); every publish
    128  producer_waiting  producer: odd while it waits for free space; rarely
    256  tail              consumer: bytes ever consumed (monotonic u64); every read
    384  consumer_waiting  consumer: odd while it may sleep on its doorbell; rarely
    512  magic, capacity   the creator, once
    640  generation        the owner of the slot (request rings: the API worker)
    1024 data[capacity]

The waiting words are read after every publish / every read (the Dekker check below), so they
must not share a line with head or tail, which change all the time.

A frame is an 8-byte header (u32 payload length, u32 flags) followed by the payload, padded to
8 bytes. Frames may wrap around the end of the data area; a header never does, since positions
and the capacity are multiples of 8. The producer writes frames at its private cursor and makes
them visible by storing `head` after a fence, so a consumer never reads an unpublished frame and
a producer killed mid-write leaves nothing visible: the next owner starts at the published head
and overwrites those bytes. Head and tail are aligned u64 words read and written through a
`memoryview.cast("Q")`, which CPython compiles to a single 8-byte load or store (no tearing).
"""

from __future__ import annotations

import struct
import threading

HEADER_BYTES = 1024
LINE_BYTES = 128
FRAME_HEADER = struct.Struct("=II")
FRAME_HEADER_BYTES = FRAME_HEADER.size  # 8
MAGIC = 0x676E6972_7573786D  # b"mxsuring" little-endian

# Word indexes (u64) into the header.
_WORDS_PER_LINE = LINE_BYTES // 8
_HEAD = 0
_PRODUCER_WAITING = 1 * _WORDS_PER_LINE
_TAIL = 2 * _WORDS_PER_LINE
_CONSUMER_WAITING = 3 * _WORDS_PER_LINE
_MAGIC, _CAPACITY = 4 * _WORDS_PER_LINE, 4 * _WORDS_PER_LINE + 1
_GENERATION = 5 * _WORDS_PER_LINE

_fence_lock = threading.Lock()
_acquire = _fence_lock.acquire
_release = _fence_lock.release


def fence() -> None:
    """Full memory barrier between this call's earlier and later shared-memory accesses.

    CPython has no memory model, so we borrow the lock's: its release is a store-release and its
    acquire a load-acquire on an atomic (glibc semaphores; locked RMW on x86, stlr/ldar on ARM).
    """
    # A release then an acquire orders earlier stores before later loads too (ARMv8 never
    # reorders stlr with a later ldar; x86's locked RMW is a full fence): Dekker needs that.
    _acquire()
    _release()
    _acquire()
    _release()


def frame_bytes(payload_len: int) -> int:
    """Ring bytes a frame with `payload_len` bytes of payload occupies."""
    return FRAME_HEADER_BYTES + ((payload_len + 7) & ~7)


class RingCorrupt(RuntimeError):
    """A published frame header is impossible: the segment was written by something else."""


class Ring:
    """One end (or both, in tests) of an SPSC frame ring living in `buf`.

    The producer calls `try_put` any number of times, then `publish`; the consumer calls
    `get_frames`. Each side keeps its cursor privately and re-reads the other's from shared
    memory, so the object must be used by one process per side. `release()` before closing the
    shared memory (exported memoryviews keep the mapping busy).
    """

    def __init__(self, buf: memoryview):
        words = buf[:HEADER_BYTES].cast("Q")
        if words[_MAGIC] != MAGIC:
            words.release()
            raise ValueError("not an mlxsup ring (bad magic)")
        capacity = words[_CAPACITY]
        if capacity % 8 or len(buf) < HEADER_BYTES + capacity:
            words.release()
            raise ValueError("ring header does not match the segment size")
        self.capacity = capacity
        self._words = words
        self._data = buf[HEADER_BYTES : HEADER_BYTES + capacity]
        self._head = words[_HEAD]  # producer: next write position (published or not)
        self._published = self._head  # producer: the head value last stored
        self._tail = words[_TAIL]  # consumer: next read position
        self._tail_seen = self._tail  # producer: last tail read from shared memory
        self._consumer_rung = self._producer_rung = 0  # last sleep word we rang for

    @classmethod
    def format(cls, buf: memoryview, capacity: int) -> "Ring":
        """Initialise a fresh segment of `segment_bytes(capacity)` bytes (creator only)."""
        if capacity % 8 or capacity < 64 or len(buf) < HEADER_BYTES + capacity:
            raise ValueError("capacity must be a multiple of 8, >= 64, and fit the segment")
        buf[:HEADER_BYTES] = bytes(HEADER_BYTES)
        words = buf[:HEADER_BYTES].cast("Q")
        words[_CAPACITY] = capacity
        fence()
        words[_MAGIC] = MAGIC  # last: an attacher that sees the magic sees the capacity
        words.release()
        return cls(buf)

    @staticmethod
    def segment_bytes(capacity: int) -> int:
        return HEADER_BYTES + capacity

    def release(self) -> None:
        """Drop the views into shared memory (idempotent)."""
        self._words.release()
        self._data.release()

    # ---------------------------------------------------------------- producer side

    @property
    def max_payload(self) -> int:
        """Largest payload one frame can carry (a frame never exceeds the capacity)."""
        return self.capacity - FRAME_HEADER_BYTES

    def free_bytes(self) -> int:
        """Bytes the producer may still write, re-reading the consumer's tail."""
        tail = self._words[_TAIL]
        fence()  # our next stores into freed space must not pass this load of tail
        self._tail_seen = tail
        return self.capacity - (self._head - tail)

    def try_put(self, payload, flags: int = 0) -> bool:
        """Write one frame at the private cursor without publishing it. False when it does not
        fit now. `payload` is any bytes-like object of format 'B'."""
        n = len(payload)
        if n > self.capacity - FRAME_HEADER_BYTES:
            raise ValueError(f"frame of {n} bytes exceeds the ring's {self.max_payload}")
        size = FRAME_HEADER_BYTES + ((n + 7) & ~7)
        # Cheap check against the tail seen last; re-read the shared tail only when short.
        if size > self.capacity - (self._head - self._tail_seen) and size > self.free_bytes():
            return False
        cap = self.capacity
        data = self._data
        pos = self._head % cap
        FRAME_HEADER.pack_into(data, pos, n, flags)
        start = (pos + FRAME_HEADER_BYTES) % cap
        if start + n <= cap:
            data[start : start + n] = payload
        else:  # the payload wraps around the end of the data area
            view = memoryview(payload).cast("B")
            first = cap - start
            data[start:] = view[:first]
            data[: n - first] = view[first:]
        self._head += size
        return True

    def publish(self) -> bool:
        """Make every frame written so far visible to the consumer. True if anything was new."""
        if self._head == self._published:
            return False
        fence()  # payload stores before the index store
        self._words[_HEAD] = self._published = self._head
        return True

    def rewind_producer(self) -> None:
        """Start writing at the published head again (a new owner of the producer side)."""
        self._head = self._published = self._words[_HEAD]
        self._tail_seen = self._words[_TAIL]


    # ---------------------------------------------------------------- consumer side

    def readable(self) -> bool:
        """True when published frames wait to be read."""
        return self._words[_HEAD] != self._tail

    def get_frames(self) -> list[tuple[int, bytes]]:
        """Copy out every published frame as (flags, payload) and free their space."""
        head = self._words[_HEAD]
        tail = self._tail
        if head == tail:
            return []
        fence()  # the index load before the payload loads
        cap = self.capacity
        if not (0 < head - tail <= cap):
            raise RingCorrupt(f"head {head} and tail {tail} are {head - tail} bytes apart")
        data = self._data
        frames = []
        while tail < head:
            pos = tail % cap
            n, flags = FRAME_HEADER.unpack_from(data, pos)
            size = FRAME_HEADER_BYTES + ((n + 7) & ~7)
            if size > head - tail:
                raise RingCorrupt(f"frame of {n} bytes at {tail} runs past head {head}")
            start = (pos + FRAME_HEADER_BYTES) % cap
            end = start + n
            if end <= cap:
                payload = bytes(data[start:end])
            else:
                payload = bytes(data[start:]) + bytes(data[: end - cap])
            frames.append((flags, payload))
            tail += size
        fence()  # our payload loads complete before the producer may overwrite the space
        self._tail = tail
        self._words[_TAIL] = tail
        return frames

    def discard(self) -> None:
        """Skip everything published so far (a new owner of the consumer side)."""
        self._tail = self._words[_HEAD]
        fence()
        self._words[_TAIL] = self._tail

    # ---------------------------------------------------------------- sleep / wake words
    # A side that may sleep makes its word odd, a new odd value for every sleep (1, 3, 5...),
    # and even again once awake. The other side rings once per odd value, not once per frame:
    # a sleeper takes tens of microseconds to wake, and a producer that rang for every frame
    # in that window would spend its time in write().

    def set_consumer_waiting(self, waiting: bool) -> None:
        """Consumer: announce a new sleep (True: call before every sleep) or that it is
        awake (False)."""
        _announce(self._words, _CONSUMER_WAITING, waiting)

    def take_consumer_wakeup(self) -> bool:
        """Producer: True once per consumer sleep; the caller then rings the bell."""
        word = self._words[_CONSUMER_WAITING]
        if word & 1 and word != self._consumer_rung:
            self._consumer_rung = word
            return True
        return False

    def set_producer_waiting(self, waiting: bool) -> None:
        """Producer: announce a new wait for space (True: call before every sleep) or that it
        no longer waits (False)."""
        _announce(self._words, _PRODUCER_WAITING, waiting)

    def take_producer_wakeup(self) -> bool:
        """Consumer: True once per producer wait; the caller then rings the bell."""
        word = self._words[_PRODUCER_WAITING]
        if word & 1 and word != self._producer_rung:
            self._producer_rung = word
            return True
        return False

    @property
    def consumer_waiting(self) -> bool:
        return bool(self._words[_CONSUMER_WAITING] & 1)

    @property
    def producer_waiting(self) -> bool:
        return bool(self._words[_PRODUCER_WAITING] & 1)

    # ---------------------------------------------------------------- slot owner

    @property
    def generation(self) -> int:
        return self._words[_GENERATION]

    @generation.setter
    def generation(self, value: int) -> None:
        self._words[_GENERATION] = value


def _announce(words, index: int, waiting: bool) -> None:
    word = words[index]  # only this side writes it, so reading it back needs no fence
    if waiting:  # always a new odd value: the other side has maybe rung for the current one
        words[index] = word + 2 if word & 1 else word + 1
    elif word & 1:
        words[index] = word + 1
