"""The one place that turns config dataclasses into command-line flags.

Every field becomes ``--field-name`` (and ``--field_name``); fields of a nested dataclass
become dotted flags (``--lora.r``, ``--data.max-seq-len``) in a help section of their own.
The docstring written under a field is its ``--help`` text. Values are typed by the field's
default: numbers accept any Python spelling (``2e-4``), booleans are ``--x``/``--no-x``,
lists are comma-separated or YAML (``[q_proj, v_proj]``), free-form fields are YAML.

Flags are never guessed from a prefix: ``--data`` is its own flag (``--data.path``), not an
ambiguous abbreviation, and an unknown flag is refused with the closest known one.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import re
from typing import Any, Callable, Iterator, Optional, Sequence

import yaml


class Parser(argparse.ArgumentParser):
    """``argparse`` without prefix matching, whose errors suggest the closest known flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        unknown = re.findall(r"(--?[\w.\-]+)", message.split(":", 1)[1]) if "unrecognized" in message else []
        hints = [hint for flag in unknown if (hint := self.closest_flag(flag))]
        if hints:
            message += "; did you mean " + ", ".join(hints) + "?"
        # one line, as every other bad input gets (the usage block is in --help)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def closest_flag(self, flag: str) -> Optional[str]:
        """The known flag nearest to ``flag`` in spelling, or None when nothing is close."""
        name = flag.split("=", 1)[0]
        known = [s for s in self._option_string_actions if s.startswith("--")]
        match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        return match[0] if match else None


def parse(parser: Parser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse ``argv``; a flag unknown to the chosen subcommand is reported by that subcommand's
    parser, so the suggestion comes from its own flags."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        chosen = _subcommand_parser(parser, getattr(args, "command", None)) or parser
        chosen.error("unrecognized arguments: " + " ".join(extra))
    return args


def _subcommand_parser(parser: argparse.ArgumentParser, command: Optional[str]) -> Optional[Parser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return None


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (a string literal right after the field)."""
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


@dataclasses.dataclass
class Leaf:
    """One settable field: its dotted name, default, help text and declared type."""

    name: str
    default: Any
    doc: str
    declared: str  # the annotation as written: "int", "float", "Any", ...


def leaf_fields(cls, prefix: str = "") -> Iterator[Leaf]:
    """Every leaf field of a config dataclass, nested dataclasses flattened to dotted names."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from leaf_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield Leaf(f"{prefix}{f.name}", default, docs.get(f.name, ""), str(f.type).replace("typing.", ""))


def _yaml_value(text: str) -> Any:
    from ..train.config import read_yaml  # the YAML of config files: 2e-4 is a number

    try:
        return read_yaml(text)
    except yaml.YAMLError:
        return text


def _number(kind: type) -> Callable[[str], Any]:
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            value = float(text)  # 2e-4, 1e3, 1_000.5 ...
            if kind is int:
                if not value.is_integer():
                    raise
                return int(value)  # 1e3 for an int, as in YAML files
            return value

    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return convert


def _list_value(text: str) -> list:
    if text.lstrip().startswith("["):
        value = _yaml_value(text)
        if isinstance(value, list):
            return value
    return [v.strip() for v in text.split(",") if v.strip()]


def _int_list(text: str) -> list:
    values = _list_value(text)
    if not all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in values):
        raise ValueError(text)
    return [int(v) for v in values]


_int_list.__name__ = "list of integers"  # argparse's "invalid list of integers value: 'x'"


def _text_value(text: str) -> Any:
    # A text field stays text, except a list or mapping written inline ("[q_proj, v_proj]").
    return _yaml_value(text) if text.lstrip()[:1] in ("[", "{") else text


def converter(leaf: Leaf) -> Callable[[str], Any]:
    """How the text of a flag becomes the field's value."""
    kind = leaf.declared
    if kind in ("Any", "dict") or kind.startswith("dict["):
        return _yaml_value
    if kind == "bool":
        raise TypeError("booleans are switches, not values")
    if kind in ("int", "float"):
        return _number(int if kind == "int" else float)
    if kind == "list[int]":
        return _int_list
    if kind == "list" or kind.startswith("list["):
        return _list_value
    return _text_value


def _metavar(leaf: Leaf) -> str:
    kind = leaf.declared
    if kind in ("Any", "dict") or kind.startswith("dict["):
        return "YAML"
    return {"int": "N", "float": "X"}.get(kind, "A,B" if kind.startswith("list") else "TEXT")


def add_repeated_flag(parser: argparse.ArgumentParser, cls, field: str, flag: str, metavar: str) -> None:
    """``--flag X --flag Y`` collects into list field ``field`` of ``cls`` (one value per flag, so a
    value may hold commas); add the other fields with ``add_options(..., skip=(field,))``."""
    parser.add_argument(f"--{flag}", dest=field, action="append", default=[], metavar=metavar,
                        help=f"{field_docs(cls)[field]} Repeat for several.")


def add_options(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (),
                aliases: Optional[dict[str, str]] = None, only_given: bool = False) -> None:
    """One flag per leaf field of ``cls``; ``aliases`` adds short flags for dotted fields
    (``{"data": "data.path"}`` makes ``--data FILE`` set ``data.path``). With ``only_given``
    the namespace holds only flags that were typed (for settings merged over a YAML file)."""
    cls_doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None
    groups: dict[str, argparse._ArgumentGroup] = {}
    short = {target: alias for alias, target in (aliases or {}).items()}
    nested_docs = field_docs(cls)
    for leaf in leaf_fields(cls):
        if leaf.name in skip:
            continue
        section, _, _ = leaf.name.rpartition(".")
        if section not in groups:
            title = f"{section}.* options" if section else f"{cls.__name__} options"
            groups[section] = parser.add_argument_group(title, nested_docs.get(section) if section else cls_doc)
        flags = list(dict.fromkeys(["--" + leaf.name.replace("_", "-"), "--" + leaf.name]))
        if leaf.name in short:
            flags.insert(0, "--" + short[leaf.name])
        shown = ",".join(map(str, leaf.default)) if isinstance(leaf.default, list) else leaf.default
        shown = "none" if shown in ("", {}) else shown
        # argparse formats help with %: a docstring's "8%" must reach it as "8%%"
        common = dict(dest=leaf.name, help=f"{leaf.doc} (default: {shown})".replace("%", "%%"),
                      default=argparse.SUPPRESS if only_given else leaf.default)
        if isinstance(leaf.default, bool):
            groups[section].add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        else:
            groups[section].add_argument(*flags, type=converter(leaf), metavar=_metavar(leaf), **common)


def add_config_command(subcommands, name: str, help_text: str, cls, run: Callable[[Any], int]) -> None:
    """A subcommand whose flags are the fields of ``cls``; it calls ``run(config)`` for its exit code."""
    parser = subcommands.add_parser(name, help=help_text)
    add_options(parser, cls)
    parser.set_defaults(func=lambda args: run(config_from_args(args, cls)))


def given_options(args: argparse.Namespace, cls) -> dict[str, Any]:
    """``{dotted name: value}`` for the fields of ``cls`` present in ``args``."""
    present = vars(args)
    return {leaf.name: present[leaf.name] for leaf in leaf_fields(cls) if leaf.name in present}


def config_from_args(args: argparse.Namespace, cls):
    """A flat config dataclass built from the flags ``add_options`` defined."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
