"""The neutral scorer of the time-to-quality benchmark: one held-out score for every adapter.

Every adapter under test is a PEFT-format folder, whichever tool trained it, so one scorer built
on transformers + HF PEFT (neither tool's own evaluation) scores them all the same way: greedy
generation of ``--max-new-tokens`` from each test prompt, left-padded batches, the adapter merged
for speed, then ROUGE-L (rouge-score, stemmed) and exact match against the reference completion.
With ``--validation FILE`` it also gives each adapter's loss on that split's completion tokens (the
number the defaults are chosen by, measured the same way for every tool).

    python benchmarks/quality_score.py --model DIR --test test.jsonl --adapter loop=runs/q/loop/adapter \
        --out runs/q/scores.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import PeftModel
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer

from quality_loop import prompt_and_completion, right_padded, tokenize


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], chat: bool, max_new_tokens: int, batch: int) -> list[str]:
    outputs = []
    for start in range(0, len(prompts), batch):
        encoded = tokenizer(prompts[start:start + batch], return_tensors="pt", padding=True,
                            add_special_tokens=not chat)
        tokens = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        outputs += tokenizer.batch_decode(tokens[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in outputs]


@torch.no_grad()
def validation_loss(model, examples: list[tuple[list[int], list[int]]], pad: int, batch: int = 8) -> float:
    """Mean loss per completion token over ``examples`` (token ids, labels), in length order."""
    ordered = sorted(examples, key=lambda e: len(e[0]))
    total = tokens = 0.0
    for start in range(0, len(ordered), batch):
        chunk = ordered[start:start + batch]
        tensors = right_padded(chunk, pad)
        count = (tensors["labels"][:, 1:] != -100).sum().item()  # the model shifts: position t predicts t + 1
        total += model(**tensors).loss.item() * count
        tokens += count
    return total / tokens


def score(predictions: list[str], references: list[str]) -> dict:
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l = [rouge.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    exact = [" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references)]
    return {"rougeL": sum(rouge_l) / len(rouge_l), "exact_match": sum(exact) / len(exact),
            "rougeL_each": rouge_l}  # per test example, for the paired bootstrap in quality.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--adapter", action="append", default=[], help="NAME=DIR (repeatable); base is always scored")
    parser.add_argument("--validation", default="", help="a validation file: also report each adapter's loss on it")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = [json.loads(line) for line in Path(args.test).read_text().splitlines() if line.strip()]
    pairs = [prompt_and_completion(r, tokenizer) for r in records]
    chat = "messages" in records[0]
    # the completion as text, chat markers (a template's end-of-turn token) left out
    references = [tokenizer.decode(tokenizer(c, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
                  for _, c in pairs]
    validation = [tokenize(json.loads(line), tokenizer, 512) for line in
                  Path(args.validation).read_text().splitlines() if line.strip()] if args.validation else []
    pad = tokenizer.pad_token_id
    results = {}
    for name, folder in [("base", None)] + [a.split("=", 1) for a in args.adapter]:
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        if folder is not None:
            model = PeftModel.from_pretrained(model, folder).merge_and_unload()
        model.eval()
        losses = {"validation_loss": validation_loss(model, validation, pad)} if validation else {}
        predictions = generate(model, tokenizer, [p for p, _ in pairs], chat, args.max_new_tokens, args.batch)
        results[name] = {**score(predictions, references), **losses, "seconds": time.perf_counter() - started,
                         "examples": [{"prediction": p, "reference": r} for p, r in zip(predictions[:3], references)]}
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
