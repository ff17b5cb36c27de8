"""The control block: engine and supervisor state that every process can read, via seqlocks.

Two regions, each with exactly one writer: the engine region (written only by the engine) and
the supervisor region (written only by the supervisor). Each has a sequence word on its own
cache line: the writer makes it odd, writes the fields, makes it even; a reader copies the
region between two reads of the word and retries until both reads are the same even number, so
it never sees a mix of two writes.

A writer killed mid-write leaves its word odd forever. A reader that sees the same odd value
for `STUCK_WRITER_S` gives up waiting and reports the region's state as "down" (the writer is
dead or stopped); the next writer (a restarted engine) completes the word and carries on.
"""

from __future__ import annotations

import collections
import struct
import time
from dataclasses import dataclass

from mlxsup.ipc.layout import CONTROL_BLOCK_BYTES
from mlxsup.ipc.ring import LINE_BYTES, fence
from mlxsup.ipc.shm import attach_shm, close_shm, create_shm, unlink_name, unlink_shm

ENGINE_STATES = ("down", "starting", "ready", "draining", "stopping", "paused")
MAX_ADAPTER_ID_BYTES = 512
MAX_SUPERVISOR_STATE_BYTES = 32
STUCK_WRITER_S = 0.25
MAGIC = 0x6C7274_6E6F63_7378  # arbitrary, checked on attach

# Byte offsets; each sequence word and each region starts on its own 128-byte line.
_LINE = LINE_BYTES
_MAGIC_OFF = 0
_ENGINE_SEQ_OFF = _LINE
_ENGINE_OFF = 2 * _LINE
# The engine's prefix cache and KV budget (engine/prefix_cache.py), also in /metrics and status.
PREFIX_CACHE_FIELDS = (
    "prefix_cache_lookups",
    "prefix_cache_hits",
    "prefix_cache_lookup_tokens",
    "prefix_cache_hit_tokens",
    "prefix_cache_entries",
    "prefix_cache_bytes",
    "kv_budget_bytes",
)
_ENGINE = struct.Struct(f"<QQQqQQQQQQQQQ{'Q' * len(PREFIX_CACHE_FIELDS)}I{MAX_ADAPTER_ID_BYTES}s")
_SUPERVISOR_SEQ_OFF = _ENGINE_OFF + -(-_ENGINE.size // _LINE) * _LINE
_SUPERVISOR_OFF = _SUPERVISOR_SEQ_OFF + _LINE
_SUPERVISOR = struct.Struct(f"<QQI{MAX_SUPERVISOR_STATE_BYTES}s")
_U64 = struct.Struct("=Q")  # native: memcpy of 8 bytes, a single store on 64-bit CPUs
if _SUPERVISOR_OFF + _SUPERVISOR.size > CONTROL_BLOCK_BYTES:
    raise ImportError("control block layout exceeds CONTROL_BLOCK_BYTES")

ENGINE_FIELDS = (
    "engine_epoch",
    "engine_pid",
    "engine_state",
    "policy_version",
    "heartbeat_ns",
    "queue_depth",
    "num_running",
    "tokens_generated",
    "prefill_tokens",
    "num_swaps",
    "num_requests",
    "vocab_size",
    "context_length",
    *PREFIX_CACHE_FIELDS,
    "adapter_id",
)
SUPERVISOR_FIELDS = ("engine_restarts", "supervisor_pid", "supervisor_state")


def prefix_cache_hit_rate(status) -> float:
    looked = status.prefix_cache_lookup_tokens
    return status.prefix_cache_hit_tokens / looked if looked else 0.0


def prefix_cache_json(status) -> dict:
    """The prefix cache's figures, as /metrics and `mlxsup status` show them."""
    return {"lookups": status.prefix_cache_lookups, "hits": status.prefix_cache_hits,
            "lookup_tokens": status.prefix_cache_lookup_tokens,
            "hit_tokens": status.prefix_cache_hit_tokens, "hit_rate": round(prefix_cache_hit_rate(status), 4),
            "entries": status.prefix_cache_entries, "bytes": status.prefix_cache_bytes,
            "kv_budget_bytes": status.kv_budget_bytes}


@dataclass(frozen=True)
class ControlSnapshot:
    """One consistent reading of both regions (each region is internally consistent)."""

    engine_epoch: int = 0  # incremented by each engine start
    engine_pid: int = 0
    engine_state: str = "down"  # one of ENGINE_STATES
    policy_version: int = 0
    adapter_id: str = ""  # "" = base model
    heartbeat_ns: int = 0  # time.time_ns() of the engine's last write
    queue_depth: int = 0
    num_running: int = 0
    tokens_generated: int = 0
    prefill_tokens: int = 0
    num_swaps: int = 0
    num_requests: int = 0
    # the model's limits, published once with "ready": the API checks requests against them
    vocab_size: int = 0
    context_length: int = 0  # 0: the model's config states none
    prefix_cache_lookups: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_lookup_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_entries: int = 0
    prefix_cache_bytes: int = 0
    kv_budget_bytes: int = 0
    engine_restarts: int = 0
    supervisor_pid: int = 0
    supervisor_state: str = ""

    def heartbeat_age_s(self, now_ns: int | None = None) -> float:
        """Seconds since the engine's last write (inf if it never wrote)."""
        if not self.heartbeat_ns:
            return float("inf")
        return ((now_ns if now_ns is not None else time.time_ns()) - self.heartbeat_ns) / 1e9


class ControlBlock:
    """Handle on the control-block segment. `create` (supervisor) or `attach` (others)."""

    def __init__(self, shm, *, is_owner: bool):
        self._shm = shm
        self._buf = shm.buf
        self.is_owner = is_owner
        self.name = shm.name.lstrip("/")

    @classmethod
    def create(cls, name: str) -> "ControlBlock":
        shm = create_shm(name, CONTROL_BLOCK_BYTES)
        block = cls(shm, is_owner=True)
        block._buf[:CONTROL_BLOCK_BYTES] = bytes(CONTROL_BLOCK_BYTES)
        _U64.pack_into(block._buf, _MAGIC_OFF, MAGIC)
        return block

    @classmethod
    def attach(cls, name: str) -> "ControlBlock":
        shm = attach_shm(name)
        if shm.size < CONTROL_BLOCK_BYTES or _U64.unpack_from(shm.buf, _MAGIC_OFF)[0] != MAGIC:
            close_shm(shm)
            raise ValueError(f"shared memory {name!r} is not an mlxsup control block")
        return cls(shm, is_owner=False)

    def close(self) -> None:
        """Unmap (idempotent). Never unlinks."""
        if self._shm is not None:
            self._buf = None
            close_shm(self._shm)
            self._shm = None

    def unlink(self) -> None:
        """Remove the segment's name (creator only)."""
        if not self.is_owner:
            raise PermissionError("only the creator of the control block may unlink it")
        if self._shm is not None:
            unlink_shm(self._shm)
        else:
            unlink_name(self.name)
        self.is_owner = False

    # ---------------------------------------------------------------- writers

    def write(self, **fields) -> None:
        """Update some fields of one region. The engine passes engine fields (heartbeat_ns is
        stamped with time.time_ns() unless given), the supervisor supervisor fields; mixing
        the two regions in one call is a `ValueError`."""
        if not fields:
            return
        names = set(fields)
        if names <= set(ENGINE_FIELDS):
            fields.setdefault("heartbeat_ns", time.time_ns())
            self._write_region(_ENGINE_SEQ_OFF, _ENGINE_OFF, _ENGINE, ENGINE_FIELDS, fields)
        elif names <= set(SUPERVISOR_FIELDS):
            self._write_region(
                _SUPERVISOR_SEQ_OFF, _SUPERVISOR_OFF, _SUPERVISOR, SUPERVISOR_FIELDS, fields
            )
        else:
            unknown = names - set(ENGINE_FIELDS) - set(SUPERVISOR_FIELDS)
            if unknown:
                raise ValueError(f"unknown control fields: {sorted(unknown)}")
            raise ValueError("one write() updates either engine or supervisor fields, not both")

    def _write_region(self, seq_off, off, st, names, fields) -> None:
        buf = self._buf
        # We are the only writer of this region, so its current contents need no seqlock.
        current = dict(zip(names, _unpack_region(st, names, buf, off)))
        current.update(fields)
        packed = _pack_region(st, names, current)
        (seq,) = _U64.unpack_from(buf, seq_off)
        seq |= 1  # odd: write in progress (also completes the word of a writer that died)
        _U64.pack_into(buf, seq_off, seq)
        fence()  # the odd word before the field stores
        buf[off : off + st.size] = packed
        fence()  # the field stores before the even word
        _U64.pack_into(buf, seq_off, seq + 1)

    # ---------------------------------------------------------------- readers

    def read(self) -> ControlSnapshot:
        """A consistent snapshot; retries while a write is in progress (microseconds)."""
        engine, engine_stuck = self._read_region(_ENGINE_SEQ_OFF, _ENGINE_OFF, _ENGINE)
        sup, sup_stuck = self._read_region(_SUPERVISOR_SEQ_OFF, _SUPERVISOR_OFF, _SUPERVISOR)
        values = dict(zip(ENGINE_FIELDS, _unpack_region(_ENGINE, ENGINE_FIELDS, engine, 0)))
        values.update(zip(SUPERVISOR_FIELDS, _unpack_region(_SUPERVISOR, SUPERVISOR_FIELDS, sup, 0)))
        if engine_stuck:
            values["engine_state"] = "down"
        if sup_stuck:
            values["supervisor_state"] = "down"
        return ControlSnapshot(**values)

    def _read_region(self, seq_off: int, off: int, st: struct.Struct) -> tuple[bytes, bool]:
        buf = self._buf
        unpack_seq = _U64.unpack_from
        stuck_since = stuck_seq = None
        spins = 0
        while True:
            (before,) = unpack_seq(buf, seq_off)
            if not before & 1:
                fence()  # the word load before the field loads
                raw = bytes(buf[off : off + st.size])
                fence()  # the field loads before the second word load
                (after,) = unpack_seq(buf, seq_off)
                if before == after:
                    return raw, False
                continue
            # A write is in progress: spin briefly, then yield the CPU, then judge it stuck.
            spins += 1
            if spins < 100:
                continue
            now = time.monotonic()
            if stuck_since is None or before != stuck_seq:
                stuck_since, stuck_seq = now, before
            elif now - stuck_since > STUCK_WRITER_S:
                return bytes(buf[off : off + st.size]), True
            time.sleep(0.0001)


def _unpack_region(st: struct.Struct, names: tuple, buf, off: int) -> list:
    values = list(st.unpack_from(buf, off))
    text_len, text = values[-2], values[-1]
    text = text[: min(text_len, len(text))].decode("utf-8", "replace")
    values[-2:] = [text]
    if names is ENGINE_FIELDS:
        state = values[2]
        values[2] = ENGINE_STATES[state] if state < len(ENGINE_STATES) else "down"
    return values


def _pack_region(st: struct.Struct, names: tuple, values: dict) -> bytes:
    ordered = [values[n] for n in names]
    text = ordered[-1]
    if not isinstance(text, str):
        raise ValueError(f"{names[-1]} must be a string")
    data = text.encode("utf-8")
    max_bytes = MAX_ADAPTER_ID_BYTES if names is ENGINE_FIELDS else MAX_SUPERVISOR_STATE_BYTES
    if len(data) > max_bytes:
        raise ValueError(f"{names[-1]} is {len(data)} UTF-8 bytes; at most {max_bytes} fit")
    if names is ENGINE_FIELDS:
        state = ordered[2]
        if state not in ENGINE_STATES:
            raise ValueError(f"engine_state must be one of {ENGINE_STATES}")
        ordered[2] = ENGINE_STATES.index(state)
    try:
        return st.pack(*ordered[:-1], len(data), data)
    except struct.error as e:
        raise ValueError(f"control field out of range: {e}") from None


class TokenRate:
    """Generated tokens per second from the control block's `tokens_generated` counter, over
    the samples of the last `window_s` seconds (the sample at or just before the window's start
    is the anchor). 0 after an engine restart: the new engine's counter starts again."""

    def __init__(self, window_s: float, min_span_s: float = 0.5):
        self.window_s = window_s
        self.min_span_s = min_span_s
        self.tokens_per_s = 0.0
        self._samples: "collections.deque[tuple[float, int, int]]" = collections.deque()

    def sample(self, now: float, epoch: int, tokens: int) -> float:
        """Add a reading at `now` (time.monotonic()); return the current rate."""
        samples = self._samples
        if samples and samples[-1][1] != epoch:
            samples.clear()
            self.tokens_per_s = 0.0
        samples.append((now, epoch, tokens))
        while len(samples) > 2 and now - samples[1][0] >= self.window_s:
            samples.popleft()
        then, _, before = samples[0]
        if now > then and now - then >= self.min_span_s:
            self.tokens_per_s = max(0.0, (tokens - before) / (now - then))
        return self.tokens_per_s
