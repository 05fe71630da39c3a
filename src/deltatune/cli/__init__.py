"""The ``deltatune`` command: one module per subcommand, each adding its parser; options come
from config dataclasses through ``options`` (field docstrings become ``--help``)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import compare, demo, eval, info, merge, train
from .options import Parser, parse

SUBCOMMANDS = (demo, train, eval, merge, compare, info)


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
    from ..data import DataError
    from ..train import ConfigError

    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, ModuleNotFoundError) as err:
        # Bad input: one clear line instead of a traceback (nothing already written is touched).
        print(f"deltatune {args.command}: error: {err}", file=sys.stderr)
        return 2
