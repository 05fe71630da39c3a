"""Shared by the serving tests: a tiny chat model with saved adapters of several methods, and the
offline greedy output each request must match."""

from __future__ import annotations

from pathlib import Path

import torch

import deltatune as dt
from tiny_models import randomize_adapter, tiny_chat_model_dir

# name -> config; a soft-prompt adapter (prompt) is batched apart from the routable ones
# name -> config. A module holds adapters of one method, so the methods target different modules
# and can share every forward pass; "prompt" (soft prompts) is batched apart, "wide" (LoRA on every
# linear layer) overlaps LoHa and IA3 and so takes turns with them.
METHODS = {
    "lora": lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False),
    "dora": lambda: dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False),
    "loha": lambda: dt.LoHaConfig(r=2, target_modules=["o_proj", "gate_proj"]),
    "ia3": lambda: dt.IA3Config(target_modules=["up_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=3),
    "wide": lambda: dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
}


def build_served(root: Path, tokenizer, names=tuple(METHODS), seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """(model folder, {adapter name: folder}) under ``root``; every adapter has random weights."""
    model_dir = tiny_chat_model_dir(root / "model", tokenizer, seed=seed)
    folders = {}
    for i, name in enumerate(names):
        model, _ = dt.load_model(model_dir)
        dt.add_adapter(model, METHODS[name](), name="default")
        randomize_adapter(model, seed=10 + i)
        if name == "prompt":  # soft prompts start at random values; make them count
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.mul_(20)
        folders[name] = dt.save_adapter(model, root / "adapters" / name)
    return model_dir, folders


def offline_greedy(model_dir: Path, folder, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """``generate`` with one adapter alone (``folder`` None: the base), batch of one, greedy."""
    model, tokenizer = dt.load_model(model_dir)
    if folder is not None:
        dt.load_adapter(model, folder, name="only")
        dt.set_adapter(model, "only")
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    tokens = out[0, len(prompt_ids):].tolist()
    eos = tokenizer.eos_token_id
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens
