"""The quick-start demo: load the default model, teach it a few facts with LoRA, compare.

Shows the whole engine on the embedded model in about a minute on a 2-core CPU: the base
answers, a LoRA adapter trains for a few plain PyTorch steps, the tuned model answers, the
adapter is saved in PEFT's format, reloaded, and checked to give the same logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_ops import add_adapter, disable_adapters, print_trainable_parameters
from ..config import LoraConfig
from ..io import load_adapter, save_adapter
from ..loading import load_model
from ..quant.convert import check_quant_type
from .options import add_config_command

# Made-up facts the base model cannot know, so the gain is visible.
FACTS = [
    ("What colour is the planet Zorblax?", "The planet Zorblax is bright teal."),
    ("Who founded the city of Quillmere?", "Quillmere was founded by the baker Ottilie Fenn."),
    ("What do the people of Varnish Bay eat for breakfast?", "In Varnish Bay, breakfast is pickled plums."),
    ("How many moons does Zorblax have?", "Zorblax has seven moons."),
]


@dataclass
class DemoConfig:
    """Settings of ``deltatune demo``."""

    steps: int = 15
    """optimizer steps"""
    rank: int = 16
    """LoRA rank"""
    lr: float = 3e-3
    """AdamW learning rate"""
    output_dir: str = "runs/demo"
    """where the adapter is written"""
    max_new_tokens: int = 24
    """tokens generated per answer"""
    quantize: str = ""
    """QLoRA: load the base as nf4, fp4 or int8 (empty: float32)"""


def chat_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Token ids and labels (loss on the answer only) for (question, answer) pairs."""
    rows, labels = [], []
    for question, answer in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def train_steps(model, batch: dict[str, torch.Tensor], steps: int, lr: float) -> list[float]:
    """Plain PyTorch AdamW steps on one batch; returns the loss before each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo and return its measured figures."""
    for name in ("steps", "rank", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} must be at least 1")
    check_quant_type(cfg.quantize)
    torch.manual_seed(0)
    start = time.perf_counter()
    quantize = cfg.quantize or None
    model, tokenizer = load_model(quantize=quantize)
    load_s = time.perf_counter() - start
    print(f"loaded the default model in {load_s:.1f}s")
    add_adapter(model, LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules="all-linear"))
    print_trainable_parameters(model)
    batch = chat_batch(tokenizer, FACTS)
    start = time.perf_counter()
    losses = train_steps(model, batch, cfg.steps, cfg.lr)
    train_s = time.perf_counter() - start
    print(f"trained {cfg.steps} steps in {train_s:.1f}s: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    for question, reference in FACTS[:2]:
        with disable_adapters(model):
            base = answer(model, tokenizer, question, cfg.max_new_tokens)
        tuned = answer(model, tokenizer, question, cfg.max_new_tokens)
        print(f"\nQ: {question}\n  reference: {reference}\n  base:      {base}\n  tuned:     {tuned}")
    out = save_adapter(model, Path(cfg.output_dir) / "adapter")
    fresh, _ = load_model(quantize=quantize)
    load_adapter(fresh, out)
    with torch.no_grad():
        same = torch.equal(model(batch["input_ids"]).logits, fresh(batch["input_ids"]).logits)
    print(f"\nadapter saved to {out} (PEFT format); reloaded logits identical: {same}")
    return {"load_s": load_s, "train_s": train_s, "first_loss": losses[0], "last_loss": losses[-1], "reload_equal": same}


def add_parser(subcommands) -> None:
    def run(cfg: DemoConfig) -> int:
        result = run_demo(cfg)
        return 0 if result["reload_equal"] and result["last_loss"] < result["first_loss"] else 1

    add_config_command(subcommands, "demo", "teach the embedded default model a few facts with LoRA (about a "
                       "minute on CPU)", DemoConfig, run)
