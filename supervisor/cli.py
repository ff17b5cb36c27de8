"""`mlxsup start | stop | status | reload-adapter | update-weights`: argparse at the edge, converted at once
into `ServerConfig` (start) or a run directory (the others). Flags are documented in
docs/cli.md; the seed's flags keep the seed's names and defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from mlxsup.config import LOG_LEVELS, PIPELINE_MODES, SWAP_MODES, ServerConfig, default_run_dir

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
RELOAD_TIMEOUT_S = 3600.0  # a drain swap waits for the longest sequence in flight


def add_subcommands(sub) -> None:
    """Add the server's subcommands to the `mlxsup` parser's subparsers."""
    start = sub.add_parser(
        "start",
        help="start a server (in the background; returns once it is healthy)",
        description="Start the rollout server: the supervisor, one engine and the API workers.",
    )
    add_start_arguments(start)
    start.set_defaults(func=_start)

    stop = sub.add_parser("stop", help="stop a server gracefully and wait until nothing of it remains")
    _add_instance_arguments(stop)
    stop.add_argument("--timeout", type=float, default=120.0, help="seconds to wait before killing (default: 120)")
    stop.set_defaults(func=_stop)

    status = sub.add_parser("status", help="processes, versions and load of a running server")
    _add_instance_arguments(status)
    status.add_argument("--json", action="store_true", help="print the full status as JSON")
    status.set_defaults(func=_status)

    reload = sub.add_parser(
        "reload-adapter",
        help="swap the LoRA adapter of a running server; prints the new policy version",
    )
    reload.add_argument("path", nargs="?", help="adapter directory (adapter_config.json + adapters.safetensors)")
    reload.add_argument("--base", action="store_true", help="go back to the base model (no adapter)")
    reload.add_argument(
        "--mode",
        choices=SWAP_MODES,
        default="drain",
        help="drain (default): finish in-flight sequences first; abort: end them; "
        "inflight: swap between two decode steps",
    )
    _add_instance_arguments(reload)
    reload.add_argument("--json", action="store_true", help="print the supervisor's reply as JSON")
    reload.set_defaults(func=_reload, parser=reload)

    update = sub.add_parser(
        "update-weights",
        help="replace model weights (all or any subset) of a running server; prints the new policy version",
        description="Commit the parameters held in the safetensors files of DIR (any subset of the "
        "model's, named as mlx_lm.load accepts them) on the adapters' version counter.",
    )
    update.add_argument("dir", help="directory of .safetensors files")
    update.add_argument(
        "--mode",
        choices=SWAP_MODES,
        default="drain",
        help="drain (default): finish in-flight sequences first; abort: end them; "
        "inflight: swap between two decode steps",
    )
    _add_instance_arguments(update)
    update.add_argument("--json", action="store_true", help="print the supervisor's reply as JSON")
    update.set_defaults(func=_update_weights)


def add_start_arguments(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    seed = p.add_argument_group("the seed's flags")
    seed.add_argument("--model", default=None, help="MLX model directory or Hugging Face repo id (default: the built-in demo model)")
    seed.add_argument("--adapter-path", default=None, help="LoRA adapter to serve from the start (policy version 0)")
    seed.add_argument("--host", default=d["host"], help=f"address to listen on (default: {d['host']})")
    seed.add_argument("--port", type=int, default=d["port"], help=f"port to listen on (default: {d['port']})")
    seed.add_argument("--max-batch", type=int, default=d["max_batch"], help=f"most sequences decoding at once (default: {d['max_batch']})")
    seed.add_argument(
        "--flush-interval-ms", type=float, default=d["flush_interval_ms"],
        help=f"how long an idle engine waits to gather arrivals (default: {d['flush_interval_ms']:g})",
    )  # fmt: skip
    seed.add_argument("--max-tokens", type=int, default=d["max_tokens"], help=f"default max_tokens of a request (default: {d['max_tokens']})")
    seed.add_argument("--trust-remote-code", action="store_true", help="let the tokenizer run code shipped with the model")
    seed.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default=d["log_level"],
        help=f"logging level (default: {d['log_level']})",
    )  # fmt: skip
    more = p.add_argument_group("server")
    more.add_argument("--workers", type=int, default=d["workers"], help=f"API worker processes (default: {d['workers']})")
    more.add_argument("--run-dir", default="", help="run directory (default: ~/.cache/mlxsup/run-<port>)")
    more.add_argument("--max-queue", type=int, default=d["max_queue"], help=f"requests waiting in the engine before 503 (default: {d['max_queue']})")
    more.add_argument("--foreground", action="store_true", help="run in this terminal instead of as a daemon")
    more.add_argument("--blas", choices=("auto", "off"), default=d["blas"], help="preload an optimized BLAS into the engine on Linux (default: auto)")
    more.add_argument(
        "--pipeline", choices=PIPELINE_MODES, default=d["pipeline"],
        help="on: queue each decode step before reading the last (host and device overlap); off: "
             "finish each step first (an adapter swap reaches new tokens one step sooner); "
             "auto (default): on for a GPU; on the CPU off while decode steps take over 25 ms, "
             "on while they take under 15 ms",
    )  # fmt: skip
    more.add_argument(
        "--prefill-chunk", type=int, default=d["prefill_chunk"], metavar="TOKENS",
        help="prefill at most this many prompt tokens per engine step and the rest in the next "
             "steps, while running sequences keep decoding: bounds how long one step (and the "
             "wait for a swap's step boundary) can take (default: 0, whole prompts at once)",
    )  # fmt: skip
    more.add_argument(
        "--kv-cache-gb", type=float, default=d["kv_cache_gb"], metavar="GB",
        help="one KV memory budget (GiB) for the running batch and the prefix cache: admission "
             "waits while it is full, a request that can never fit is refused (default: 0, half "
             "of the memory the weights leave: Metal's recommended working set on a Mac)",
    )  # fmt: skip
    more.add_argument("--no-prefix-cache", action="store_true",
                      help="keep no prompt KV for later requests (every prompt is prefilled whole)")
    sec = p.add_argument_group("security")
    # The environment variables keep keys out of the command line, which any local user can read with ps.
    sec.add_argument("--api-key", default=os.environ.get("MLXSUP_API_KEY") or None,
                     help="required as a Bearer token on every route but /health (or env MLXSUP_API_KEY)")
    sec.add_argument("--admin-key", default=os.environ.get("MLXSUP_ADMIN_KEY") or None,
                     help="required on adapter routes (default: loopback clients only; or env MLXSUP_ADMIN_KEY)")
    sec.add_argument("--adapter-root", default=None, help="/load_adapter paths must resolve inside this directory")
    sec.add_argument("--header-timeout", type=float, default=d["header_timeout_s"],
                     help=f"seconds a new connection may take to send its request line and headers "
                          f"before it is closed (default: {d['header_timeout_s']:g})")
    sec.add_argument("--max-upload-mb", type=int, default=d["max_upload_mb"], help=f"largest /upload_adapter body (default: {d['max_upload_mb']})")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The `start` flags as a ServerConfig (raises ValueError on invalid values)."""
    return ServerConfig(
        model=args.model,
        adapter_path=args.adapter_path,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        flush_interval_ms=args.flush_interval_ms,
        max_tokens=args.max_tokens,
        trust_remote_code=args.trust_remote_code,
        log_level=args.log_level,
        workers=args.workers,
        run_dir=os.path.abspath(os.path.expanduser(args.run_dir)) if args.run_dir else "",
        max_queue=args.max_queue,
        api_key=args.api_key,
        admin_key=args.admin_key,
        adapter_root=args.adapter_root,
        max_upload_mb=args.max_upload_mb,
        blas=args.blas,
        header_timeout_s=args.header_timeout,
        pipeline=args.pipeline,
        prefill_chunk=args.prefill_chunk,
        kv_cache_gb=args.kv_cache_gb,
        no_prefix_cache=args.no_prefix_cache,
    )


def _add_instance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default="", help="run directory of the server (default: that of --port)")
    p.add_argument("--port", type=int, default=_DEFAULTS["port"], help=f"port of the server (default: {_DEFAULTS['port']})")


def run_dir_of(args: argparse.Namespace) -> str:
    return os.path.abspath(os.path.expanduser(args.run_dir or default_run_dir(args.port)))


# ---------------------------------------------------------------------- commands


def _start(args: argparse.Namespace) -> int:
    from mlxsup.supervisor import launcher

    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"mlxsup start: {e}", file=sys.stderr)
        return 2
    return launcher.start(config, foreground=args.foreground)


def _stop(args: argparse.Namespace) -> int:
    from mlxsup.supervisor import launcher

    return launcher.stop(run_dir_of(args), timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    from mlxsup.supervisor import protocol
    from mlxsup.supervisor.rundir import is_owned
    from mlxsup.supervisor.status import format_status

    run_dir = run_dir_of(args)
    reply = None
    if is_owned(run_dir):
        try:
            reply = protocol.call(run_dir, {"op": "status"}, timeout=10.0)
        except protocol.ControlError as e:
            print(f"mlxsup status: {e}", file=sys.stderr)
            return 1
    if reply is None:
        if args.json:
            print(json.dumps({"running": False, "run_dir": run_dir}))
        else:
            print(f"mlxsup: no server is running in {run_dir}")
        return 1
    reply["running"] = True
    print(json.dumps(reply, indent=2) if args.json else format_status(reply))
    return 0


def _reload(args: argparse.Namespace) -> int:
    if args.base == (args.path is not None):
        args.parser.error("give an adapter PATH or --base")
    path = None if args.base else os.path.abspath(os.path.expanduser(args.path))
    return _swap_command("reload-adapter", {"op": "reload_adapter", "path": path, "mode": args.mode}, args)


def _update_weights(args: argparse.Namespace) -> int:
    path = os.path.abspath(os.path.expanduser(args.dir))
    return _swap_command("update-weights", {"op": "update_weights", "path": path, "mode": args.mode}, args)


def _swap_command(name: str, request: dict, args: argparse.Namespace) -> int:
    """Send a swap request to the supervisor; print the new version (stdout) and a line."""
    from mlxsup.supervisor import protocol

    run_dir = run_dir_of(args)
    try:
        reply = protocol.call(run_dir, request, timeout=RELOAD_TIMEOUT_S)
    except protocol.ControlError as e:
        print(f"mlxsup {name}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0 if reply.get("ok") else 1
    if not reply.get("ok"):
        err = reply.get("error") or {}
        print(f"mlxsup {name}: {err.get('type')}: {err.get('message')}", file=sys.stderr)
        return 1
    print(reply["policy_version"])
    print(f"mlxsup: {reply.get('message')} as policy version {reply['policy_version']}", file=sys.stderr)
    return 0
