"""``deltatune train``: flags from the ``TrainConfig`` dataclasses, merged over ``--config`` YAML."""

from __future__ import annotations

import argparse
from typing import Any

from .options import add_options, given_options

# Short flags for nested settings, as other fine-tuning tools spell them.
ALIASES = {"data": "data.path"}


def add_parser(subcommands) -> None:
    from ..train.config import TrainConfig

    parser = subcommands.add_parser("train", help="train an adapter (no arguments: LoRA on the default model "
                                    "and data)",
                                    usage="deltatune train [--config FILE] [--data FILE] [--model DIR] "
                                          "[--method NAME] [--lr X] [--epochs X] [--batch-size N] "
                                          "[--output-dir DIR] [other settings, see below]")
    parser.add_argument("--config", help="YAML file with settings (flags override it)")
    add_options(parser, TrainConfig, aliases=ALIASES, only_given=True)
    parser.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings typed on the command line, as ``{dotted name: value}``."""
    from ..train.config import TrainConfig

    return given_options(args, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from ..train import load_config, train

    summary = train(load_config(args.config, overrides_from_args(args)))
    return 0 if summary.get("steps", 1) > 0 else 1
