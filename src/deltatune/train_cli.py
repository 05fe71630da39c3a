"""``deltatune train``: options from the ``TrainConfig`` dataclasses (nested ones as ``--group.field``)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import yaml


def _flat_fields(cls, prefix: str = ""):
    """(dotted name, default, docstring) for every leaf field of a config dataclass."""
    from .cli import _field_docs

    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _flat_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", default, docs.get(f.name, "")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    from .train.config import TrainConfig

    parser.add_argument("--config", help="YAML file with settings (flags override it)")
    for name, default, doc in _flat_fields(TrainConfig):
        flags = list(dict.fromkeys(["--" + name.replace("_", "-"), "--" + name]))  # --max-steps, --max_steps
        shown = default if default not in ("", {}) else "none"
        if isinstance(default, bool):
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{doc} (default: {shown})")
        else:
            parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                                help=f"{doc} (default: {shown})")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flags given on the command line, typed: text fields stay text, others are read as YAML scalars."""
    from .train.config import TrainConfig

    out: dict[str, Any] = {}
    for name, default, _ in _flat_fields(TrainConfig):
        if name not in vars(args):
            continue
        value = vars(args)[name]
        # Text fields stay text, except a list or mapping written inline ("[q_proj, v_proj]").
        if isinstance(value, str) and (not isinstance(default, str) or value.lstrip()[:1] in ("[", "{")):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        out[name] = value
    return out


def run_train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    config = load_config(args.config, overrides_from_args(args))
    summary = train(config)
    return 0 if summary.get("steps", 1) > 0 else 1
