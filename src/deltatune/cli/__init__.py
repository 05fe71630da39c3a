"""The ``deltatune`` command: one module per subcommand, each adding its parser; options come
from config dataclasses through ``options`` (field docstrings become ``--help``)."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from ..allocator import relaunch_with_allocator

# the subcommand modules, in --help's order (imported by build_parser: they bring in torch)
SUBCOMMANDS = ("demo", "train", "eval", "merge", "compare", "bench", "plan", "serve", "export", "info")

# What deltatune raises for input it cannot use (ConfigError and DataError are ValueErrors);
# set DELTATUNE_TRACEBACK=1 to see the traceback instead of the one line.
BAD_INPUT = (ValueError, FileNotFoundError, ModuleNotFoundError, NotImplementedError, PermissionError,
             IsADirectoryError, NotADirectoryError)


def build_parser():
    """The ``deltatune`` parser with every subcommand's options."""
    import importlib

    from .options import Parser

    parser = Parser(prog="deltatune", description="Parameter-efficient fine-tuning with adapters.")
    subcommands = parser.add_subparsers(dest="command")
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(subcommands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``deltatune`` command: ``argv`` (default: this process's arguments, and then the
    process may first run itself again under a better memory allocator)."""
    if argv is None:
        try:
            relaunch_with_allocator(sys.argv[1:])
        except FileNotFoundError as err:  # a DELTATUNE_ALLOCATOR that names no library
            print(f"deltatune: error: {err}", file=sys.stderr)
            return 2
    from .options import parse

    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except BAD_INPUT as err:
        if os.environ.get("DELTATUNE_TRACEBACK"):
            raise
        # Bad input: one clear line instead of a traceback (nothing already written is touched).
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"deltatune {args.command}: error: {message}", file=sys.stderr)
        return 2
