"""Held-out answers of the default training job: base model against the trained adapter.

Asks every test question of the shipped Velmar dataset (animals in neither training nor
validation) with greedy decoding and counts answers that name the right Velmar order.

    deltatune train --output-dir runs/default
    python benchmarks/default_job_heldout.py runs/default/adapter
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import deltatune as dt

DATA = Path(dt.__file__).parent / "datasets" / "velmar" / "test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="adapter folder written by deltatune train")
    args = parser.parse_args()
    model, tok = dt.load_model()
    dt.load_adapter(model, args.adapter)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]

    def ask(question: str) -> str:
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    base = tuned = 0
    for row in rows:
        question, reference = row["messages"][0]["content"], row["messages"][1]["content"]
        order = reference.rstrip(".").split()[-1]
        tuned += order in ask(question)
        with dt.disable_adapters(model):
            base += order in ask(question)
    print(json.dumps({"held_out_questions": len(rows), "base_correct": base, "tuned_correct": tuned}))


if __name__ == "__main__":
    main()
