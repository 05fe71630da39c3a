"""What autograd keeps for backward in one LoRA step on the default model, with and without
``cheap_recompute``: the bytes of every distinct storage saved, grouped by shape, and the
forward + backward time. Writes ``benchmarks/saved-activations-cpu.json``.

    python benchmarks/saved_activations.py            # about two minutes on 2 CPU cores
    python benchmarks/saved_activations.py --model DIR --rows 2 --tokens 16   # a quick look
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def measure(model, loss_fn, batch: dict, recompute: bool, repeats: int) -> dict:
    """Saved bytes (distinct storages, parameters left out) and fwd+bwd seconds of one setting."""
    from deltatune.train.recompute import cheap_recompute

    state = cheap_recompute(model) if recompute else None
    saved: dict[int, tuple] = {}

    def count(t):
        kept = getattr(t, "tensor", t)  # what the recompute hooks keep as a tensor
        if isinstance(kept, torch.Tensor) and not isinstance(kept, torch.nn.Parameter):
            storage = kept.untyped_storage()
            saved[storage.data_ptr()] = (storage.nbytes(), tuple(kept.shape))
        return t

    seconds = []
    for _ in range(repeats):
        saved.clear()
        if state is not None:
            pack = state.pack
            state.pack = lambda t, pack=pack: count(pack(t))
            context = state.saving()
        else:
            context = torch.autograd.graph.saved_tensors_hooks(count, lambda t: t)
        started = time.perf_counter()
        with context:
            loss = loss_fn(batch)
        loss.backward()
        seconds.append(time.perf_counter() - started)
        if state is not None:
            state.pack = pack
        model.zero_grad(set_to_none=True)
    if state is not None:
        state.remove()
    by_shape: collections.Counter = collections.Counter()
    for nbytes, shape in saved.values():
        by_shape[str(shape)] += nbytes
    return {"saved_bytes": sum(n for n, _ in saved.values()), "seconds": seconds,
            "median_seconds": statistics.median(seconds[1:] or seconds),
            "by_shape": dict(by_shape.most_common(12))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "saved-activations-cpu.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    import deltatune
    from deltatune.hardware import set_cpu_threads
    from deltatune.loading import default_model_dir
    from deltatune.loss import IGNORE_INDEX, TrainingLoss

    set_cpu_threads()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model or str(default_model_dir()), dtype=torch.float32)
    deltatune.add_adapter(model, deltatune.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                      target_modules="all-linear"))
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (args.rows, args.tokens))
    mask = torch.ones_like(ids)
    mask[0, -args.tokens // 12:] = 0  # one row padded, as in a batch of mixed lengths
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, : args.tokens // 5] = IGNORE_INDEX  # a prompt that is not trained
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    loss_fn = TrainingLoss(model)
    runs = {name: measure(model, loss_fn, batch, name == "cheap_recompute", args.repeats)
            for name in ("kept", "cheap_recompute")}
    result = {"machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
              "versions": {"torch": torch.__version__}, "rows": args.rows, "tokens": args.tokens, "runs": runs,
              "saved_ratio": runs["cheap_recompute"]["saved_bytes"] / runs["kept"]["saved_bytes"],
              "time_ratio": runs["cheap_recompute"]["median_seconds"] / runs["kept"]["median_seconds"]}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, run in runs.items():
        print(f"{name:16s} saved {run['saved_bytes'] / 2**30:.3f} GiB, forward+backward {run['median_seconds']:.2f} s")
    print(f"ratio: saved {result['saved_ratio']:.2f}x, time {result['time_ratio']:.2f}x")


if __name__ == "__main__":
    main()
