"""The ``deltatune`` command: one module per subcommand, each adding its parser; options come
from config dataclasses through ``options`` (field docstrings become ``--help``)."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from . import bench, compare, demo, eval, info, merge, plan, train
from .options import Parser, parse

SUBCOMMANDS = (demo, train, eval, merge, compare, bench, plan, info)

# What deltatune raises for input it cannot use (ConfigError and DataError are ValueErrors);
# set DELTATUNE_TRACEBACK=1 to see the traceback instead of the one line.
BAD_INPUT = (ValueError, FileNotFoundError, ModuleNotFoundError, NotImplementedError, PermissionError,
             IsADirectoryError, NotADirectoryError)


def build_parser() -> Parser:
    parser = Parser(prog="deltatune", description="Parameter-efficient fine-tuning with adapters.")
    subcommands = parser.add_subparsers(dest="command")
    for module in SUBCOMMANDS:
        module.add_parser(subcommands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
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
