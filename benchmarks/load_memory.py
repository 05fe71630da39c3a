"""Peak memory of loading the default model in float32 and quantized, each in a fresh process.

Prints, per mode: resident memory before loading (Python, torch, transformers and the Llama
model code imported and warmed up on a tiny model),
the peak while loading and running one 16-token forward pass (which makes every weight
resident, also those transformers maps from the file lazily), the increase, the load time
and the stored bytes of the weights. The tokenizer is not loaded (it costs the same in every
mode).

    python benchmarks/load_memory.py            # fp32, nf4, nf4 without double quant, fp4, int8
    python benchmarks/load_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from tables import load_memory_table  # benchmarks/tables.py: the table docs/quantization.md shows

CHILD = r"""
import json, resource, time, sys
import torch, transformers, deltatune as dt
from deltatune.quant import memory_report
def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
mode = sys.argv[1]
kw = {} if mode == "fp32" else {"quantize": mode.split("-")[0], "quant_double": not mode.endswith("-nodq")}
# Warm-up: load and run a tiny Llama the same way first, so that the model code, its imports
# and the allocator's pools are in place; what follows is what the default model itself adds.
import gc, tempfile
with tempfile.TemporaryDirectory() as tiny:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tiny)
    warm, _ = dt.load_model(tiny, **kw)
    with torch.no_grad():
        warm(torch.arange(16).view(1, 16))
    del warm
gc.collect()
before = rss_mib()
start = time.perf_counter()
model, _ = dt.load_model(tokenizer=False, **kw)
seconds = time.perf_counter() - start
load_peak = peak_mib()
# transformers may map float32 weights from the file lazily: read one value per 4 KiB page
# so that every weight is resident before we count what the model holds.
with torch.no_grad():
    for t in list(model.parameters()) + [getattr(m, "weight") for m in model.modules() if hasattr(m, "quant_state")]:
        t.reshape(-1)[::1024].float().sum()
resident = rss_mib()
with torch.no_grad():
    model(torch.arange(16).view(1, 16))
rep = memory_report(model)
print(json.dumps({"mode": mode, "before_mib": before, "load_peak_increase_mib": load_peak - before,
                  "resident_increase_mib": resident - before, "forward_peak_increase_mib": peak_mib() - before,
                  "seconds": seconds, "weights_mib": rep.total_bytes / 2**20,
                  "bits_per_quantized_parameter": rep.bits_per_parameter,
                  "quantized_parameters": rep.quantized_parameters}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="fp32,nf4,nf4-nodq,fp4,int8")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    from deltatune.loading import default_model_dir

    default_model_dir()  # convert and cache once, outside the measured processes
    rows = []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("MiB above the process before loading (imports done and warmed up on a tiny Llama):")
    print(load_memory_table(rows), flush=True)  # flushed: a test reads the JSON after it from stdout
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
