"""`mlxsup` command line: argparse lives here and in supervisor/cli.py, nowhere deeper."""

from __future__ import annotations

import argparse
import sys

from mlxsup import __version__


def _demo_model(args: argparse.Namespace) -> int:
    from mlxsup.demo import build_demo_model, default_demo_dir

    out = build_demo_model(args.dir or default_demo_dir(), seed=args.seed, preset=args.preset)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
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

    try:
        from mlxsup.supervisor.cli import add_subcommands
    except ImportError:
        pass
    else:
        add_subcommands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
