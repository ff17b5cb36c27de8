"""Stand-ins for the engine and the API server, so the supervisor's process management is
tested with real processes, signals and shared memory but without a model.

    python supervisor_fakes.py start  --run-dir D --port P [--foreground]   # the real launcher
    python supervisor_fakes.py engine --run-dir D --control-fd FD --epoch N
    python supervisor_fakes.py api    --port P

Behaviour switches (environment, inherited through the supervisor):
    FAKE_ENGINE=boot_fail        exit 3 before ready
    FAKE_ENGINE=restart_fail     epochs > 1 exit before ready
    FAKE_ENGINE=no_heartbeat     stop writing the control block after ready
    FAKE_ENGINE=slow_boot        take 3 s before ready
    FAKE_API=boot_fail           exit 1 at once
    FAKE_HEARTBEAT_TIMEOUT_S, FAKE_MAX_BOOT_FAILURES   override the supervisor's limits
Swaps: a path whose name starts with "bad" is refused, "slow" takes 0.5 s, "die" kills the
engine mid-swap.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

HERE = os.path.abspath(__file__)


def engine_cmd(config, control_fd: int, epoch: int) -> list[str]:
    return [sys.executable, HERE, "engine", "--run-dir", config.run_dir, "--control-fd", str(control_fd), "--epoch", str(epoch)]


def api_cmd(config) -> list[str]:
    return [sys.executable, HERE, "api", "--port", str(config.port)]


def run_engine(args) -> int:
    from mlxsup.ipc.control import ControlBlock
    from mlxsup.ipc.layout import IpcLayout

    behaviour = os.environ.get("FAKE_ENGINE", "")
    print(f"fake engine epoch {args.epoch} pid {os.getpid()} starting", flush=True)
    if behaviour == "boot_fail" or (behaviour == "restart_fail" and args.epoch > 1):
        print("fake engine: cannot load the model (on purpose)", file=sys.stderr, flush=True)
        return 3
    if behaviour == "slow_boot":
        time.sleep(3.0)
    with open(os.path.join(args.run_dir, "adapter_state.json")) as f:
        state = json.load(f)
    layout = IpcLayout.load(args.run_dir)
    block = ControlBlock.attach(layout.control_name)
    version = state["policy_version"]
    adapter = state["adapter_path"]
    tokens = 0
    lock = threading.Lock()
    beating = True

    def beat():
        nonlocal tokens
        while True:
            with lock:
                if beating:
                    tokens += 10
                    block.write(
                        engine_epoch=args.epoch, engine_pid=os.getpid(), engine_state="ready",
                        policy_version=version, adapter_id=adapter or "", tokens_generated=tokens,
                    )  # fmt: skip
            time.sleep(0.1)

    threading.Thread(target=beat, daemon=True).start()
    sock = socket.socket(fileno=args.control_fd)
    f = sock.makefile("rwb", buffering=0)

    def send(msg):
        f.write(json.dumps(msg).encode() + b"\n")

    send({"op": "ready", "policy_version": version, "adapter": adapter, "epoch": args.epoch})
    if behaviour == "no_heartbeat":
        time.sleep(0.3)
        with lock:
            beating = False
    for line in f:
        msg = json.loads(line)
        if msg["op"] == "stop":
            print(f"fake engine: stop drain={msg['drain']}", flush=True)
            return 0
        if msg["op"] == "swap":
            name = os.path.basename(msg["path"] or "")
            if name.startswith("die"):
                os._exit(9)
            if name.startswith("slow"):
                time.sleep(0.5)
            if name.startswith("bad"):
                send({"op": "swap_done", "id": msg["id"], "ok": False,
                      "error": {"type": "invalid_adapter", "message": f"{name}: shapes do not match"}})  # fmt: skip
                continue
            with lock:
                version, adapter = msg["version"], msg["path"]
            send({"op": "swap_done", "id": msg["id"], "ok": True, "policy_version": version,
                  "prepare_ms": 1.0, "commit_ms": 0.5})  # fmt: skip
    return 0


def run_api(args) -> int:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    if os.environ.get("FAKE_API") == "boot_fail":
        print("fake api: cannot import the app (on purpose)", file=sys.stderr, flush=True)
        return 1

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "healthy", "model_loaded": True}).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    signal.signal(signal.SIGHUP, lambda *a: print("fake api: SIGHUP", flush=True))
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(0)))
    signal.signal(signal.SIGINT, lambda *a: (_ for _ in ()).throw(SystemExit(0)))
    try:
        server.serve_forever(poll_interval=0.1)
    except SystemExit:
        pass
    server.server_close()
    return 0


def run_start(args) -> int:
    from mlxsup.config import ServerConfig
    from mlxsup.supervisor import arbiter, launcher

    # Shorter limits, so tests of a hung or crash-looping engine take seconds.
    arbiter.ENGINE_HEARTBEAT_TIMEOUT_S = float(os.environ.get("FAKE_HEARTBEAT_TIMEOUT_S", arbiter.ENGINE_HEARTBEAT_TIMEOUT_S))
    arbiter.MAX_ENGINE_BOOT_FAILURES = int(os.environ.get("FAKE_MAX_BOOT_FAILURES", arbiter.MAX_ENGINE_BOOT_FAILURES))

    config = ServerConfig(model=args.model, host="127.0.0.1", port=args.port, run_dir=args.run_dir, workers=1)
    return launcher.start(config, foreground=args.foreground, engine_cmd=engine_cmd, api_cmd=api_cmd)


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--control-fd", type=int, required=True)
    e.add_argument("--epoch", type=int, required=True)
    a = sub.add_parser("api")
    a.add_argument("--port", type=int, required=True)
    s = sub.add_parser("start")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--model", default=HERE)  # any existing path: the fake engine loads nothing
    s.add_argument("--foreground", action="store_true")
    args = p.parse_args()
    return {"engine": run_engine, "api": run_api, "start": run_start}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
