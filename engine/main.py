"""The engine process: `python -m mlxsup.engine --run-dir DIR --control-fd FD --epoch N`.

Started fresh (never forked) by the supervisor. It reads `config.json` and, when present,
`adapter_state.json` from the run directory, loads the model, attaches the shared-memory IPC
and serves: requests from the API workers' rings go into the `Engine`; its events go back to
the slot that asked. The supervisor talks to it over the control socket (JSON lines, see
docs/architecture.md): `ready` once loaded, `swap` -> `swap_done`, `stop`.

Threads: the main thread owns MLX (load, generate, adapter tensors). Three helpers never touch
MLX: the control reader (socket lines -> queue), the adapter reader (files -> numpy, validated)
and the publisher, the control block's only writer, which stamps the heartbeat every 100 ms
while the main loop keeps making progress (a loop stuck for `STALL_S` goes silent, so the
supervisor's watchdog restarts the engine).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Optional

from mlxsup.config import ServerConfig
from mlxsup.ipc.control import PREFIX_CACHE_FIELDS
from mlxsup.ipc.messages import (
    ERR_INTERNAL,
    ERR_INVALID,
    ERR_OVERLOADED,
    OP_ABORT_ALL,
    OP_PAUSE,
    OP_RESUME,
    PAUSE_WAIT,
    AbortRequest,
    ControlResult,
    EngineControl,
    AbortTagged,
    ErrorEvent,
    GenerateRequest,
    Hello,
    ScoreRequest,
    ScoreResult,
    SequenceDone,
)

from .control import RECEIVED_AT, ControlLink, Publisher
from .steptrace import StepTrace

log = logging.getLogger("mlxsup.engine")

IDLE_WAIT_S = 0.1
# How long the main loop waits for a swap's adapter files before it runs the next step, so the
# swap commits at this step boundary instead of the next (a few ms against a decode step).
# Pipelined, the step queued last computes meanwhile, so a read that finishes in time is free.
SWAP_READ_WAIT_S = 0.05


def request_generation(request_id: int) -> int:
    """The slot generation a worker embeds in its request ids (bits 32..55)."""
    return (request_id >> 32) & 0xFFFFFF


class EngineProcess:
    """The main loop: IPC in, engine steps, IPC out; control commands between steps."""

    def __init__(self, engine, channel, control: ControlLink, epoch: int):
        from mlxsup.ipc.doorbell import Doorbell

        self.engine = engine
        self.channel = channel
        self.control = control
        self.epoch = epoch
        self._bell = Doorbell(channel.layout.engine_bell_path)  # helpers ring it to wake us
        self._slot_of: dict[int, int] = {}  # request id -> slot
        self._tag_of: dict[int, str] = {}  # request id -> the client's request_id, when it set one
        self._remaining: dict[int, int] = {}  # request id -> events still to come
        self._prepared: "queue.Queue[tuple]" = queue.Queue()
        self._swaps: list[dict] = []  # swap commands not yet handed to the engine
        self._swap_busy = False
        # Prepared and not committed (two-phase swaps of a fleet): hold key -> _Held. The
        # supervisor bounds how many and drops them; they die with this process.
        self._held: dict[str, _Held] = {}
        self._signals: "queue.Queue[int]" = queue.Queue()
        self._pause_waiters: list[tuple[int, int]] = []  # (slot, id) of `wait` pauses not answered
        self.stopping = False
        self.publisher = Publisher(channel.control, dict(
            engine_epoch=epoch, engine_pid=os.getpid(), engine_state="starting",
            policy_version=engine.policy_version, adapter_id=engine.adapter_path or "",
            # the limits the API checks requests against (docs/api.md, "Context length")
            vocab_size=engine.vocab_size, context_length=engine.context_length or 0))

    def wake(self) -> None:
        self._bell.ring()

    def on_signal(self, signum, frame) -> None:
        """Signal handler - no logging, just queue the signal."""
        self._signals.put(signum)
        self.wake()

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        eng = self.engine
        self._publish(state="ready")
        self.publisher.write_now()
        self.publisher.start()
        self.control.send({"op": "ready", "policy_version": eng.policy_version,
                           "adapter": eng.adapter_path, "epoch": self.epoch})
        log.info("ready: policy version %d, adapter %s", eng.policy_version,
                 eng.adapter_path or "none")
        trace = StepTrace.from_env()  # None: off
        while True:
            self._handle_signals()
            self._handle_control()
            self._handle_prepared()
            t_loop, t0 = time.monotonic(), time.perf_counter()  # (stamps for the trace)
            msgs = self.channel.poll()
            for slot, msg in msgs:
                self._dispatch(slot, msg)
            t_dispatch = time.perf_counter()
            stepped = eng.has_work()
            events = eng.step() if stepped else []
            t_step = time.perf_counter()
            self._route(events)
            t_route = time.perf_counter()
            if self._pause_waiters and (eng.paused != PAUSE_WAIT or eng.is_drained):
                # (drained, or the pause became another one or ended: nothing left to wait for)
                self._answer_pause_waiters()
            self.channel.flush()
            self._publish()
            if self.control.closed.is_set() and not self.stopping:
                log.warning("control socket closed: the supervisor is gone; stopping")
                eng.abort_all()
                self.stopping = True
            if self.stopping and not eng.has_work() and not self._swap_busy:
                break
            hint = eng.wait_hint()
            t_flush = time.perf_counter()
            if hint is None or hint > 0:
                self.channel.wait(min(hint if hint is not None else IDLE_WAIT_S, IDLE_WAIT_S))
            if trace is not None:
                runner_s, post_s, admitted, admitted_tokens = eng.last_step if stepped else (
                    0.0, 0.0, 0, 0)
                trace.record(t_loop, t_dispatch - t0, len(msgs),
                             t_step - t_dispatch, runner_s, post_s, t_route - t_step, len(events),
                             t_flush - t_route, time.perf_counter() - t_flush,
                             eng.runner.num_rows, admitted, admitted_tokens,
                             eng.scheduler.queue_depth)
        if trace is not None:
            trace.flush()
        self._drain_outbox()
        self.publisher.finish(engine_state="down")
        log.info("stopped")
        return 0

    def _publish(self, state: Optional[str] = None) -> None:
        s = self.engine.stats()
        fields = dict(
            policy_version=s["policy_version"], adapter_id=s["adapter_path"] or "",
            queue_depth=s["queue_depth"], num_running=s["num_running"],
            tokens_generated=s["tokens_generated"], prefill_tokens=s["prefill_tokens"],
            num_swaps=s["num_swaps"], num_requests=s["num_requests"],
            **{k: s[k] for k in PREFIX_CACHE_FIELDS},
        )
        if state is None:
            swap = self.engine.pending_swap
            state = "stopping" if self.stopping else "paused" if s["paused"] else (
                "draining" if swap is not None and swap.mode == "drain" else "ready")
        fields["engine_state"] = state
        self.publisher.update(**fields)

    def _drain_outbox(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while self.channel.has_backlog() and time.monotonic() < deadline:
            self.channel.wait(0.05)
            self.channel.flush()

    # ------------------------------------------------------------------ requests

    def _dispatch(self, slot: int, msg) -> None:
        eng = self.engine
        if isinstance(msg, Hello):
            # A new worker owns the slot: the old one's requests have nobody to answer.
            for rid, s in list(self._slot_of.items()):
                if s == slot and request_generation(rid) != (msg.generation & 0xFFFFFF):
                    self._forget(rid)
                    eng.abort(rid)
            return
        if isinstance(msg, AbortRequest):
            if self._slot_of.get(msg.request_id) == slot:
                eng.abort(msg.request_id)
            return
        if isinstance(msg, EngineControl):
            self._control(slot, msg)
            return
        if isinstance(msg, AbortTagged):  # any worker's requests: a scan of those in flight
            for rid in [r for r, tag in self._tag_of.items() if tag == msg.tag]:
                eng.abort(rid)
            return
        if not isinstance(msg, (GenerateRequest, ScoreRequest)):
            return
        rid = msg.request_id
        if self.stopping:
            self.channel.send(slot, ErrorEvent(rid, ERR_OVERLOADED, "the engine is stopping"))
            return
        from .core import RequestError
        from .scheduler import QueueFull

        try:
            eng.submit(msg)
        except QueueFull as e:
            self.channel.send(slot, ErrorEvent(rid, ERR_OVERLOADED, str(e)))
            return
        except RequestError as e:
            self.channel.send(slot, ErrorEvent(rid, ERR_INVALID, str(e), e.field))
            return
        except Exception as e:  # never let a request take the engine down
            log.exception("submit failed")
            self.channel.send(slot, ErrorEvent(rid, ERR_INTERNAL, f"submit failed: {e}"))
            return
        self._slot_of[rid] = slot
        if msg.tag:
            self._tag_of[rid] = msg.tag
        self._remaining[rid] = msg.n if isinstance(msg, GenerateRequest) else 1

    def _control(self, slot: int, msg: EngineControl) -> None:
        """vLLM's pause family. A `wait` pause answers once in-flight work is done."""
        eng = self.engine
        num_aborted = 0
        if msg.op == OP_PAUSE:
            num_aborted = eng.pause(msg.mode)
            log.info("paused (%s): %d requests aborted", msg.mode, num_aborted)
        elif msg.op == OP_RESUME:
            if eng.paused is not None:
                log.info("resumed")
            eng.resume()
        elif msg.op == OP_ABORT_ALL:
            num_aborted = eng.abort_all()
        self._publish()
        if msg.op == OP_PAUSE and msg.mode == PAUSE_WAIT and not eng.is_drained:
            self._pause_waiters.append((slot, msg.request_id))
            return
        self.channel.send(slot, ControlResult(msg.request_id, eng.paused is not None,
                                              eng.paused or "", num_aborted))

    def _answer_pause_waiters(self) -> None:
        eng = self.engine
        for slot, rid in self._pause_waiters:
            self.channel.send(slot, ControlResult(rid, eng.paused is not None, eng.paused or ""))
        self._pause_waiters = []

    def _forget(self, rid: int) -> None:
        self._slot_of.pop(rid, None)
        self._tag_of.pop(rid, None)
        self._remaining.pop(rid, None)

    def _route(self, events) -> None:
        for ev in events:
            rid = ev.request_id
            slot = self._slot_of.get(rid)
            if slot is None:
                continue  # its worker is gone
            self.channel.send(slot, ev)
            if isinstance(ev, SequenceDone):
                self._remaining[rid] -= 1
                if self._remaining[rid] <= 0:
                    self._forget(rid)
            elif isinstance(ev, (ScoreResult, ErrorEvent)):
                self._forget(rid)

    # ------------------------------------------------------------------ control

    def _handle_signals(self) -> None:
        while not self._signals.empty():
            signum = self._signals.get()
            log.info("signal %d: stopping (aborting in-flight work)", signum)
            self._stop(drain=False)

    def _handle_control(self) -> None:
        while not self.control.inbox.empty():
            msg = self.control.inbox.get()
            op = msg.get("op")
            if op == "swap":
                self._swaps.append(msg)
            elif op == "stop":
                self._stop(drain=bool(msg.get("drain", True)))
            elif op == "drop_prepared":
                dropped = self._held.pop(str(msg.get("hold")), None) is not None
                self.control.send({"op": "drop_prepared_done", "id": msg.get("id"), "ok": True,
                                   "dropped": dropped})
            elif op == "reset_prefix_cache":
                dropped = self.engine.reset_prefix_cache()
                self.control.send({"op": "reset_prefix_cache_done", "id": msg.get("id"), "ok": True,
                                   "entries_dropped": dropped})
            else:
                log.warning("unknown control op: %r", msg)
        if self._swaps and not self._swap_busy:
            self._start_swap(self._swaps.pop(0))

    def _stop(self, drain: bool) -> None:
        if not drain:
            self.engine.abort_all()
        self.stopping = True
        self._publish(state="stopping")

    def _start_swap(self, msg: dict) -> None:
        swap_id, path, mode, version = msg.get("id"), msg.get("path"), msg.get("mode", "drain"), \
            msg.get("version")
        self._swap_busy = True
        started = time.perf_counter()
        is_weights = msg.get("kind") == "weights"
        if msg.get("prepared") is not None:  # commit what an earlier `hold` swap prepared
            held = self._held.pop(str(msg["prepared"]), None)
            if held is None:
                self._swap_failed(swap_id, "not_found",
                                  f"no prepared swap {msg['prepared']!r} in this engine")
                return
            self._prepared.put((msg, held, started, held.read_ms))
            return
        if path is None and not is_weights:
            self._prepared.put((msg, None, started, 0.0))
            return
        reader_of = self.engine.weights.read if is_weights else self.engine.adapters.read

        def read():
            try:
                files = reader_of(path)  # numpy only: safe off the engine thread
            except Exception as e:  # AdapterError or anything unexpected
                files = e
            self._prepared.put((msg, files, started, (time.perf_counter() - started) * 1e3))
            self.wake()

        reader = threading.Thread(target=read, name="engine-adapter-reader", daemon=True)
        reader.start()
        log.info("swap %s: reading %s (mode %s, version %s)", swap_id, path, mode, version)
        reader.join(SWAP_READ_WAIT_S)  # usually done: _handle_prepared commits this iteration

    def _handle_prepared(self) -> None:
        from .adapter_files import AdapterError

        while not self._prepared.empty():
            msg, files, started, read_ms = self._prepared.get()
            swap_id = msg.get("id")
            try:
                if isinstance(files, Exception):
                    raise files
                if isinstance(files, _Held):
                    prepared, names = files.prepared, files.names
                elif msg.get("kind") == "weights":
                    prepared = self.engine.prepare_weights(files)
                    names = prepared.names
                else:
                    prepared, names = self.engine.prepare_adapter(files), None
                ready = time.perf_counter()
                prepare_ms = (ready - started) * 1e3
                if isinstance(files, _Held):
                    prepare_ms = files.prepare_ms
                elif msg.get("hold") is not None:  # prepare only: keep it for a later commit
                    self._held[str(msg["hold"])] = _Held(prepared, names, read_ms, prepare_ms)
                    self._swap_busy = False
                    self.control.send({"op": "swap_done", "id": swap_id, "ok": True, "held": True,
                                       "read_ms": round(read_ms, 3),
                                       "prepare_ms": round(prepare_ms, 3)})
                    log.info("swap %s prepared and held as %s (read %.1f ms, prepare %.1f ms)",
                             swap_id, msg["hold"], read_ms, prepare_ms)
                    continue
                version = msg.get("version")
                if not isinstance(version, int) or isinstance(version, bool):
                    raise ValueError("swap version must be an integer")

                def done(ticket, swap_id=swap_id, prepare_ms=prepare_ms, read_ms=read_ms,
                         ready=ready, names=names):
                    self._swap_busy = False
                    wait_ms = (time.perf_counter() - ready) * 1e3 - ticket.commit_ms
                    # The control block shows the new version before anyone learns of the swap.
                    self._publish()
                    self.publisher.write_now()
                    self.control.send({"op": "swap_done", "id": swap_id, "ok": True,
                                       "policy_version": ticket.policy_version,
                                       "read_ms": round(read_ms, 3),
                                       "prepare_ms": round(prepare_ms, 3),
                                       "wait_ms": round(wait_ms, 3),
                                       "commit_ms": round(ticket.commit_ms, 3),
                                       **({"tensors": names} if names is not None else {})})
                    log.info("swap %s committed: version %d, %s (read %.1f ms, prepare %.1f ms, "
                             "wait %.1f ms, commit %.2f ms)", swap_id, ticket.policy_version,
                             ticket.adapter_path or "base model", read_ms, prepare_ms, wait_ms,
                             ticket.commit_ms)

                received = msg.get(RECEIVED_AT, started)  # the control reader's stamp

                def first_token(ticket, swap_id=swap_id, received=received):
                    t = ticket.first_token_at
                    ms = round((t - received) * 1e3, 3)
                    after_commit = round((t - ticket.committed_at) * 1e3, 3)
                    self.control.send({"op": "swap_first_token", "id": swap_id,
                                       "policy_version": ticket.policy_version,
                                       "first_token_ms": ms,
                                       "commit_to_first_token_ms": after_commit,
                                       "running_at_commit": ticket.running_at_commit})
                    log.info("swap %s: first token of version %d %.1f ms after receipt "
                             "(%.1f ms after the commit, %d rows running then)", swap_id,
                             ticket.policy_version, ms, after_commit, ticket.running_at_commit)

                self.engine.request_swap(prepared, msg.get("mode", "drain"), version, on_done=done,
                                         on_first_token=first_token)
            except AdapterError as e:  # WeightError too
                invalid = "invalid_weights" if msg.get("kind") == "weights" else "invalid_adapter"
                self._swap_failed(swap_id, "not_found" if e.kind == "not_found" else invalid,
                                  str(e))
            except (ValueError, RuntimeError) as e:
                self._swap_failed(swap_id, "bad_request", str(e))
            except Exception as e:
                log.exception("swap %s failed", swap_id)
                self._swap_failed(swap_id, "internal", str(e))

    def _swap_failed(self, swap_id, kind: str, message: str) -> None:
        self._swap_busy = False
        log.warning("swap %s refused: %s", swap_id, message)
        self.control.send({"op": "swap_done", "id": swap_id, "ok": False,
                           "error": {"type": kind, "message": message}})


@dataclasses.dataclass
class _Held:
    """A swap prepared (MLX arrays evaluated, validated against the model) and not committed."""

    prepared: object  # PreparedAdapter
    names: Optional[list]
    read_ms: float
    prepare_ms: float


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlxsup.engine",
                                description="mlxsup's engine process (started by the supervisor)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--control-fd", type=int, help="the supervisor's end of the control socket "
                   "(rank 0; a follower has none)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--distributed", metavar="BACKEND",
                   help="one rank of a sharded engine: join the mx.distributed group over BACKEND "
                   "(the rank and the backend's addresses come from the environment, as "
                   "mlx.launch sets them)")
    p.add_argument("--follower", action="store_true",
                   help="a rank other than 0: run rank 0's plans, serve nothing itself")
    args = p.parse_args(argv)
    if args.follower and not args.distributed:
        p.error("--follower needs --distributed BACKEND")
    if not args.follower and args.control_fd is None:
        p.error("--control-fd is required (except for a --follower)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = ServerConfig.load(args.run_dir)
    group, rank_tag = None, ""
    if args.distributed:
        from . import distributed

        group = distributed.init_group(args.distributed)  # blocks until every rank joined
        rank_tag = f" rank {group.rank()}/{group.size()}"
        if (group.rank() != 0) != args.follower:
            raise SystemExit(f"rank {group.rank()} started as "
                             f"{'a follower' if args.follower else 'rank 0'}: MLX_RANK is wrong")
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format=f"%(asctime)s engine[%(process)d]{rank_tag} %(levelname)s %(message)s")
    import mlx.core as mx

    from .config import EngineConfig
    from .core import Engine

    from mlxsup.supervisor.state import read_state

    state = read_state(args.run_dir)
    state_version = state.policy_version if state is not None else None
    adapter = state.adapter_path if state is not None else cfg.adapter_path
    weight_dirs = tuple(p for p, _ in state.weights) if state is not None else ()
    model = cfg.model
    if model is None:
        from mlxsup.demo import ensure_demo_model

        model = ensure_demo_model()
    ecfg = dataclasses.replace(EngineConfig.from_server_config(cfg, model=model),
                               adapter_path=adapter, weight_dirs=weight_dirs)
    if args.follower:
        log.info("epoch %d: loading this rank's shard of %s", args.epoch, model)
        engine = distributed.sharded_engine(ecfg, state_version or 0)
        log.info("following rank 0")
        num_plans = distributed.follow(engine, group)
        log.info("rank 0 released this rank after %d plans", num_plans)
        return 0

    from mlxsup.ipc.channel import EngineChannel
    from mlxsup.ipc.layout import IpcLayout

    channel = EngineChannel(IpcLayout.load(args.run_dir))
    channel.control.write(engine_epoch=args.epoch, engine_pid=os.getpid(),
                          engine_state="starting")
    log.info("epoch %d: loading %s (%d weight update(s), adapter %s, version %d)%s", args.epoch,
             model, len(weight_dirs), adapter or "none", state_version or 0,
             f", sharded over {group.size()} ranks ({args.distributed})" if group else "")
    t0 = time.perf_counter()
    leader = None
    if group is None:
        engine = Engine(ecfg, policy_version=state_version or 0)
    else:
        engine = distributed.sharded_engine(ecfg, state_version or 0)
        leader = distributed.lead(engine, group)
    log.info("loaded in %.1f s", time.perf_counter() - t0)
    if ecfg.warm_up or (ecfg.warm_up is None and mx.default_device() != mx.cpu):
        log.info("warmed up in %.1f s", engine.warm_up())
    proc: Optional[EngineProcess] = None
    control = ControlLink(args.control_fd, wake=lambda: proc.wake() if proc else None)
    proc = EngineProcess(engine, channel, control, args.epoch)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, proc.on_signal)
    try:
        code = proc.run()
        if leader is not None:
            leader.stop()  # the followers return from follow() and exit
        return code
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
