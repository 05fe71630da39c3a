"""4-bit dequantization, deltatune against bitsandbytes, side by side in one run; prints the ratios.

The same weight is quantized by both (the bytes are identical; the script checks that the two
dequantized tensors are equal), then each dequantizes it ``--repeats`` times and the median
is kept. deltatune's figures:

- ``fresh``: ``quant.dequantize_4bit`` returning a new tensor, as bitsandbytes does;
- ``layer``: what a 4-bit layer's matmul runs: on CPU the same function writing into reused
  buffers (``reuse=True``), on CUDA the Triton kernel (``kernels.nf4_triton.dequantize``).

    python benchmarks/dequant_speed.py --device cpu --json benchmarks/dequant-speed-cpu.json
    python benchmarks/dequant_speed.py --device cuda --json benchmarks/dequant-speed-cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from deltatune.quant.blockwise import dequantize_4bit, quantize_4bit
from tables import dequant_speed_table  # benchmarks/tables.py: the table the docs show

# (out, in): the default model's (SmolLM2-135M) attention and MLP shapes, then Llama-1B/8B shapes
SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (8192, 2048), (2048, 8192), (14336, 4096)]


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def case(shape, quant_type: str, nested: bool, blocksize: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    import bitsandbytes.functional as bnb

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    packed_bnb, state_bnb = bnb.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                              compress_statistics=nested)
    packed, state = quantize_4bit(weight, quant_type, blocksize, nested)
    if device == "cuda":
        from deltatune.kernels import nf4_triton

        def layer():
            return nf4_triton.dequantize(packed, state, dtype)
    else:
        def layer():
            return dequantize_4bit(packed, state, dtype, reuse=True)
    # identical bytes in, identical values out: else the timings would compare different work
    same = torch.equal(bnb.dequantize_4bit(packed_bnb, state_bnb), dequantize_4bit(packed, state, dtype)) \
        and torch.equal(layer(), dequantize_4bit(packed, state, dtype))
    theirs = timed(lambda: bnb.dequantize_4bit(packed_bnb, state_bnb), repeats, device)
    fresh = timed(lambda: dequantize_4bit(packed, state, dtype), repeats, device)
    ours = timed(layer, repeats, device)
    return {"shape": list(shape), "quant_type": quant_type, "double_quant": nested, "blocksize": blocksize,
            "dtype": str(dtype).removeprefix("torch."), "identical_values": same,
            "bitsandbytes_ms": theirs * 1e3, "deltatune_fresh_ms": fresh * 1e3, "deltatune_layer_ms": ours * 1e3,
            "layer_speedup": theirs / ours, "fresh_speedup": theirs / fresh}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per case (default 20 cpu, 100 cuda)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import sys

    import bitsandbytes

    repeats = args.repeats or (100 if args.device == "cuda" else 20)
    dtypes = [torch.bfloat16] if args.device == "cuda" else [torch.float32, torch.bfloat16]
    cases = [case(shape, "nf4", True, 64, dtype, args.device, repeats) for shape in SHAPES for dtype in dtypes]
    cases += [case((2048, 8192), "fp4", False, 64, dtypes[0], args.device, repeats)]
    cases += [case((2048, 8192), "nf4", True, bs, dtypes[0], args.device, repeats) for bs in (32, 256, 4096)]
    cases += [case((576, 1536), "nf4", True, bs, dtypes[0], args.device, repeats) for bs in (32, 256, 4096)]
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        import os

        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor()) + f" ({os.cpu_count()} cores)"
    result = {"device": name, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
              "repeats": repeats, "command": "python benchmarks/dequant_speed.py " + " ".join(sys.argv[1:]),
              "cases": cases}
    print(dequant_speed_table(result))
    if not all(c["identical_values"] for c in cases):
        raise SystemExit("deltatune and bitsandbytes dequantized to different values in some case")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
