"""`mlxsup start | stop | status | reload-adapter | update-weights`: argparse at the edge, converted at once
into `ServerConfig` (start) or a run directory (the others). Flags are documented in
docs/cli.md; the seed's flags keep the seed's names and defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from mlxsup.config import SWAP_MODES, ServerConfig, default_run_dir

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
    _add_swap_mode_argument(reload)
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
    _add_swap_mode_argument(update)
    _add_instance_arguments(update)
    update.add_argument("--json", action="store_true", help="print the supervisor's reply as JSON")
    update.set_defaults(func=_update_weights)


def _add_swap_mode_argument(parser) -> None:
    parser.add_argument(
        "--mode",
        choices=SWAP_MODES,
        default="drain",
        help="drain (default): finish in-flight sequences first; abort: end them; "
        "inflight: swap between two decode steps",
    )


def config_flags(cls=ServerConfig) -> list[tuple[dataclasses.Field, dict]]:
    """The fields of `cls` that are `mlxsup start` flags, with their `flag(...)` metadata, in
    --help's order. Every field must say whether it is a flag (mlxsup.config.flag / no_flag)."""
    out = []
    for f in dataclasses.fields(cls):
        if "cli" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} must be declared with flag(...) or no_flag(...)")
        if f.metadata["cli"] is not None:
            out.append((f, f.metadata["cli"]))
    return out


def flag_name(f: dataclasses.Field, meta: dict) -> str:
    return meta["flag"] or "--" + f.name.replace("_", "-")


def _abs_path(text: str) -> str:
    return os.path.abspath(os.path.expanduser(text)) if text else ""


def add_start_arguments(p: argparse.ArgumentParser) -> None:
    """The `start` flags, one per ServerConfig field declared with `flag(...)`, plus
    --foreground (how to start, not what: no field)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, meta in config_flags():
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        kwargs = {k: v for k, v in meta.items() if k not in ("flag", "help", "group", "env", "path")}
        name = flag_name(f, meta)
        default = (os.environ.get(meta["env"]) or f.default) if meta.get("env") else f.default
        kwargs.update(dest=f.name, default=default, help=meta["help"].format(default=f.default))
        if f.type in (bool, "bool"):
            kwargs["action"] = "store_true"
        else:
            if "choices" not in kwargs:  # argparse would name the value after the dest
                kwargs.setdefault("metavar", name[2:].replace("-", "_").upper())
            if meta.get("path"):
                kwargs["type"] = _abs_path
            elif "type" not in kwargs and f.type in (int, float, "int", "float"):
                kwargs["type"] = {"int": int, "float": float}.get(f.type, f.type)
        group.add_argument(name, **kwargs)
        if f.name == "max_queue":  # where --help has always listed it
            group.add_argument("--foreground", action="store_true", help="run in this terminal instead of as a daemon")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The `start` flags as a ServerConfig (raises ValueError on invalid values)."""
    return ServerConfig(**{f.name: getattr(args, f.name) for f, _ in config_flags()})


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
