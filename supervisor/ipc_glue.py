"""The supervisor's handle on the instance's IPC objects (segments, doorbells, control block):
it creates them at start, writes the supervisor region of the control block, reads the
engine's heartbeat and counters, and destroys everything at stop."""

from __future__ import annotations

import time
from typing import Optional

from mlxsup.ipc.control import ControlBlock, TokenRate, prefix_cache_json
from mlxsup.ipc.layout import IpcLayout
from mlxsup.ipc.segments import create_ipc


class SupervisorIpc:
    def __init__(self, layout: IpcLayout):
        self.layout = layout
        self.resources = create_ipc(layout)
        self.control: ControlBlock = self.resources.control
        self._rate = TokenRate(window_s=0.0, min_span_s=0.0)  # from one sample to the next

    def write_supervisor(self, pid: int, state: str, engine_restarts: int) -> None:
        self.control.write(supervisor_pid=pid, supervisor_state=state, engine_restarts=engine_restarts)

    def heartbeat_age_s(self) -> Optional[float]:
        """Seconds since the engine last wrote the control block (None if it never did)."""
        snap = self.control.read()
        if not snap.heartbeat_ns:
            return None
        return snap.heartbeat_age_s()

    def sample_throughput(self) -> None:
        """Update `tokens_per_s` from the engine's generated-token counter."""
        snap = self.control.read()
        self._rate.sample(time.monotonic(), snap.engine_epoch, snap.tokens_generated)

    @property
    def tokens_per_s(self) -> float:
        return self._rate.tokens_per_s

    def engine_stats(self) -> dict:
        snap = self.control.read()
        return {
            "state": snap.engine_state,
            "engine_pid": snap.engine_pid,
            "policy_version": snap.policy_version,
            "adapter_id": snap.adapter_id,
            "queue_depth": snap.queue_depth,
            "running": snap.num_running,
            "tokens_generated": snap.tokens_generated,
            "prefill_tokens": snap.prefill_tokens,
            "num_requests": snap.num_requests,
            "prefix_cache": prefix_cache_json(snap),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "heartbeat_age_s": round(snap.heartbeat_age_s(), 2) if snap.heartbeat_ns else None,
        }

    def destroy(self) -> None:
        self.resources.destroy()


def create(run_dir: str, instance_id: str, num_slots: int) -> SupervisorIpc:
    return SupervisorIpc(IpcLayout(run_dir=run_dir, instance_id=instance_id, num_slots=num_slots))
