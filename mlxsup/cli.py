"""`mlxsup` command line: argparse lives here and in supervisor/cli.py, nowhere deeper."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from mlxsup import __version__


def _demo_model(args: argparse.Namespace) -> int:
    from mlxsup.demo import build_demo_model, default_demo_dir

    out = build_demo_model(args.dir or default_demo_dir(), seed=args.seed, preset=args.preset)
    print(out)
    return 0


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
    if import_error is not None and command is not None and command != "demo-model":
        print(install_hint(import_error), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
