"""``deltatune eval``: options from ``EvalConfig`` (field docstrings become ``--help``)."""

from __future__ import annotations

import argparse
import dataclasses


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    from .cli import _field_docs
    from .evaluate import EvalConfig

    docs = _field_docs(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        if f.name == "adapters":
            parser.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="DIR",
                                help=f"{docs[f.name]} Repeat for several.")
        elif f.name == "metrics":
            parser.add_argument(flag, type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                                default=default, metavar="A,B", help=f"{docs[f.name]} (default: {','.join(default)})")
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{docs[f.name]} (default: {default})")
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                help=f"{docs[f.name]} (default: {default or 'none'})")


def run_eval_command(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, run_eval

    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})
    run_eval(cfg)
    return 0
