"""Benchmark the shared-memory rings against multiprocessing.Queue and an AF_UNIX socketpair.

Between two processes (spawned), in one run:
  * round trip (send a message, get the same bytes back): p50 / p99
  * one-way throughput (stream messages, one small ack at the end)
for 1 KiB and 64 KiB messages; then the request/response rate of an asyncio caller
(WorkerChannel, 64 requests in flight) against an engine loop (EngineChannel) in another
process, with real codec messages.

    python scripts/bench_ipc.py            # prints a markdown table
    python scripts/bench_ipc.py --quick    # fewer iterations
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections import deque

from mlxsup.ipc.channel import EngineChannel, WorkerChannel
from mlxsup.ipc.doorbell import Doorbell
from mlxsup.ipc.framing import MessageConsumer, MessageProducer, wait_for_work
from mlxsup.ipc.layout import IpcLayout
from mlxsup.ipc.messages import GenerateRequest, SamplingParams, SequenceDone
from mlxsup.ipc.ring import Ring
from mlxsup.ipc.segments import create_ipc
from mlxsup.ipc.shm import attach_shm, close_shm

CTX = mp.get_context("spawn")
LEN = struct.Struct("<I")
ACK = b"k"


# ---------------------------------------------------------------- ring transport (raw bytes)


class RingEnd:
    """One side of a duplex byte-message link over slot 0's ring pair."""

    def __init__(self, layout: IpcLayout, is_client: bool, spin_s: float):
        self.spin_s = spin_s
        self._shms = [attach_shm(layout.request_ring_name(0)), attach_shm(layout.response_ring_name(0))]
        self._rings = [Ring(s.buf) for s in self._shms]
        request, response = self._rings
        engine_bell = Doorbell(layout.engine_bell_path)
        slot_bell = Doorbell(layout.slot_bell_path(0))
        self._bells = [engine_bell, slot_bell]
        if is_client:  # writes requests, reads responses, sleeps on the slot bell
            self.out = MessageProducer(request, consumer_bell=engine_bell)
            self.inp = MessageConsumer(response, producer_bell=engine_bell)
            self.bell = slot_bell
        else:
            self.out = MessageProducer(response, consumer_bell=slot_bell)
            self.inp = MessageConsumer(request, producer_bell=slot_bell)
            self.bell = engine_bell
        self._pending: deque = deque()

    def send(self, payload, publish: bool = True) -> None:
        """publish=False: queue only; the next send with publish=True publishes the batch
        (how the engine works: send every event of a step, flush once)."""
        self.out.send(payload)
        while publish and not self.out.flush():
            wait_for_work(self.bell, [self.inp], [self.out], timeout=0.05)

    def recv(self) -> bytes:
        while not self._pending:
            self._pending.extend(self.inp.receive())
            if not self._pending:
                wait_for_work(self.bell, [self.inp], [self.out] if self.out.pending else [], 0.05, self.spin_s)
                if self.out.pending:
                    self.out.flush()
        return self._pending.popleft()

    def close(self) -> None:
        for ring in self._rings:
            ring.release()
        for shm in self._shms:
            close_shm(shm)
        for bell in self._bells:
            bell.close()


# ---------------------------------------------------------------- socketpair transport


class SockEnd:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray(1 << 20)

    def send(self, payload) -> None:
        self.sock.sendall(LEN.pack(len(payload)) + payload)

    def _exact(self, n: int) -> memoryview:
        view = memoryview(self._buf)[:n]
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if not k:
                raise EOFError
            got += k
        return view

    def recv(self) -> bytes:
        (n,) = LEN.unpack(self._exact(4))
        return bytes(self._exact(n))

    def close(self) -> None:
        self.sock.close()


class QueueEnd:
    def __init__(self, out_q, in_q):
        self.out_q, self.in_q = out_q, in_q

    def send(self, payload) -> None:
        self.out_q.put(payload)

    def recv(self) -> bytes:
        return self.in_q.get()

    def close(self) -> None:
        pass


def make_end(kind: str, arg, is_client: bool, spin_s: float):
    if kind == "ring":
        return RingEnd(arg, is_client, spin_s)
    if kind == "socketpair":
        return SockEnd(arg)
    return QueueEnd(*arg) if is_client else QueueEnd(arg[1], arg[0])


def server(kind: str, arg, mode: str, count: int, spin_s: float) -> None:
    end = make_end(kind, arg, False, spin_s)
    for _ in range(count):
        msg = end.recv()
        if mode == "echo":
            end.send(msg)
    if mode == "sink":
        end.send(ACK)
    end.recv()  # the client's goodbye: keeps our resources alive until it is done
    end.close()


def run_pair(kind: str, size: int, mode: str, count: int, spin_s: float, batch: int = 1) -> dict:
    tmp = tempfile.mkdtemp(prefix="mxs-bench-")
    resources = None
    if kind == "ring":
        layout = IpcLayout(tmp, os.urandom(4).hex(), 1)
        resources = create_ipc(layout)
        client_arg = server_arg = layout
    elif kind == "socketpair":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client_arg, server_arg = a, b
    else:
        q1, q2 = CTX.Queue(), CTX.Queue()
        client_arg = server_arg = (q1, q2)
    proc = CTX.Process(target=server, args=(kind, server_arg, mode, count, spin_s), daemon=True)
    proc.start()
    if kind == "socketpair":
        b.close()
    end = make_end(kind, client_arg, True, spin_s)
    payload = os.urandom(size)
    try:
        end.send(payload)  # warm-up, also waits for the child to be up
        if mode == "echo":
            end.recv()
            times = []
            for _ in range(count - 1):
                t0 = time.perf_counter_ns()
                end.send(payload)
                reply = end.recv()
                times.append(time.perf_counter_ns() - t0)
                if len(reply) != size:
                    raise RuntimeError("short reply")
            times.sort()
            result = {"p50_us": times[len(times) // 2] / 1e3, "p99_us": times[int(len(times) * 0.99)] / 1e3}
        else:
            t0 = time.perf_counter()
            if batch > 1:
                for i in range(1, count):
                    end.send(payload, publish=i % batch == 0 or i == count - 1)
            else:
                for _ in range(count - 1):
                    end.send(payload)
            end.recv()  # the ack: everything arrived
            elapsed = time.perf_counter() - t0
            result = {"msg_per_s": (count - 1) / elapsed, "mb_per_s": (count - 1) * size / elapsed / 1e6}
        end.send(b"bye")
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
        end.close()
        if resources is not None:
            resources.destroy()
        os.rmdir(tmp) if not os.listdir(tmp) else None
    return result


# ---------------------------------------------------------------- asyncio request/response


def engine_echo(run_dir: str, stop, num_tokens: int) -> None:
    channel = EngineChannel(IpcLayout.load(run_dir))
    tokens, logprobs, versions = list(range(num_tokens)), [-0.5] * num_tokens, [0] * num_tokens
    while not stop.is_set():
        requests = channel.poll()
        for slot, req in requests:
            if isinstance(req, GenerateRequest):
                done = SequenceDone(req.request_id, 0, "length", tokens, logprobs, versions, len(req.prompt_ids), 1, 0)
                channel.send(slot, done)
        channel.flush()
        if not requests:
            channel.wait(0.05)
    channel.close()


async def caller(layout: IpcLayout, in_flight: int, duration: float, prompt_len: int) -> dict:
    channel = await WorkerChannel.open(layout)
    params = SamplingParams(max_tokens=16, logprobs_mode="processed")
    prompt = list(range(prompt_len))
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def one_client():
        while time.perf_counter() < deadline:
            rid = channel.new_request_id()
            queue = channel.register(rid)
            t0 = time.perf_counter()
            await channel.send(GenerateRequest(rid, prompt, params))
            await queue.get()
            latencies.append(time.perf_counter() - t0)
            channel.unregister(rid)

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(in_flight)))
    elapsed = time.perf_counter() - t0
    await channel.close()
    latencies.sort()
    return {
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


def run_asyncio(in_flight: int, duration: float) -> tuple[dict, str]:
    tmp = tempfile.mkdtemp(prefix="mxs-bench-")
    resources = create_ipc(IpcLayout(tmp, os.urandom(4).hex(), 2))
    stop = CTX.Event()
    proc = CTX.Process(target=engine_echo, args=(tmp, stop, 16), daemon=True)
    proc.start()
    try:
        try:
            import uvloop

            loop_name = "uvloop"
            runner = uvloop.run if hasattr(uvloop, "run") else None
        except ImportError:
            loop_name, runner = "asyncio", None
        coro = caller(IpcLayout.load(tmp), in_flight, duration, prompt_len=256)
        result = runner(coro) if runner else asyncio.run(coro)
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        resources.destroy()
    return result, loop_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--spin-us", type=float, default=0.0, help="ring waiters poll this long before sleeping")
    args = parser.parse_args(argv)
    scale = 0.2 if args.quick else 1.0
    spin_s = args.spin_us / 1e6
    rows = []
    for size, label in ((1024, "1 KiB"), (65536, "64 KiB")):
        n = int((200_000 if size == 1024 else 20_000) * scale)
        for kind in ("ring", "socketpair", "mp.Queue"):
            rt = run_pair(kind, size, "echo", int(5000 * scale), spin_s)
            tp = run_pair(kind, size, "sink", n, spin_s)
            rows.append((label, kind, f"{rt['p50_us']:.1f}", f"{rt['p99_us']:.1f}", tp["msg_per_s"], tp["mb_per_s"]))
            print(f"  {label:>6} {kind:<10} done", file=sys.stderr)
        if size == 1024:  # the engine's pattern: send every event of a step, then flush once
            tp = run_pair("ring", size, "sink", n, spin_s, batch=64)
            rows.insert(-2, (label, "ring, publish per 64", "-", "-", tp["msg_per_s"], tp["mb_per_s"]))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, ring spin {args.spin_us:g} us\n")
    print("| size | transport | RTT p50 (us) | RTT p99 (us) | one-way msg/s | one-way MB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for label, kind, p50, p99, mps, mbps in rows:
        print(f"| {label} | {kind} | {p50} | {p99} | {mps:,.0f} | {mbps:,.0f} |")
    result, loop_name = run_asyncio(64, 3.0 * (0.5 if args.quick else 1.0))
    print(
        f"\nasyncio caller ({loop_name}), 64 in flight, GenerateRequest (256-token prompt) -> "
        f"SequenceDone (16 tokens + log-probs) through WorkerChannel/EngineChannel:\n"
        f"{result['req_per_s']:,.0f} req/s, latency p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
