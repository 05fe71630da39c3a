"""The tasks of the time-to-quality benchmark (`benchmarks/quality.py`), written as JSONL files.

- ``default``: the default job's shipped Velmar files (chat records; train / validation / test).
- ``docstrings``: code summarization built at run time from the Python standard library installed
  on the machine: a function's source (its docstring removed) as the prompt, the first sentence
  of its docstring as the completion. Modules are split between train, validation and test by a
  hash of their name, so no test module is seen in training. The standard library is under the
  PSF License; the base model may have read it in pretraining, which helps every tool alike, so
  the task serves comparisons, not absolute claims. The files depend on the Python version; the
  benchmark records it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sys
import sysconfig
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VELMAR = ROOT / "src" / "deltatune" / "datasets" / "velmar"
PROMPT = "Summarize what this Python function does in one sentence.\n\n{source}\n\nSummary:"
SPLIT_SHARES = (("test", 0.15), ("validation", 0.15))  # the rest of the modules train
SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _split_of(module: str) -> str:
    """train, validation or test for ``module``, fixed by a hash of its name (not by chance)."""
    share = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) / 16 ** 8
    for split, size in SPLIT_SHARES:
        if share < size:
            return split
        share -= size
    return "train"


def _first_sentence(docstring: str) -> str | None:
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    sentence = SENTENCE_END.split(paragraph, maxsplit=1)[0].strip()
    words = sentence.split()
    if not 4 <= len(words) <= 30 or not sentence.endswith(".") or ">>>" in sentence or ":" in sentence[-2:]:
        return None
    return sentence


def _without_docstring(lines: list[str], node: ast.FunctionDef) -> str:
    """The source of ``node`` (from the file's ``lines``), its docstring's lines left out, dedented."""
    doc = node.body[0]
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    kept = lines[start:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    return textwrap.dedent("\n".join(kept))


def module_functions(path: Path, module: str, max_chars: int):
    """Records (prompt, completion, module) of the documented functions in the file ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        lines = text.splitlines()
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__"):
            continue
        doc = ast.get_docstring(node)
        summary = _first_sentence(doc) if doc else None
        if not summary:
            continue
        code = _without_docstring(lines, node)
        body_lines = len(code.splitlines()) - 1
        if 2 <= body_lines and len(code) <= max_chars:
            yield {"prompt": PROMPT.format(source=code), "completion": " " + summary, "module": module}


def build_docstrings(out: Path, n_train: int = 300, n_validation: int = 40, n_test: int = 40,
                     max_chars: int = 1500, seed: int = 0) -> dict[str, Path]:
    """Write train/validation/test JSONL files under ``out``; returns their paths by split."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    by_split: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).with_suffix("").parts
        if parts[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo") \
                or any(p in ("tests", "test") for p in parts):
            continue
        module = ".".join(p for p in parts if p != "__init__")
        by_split[_split_of(module.split(".")[0])].extend(module_functions(path, module, max_chars))
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    files = {}
    out.mkdir(parents=True, exist_ok=True)
    for split, records in by_split.items():
        random.Random(f"{seed}-{split}").shuffle(records)
        if len(records) < sizes[split]:
            raise RuntimeError(f"the standard library gave {len(records)} {split} functions, fewer than "
                               f"{sizes[split]}")
        files[split] = out / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in records[:sizes[split]]))
    return files


def task_files(task: str, out: Path, small: bool = False) -> dict[str, Path]:
    """The train/validation/test files of ``task`` (written under ``out`` when built)."""
    if task == "default":
        return {split: VELMAR / f"{split}.jsonl" for split in ("train", "validation", "test")}
    if task == "docstrings":
        sizes = dict(n_train=24, n_validation=8, n_test=8) if small else {}
        return build_docstrings(out / "docstrings", **sizes)
    raise ValueError(f"unknown task {task!r}; known: default, docstrings")


if __name__ == "__main__":
    files = build_docstrings(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quality/docstrings"))
    print({k: str(v) for k, v in files.items()}, sys.version.split()[0])
