"""deltatune against HF PEFT in one run: same model shape, weights, batch and adapter; prints ratios.

Cases: a LoRA and a DoRA training step (forward + backward + AdamW), a mixed-adapter
inference forward (4 LoRA adapters, each row of the batch routed to its own adapter), and,
when bitsandbytes is installed, QLoRA and QDoRA training steps on an NF4 (double-quantized)
base: transformers + bitsandbytes + PEFT against deltatune's own NF4 layers.
Both tools keep adapter weights in the base dtype (PEFT with autocast_adapter_dtype=False).

    python benchmarks/peft_side_by_side.py --device cuda          # a GPU, bf16, 1.1B-parameter Llama shape
    python benchmarks/peft_side_by_side.py --device cpu --small    # a quick CPU check of the script
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from tables import side_by_side_table  # benchmarks/tables.py: the table docs/measured.md shows


def make_base(small: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    if small:
        config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    else:  # the TinyLlama-1.1B shape
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device: str) -> tuple[float, float]:
    """(median seconds per call, peak memory in GiB) over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return sorted(times)[len(times) // 2], peak


def train_step_fn(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_training(base, ids, rank, use_dora, args):
    import peft

    results = {}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", use_dora=use_dora),
        autocast_adapter_dtype=False).train()
    results["peft"] = timed(train_step_fn(theirs, ids), args.steps, args.warmup, args.device)
    del theirs
    ours = copy.deepcopy(base)
    dt.add_adapter(ours, dt.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", use_dora=use_dora))
    ours.train()
    results["deltatune"] = timed(train_step_fn(ours, ids), args.steps, args.warmup, args.device)
    del ours
    return results


def bench_mixed(base, ids, rank, args):
    import peft

    names = [f"a{i}" for i in range(4)]
    rows = [names[i % 4] for i in range(ids.shape[0])]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, target_modules="all-linear", init_lora_weights=False), adapter_name=names[0],
        autocast_adapter_dtype=False)
    for n in names[1:]:
        theirs.add_adapter(n, peft.LoraConfig(r=rank, target_modules="all-linear", init_lora_weights=False))
    theirs.eval()

    def peft_fwd():
        with torch.no_grad():
            theirs(input_ids=ids, adapter_names=rows)
    results = {"peft": timed(peft_fwd, args.steps, args.warmup, args.device)}
    del theirs
    ours = copy.deepcopy(base)
    for n in names:
        dt.add_adapter(ours, dt.LoraConfig(r=rank, target_modules="all-linear", init_lora_weights=False), name=n)

    def dt_fwd():
        with dt.adapter_per_row(ours, rows), torch.no_grad():
            ours(input_ids=ids)
    results["deltatune"] = timed(dt_fwd, args.steps, args.warmup, args.device)
    return results


def bench_qlora(base, ids, rank, use_dora, args):
    import tempfile

    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = next(base.parameters()).dtype
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=dtype)
        theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config, dtype=dtype,
                                                      device_map=args.device)
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                             use_dora=use_dora), autocast_adapter_dtype=False)
        results["peft"] = timed(train_step_fn(theirs.train(), ids), args.steps, args.warmup, args.device)
        del theirs
        _free(args.device)
        ours, _ = dt.load_model(folder, dtype=dtype, quantize="nf4", device=args.device, tokenizer=False)
        dt.add_adapter(ours, dt.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                           use_dora=use_dora))
        results["deltatune"] = timed(train_step_fn(ours.train(), ids), args.steps, args.warmup, args.device)
        del ours
        _free(args.device)
    return results


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a tiny model, to check the script quickly")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    base = make_base(args.small, dtype, args.device)
    base.requires_grad_(False)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=args.device)
    tokens = args.batch * args.seq
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    cases = {
        "LoRA r=16 train step": bench_training(base, ids, args.rank, False, args),
        "DoRA r=16 train step": bench_training(base, ids, args.rank, True, args),
        "4 LoRA adapters, per-row routing, forward": bench_mixed(base, ids, args.rank, args),
    }
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bitsandbytes is not installed: QLoRA cases skipped")
    else:
        cases["QLoRA (NF4) r=16 train step"] = bench_qlora(base, ids, args.rank, False, args)
        cases["QDoRA (NF4) r=16 train step"] = bench_qlora(base, ids, args.rank, True, args)
    print(f"\ndevice: {device_name}; dtype {dtype}; batch {args.batch} x {args.seq} tokens; "
          f"{sum(p.numel() for p in base.parameters()) / 1e9:.2f}B-parameter Llama shape")
    table = {}
    for case, res in cases.items():
        (tp, mp), (td, md) = res["peft"], res["deltatune"]
        table[case] = {"peft_tokens_per_s": tokens / tp, "deltatune_tokens_per_s": tokens / td,
                       "speedup": tp / td, "peft_peak_gib": mp, "deltatune_peak_gib": md}
    results = {"device": device_name, "batch": args.batch, "seq": args.seq, "cases": table}
    print(side_by_side_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
