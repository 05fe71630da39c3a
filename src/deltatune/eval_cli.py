"""``deltatune eval``: options from ``EvalConfig`` (field docstrings become ``--help``)."""

from __future__ import annotations

import argparse
import dataclasses


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    from .cli import _add_dataclass_options, _field_docs
    from .evaluate import EvalConfig

    # Adapters are given one flag each (--adapter A --adapter B), the rest as usual.
    parser.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="DIR",
                        help=f"{_field_docs(EvalConfig)['adapters']} Repeat for several.")
    _add_dataclass_options(parser, EvalConfig, skip=("adapters",))


def run_eval_command(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, run_eval

    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})
    run_eval(cfg)
    return 0
