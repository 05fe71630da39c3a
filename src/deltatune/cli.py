"""The ``deltatune`` command. Each subcommand's options come from a dataclass whose field
docstrings become the ``--help`` text."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
from typing import Optional, Sequence


def _field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (a string literal after the field)."""
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One option per field of ``cls`` (lists as comma-separated values), its docstring as help."""
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        flag = f"--{f.name.replace('_', '-')}"
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = f"{docs.get(f.name, '')} (default: {shown})"
        if type_name == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif type_name == "list":
            parser.add_argument(flag, type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
                                default=default, metavar="A,B", help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[type_name]
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def _info(_: argparse.Namespace) -> int:
    import torch
    import transformers

    from . import __version__
    from .models import describe_default

    facts = {"deltatune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
             "cuda": torch.cuda.is_available(), "default_model": describe_default()}
    print(json.dumps(facts, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
    result = run_demo(cfg)
    return 0 if result["reload_equal"] and result["last_loss"] < result["first_loss"] else 1


def _merge(args: argparse.Namespace) -> int:
    from .merge_cli import MergeConfig, run_merge

    run_merge(MergeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MergeConfig)}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train_cli import run_train

    return run_train(args)


def _eval(args: argparse.Namespace) -> int:
    from .eval_cli import run_eval_command

    return run_eval_command(args)


def _compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, run_compare

    rows = run_compare(CompareConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompareConfig)}))
    return 0 if all("error" not in r for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig
    from .merge_cli import MergeConfig

    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning with adapters.")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="teach the embedded default model a few facts with LoRA (about a minute on CPU)")
    _add_dataclass_options(demo, DemoConfig)
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train an adapter (no arguments: LoRA on the default model and data)")
    from .train_cli import add_train_options

    add_train_options(train)
    train.set_defaults(func=_train)
    evaluate = sub.add_parser("eval", help="generate with the base model and adapters on held-out data; "
                              "ROUGE/BLEU/chrF/exact match/F1/perplexity side by side")
    from .eval_cli import add_eval_options

    add_eval_options(evaluate)
    evaluate.set_defaults(func=_eval)
    merge = sub.add_parser("merge", help="merge an adapter into its base and write a plain Hugging Face folder; "
                           "prints the merge error")
    _add_dataclass_options(merge, MergeConfig)
    merge.set_defaults(func=_merge)
    from .compare import CompareConfig

    compare = sub.add_parser("compare", help="train several methods on the same job and step budget; "
                             "one table of parameters, file size, memory, time and held-out scores, plus a plot")
    _add_dataclass_options(compare, CompareConfig)
    compare.set_defaults(func=_compare)
    info = sub.add_parser("info", help="versions, device and the default model's cache")
    info.set_defaults(func=_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    from .data import DataError
    from .train import ConfigError

    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, ModuleNotFoundError) as err:
        # Bad input: one clear line instead of a traceback (nothing already written is touched).
        print(f"deltatune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
