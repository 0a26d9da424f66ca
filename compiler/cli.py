"""The `tapernorm` command. Each subcommand lives beside the code it drives and registers itself
through an `add_cli(subparsers)` function that sets `func` on its parser."""
from __future__ import annotations

import argparse
import importlib
import sys

# module (relative to tapernorm) -> owns one or more subcommands via add_cli(subparsers)
_SUBCOMMAND_MODULES = [
    "compiler.train",       # train, eval, plot
    "compiler.pipeline",    # compile, demo
    "runtime.generate",     # generate
]


class CliError(Exception):
    """An error to print as one line and exit 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="tapernorm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"tapernorm.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("tapernorm."):
                continue  # subcommand not built yet
            raise
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, dispatch, turn expected errors into one clear line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tapernorm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, CliError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"tapernorm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
