"""The supervisor process: parent of the engine and of the gunicorn master.

Shaped after gunicorn's arbiter: `Arbiter` is the one owner of the child table; signal
handlers only enqueue; the main loop dispatches `handle_<signal>`, reaps children with
non-blocking waits, watches the engine's heartbeat (a hung engine is alive but not beating),
and restarts what died with exponential backoff. A child that never booted is a boot
failure: the server stops with the reason and `EXIT_BOOT_ERROR` instead of spinning.

The supervisor never imports mlx; it owns the run directory, the shared-memory segments, the
control socket and the committed-adapter state, and it is the only authority for swaps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import time
from typing import Callable, Optional

import orjson
import psutil

from mlxsup.blas import engine_env
from mlxsup.config import ENGINE_HEARTBEAT_TIMEOUT_S, EXIT_BOOT_ERROR, EXIT_ERROR, EXIT_OK, ServerConfig
from mlxsup.supervisor import ipc_glue, protocol, ranks, weight_store
from mlxsup.supervisor.backoff import Backoff
from mlxsup.supervisor.children import (
    MARK_ENV,
    Child,
    child_env,
    kill_all,
    remove_children_file,
    spawn,
    write_children,
)
from mlxsup.supervisor.commands import GUNICORN_GRACEFUL_S, describe_exit, engine_argv, gunicorn_argv
from mlxsup.supervisor.control_server import ControlServer
from mlxsup.supervisor.engine_link import EngineControlLink, EngineGone
from mlxsup.supervisor.health import get_health, is_healthy
from mlxsup.supervisor.rundir import PID_NAME, log_size, log_tail, write_pid
from mlxsup.supervisor.state import AdapterState, initial_state, read_state, state_path, write_state
from mlxsup.supervisor.status import ProcessSampler
from mlxsup.supervisor.swaps import PREPARED_TTL_S, SwapCoordinator, error_reply

log = logging.getLogger("mlxsup.supervisor")

TICK_S = 0.25
ENGINE_BOOT_TIMEOUT_S = 1800.0  # a first start may download the model (a Hugging Face repo id)
ENGINE_RESTART_TIMEOUT_S = 600.0  # a restart loads from the local cache
ENGINE_STOP_TIMEOUT_S = 60.0
MAX_ENGINE_BOOT_FAILURES = 5  # consecutive restarts that never became ready
API_BOOT_TIMEOUT_S = 120.0
SWAP_ENGINE_WAIT_S = 120.0  # a swap waits this long for a restarting engine
SAMPLE_S = 2.0

ENGINE_LOG = "engine.log"
API_LOG = "api.log"


class Arbiter:
    """Runs one server instance until it is told to stop; `run()` returns the exit code.

    `engine_cmd` and `api_cmd` build the children's command lines (tests pass stand-ins)."""

    def __init__(
        self,
        config: ServerConfig,
        notify_fd: Optional[int] = None,
        lock_fd: Optional[int] = None,
        engine_cmd: Callable[[ServerConfig, int, int], list[str]] = engine_argv,
        api_cmd: Callable[[ServerConfig], list[str]] = gunicorn_argv,
    ):
        self.config = config
        self.engine_cmd = engine_cmd
        self.api_cmd = api_cmd
        self.run_dir = config.run_dir
        self.notify_fd = notify_fd
        self.lock_fd = lock_fd  # flock on the run dir, held for the supervisor's lifetime
        self.instance_id = secrets.token_hex(4)
        self.started_at = time.time()

        self.engine: Optional[Child] = None  # rank 0 of a sharded engine
        self.followers: list[Child] = []  # the other ranks of a sharded engine, in rank order
        self.group: Optional[ranks.RankGroup] = None  # None: a one-rank engine
        self.gunicorn: Optional[Child] = None
        self.link: Optional[EngineControlLink] = None
        self.epoch = 0
        self.engine_restarts = 0
        self.is_engine_ready = False
        self.has_engine_been_ready = False
        self.num_engine_boot_failures = 0
        self.engine_backoff = Backoff()
        self.engine_restart_at: Optional[float] = None
        self.gunicorn_backoff = Backoff()
        self.gunicorn_restart_at: Optional[float] = None
        self.num_gunicorn_restarts = 0
        self.is_healthy = False

        self.swaps = SwapCoordinator(self.run_dir, AdapterState())
        self.sampler = ProcessSampler(self.process_table)
        self._last_sample = 0.0
        self._engine_log_at = self._api_log_at = 0
        self.ipc = None
        self.control_server: Optional[ControlServer] = None
        self.is_running = True
        self.is_stopping = False
        self.is_graceful = True
        self.exit_code = EXIT_OK
        self.stop_reason: Optional[str] = None
        self._notified = False
        self._published = ""
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        try:
            asyncio.run(self._main())
        except Exception as e:  # a bug: still tell the launcher and clean up what we can
            log.exception("supervisor failed")
            self.exit_code = EXIT_ERROR
            self._notify({"ok": False, "error": f"supervisor failed: {e!r}", "exit_code": EXIT_ERROR})
            self._emergency_cleanup()
        return self.exit_code

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self.sig_queue: asyncio.Queue = asyncio.Queue()
        self.engine_ready_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD):
            loop.add_signal_handler(sig, self.signal, sig)
        try:
            await self._setup()
        except Exception as e:
            log.exception("setup failed")
            self.exit_code = EXIT_ERROR
            self.stop_reason = f"setup failed: {e}"
            self.is_running = False
        while self.is_running:
            try:
                sig = await asyncio.wait_for(self.sig_queue.get(), TICK_S)
            except asyncio.TimeoutError:
                sig = None
            if sig is not None:
                self.dispatch(sig)
            self.reap()
            self.check_engine()
            self.check_gunicorn()
            self.publish_state()
            self.sample()
        await self.shutdown()

    async def _setup(self) -> None:
        config = self.config
        write_pid(self.run_dir)
        config.save()
        state = initial_state(read_state(self.run_dir), config.adapter_path)
        write_state(self.run_dir, state)
        weight_store.remove_unlisted(self.run_dir, [p for p, _ in state.weights])
        self.group = ranks.group_of(config)
        self.swaps = SwapCoordinator(self.run_dir, state)
        self.ipc = ipc_glue.create(self.run_dir, self.instance_id, config.num_slots)
        self.publish_state()
        self.control_server = ControlServer(protocol.socket_path(self.run_dir), self.handle_request)
        await self.control_server.start()
        log.info(
            "supervisor %d: instance %s, run dir %s, model %s, policy version %d (%s)",
            os.getpid(), self.instance_id, self.run_dir, config.model,
            self.swaps.state.policy_version, self.swaps.state.adapter_path or "base model",
        )  # fmt: skip
        self.spawn_engine()

    def signal(self, sig: int) -> None:
        """Signal handler - no logging, no work: just queue the signal for the main loop."""
        self.sig_queue.put_nowait(sig)

    def dispatch(self, sig) -> None:
        name = sig if isinstance(sig, str) else signal.Signals(sig).name[3:].lower()
        handler = getattr(self, f"handle_{name}", None)
        if handler is not None:
            handler()

    def handle_chld(self) -> None:
        pass  # reap() runs after every dispatch

    def handle_term(self) -> None:
        log.info("SIGTERM: graceful stop")
        self.begin_stop(graceful=True)

    def handle_int(self) -> None:
        log.info("SIGINT: graceful stop")
        self.begin_stop(graceful=True)

    def handle_quit(self) -> None:
        log.info("SIGQUIT: quick stop (in-flight requests are aborted)")
        self.begin_stop(graceful=False)

    def handle_stop(self) -> None:
        log.info("stop requested on the control socket: graceful stop")
        self.begin_stop(graceful=True)

    def handle_hup(self) -> None:
        if self.gunicorn is not None:
            log.info("SIGHUP: reloading API workers")
            self._signal_child(self.gunicorn, signal.SIGHUP)

    def begin_stop(self, graceful: bool) -> None:
        self.is_running = False
        self.is_graceful = self.is_graceful and graceful

    def fail_boot(self, reason: str) -> None:
        log.error("%s; stopping the server", reason)
        self.exit_code = EXIT_BOOT_ERROR
        self.stop_reason = reason
        self.begin_stop(graceful=False)

    # ------------------------------------------------------------------ children

    def children(self) -> list[Child]:
        return [c for c in (self.engine, *self.followers, self.gunicorn) if c is not None]

    def engine_ranks(self) -> list[Child]:
        """The engine's processes: rank 0, then the followers (a local ssh for a remote one)."""
        return [c for c in (self.engine, *self.followers) if c is not None]

    def _record_children(self) -> None:
        try:
            write_children(self.run_dir, self.children())
        except OSError as e:
            log.warning("could not record children: %s", e)

    def reap(self) -> None:
        for child in self.children():
            returncode = child.proc.poll()  # waitpid(pid, WNOHANG)
            if returncode is None:
                continue
            if child is self.engine or child in self.followers:
                self.on_engine_exit(child, returncode)
            elif child is self.gunicorn:
                self.on_gunicorn_exit(child, returncode)
            self._record_children()

    def _signal_child(self, child: Child, sig: int) -> None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    # ------------------------------------------------------------------ engine

    def spawn_engine(self) -> None:
        self.epoch += 1
        ours, theirs = socket.socketpair()
        env = child_env(engine_env(os.environ, self.config.blas), self.run_dir)
        argv = self.engine_cmd(self.config, theirs.fileno(), self.epoch)
        engine_log = os.path.join(self.run_dir, ENGINE_LOG)
        self._engine_log_at = log_size(engine_log)
        try:
            launches = self._rank_launches(argv)
            self.engine = spawn(
                "engine", launches[0].argv, {**env, **launches[0].env}, engine_log,
                pass_fds=[theirs.fileno()], death_signal=signal.SIGKILL, epoch=self.epoch,
            )  # fmt: skip
            for launch in launches[1:]:  # the followers: all of a group's ranks log to engine.log
                self.followers.append(spawn(
                    f"rank-{launch.rank}", launch.argv, {**env, **launch.env}, engine_log,
                    death_signal=signal.SIGKILL, epoch=self.epoch,
                ))  # fmt: skip
        except OSError as e:
            ours.close()
            self._kill_ranks()
            self.engine = None
            self.fail_boot(f"could not start the engine: {e}")
            return
        finally:
            theirs.close()
        self.is_engine_ready = False
        self.engine_ready_event.clear()
        self.engine_restart_at = None
        self.link = EngineControlLink(ours, self.epoch, self.on_engine_ready,
                               lambda msg: self.swaps.note_first_token(msg))
        self._spawn_task(self.link.start())
        self._record_children()
        log.info("engine epoch %d started: pid %d", self.epoch, self.engine.pid)
        for launch, child in zip(launches[1:], self.followers):
            log.info("engine epoch %d rank %d started on %s: pid %d%s", self.epoch, launch.rank,
                     launch.host, child.pid, "" if launch.is_local else " (ssh)")

    def _rank_launches(self, rank0_argv: list[str]) -> list[ranks.RankLaunch]:
        """How to start each rank of this epoch's engine (one launch for a one-rank engine)."""
        if self.group is None:
            return [ranks.RankLaunch(0, "localhost", tuple(rank0_argv), {}, True)]
        try:
            with open(state_path(self.run_dir)) as f:
                state_json = f.read()
        except OSError:
            state_json = ""
        return ranks.plan(self.group, rank0_argv, self.config, self.epoch, state_json)

    def _kill_ranks(self, spare: Optional[Child] = None) -> None:
        """SIGKILL every rank of the engine but `spare` (the one already dead) and reap them:
        a sharded engine lives and dies as one (the others would wait in their next collective
        forever), and the next epoch's ranks need their ports."""
        for child in self.engine_ranks():
            if child is not spare and child.proc.poll() is None:
                child.proc.kill()
        for child in self.engine_ranks():
            if child is not spare:
                try:
                    child.proc.wait(timeout=10.0)
                except Exception:  # subprocess.TimeoutExpired: a process in the kernel's hands
                    log.warning("%s (pid %d) did not die on SIGKILL within 10 s", child.role, child.pid)
        self.followers = []

    def on_engine_ready(self, msg: dict) -> None:
        if self.link is None or msg.get("epoch", self.epoch) != self.epoch or self.engine is None:
            return
        self.is_engine_ready = True
        self.has_engine_been_ready = True
        self.num_engine_boot_failures = 0
        self.engine_ready_event.set()
        version = msg.get("policy_version")
        log.info(
            "engine epoch %d ready (pid %d) on policy version %s, adapter %s after %.1fs",
            self.epoch, self.engine.pid, version, msg.get("adapter") or "none", self.engine.uptime_s(),
        )  # fmt: skip
        if version != self.swaps.state.policy_version:
            log.warning("engine reports version %s, committed is %d", version, self.swaps.state.policy_version)
        self.publish_state()
        if self.gunicorn is None and self.gunicorn_restart_at is None and not self.is_stopping:
            self.spawn_gunicorn()

    def on_engine_exit(self, child: Child, returncode: int) -> None:
        was_ready = self.is_engine_ready
        if self.followers:
            if not self.is_stopping:
                log.warning("engine epoch %d: %s (pid %d) %s; stopping the other ranks to restart "
                            "the group", child.epoch, "rank 0" if child is self.engine else child.role,
                            child.pid, describe_exit(returncode))
            self._kill_ranks(spare=child)
        self.engine = None
        self.is_engine_ready = False
        self.engine_ready_event.clear()
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.is_stopping:
            log.info("engine epoch %d exited (%s)", child.epoch, describe_exit(returncode))
            return
        self.publish_state()
        how = describe_exit(returncode)
        if not was_ready:
            tail = log_tail(os.path.join(self.run_dir, ENGINE_LOG), since=self._engine_log_at)
            if not self.has_engine_been_ready:
                self.fail_boot(f"the engine failed to start ({how}); last lines of engine.log:\n{tail}")
                return
            self.num_engine_boot_failures += 1
            if self.num_engine_boot_failures >= MAX_ENGINE_BOOT_FAILURES:
                self.fail_boot(
                    f"the engine failed to restart {self.num_engine_boot_failures} times in a row "
                    f"({how}); last lines of engine.log:\n{tail}"
                )
                return
        delay = self.engine_backoff.next_delay(child.uptime_s())
        self.engine_restart_at = time.monotonic() + delay
        log.warning(
            "engine epoch %d (pid %d) %s after %.1fs; restarting in %.1fs on policy version %d",
            child.epoch, child.pid, how, child.uptime_s(), delay, self.swaps.state.policy_version,
        )  # fmt: skip

    def check_engine(self) -> None:
        if self.is_stopping or not self.is_running:
            return
        now = time.monotonic()
        if self.engine is None:
            if self.engine_restart_at is not None and now >= self.engine_restart_at:
                self.engine_restarts += 1
                self._published = ""  # the count changed: write it even if the state did not
                self.publish_state()
                self.spawn_engine()
            return
        if not self.is_engine_ready:
            limit = ENGINE_RESTART_TIMEOUT_S if self.has_engine_been_ready else ENGINE_BOOT_TIMEOUT_S
            if self.engine.uptime_s(now) > limit:
                log.error("engine epoch %d not ready after %.0fs; killing it", self.epoch, limit)
                self._signal_child(self.engine, signal.SIGKILL)
            return
        silent_s = self.ipc.heartbeat_age_s()
        if silent_s is not None and silent_s > ENGINE_HEARTBEAT_TIMEOUT_S:
            log.error(
                "engine epoch %d (pid %d) sent no heartbeat for %.1fs; killing it",
                self.epoch, self.engine.pid, silent_s,
            )  # fmt: skip
            self._signal_child(self.engine, signal.SIGKILL)

    # ------------------------------------------------------------------ API (gunicorn)

    def spawn_gunicorn(self) -> None:
        env = child_env(os.environ, self.run_dir)
        api_log = os.path.join(self.run_dir, API_LOG)
        self._api_log_at = log_size(api_log)
        try:
            self.gunicorn = spawn(
                "gunicorn", self.api_cmd(self.config), env, api_log,
                death_signal=signal.SIGINT,  # quick shutdown: the workers let go of the port at once
            )  # fmt: skip
        except OSError as e:
            self.fail_boot(f"could not start gunicorn: {e}")
            return
        self.gunicorn_restart_at = None
        self._record_children()
        log.info("gunicorn master started: pid %d, %d workers", self.gunicorn.pid, self.config.workers)
        if not self.is_healthy:
            self._spawn_task(self._wait_healthy())

    def on_gunicorn_exit(self, child: Child, returncode: int) -> None:
        self.gunicorn = None
        if self.is_stopping:
            log.info("gunicorn master exited (%s)", describe_exit(returncode))
            return
        # Workers of a killed master notice their new parent and exit; don't wait for them.
        kill_all(self._api_leftovers(), timeout=2.0)
        how = describe_exit(returncode)
        if not self.is_healthy:
            tail = log_tail(os.path.join(self.run_dir, API_LOG), since=self._api_log_at)
            self.fail_boot(f"the API server failed to start ({how}); last lines of api.log:\n{tail}")
            return
        delay = self.gunicorn_backoff.next_delay(child.uptime_s())
        self.gunicorn_restart_at = time.monotonic() + delay
        log.warning("gunicorn master (pid %d) %s; restarting it in %.1fs", child.pid, how, delay)

    def _api_leftovers(self) -> list[psutil.Process]:
        """Processes of this run dir other than us and the engine: after the gunicorn master
        is gone, these are workers that outlived it."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.environ().get(MARK_ENV) == self.run_dir:
                    if proc.pid not in {c.pid for c in self.engine_ranks()}:
                        found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def check_gunicorn(self) -> None:
        if self.is_stopping or not self.is_running:
            return
        now = time.monotonic()
        if self.gunicorn is None:
            if self.gunicorn_restart_at is not None and now >= self.gunicorn_restart_at:
                self.num_gunicorn_restarts += 1
                self.spawn_gunicorn()
        elif not self.is_healthy and self.gunicorn.uptime_s(now) > API_BOOT_TIMEOUT_S:
            self.fail_boot(f"the API did not answer /health within {API_BOOT_TIMEOUT_S:.0f}s; see api.log")

    async def _wait_healthy(self) -> None:
        while self.is_running and not self.is_healthy:
            if is_healthy(await get_health(self.config.host, self.config.port)):
                self.is_healthy = True
                self.publish_state()
                url = f"http://{self.config.host}:{self.config.port}"
                log.info("server healthy at %s (supervisor pid %d)", url, os.getpid())
                self._notify({"ok": True, "pid": os.getpid(), "url": url, "run_dir": self.run_dir})
                return
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ stop

    async def shutdown(self) -> None:
        self.is_stopping = True
        graceful = self.is_graceful
        log.info("stopping (%s)", "graceful" if graceful else "quick")
        self.publish_state()
        if self.gunicorn is not None:
            # gunicorn: SIGTERM finishes open requests (the engine still serves them), SIGINT doesn't.
            self._signal_child(self.gunicorn, signal.SIGTERM if graceful else signal.SIGINT)
            await self._wait_exit(self.gunicorn, GUNICORN_GRACEFUL_S + 10)
            kill_all(self._api_leftovers(), timeout=5.0)
            self.gunicorn = None
        if self.engine is not None:
            if not (self.link is not None and self.is_engine_ready and self.link.stop(drain=graceful)):
                self._signal_child(self.engine, signal.SIGKILL)
            await self._wait_exit(self.engine, ENGINE_STOP_TIMEOUT_S)
            if self.engine.proc.returncode == 0:  # rank 0 released the followers on its way out
                for follower in self.followers:
                    await self._wait_exit(follower, ENGINE_STOP_TIMEOUT_S)
            self._kill_ranks(spare=self.engine)
            self.engine = None
        self._kill_ranks()
        if self.link is not None:
            self.link.close()
            self.link = None
        for task in list(self._tasks):
            task.cancel()
        if self.control_server is not None:
            self.control_server.close()
        self._notify({
            "ok": False,
            "error": self.stop_reason or "the server was stopped before it was healthy",
            "exit_code": self.exit_code or EXIT_ERROR,
        })
        self._remove_run_files()
        log.info("stopped")

    async def _wait_exit(self, child: Child, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while child.proc.poll() is None:
            if time.monotonic() > deadline:
                log.warning("%s (pid %d) did not exit within %.0fs; killing it", child.role, child.pid, timeout)
                child.proc.kill()
                child.proc.wait()
                break
            await asyncio.sleep(0.05)
        log.info("%s (pid %d) exited (%s)", child.role, child.pid, describe_exit(child.proc.returncode))

    def _remove_run_files(self) -> None:
        if self.ipc is not None:
            try:
                self.ipc.destroy()
            except Exception:
                log.exception("removing shared memory failed")
            self.ipc = None
        for name in (protocol.SOCKET_NAME, PID_NAME):
            try:
                os.unlink(os.path.join(self.run_dir, name))
            except FileNotFoundError:
                pass
        remove_children_file(self.run_dir)
        for name in ranks.RANK_FILES:
            try:
                os.unlink(os.path.join(self.run_dir, name))
            except FileNotFoundError:
                pass

    def _emergency_cleanup(self) -> None:
        for child in self.children():
            child.proc.kill()
            child.proc.wait()
        self._remove_run_files()

    def _notify(self, message: dict) -> None:
        """Tell the `mlxsup start` that launched us how the start went (once)."""
        if self._notified or self.notify_fd is None:
            return
        self._notified = True
        try:
            os.write(self.notify_fd, orjson.dumps(message) + b"\n")
            os.close(self.notify_fd)
        except OSError:
            pass
        self.notify_fd = None

    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ control socket

    async def handle_request(self, request: dict) -> dict:
        """Dispatch one control-socket request by its `op`."""
        op = request.get("op")
        if op == "reload_adapter":
            return await self.swaps.reload(request.get("path"), request.get("mode", "drain"), self._ready_link)
        if op == "update_weights":
            return await self.swaps.update_weights(request.get("path"), request.get("mode", "drain"),
                                                   self._ready_link, move=request.get("move") is True)
        if op == "prepare_adapter":
            return await self.swaps.prepare(request.get("path"), self._ready_link,
                                            request.get("ttl_s", PREPARED_TTL_S))
        if op == "commit_prepared":
            version = request.get("policy_version")
            if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
                return error_reply("bad_request", "policy_version must be an integer or null",
                                   field="policy_version")
            return await self.swaps.commit_prepared(request.get("prepared_id"), request.get("mode", "drain"),
                                                    self._ready_link, version)
        if op == "cancel_prepared":
            return await self.swaps.cancel_prepared(request.get("prepared_id"), self._current_link())
        if op == "status":
            return self.status()
        if op == "reset_prefix_cache":
            link = await self._ready_link()
            if link is None:
                return error_reply("engine_unavailable", "the engine is not running")
            try:
                return await link.reset_prefix_cache()
            except EngineGone as e:
                return error_reply("engine_restarted", str(e))
        if op == "stop":
            self.sig_queue.put_nowait("stop")
            return {"ok": True}
        return error_reply("bad_request", f"unknown op {op!r}; expected reload_adapter, update_weights, "
                           "prepare_adapter, commit_prepared, cancel_prepared, reset_prefix_cache, "
                           "status or stop")

    def _current_link(self) -> Optional[EngineControlLink]:
        """The link of the engine if it is ready now (no waiting)."""
        if self.is_engine_ready and self.link is not None and not self.link.closed:
            return self.link
        return None

    async def _ready_link(self) -> Optional[EngineControlLink]:
        """The link of a ready engine, waiting for a restarting one; None when stopping."""
        deadline = time.monotonic() + SWAP_ENGINE_WAIT_S
        while self.is_running and not self.is_stopping and time.monotonic() < deadline:
            if self.is_engine_ready and self.link is not None and not self.link.closed:
                return self.link
            try:
                await asyncio.wait_for(self.engine_ready_event.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        return None

    # ------------------------------------------------------------------ status

    def publish_state(self) -> None:
        """Write the supervisor's state into the control block when it changed (API workers
        refuse new requests while it says "restarting" or "stopping")."""
        state = self._public_state()
        if self.ipc is not None and state != self._published:
            self.ipc.write_supervisor(os.getpid(), state, self.engine_restarts)
            self._published = state

    def _public_state(self) -> str:
        if self.is_stopping or not self.is_running:
            return "stopping"
        if not self.is_healthy:
            return "starting"
        return "running" if self.is_engine_ready else "restarting"

    def process_table(self) -> list[tuple[str, int]]:
        rows = [("supervisor", os.getpid())]
        if self.engine is not None:
            rows.append(("engine", self.engine.pid))
        rows += [(f.role if self._rank_launch_is_local(i + 1) else f"ssh-{f.role}", f.pid)
                 for i, f in enumerate(self.followers)]
        if self.gunicorn is not None:
            rows.append(("api-master", self.gunicorn.pid))
            try:
                workers = psutil.Process(self.gunicorn.pid).children()
            except psutil.Error:
                workers = []
            rows += [("api-worker", w.pid) for w in sorted(workers, key=lambda p: p.pid)]
        return rows

    def sample(self) -> None:
        """Periodic figures for `status`: CPU % windows and the engine's tokens/s."""
        now = time.monotonic()
        if now - self._last_sample < SAMPLE_S:
            return
        self._last_sample = now
        if self.swaps.has_expired():
            self._spawn_task(self.swaps.drop_expired(self._current_link()))
        if self.ipc is not None:
            self.ipc.sample_throughput()
        self.sampler.sample()

    def _rank_launch_is_local(self, rank: int) -> bool:
        return self.group is None or self.group.hosts[rank].is_local

    def rank_rows(self) -> list[dict]:
        """Every rank of the engine: its host, its pid (a remote rank's: the local ssh's) and
        whether that process is alive."""
        if self.group is None:
            hosts = ["localhost"]
        else:
            hosts = [h.name for h in self.group.hosts]
        procs = [self.engine, *self.followers] if self.engine is not None else []
        rows = []
        for rank, host in enumerate(hosts):
            child = procs[rank] if rank < len(procs) else None
            rows.append({
                "rank": rank, "host": host, "pid": child.pid if child is not None else None,
                "alive": child is not None and child.proc.poll() is None,
                "via": "local" if self._rank_launch_is_local(rank) else "ssh",
            })  # fmt: skip
        return rows

    def status(self) -> dict:
        engine = {
            "epoch": self.epoch,
            "restarts": self.engine_restarts,
            "ready": self.is_engine_ready,
            "pid": self.engine.pid if self.engine else None,
            "num_ranks": 1 if self.group is None else self.group.size,
            "distributed_backend": None if self.group is None else self.group.backend,
            "ranks": self.rank_rows(),
        }
        if self.ipc is not None:
            engine.update(self.ipc.engine_stats())
        return {
            "ok": True,
            "state": self._public_state(),
            "healthy": self.is_healthy,
            "instance_id": self.instance_id,
            "run_dir": self.run_dir,
            "host": self.config.host,
            "port": self.config.port,
            "model": self.config.model,
            "workers": self.config.workers,
            "supervisor_pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "policy_version": self.swaps.state.policy_version,
            "adapter": self.swaps.state.adapter_path,
            "weight_updates": [p for p, _ in self.swaps.state.weights],
            "num_swaps": self.swaps.num_swaps,
            "last_swap": self.swaps.last_swap(),
            "api_restarts": self.num_gunicorn_restarts,
            "engine": engine,
            "processes": self.sampler.rows(),
        }
