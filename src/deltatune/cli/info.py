"""``deltatune info``: versions, device, memory allocator and the default model's cache, as JSON."""

from __future__ import annotations

import argparse
import json


def add_parser(subcommands) -> None:
    parser = subcommands.add_parser("info", help="versions, device and the default model's cache")
    parser.set_defaults(func=run)


def run(_: argparse.Namespace) -> int:
    import torch
    import transformers

    from .. import __version__
    from ..allocator import allocator_in_use
    from ..loading import describe_default

    facts = {"deltatune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
             "cuda": torch.cuda.is_available(), "allocator": allocator_in_use(), "default_model": describe_default()}
    print(json.dumps(facts, indent=2))
    return 0
