"""The reference of the time-to-quality benchmark: a plain training loop with transformers + HF PEFT.

What a user writes by hand: LoRA r=16, alpha 32, dropout 0.05 on all linear layers, float32,
AdamW at a constant learning rate, a fixed number of steps over shuffled examples, the loss on
completions only, examples cut at 512 tokens, no validation. Records are tokenized as deltatune
does (prompt, then completion and EOS; chats through the tokenizer's template), so both tools
learn from the same tokens. Writes the adapter (PEFT format) and ``result.json`` (time per phase,
peak memory, padding share) under ``--out``.

    python benchmarks/quality_loop.py --model DIR --train train.jsonl --steps 80 --out runs/q/loop
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def prompt_and_completion(record: dict, tokenizer) -> tuple[str, str]:
    """The text a model is given and the text it should produce, for chat or prompt/completion records."""
    if "messages" in record:
        messages = record["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt, whole[len(prompt):]
    return record["prompt"], record["completion"]


def tokenize(record: dict, tokenizer, max_len: int) -> tuple[list[int], list[int]]:
    prompt, completion = prompt_and_completion(record, tokenizer)
    chat = "messages" in record
    p = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id  # ends every completion once, as deltatune does (a chat turn may end in it)
    if eos not in (c if chat else c[-1:]):
        c.append(eos)
    return (p + c)[:max_len], ([-100] * len(p) + c)[:max_len]


def right_padded(batch: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` and ``attention_mask`` of (ids, labels) pairs, padded on the right."""
    width = max(len(ids) for ids, _ in batch)
    return {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for _, y in batch]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    loaded = time.perf_counter()
    records = [json.loads(line) for line in Path(args.train).read_text().splitlines() if line.strip()]
    examples = [tokenize(r, tokenizer, args.max_len) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data_done = time.perf_counter()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    order: list[int] = []
    rng = random.Random(args.seed)
    real = padded = 0
    model.train()
    for _ in range(args.steps):
        if len(order) < args.batch:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:args.batch]], order[args.batch:]
        tensors = right_padded(batch, pad)
        real, padded = real + sum(len(ids) for ids, _ in batch), padded + tensors["input_ids"].numel()
        loss = model(**tensors).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    steps_done = time.perf_counter()
    model.save_pretrained(args.out / "adapter")
    ended = time.perf_counter()
    result = {"time_seconds": {"load": loaded - started, "data": data_done - loaded, "steps": steps_done - data_done,
                               "checkpoints": ended - steps_done, "total": ended - started},
              "steps": args.steps, "final_train_loss": loss.item(), "padding_share": 1 - real / padded,
              "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "adapter": str(args.out / "adapter")}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
