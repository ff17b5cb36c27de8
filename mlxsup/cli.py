"""`mlxsup` command line: argparse lives here and in supervisor/cli.py, nowhere deeper."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from mlxsup import __version__
from mlxsup.config import SWAP_MODES


def _demo_model(args: argparse.Namespace) -> int:
    from mlxsup.demo import build_demo_model, default_demo_dir

    out = build_demo_model(args.dir or default_demo_dir(), seed=args.seed, preset=args.preset)
    print(out)
    return 0


def _fleet_reload(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from mlxsup.fleet import FleetClient, FleetSwapError, read_replicas

    if args.base == (args.path is not None):
        args.parser.error("give an adapter PATH or --base")
    urls = list(args.replica or [])
    if args.replicas_file:
        try:
            urls += read_replicas(args.replicas_file)
        except (OSError, ValueError) as e:
            args.parser.error(str(e))
    if not urls:
        args.parser.error("give the replicas: --replica URL (repeatable) or --replicas-file FILE")
    path = None if args.base else args.path  # a path on the replicas' file systems, sent as given

    async def run():
        async with FleetClient(urls, api_key=args.api_key, admin_key=args.admin_key,
                               timeout=args.timeout) as fleet:
            return await fleet.reload_adapter(path, mode=args.mode, skip_unreachable=args.skip_unreachable)

    try:
        swap = asyncio.run(run())
    except ValueError as e:
        args.parser.error(str(e))
    except FleetSwapError as e:
        if args.json:
            print(json.dumps({"ok": False, "phase": e.phase, "policy_version": e.policy_version,
                              "committed": e.committed, "cancelled": e.cancelled, "failed": e.failed}, indent=2))
        print(f"mlxsup fleet reload-adapter: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, "policy_version": swap.policy_version, "committed": swap.committed,
                          "skipped": swap.skipped}, indent=2))
        return 0
    print(swap.policy_version)
    print(f"mlxsup: policy version {swap.policy_version} committed on {len(swap.committed)} replica(s)"
          + "".join(f"\nmlxsup: skipped {u}: {why}" for u, why in swap.skipped.items()), file=sys.stderr)
    return 0


def _add_fleet(sub) -> None:
    fleet = sub.add_parser("fleet", help="several servers serving one policy (docs/scaling.md)")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", metavar="COMMAND", required=True)
    reload = fleet_sub.add_parser(
        "reload-adapter",
        help="swap the adapter on every replica together (prepare on all, then commit on all); "
             "prints the new policy version",
        description="Prepare the adapter on every replica; once all have, commit it on every replica "
                    "as one policy version. A replica that fails to prepare cancels it everywhere.")
    reload.add_argument("path", nargs="?", help="adapter directory, the same path on every replica's disk (sent as given: a "
                             "relative path resolves on the server, against its --adapter-root)")
    reload.add_argument("--base", action="store_true", help="go back to the base model (no adapter)")
    reload.add_argument("--replica", action="append", metavar="URL",
                        help="a replica's base URL, e.g. http://10.0.0.2:8000 (repeatable)")
    reload.add_argument("--replicas-file", metavar="FILE", help="replica URLs, one per line (# comments)")
    reload.add_argument("--mode", choices=SWAP_MODES, default="drain",
                        help="commit mode on every replica (default: drain)")
    reload.add_argument("--skip-unreachable", action="store_true",
                        help="leave out replicas that give no HTTP answer (down) instead of failing")
    reload.add_argument("--admin-key", default=os.environ.get("MLXSUP_ADMIN_KEY"),
                        help="the replicas' --admin-key (default: $MLXSUP_ADMIN_KEY)")
    reload.add_argument("--api-key", default=os.environ.get("MLXSUP_API_KEY"),
                        help="the replicas' --api-key (default: $MLXSUP_API_KEY)")
    reload.add_argument("--timeout", type=float, default=600.0,
                        help="seconds for one replica's prepare or commit (default: 600)")
    reload.add_argument("--json", action="store_true", help="print the outcome per replica as JSON")
    reload.set_defaults(func=_fleet_reload, parser=reload)


def install_hint(error: ImportError) -> str:
    """Why the server commands are missing and how to get them: a source checkout run without
    installing (`mlxsup.supervisor` lives in supervisor/, which only the install maps), or a
    dependency that is not installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = root if os.path.isfile(os.path.join(root, "pyproject.toml")) else "mlxsup"
    extra = "[cpu]" if sys.platform.startswith("linux") else ""
    command = f"pip install -e '{target}{extra}'" if target != "mlxsup" else f"pip install 'mlxsup{extra}'"
    if extra:
        command += " (with an NVIDIA GPU: [cuda] instead of [cpu])"
    name = getattr(error, "name", None) or ""
    if name.startswith("mlxsup"):
        why = f"{name} is not importable: mlxsup is not installed (a source checkout needs installing first)"
    else:
        why = f"a dependency is missing ({error})"
    return (f"mlxsup: the server commands (start, stop, status, reload-adapter) could not be loaded: {why}.\n"
            f"  importing mlxsup.supervisor.cli failed with {type(error).__name__}: {error}\n"
            f"  install mlxsup with its dependencies: {command}")


def build_parser() -> argparse.ArgumentParser:
    return _build_parser()[0]


def _build_parser() -> tuple[argparse.ArgumentParser, Optional[ImportError]]:
    parser = argparse.ArgumentParser(
        prog="mlxsup",
        description="Rollout server for RL trainers on MLX models.",
    )
    parser.add_argument("--version", action="version", version=f"mlxsup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo-model", help="write the built-in random-weight demo model")
    demo.add_argument("dir", nargs="?", help="output directory (default: the cache used by `start`)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--preset", default="demo", help="tiny, demo (default), bench75m, bench1b")
    demo.set_defaults(func=_demo_model)
    _add_fleet(sub)

    try:
        from mlxsup.supervisor.cli import add_subcommands
    except ImportError as e:  # `main` says so when a command is asked for; --help shows it too
        parser.epilog = install_hint(e)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        return parser, e
    add_subcommands(sub)
    return parser, None


def main(argv=None) -> int:
    parser, import_error = _build_parser()
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((w for w in words if not w.startswith("-")), None)
    if import_error is not None and command is not None and command not in ("demo-model", "fleet"):
        print(install_hint(import_error), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
