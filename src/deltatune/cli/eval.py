"""``deltatune eval``: options from ``EvalConfig`` (field docstrings become ``--help``)."""

from __future__ import annotations

import argparse

from .options import add_options, add_repeated_flag, config_from_args


def add_parser(subcommands) -> None:
    from ..evaluate import EvalConfig

    parser = subcommands.add_parser("eval", help="generate with the base model and adapters on held-out data; "
                                    "ROUGE/BLEU/chrF/exact match/F1/perplexity side by side")
    # Adapters are given one flag each (--adapter A --adapter B), the rest as usual.
    add_repeated_flag(parser, EvalConfig, "adapters", "adapter", "DIR")
    add_options(parser, EvalConfig, skip=("adapters",))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import EvalConfig, run_eval

    run_eval(config_from_args(args, EvalConfig))
    return 0
