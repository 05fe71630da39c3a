"""``deltatune eval``: the base model and each adapter on the same examples, in one loaded model."""

from __future__ import annotations

import contextlib

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..data import DataConfig, DataError
from ..io import load_adapter
from ..adapter_ops import delete_adapter, disable_adapters, get_state, set_adapter, set_adapter_rank
from ..adapters.low_rank.dylora import check_rank
from ..loading import load_model
from ..quant.convert import check_quant_type
from . import metrics as text_metrics
from .examples import load_eval_examples
from .generation import choice_accuracy, generate, perplexity
from .report import table, write_outputs


@dataclass
class EvalConfig:
    """Settings of ``deltatune eval``."""

    adapters: list = field(default_factory=list)
    """Adapter folders (PEFT format) or training run folders."""
    data: str = ""
    """Evaluation data file (formats as in training; the completion / last assistant turn is the reference)."""
    model: str = ""
    """Base model folder or .gguf file; empty: the embedded default."""
    quantize: str = ""
    """Load the base quantized (nf4, fp4, int8)."""
    output_dir: str = "runs/eval"
    """Where predictions.jsonl, metrics.json, report.md and metrics.png go."""
    metrics: list = field(default_factory=lambda: list(text_metrics.METRICS))
    """Metrics: rouge, bleu, chrf, exact_match, token_f1 (perplexity and choice accuracy are always added)."""
    max_new_tokens: int = 64
    """Tokens generated per example at most (generation stops at EOS)."""
    batch_size: int = 8
    """Examples generated together."""
    limit: int = 0
    """Evaluate only the first N examples (0: all)."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    chat_template: bool = False
    """Render prompt/completion records as a one-turn chat (as training's data.chat_template)."""
    seed: int = 0
    """Seed for sampling."""
    ranks: list[int] = field(default_factory=list)
    """DyLoRA adapters: evaluate each one cut to each of these ranks (e.g. 2,4,8,16), rows NAME@rB, with a table and plot of score against rank."""


def _adapter_dir(path: Path) -> tuple[Path, Optional[Path]]:
    """(adapter folder, loss curve) for an adapter folder or a training run folder."""
    if (path / "adapter_config.json").is_file():
        return path, None
    if (path / "adapter" / "adapter_config.json").is_file():
        curve = path / "loss.png"
        return path / "adapter", curve if curve.is_file() else None
    raise FileNotFoundError(f"--adapter {path} holds no adapter: expected adapter_config.json there or in "
                            f"{path}/adapter")


def _name_for(path: Path, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", path.name if path.name != "adapter" else path.parent.name) or "adapter"
    name, n = base, 2
    while name in taken or name == "base":
        name, n = f"{base}-{n}", n + 1
    return name


def check_eval_settings(cfg: EvalConfig, loading: bool = True) -> None:
    """Refuse settings no evaluation can use, before a model loads."""
    if not cfg.data:
        raise DataError("--data FILE is required: the held-out records to generate for")
    if not Path(cfg.data).exists():
        raise DataError(f"--data: {cfg.data} does not exist")
    unknown = [m for m in cfg.metrics if m not in text_metrics.METRICS]
    if unknown:
        raise DataError(f"--metrics: {unknown} not known; choose from {list(text_metrics.METRICS)}")
    for name in ("batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise DataError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} must be at least 1")
    if cfg.limit < 0:
        raise DataError(f"--limit: {cfg.limit} must be 0 (all) or more")
    check_quant_type(cfg.quantize)
    bad = [r for r in cfg.ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise DataError(f"--ranks: {bad} are not ranks; give positive integers, e.g. --ranks 2,4,8,16")
    if loading:
        for raw in cfg.adapters:
            _adapter_dir(Path(raw))  # a folder without an adapter fails now, not after loading


def _check_ranks(config, ranks: list, adapter: str) -> None:
    """Refuse ``--ranks`` for an adapter that cannot be cut to each of them."""
    for rank in ranks:
        try:
            check_rank(config, rank, what=f"--ranks (adapter {adapter})")
        except ValueError as err:
            raise DataError(str(err)) from None


def run_eval(cfg: EvalConfig, model=None, tokenizer=None, log=print, loss_curve: Optional[Path] = None) -> dict:
    """Evaluate base and adapters; write the outputs; return ``{model: {metric: value}}``.

    ``model``/``tokenizer``: evaluate an already loaded model (training does this); its
    adapters are then the ones it has.
    """
    check_eval_settings(cfg, loading=model is None)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    curves: list[Path] = []
    names: list[str] = []
    folders: dict[str, Path] = {}  # adapters loaded one at a time (methods may share modules)
    if model is None:
        model, tokenizer = load_model(cfg.model or None, quantize=cfg.quantize or None)
        for raw in cfg.adapters:
            folder, curve = _adapter_dir(Path(raw))
            name = _name_for(Path(raw), set(names))
            try:  # fail before any evaluation if an adapter does not fit
                load_adapter(model, folder, name=name)
                config = get_state(model).configs[name]
                delete_adapter(model, name)
            except (ValueError, TypeError) as err:
                raise DataError(f"adapter {raw} does not fit this base model: {err}") from None
            _check_ranks(config, cfg.ranks, raw)
            names.append(name)
            folders[name] = folder
            if curve is not None:
                curves.append(curve)
    else:
        names = list(get_state(model).configs)
        for name in names:
            _check_ranks(get_state(model).configs[name], cfg.ranks, name)
        if loss_curve is not None and Path(loss_curve).is_file():
            curves.append(Path(loss_curve))
    if tokenizer is None:
        raise DataError("evaluation needs a tokenizer; the model folder has none")
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    examples = load_eval_examples(cfg.data, tokenizer, DataConfig(chat_template=cfg.chat_template), seq2seq,
                                  cfg.limit)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    results: dict[str, dict[str, float]] = {}
    rows: list[dict] = []
    references = [e.reference for e in examples]
    runs: list[tuple[str, str, Optional[int]]] = [("base", "base", None)]  # (row, adapter, rank)
    for name in names:
        runs += [(f"{name}@r{rank}", name, rank) for rank in cfg.ranks] or [(name, name, None)]
    for who, name, rank in runs:
        if who == "base":
            context = disable_adapters(model)
        else:
            context = _loaded(model, name, folders[name]) if name in folders else _active(model, name)
        with context, _at_rank(model, name, rank):
            predictions = generate(model, tokenizer, examples, cfg.batch_size, cfg.max_new_tokens, seq2seq,
                                   cfg.do_sample, cfg.temperature, cfg.top_p)
            scores = text_metrics.compute(list(cfg.metrics), predictions, references)
            scores["perplexity"] = perplexity(model, examples, cfg.batch_size, pad, seq2seq)
            accuracy = choice_accuracy(model, tokenizer, examples, seq2seq)
            if accuracy is not None:
                scores["choice_accuracy"] = accuracy
        results[who] = scores
        rows += [{"id": e.id, "model": who, "prompt": e.prompt, "prediction": p, "reference": e.reference}
                 for e, p in zip(examples, predictions)]
    out = Path(cfg.output_dir)
    copied = []
    for i, curve in enumerate(curves):
        out.mkdir(parents=True, exist_ok=True)
        target = f"loss-{names[i]}.png" if len(curves) > 1 else "loss.png"
        shutil.copyfile(curve, out / target)
        copied.append(target)
    write_outputs(out, results, rows, copied, ranked=bool(cfg.ranks))
    seconds = time.perf_counter() - started
    log(f"\nevaluated {len(examples)} examples x {len(results)} models in {seconds:.1f}s; "
        f"report: {out / 'report.md'}\n")
    log(table(results))
    return results


@contextlib.contextmanager
def _loaded(model, name: str, folder: Path):
    """Within the block adapter ``name`` is loaded (and active); afterwards the base is as before."""
    load_adapter(model, folder, name=name)
    try:
        yield
    finally:
        delete_adapter(model, name)


@contextlib.contextmanager
def _at_rank(model, name: str, rank: Optional[int]):
    """Within the block DyLoRA adapter ``name`` runs cut to ``rank`` (None: as it is)."""
    if rank is None:
        yield
        return
    set_adapter_rank(model, rank, name)
    try:
        yield
    finally:
        set_adapter_rank(model, None, name)


class _active:
    """Within the block only adapter ``name`` is active; the previous set comes back after."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def __enter__(self):
        from ..adapter_ops import active_adapters

        self.before = active_adapters(self.model)
        set_adapter(self.model, self.name)

    def __exit__(self, *exc):
        set_adapter(self.model, self.before or None)
